// Pieces shared by the CUDA linear kernels (linear.cu: mma.sync; linear_sm90.cu: wgmma): the
// kernels' arguments, the 16-bit types' conversions, the epilogue, and the shared-memory opt-in.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>

#include "aphrodite/linear.h"
#include "cuda_check.cuh"
#include "internal/linear_cuda.h"

namespace aphrodite::detail::linear_kernels {

// What every linear kernel takes (by value, as a kernel parameter).
struct KernelArgs {
  void* out;
  long long ldo;
  const void* x;
  long long ldx;
  const void* w;
  long long ldw;
  const void* bias;
  long long m, n, k;
  int act;
  int pair_stores;  // out's rows allow 4-byte stores of column pairs
};

inline KernelArgs kernel_args(const LinearCudaArgs& a) {
  KernelArgs k{};
  k.out = a.out;
  k.ldo = a.ldo;
  k.x = a.x;
  k.ldx = a.ldx;
  k.w = a.w;
  k.ldw = a.ldw;
  k.bias = a.bias;
  k.m = a.m;
  k.n = a.n;
  k.k = a.k;
  k.act = static_cast<int>(a.act);
  k.pair_stores = a.ldo % 2 == 0 && reinterpret_cast<std::uintptr_t>(a.out) % 4 == 0;
  return k;
}

// Estimated run time of a tiling Cfg (kBlockM x kBlockN tiles of out), in arbitrary units: each
// SM works through ceil(tiles / SMs) tiles, at a rate that grows with how often the tile reuses
// each loaded fragment (`relative_rate`, an estimate). This trades idle SMs and rows padded up to
// the tile (576 rows are 4.5 tiles of 128 but 9 of 64) against the larger tiles' efficiency.
inline double tiling_cost(long long m, long long n, int sms, int block_m, int block_n,
                          double relative_rate) {
  const long long tiles = ((m + block_m - 1) / block_m) * ((n + block_n - 1) / block_n);
  const long long rounds = (tiles + sms - 1) / sms;
  return static_cast<double>(rounds) * block_m * block_n / relative_rate;
}

template <typename Cfg>
double tiling_cost(long long m, long long n, int sms, double relative_rate) {
  return tiling_cost(m, n, sms, Cfg::kBlockM, Cfg::kBlockN, relative_rate);
}

// Over 48 KiB of dynamic shared memory needs an opt-in per kernel and device: done once per
// device through `done` (a static of the caller's, one per kernel; devices past the mask's 64
// bits opt in every time).
template <typename Kernel>
void allow_dynamic_smem(Kernel kernel, int bytes, int device, std::atomic<std::uint64_t>& done,
                        const char* what) {
  const std::uint64_t bit = device < 64 ? std::uint64_t{1} << device : 0;
  if (bit != 0 && (done.load(std::memory_order_acquire) & bit) != 0) return;
  check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes),
             what);
  done.fetch_or(bit, std::memory_order_release);
}

template <typename T>
struct TypeTraits;

template <>
struct TypeTraits<__nv_bfloat16> {
  using Pair = __nv_bfloat162;
  static __device__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
  static __device__ Pair pair(float a, float b) { return __floats2bfloat162_rn(a, b); }
};

template <>
struct TypeTraits<__half> {
  using Pair = __half2;
  static __device__ float to_float(__half v) { return __half2float(v); }
  static __device__ __half from_float(float v) { return __float2half_rn(v); }
  static __device__ Pair pair(float a, float b) { return __floats2half2_rn(a, b); }
};

__device__ __forceinline__ float activate(float v, int act) {
  if (act == static_cast<int>(Activation::kGeluErf)) {
    return 0.5f * v * (1.0f + erff(v * 0.70710678118654752f));
  }
  if (act == static_cast<int>(Activation::kGeluTanh)) {
    const float y = 0.7978845608028654f * (v + 0.044715f * v * v * v);
    return 0.5f * v * (1.0f + tanhf(y));
  }
  if (act == static_cast<int>(Activation::kQuickGelu)) return v / (1.0f + expf(-1.702f * v));
  return v;
}

// Applies bias and activation to two accumulators of one output row at columns col, col + 1
// (the second only when second_valid) and stores them, as one 4-byte pair when allowed.
template <typename T>
__device__ __forceinline__ void store_pair(T* dst, float v0, float v1, float bias0, float bias1,
                                           int act, bool second_valid, bool pair_store) {
  using Traits = TypeTraits<T>;
  v0 = activate(v0 + bias0, act);
  v1 = activate(v1 + bias1, act);
  if (second_valid && pair_store) {
    *reinterpret_cast<typename Traits::Pair*>(dst) = Traits::pair(v0, v1);
  } else {
    dst[0] = Traits::from_float(v0);
    if (second_valid) dst[1] = Traits::from_float(v1);
  }
}

}  // namespace aphrodite::detail::linear_kernels
