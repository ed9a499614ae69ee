// CUDA linear: out = act(x @ w^T + bias) for float16/bfloat16 with float32 accumulation.
//
// Main path: a tensor-core GEMM with mma.sync m16n8k16. Each 256-thread block computes a
// 128 x 128 tile of out; its 8 warps (2 along M x 4 along N) own 64 x 32 each. K advances in
// steps of 32 through shared memory, double-buffered with cp.async (16-byte copies, zero-filled
// past the edges of x and w, so any M and N work). w in torch's [N, K] layout is exactly the
// "col" operand mma.sync wants, so both tiles are stored [rows][k] and read with ldmatrix, no
// transposes. The epilogue adds the bias and applies the activation to the float32 accumulators
// before the single rounding to the output type.
//
// The 16-byte copies need K, the row strides of x and w to be multiples of 8 elements and both
// base pointers 16-byte aligned; other inputs take a plain one-thread-per-output kernel (correct,
// not fast).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "cuda_check.cuh"
#include "internal/linear_cuda.h"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "the CUDA linear kernels need sm_80 or newer (mma.sync bf16, cp.async)"
#endif

namespace aphrodite::detail {

namespace {

constexpr int kBlockM = 128;
constexpr int kBlockN = 128;
constexpr int kBlockK = 32;
constexpr int kThreads = 256;
constexpr int kWarpM = 64;
constexpr int kWarpN = 32;
constexpr int kMmaTilesM = kWarpM / 16;  // 4
constexpr int kMmaTilesN = kWarpN / 8;   // 4
// Shared-memory rows are padded from 32 to 40 elements (80 bytes): the 8 row addresses of an
// ldmatrix then fall into 8 different 16-byte bank groups (no conflicts), and every row stays
// 16-byte aligned for cp.async.
constexpr int kSmemStride = kBlockK + 8;

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
  return v;
}

__device__ __forceinline__ std::uint32_t smem_address(const void* p) {
  return static_cast<std::uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy; `bytes` 0 fills the destination with zeros.
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, int bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_address(dst)), "l"(src),
               "r"(bytes)
               : "memory");
}

__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void ldmatrix_x4(std::uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_address(p)));
}

template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const std::uint32_t (&a)[4],
                                          std::uint32_t b0, std::uint32_t b1);

template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], const std::uint32_t (&a)[4],
                                                         std::uint32_t b0, std::uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
      "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void mma_16816<__half>(float (&d)[4], const std::uint32_t (&a)[4],
                                                  std::uint32_t b0, std::uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
      "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

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

// Loads one kBlockM x kBlockK tile of `src` (rows [row0, row0 + kBlockM) clipped to `rows`,
// columns [k0, k0 + kBlockK) clipped to k) into `dst` [kBlockM][kSmemStride].
template <typename T>
__device__ __forceinline__ void load_tile(T* dst, const T* src, long long ld, long long row0,
                                          long long rows, long long k0, long long k) {
  constexpr int kChunksPerRow = kBlockK / 8;
  constexpr int kChunks = kBlockM * kChunksPerRow;
  for (int c = threadIdx.x; c < kChunks; c += kThreads) {
    const int r = c / kChunksPerRow;
    const int col = (c % kChunksPerRow) * 8;
    const long long gr = row0 + r;
    const long long gk = k0 + col;
    const bool valid = gr < rows && gk < k;
    // A zero-byte copy reads nothing, but keep the address inside the tensor all the same.
    const T* p = valid ? src + gr * ld + gk : src;
    cp_async_16(dst + r * kSmemStride + col, p, valid ? 16 : 0);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) linear_mma_kernel(KernelArgs args) {
  using Traits = TypeTraits<T>;
  __shared__ __align__(16) T smem_x[2][kBlockM * kSmemStride];
  __shared__ __align__(16) T smem_w[2][kBlockN * kSmemStride];

  const T* x = static_cast<const T*>(args.x);
  const T* w = static_cast<const T*>(args.w);
  const long long m0 = static_cast<long long>(blockIdx.y) * kBlockM;
  const long long n0 = static_cast<long long>(blockIdx.x) * kBlockN;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int warp_m = warp / (kBlockN / kWarpN);  // 0..1
  const int warp_n = warp % (kBlockN / kWarpN);  // 0..3

  float acc[kMmaTilesM][kMmaTilesN][4];
#pragma unroll
  for (int i = 0; i < kMmaTilesM; ++i)
#pragma unroll
    for (int j = 0; j < kMmaTilesN; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;

  const long long k_tiles = (args.k + kBlockK - 1) / kBlockK;
  if (k_tiles > 0) {
    load_tile(smem_x[0], x, args.ldx, m0, args.m, 0, args.k);
    load_tile(smem_w[0], w, args.ldw, n0, args.n, 0, args.k);
    cp_async_commit();
  }
  for (long long kt = 0; kt < k_tiles; ++kt) {
    const int stage = static_cast<int>(kt & 1);
    if (kt + 1 < k_tiles) {
      // The other stage was last read in iteration kt - 1, which ended with a barrier.
      load_tile(smem_x[stage ^ 1], x, args.ldx, m0, args.m, (kt + 1) * kBlockK, args.k);
      load_tile(smem_w[stage ^ 1], w, args.ldw, n0, args.n, (kt + 1) * kBlockK, args.k);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();

    const T* tile_x = smem_x[stage] + (warp_m * kWarpM) * kSmemStride;
    const T* tile_w = smem_w[stage] + (warp_n * kWarpN) * kSmemStride;
#pragma unroll
    for (int kk = 0; kk < kBlockK; kk += 16) {
      std::uint32_t a[kMmaTilesM][4];
#pragma unroll
      for (int i = 0; i < kMmaTilesM; ++i) {
        // Lanes 0-15 address rows 0-15 at k, lanes 16-31 the same rows at k + 8: the four 8x8
        // matrices land as the A fragment's a0..a3.
        ldmatrix_x4(a[i], tile_x + (i * 16 + lane % 16) * kSmemStride + kk + (lane / 16) * 8);
      }
      std::uint32_t b[kMmaTilesN][2];
#pragma unroll
      for (int j = 0; j < kMmaTilesN; j += 2) {
        // Lanes 0-7: features 0-7 at k; 8-15: features 0-7 at k + 8; 16-23 and 24-31: features
        // 8-15 likewise. Gives (b0, b1) of two adjacent n8 tiles.
        std::uint32_t r[4];
        ldmatrix_x4(r, tile_w + (j * 8 + lane % 8 + (lane / 16) * 8) * kSmemStride + kk +
                           ((lane / 8) % 2) * 8);
        b[j][0] = r[0];
        b[j][1] = r[1];
        b[j + 1][0] = r[2];
        b[j + 1][1] = r[3];
      }
#pragma unroll
      for (int i = 0; i < kMmaTilesM; ++i)
#pragma unroll
        for (int j = 0; j < kMmaTilesN; ++j) mma_16816<T>(acc[i][j], a[i], b[j][0], b[j][1]);
    }
    __syncthreads();
  }

  // Epilogue: accumulator e of tile (i, j) sits at row lane/4 (+8 for e >= 2) and column
  // 2 * (lane % 4) (+1 for odd e) of that 16 x 8 tile.
  T* out = static_cast<T*>(args.out);
  const T* bias = static_cast<const T*>(args.bias);
#pragma unroll
  for (int j = 0; j < kMmaTilesN; ++j) {
    const long long col = n0 + warp_n * kWarpN + j * 8 + (lane % 4) * 2;
    if (col >= args.n) continue;
    const bool second = col + 1 < args.n;
    float bias0 = 0.0f, bias1 = 0.0f;
    if (bias != nullptr) {
      bias0 = Traits::to_float(bias[col]);
      if (second) bias1 = Traits::to_float(bias[col + 1]);
    }
#pragma unroll
    for (int i = 0; i < kMmaTilesM; ++i) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const long long row = m0 + warp_m * kWarpM + i * 16 + lane / 4 + half * 8;
        if (row >= args.m) continue;
        const float v0 = activate(acc[i][j][2 * half] + bias0, args.act);
        const float v1 = activate(acc[i][j][2 * half + 1] + bias1, args.act);
        T* dst = out + row * args.ldo + col;
        if (second && args.pair_stores) {
          *reinterpret_cast<typename Traits::Pair*>(dst) = Traits::pair(v0, v1);
        } else {
          dst[0] = Traits::from_float(v0);
          if (second) dst[1] = Traits::from_float(v1);
        }
      }
    }
  }
}

// One thread per output element, float32 accumulation: for shapes and layouts the tiled kernel's
// 16-byte copies cannot take.
template <typename T>
__global__ void linear_simple_kernel(KernelArgs args) {
  using Traits = TypeTraits<T>;
  const long long col = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  const long long row = static_cast<long long>(blockIdx.y) * blockDim.y + threadIdx.y;
  if (row >= args.m || col >= args.n) return;
  const T* x = static_cast<const T*>(args.x) + row * args.ldx;
  const T* w = static_cast<const T*>(args.w) + col * args.ldw;
  float sum = 0.0f;
  for (long long kk = 0; kk < args.k; ++kk) {
    sum = fmaf(Traits::to_float(x[kk]), Traits::to_float(w[kk]), sum);
  }
  if (args.bias != nullptr) sum += Traits::to_float(static_cast<const T*>(args.bias)[col]);
  static_cast<T*>(args.out)[row * args.ldo + col] = Traits::from_float(activate(sum, args.act));
}

bool aligned16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

template <typename T>
void launch(const LinearCudaArgs& a) {
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
  cudaStream_t stream = to_cuda_stream(a.stream);

  const bool tiled =
      a.k % 8 == 0 && a.ldx % 8 == 0 && a.ldw % 8 == 0 && aligned16(a.x) && aligned16(a.w);
  // Rows map to gridDim.y (at most 65535 blocks).
  const long long max_rows = 65535LL * (tiled ? kBlockM : 8);
  if (a.m > max_rows) {
    throw ValueError("linear on CUDA supports at most " + std::to_string(max_rows) +
                     " rows for these inputs, got " + std::to_string(a.m));
  }
  if (tiled) {
    const dim3 grid(static_cast<unsigned>((a.n + kBlockN - 1) / kBlockN),
                    static_cast<unsigned>((a.m + kBlockM - 1) / kBlockM));
    linear_mma_kernel<T><<<grid, kThreads, 0, stream>>>(k);
    check_launch("linear_mma_kernel");
  } else {
    const dim3 block(32, 8);
    const dim3 grid(static_cast<unsigned>((a.n + block.x - 1) / block.x),
                    static_cast<unsigned>((a.m + block.y - 1) / block.y));
    linear_simple_kernel<T><<<grid, block, 0, stream>>>(k);
    check_launch("linear_simple_kernel");
  }
}

}  // namespace

void linear_cuda(const LinearCudaArgs& args) {
  if (args.m == 0 || args.n == 0) return;
  DeviceGuard guard(args.device);
  if (args.dtype == DType::kBFloat16) {
    launch<__nv_bfloat16>(args);
  } else {
    launch<__half>(args);
  }
}

}  // namespace aphrodite::detail
