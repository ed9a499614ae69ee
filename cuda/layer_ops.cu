// CUDA layer ops: RMSNorm (with the residual add), rotary embedding, SiLU-and-multiply, one block
// per row (token), float32 arithmetic rounded to the dtype where HF's eager code stores an
// intermediate tensor (aphrodite/layer_ops.h). Products and sums that torch computes as separate
// ops use __fmul_rn / __fadd_rn, so the compiler cannot contract them into one rounding.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <string>

#include "aphrodite/error.h"
#include "cuda_check.cuh"
#include "internal/layer_ops_kernels.h"

namespace aphrodite::detail {

namespace {

template <typename T>
struct Elem;
template <>
struct Elem<float> {
  static __device__ __forceinline__ float load(float v) { return v; }
  static __device__ __forceinline__ float store(float v) { return v; }
};
template <>
struct Elem<__half> {
  static __device__ __forceinline__ float load(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half store(float v) { return __float2half_rn(v); }
};
template <>
struct Elem<__nv_bfloat16> {
  static __device__ __forceinline__ float load(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 store(float v) { return __float2bfloat16_rn(v); }
};
template <typename T>
__device__ __forceinline__ float round_to(float v) {
  return Elem<T>::load(Elem<T>::store(v));
}

constexpr int kNormThreads = 256;
constexpr int kRotaryThreads = 128;
constexpr int kSiluThreads = 256;

// The sum of v over the block, returned to every thread (blockDim.x a multiple of 32).
__device__ __forceinline__ float block_sum(float v) {
  __shared__ float warp_sums[32];
  for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  v = lane < static_cast<int>(blockDim.x / 32) ? warp_sums[lane] : 0.0f;
  for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// One block per row. With a residual the first pass stores residual = x + residual and the
// second pass normalises it; each thread reads back only what it wrote itself.
template <typename T>
__global__ void __launch_bounds__(kNormThreads) rms_norm_kernel(const RmsNormParams p) {
  using E = Elem<T>;
  const std::int64_t r = blockIdx.x;
  const T* x = static_cast<const T*>(p.x) + r * p.x_stride;
  T* res = p.residual != nullptr ? static_cast<T*>(p.residual) + r * p.residual_stride : nullptr;
  const T* weight = static_cast<const T*>(p.weight);
  float sum_sq = 0.0f;
  for (std::int64_t i = threadIdx.x; i < p.hidden; i += blockDim.x) {
    float v = E::load(x[i]);
    if (res != nullptr) {
      const T sum = E::store(__fadd_rn(v, E::load(res[i])));
      res[i] = sum;
      v = E::load(sum);
    }
    sum_sq = fmaf(v, v, sum_sq);
  }
  const float inv = rsqrtf(block_sum(sum_sq) / static_cast<float>(p.hidden) + p.eps);
  T* out = static_cast<T*>(p.out) + r * p.out_stride;
  for (std::int64_t i = threadIdx.x; i < p.hidden; i += blockDim.x) {
    const float v = E::load(res != nullptr ? res[i] : x[i]);
    const float normed = round_to<T>(__fmul_rn(v, inv));
    out[i] = E::store(__fmul_rn(E::load(weight[i]), normed));
  }
}

// One block per token; a thread rotates the pair (d, d + head_size / 2) of one head of q or k.
template <typename T>
__global__ void __launch_bounds__(kRotaryThreads) rotary_kernel(const RotaryParams p) {
  using E = Elem<T>;
  const std::int64_t t = blockIdx.x;
  const std::int64_t pos = p.positions_int64 ? static_cast<const std::int64_t*>(p.positions)[t]
                                             : static_cast<const std::int32_t*>(p.positions)[t];
  if (pos < 0 || pos >= p.max_positions) return;  // cannot be reported from here
  const int half = p.head_size / 2;
  const float* cos = p.cos + pos * p.head_size;
  const float* sin = p.sin + pos * p.head_size;
  const int q_pairs = p.num_heads * half;
  const int pairs = (p.num_heads + p.num_kv_heads) * half;
  for (int i = threadIdx.x; i < pairs; i += blockDim.x) {
    const bool is_query = i < q_pairs;
    const int j = is_query ? i : i - q_pairs;
    T* row = is_query ? static_cast<T*>(p.query) + t * p.query_stride
                      : static_cast<T*>(p.key) + t * p.key_stride;
    T* x = row + static_cast<std::int64_t>(j / half) * p.head_size;
    const int d = j % half;
    const float x1 = E::load(x[d]);
    const float x2 = E::load(x[d + half]);
    // x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1]; each product rounded.
    const float a1 = round_to<T>(__fmul_rn(x1, round_to<T>(cos[d])));
    const float b1 = round_to<T>(__fmul_rn(-x2, round_to<T>(sin[d])));
    const float a2 = round_to<T>(__fmul_rn(x2, round_to<T>(cos[d + half])));
    const float b2 = round_to<T>(__fmul_rn(x1, round_to<T>(sin[d + half])));
    x[d] = E::store(__fadd_rn(a1, b1));
    x[d + half] = E::store(__fadd_rn(a2, b2));
  }
}

// Rows along x, column chunks along y.
template <typename T>
__global__ void __launch_bounds__(kSiluThreads) silu_and_mul_kernel(const SiluAndMulParams p) {
  using E = Elem<T>;
  const std::int64_t r = blockIdx.x;
  const T* gate = static_cast<const T*>(p.x) + r * p.x_stride;
  const T* up = gate + p.n;
  T* out = static_cast<T*>(p.out) + r * p.out_stride;
  const std::int64_t step = static_cast<std::int64_t>(gridDim.y) * blockDim.x;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.y) * blockDim.x + threadIdx.x; i < p.n;
       i += step) {
    const float g = E::load(gate[i]);
    const float silu = round_to<T>(g / (1.0f + expf(-g)));  // torch's formula, accurate expf
    out[i] = E::store(__fmul_rn(silu, E::load(up[i])));
  }
}

template <template <typename> class Launch, typename Params>
void by_dtype(const Params& p, cudaStream_t stream) {
  switch (p.dtype) {
    case DType::kFloat32:
      return Launch<float>::run(p, stream);
    case DType::kFloat16:
      return Launch<__half>::run(p, stream);
    case DType::kBFloat16:
      return Launch<__nv_bfloat16>::run(p, stream);
    default:
      throw TypeError(std::string("layer ops on CUDA: unsupported dtype ") + dtype_name(p.dtype));
  }
}

// Grid dimension x is limited to 2^31 - 1 blocks: rows and tokens beyond are rejected.
void check_grid_rows(std::int64_t rows, const char* op) {
  if (rows > 0x7fffffffLL) {
    throw ValueError(std::string(op) + " on CUDA supports at most 2^31 - 1 rows, got " +
                     std::to_string(rows));
  }
}

template <typename T>
struct RmsNormLaunch {
  static void run(const RmsNormParams& p, cudaStream_t stream) {
    rms_norm_kernel<T><<<static_cast<unsigned>(p.rows), kNormThreads, 0, stream>>>(p);
    check_launch("rms_norm_kernel");
  }
};
template <typename T>
struct RotaryLaunch {
  static void run(const RotaryParams& p, cudaStream_t stream) {
    rotary_kernel<T><<<static_cast<unsigned>(p.tokens), kRotaryThreads, 0, stream>>>(p);
    check_launch("rotary_kernel");
  }
};
template <typename T>
struct SiluAndMulLaunch {
  static void run(const SiluAndMulParams& p, cudaStream_t stream) {
    const std::int64_t chunks = std::min<std::int64_t>(16, (p.n + kSiluThreads - 1) / kSiluThreads);
    const dim3 grid(static_cast<unsigned>(p.rows), static_cast<unsigned>(chunks));
    silu_and_mul_kernel<T><<<grid, kSiluThreads, 0, stream>>>(p);
    check_launch("silu_and_mul_kernel");
  }
};

}  // namespace

void rms_norm_cuda(const RmsNormParams& p, int device, StreamHandle stream) {
  check_grid_rows(p.rows, "rms_norm");
  DeviceGuard guard(device);
  by_dtype<RmsNormLaunch>(p, to_cuda_stream(stream));
}

void rotary_embedding_cuda(const RotaryParams& p, int device, StreamHandle stream) {
  check_grid_rows(p.tokens, "rotary_embedding");
  DeviceGuard guard(device);
  by_dtype<RotaryLaunch>(p, to_cuda_stream(stream));
}

void silu_and_mul_cuda(const SiluAndMulParams& p, int device, StreamHandle stream) {
  check_grid_rows(p.rows, "silu_and_mul");
  DeviceGuard guard(device);
  by_dtype<SiluAndMulLaunch>(p, to_cuda_stream(stream));
}

}  // namespace aphrodite::detail
