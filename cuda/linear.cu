// CUDA linear: out = act(x @ w^T + bias) for float16/bfloat16 with float32 accumulation.
//
// Main path: a tensor-core GEMM with mma.sync m16n8k16. Each 256-thread block computes one tile
// of out with 8 warps (2 along M x 4 along N); the tile size is chosen per call from the shape and
// the SM count (128 x 256, 192 x 128, 128 x 128 or 64 x 128: see choose_tiling). K advances in
// steps of 32 through a 4-stage ring of shared-memory buffers filled by cp.async (16-byte copies,
// zero-filled past the edges of x and w, so any M and N work), so three tiles are in flight while
// one is multiplied. w in torch's [N, K] layout is exactly the "col" operand mma.sync wants, so
// both tiles are stored [rows][k] and read with ldmatrix, no transposes. The epilogue adds the bias
// and applies the activation to the float32 accumulators before the single rounding to the
// output type.
//
// The 16-byte copies need K, the row strides of x and w to be multiples of 8 elements and both
// base pointers 16-byte aligned; other inputs take a plain one-thread-per-output kernel (correct,
// not fast).
//
// Two more kernels, chosen by default where they apply (see choose_gemm; APHRODITE_CUDA_GEMM
// overrides): a skinny kernel for decode-sized inputs (M <= 16, below) and, on Hopper, wgmma fed
// by TMA (linear_sm90.cu). All three were seen passing the tests on an H200.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "cuda_check.cuh"
#include "internal/linear_cuda.h"
#include "linear_common.cuh"
#include "linear_sm90.cuh"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "the CUDA linear kernels need sm_80 or newer (mma.sync bf16, cp.async)"
#endif

namespace aphrodite::detail {

namespace {

using linear_kernels::activate;
using linear_kernels::KernelArgs;
using linear_kernels::TypeTraits;

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

// One tiling of the tensor-core kernel: a BM x BN tile of out per block of WarpsM x WarpsN warps
// (each owning a (BM / WarpsM) x (BN / WarpsN) sub-tile), K in steps of BK through a ring of
// Stages shared-memory buffers.
template <int BM, int BN, int WarpsM, int WarpsN, int MinBlocksPerSm>
struct Tiling {
  static constexpr int kBlockM = BM;
  static constexpr int kBlockN = BN;
  static constexpr int kBlockK = 32;
  static constexpr int kStages = 4;
  static constexpr int kWarpsN = WarpsN;
  static constexpr int kThreads = 32 * WarpsM * WarpsN;
  static constexpr int kMinBlocksPerSm = MinBlocksPerSm;
  static constexpr int kWarpM = BM / WarpsM;
  static constexpr int kWarpN = BN / WarpsN;
  static constexpr int kMmaTilesM = kWarpM / 16;
  static constexpr int kMmaTilesN = kWarpN / 8;
  // Shared-memory rows are padded from 32 to 40 elements (80 bytes): the 8 row addresses of an
  // ldmatrix then fall into 8 different 16-byte bank groups (no conflicts), and every row stays
  // 16-byte aligned for cp.async.
  static constexpr int kSmemStride = kBlockK + 8;
  // One stage holds the x tile [BM][kSmemStride] followed by the w tile [BN][kSmemStride].
  static constexpr int kStageElems = (BM + BN) * kSmemStride;
  static constexpr int kSmemBytes = kStages * kStageElems * 2;  // 2-byte elements

  static_assert(kWarpM % 16 == 0 && kWarpN % 16 == 0, "warp tiles are whole pairs of n8 tiles");
  static_assert((BM * kBlockK / 8) % kThreads == 0 && (BN * kBlockK / 8) % kThreads == 0,
                "every thread issues the same number of 16-byte copies per tile");
};

// Large tiles, 64 x 64 per warp: the most reuse of each fragment, for grids with many tiles.
using TilingLarge = Tiling<128, 256, 2, 4, 1>;
// 64 x 32 per warp, two blocks per SM: the middle ground.
using TilingMedium = Tiling<128, 128, 2, 4, 2>;
// 96 x 32 per warp: LLaVA's 576 image tokens are exactly 3 row tiles, and 576 x 4096 makes 96
// tiles, one round on 96+ SMs, each three quarters of a large tile.
using TilingTall = Tiling<192, 128, 2, 4, 1>;
// Small tiles, 32 x 32 per warp: more blocks (all SMs busy) and less padding when M is small.
using TilingSmall = Tiling<64, 128, 2, 4, 2>;

// Loads one Rows x kBlockK tile of `src` (rows [row0, row0 + Rows) clipped to `rows`, columns
// [k0, k0 + kBlockK) clipped to k) into `dst` [Rows][kSmemStride].
template <typename T, typename Cfg, int Rows>
__device__ __forceinline__ void load_tile(T* dst, const T* src, long long ld, long long row0,
                                          long long rows, long long k0, long long k) {
  constexpr int kChunksPerRow = Cfg::kBlockK / 8;
  constexpr int kCopiesPerThread = Rows * kChunksPerRow / Cfg::kThreads;
#pragma unroll
  for (int i = 0; i < kCopiesPerThread; ++i) {
    const int c = static_cast<int>(threadIdx.x) + i * Cfg::kThreads;
    const int r = c / kChunksPerRow;
    const int col = (c % kChunksPerRow) * 8;
    const long long gr = row0 + r;
    const long long gk = k0 + col;
    const bool valid = gr < rows && gk < k;
    // A zero-byte copy reads nothing, but keep the address inside the tensor all the same.
    const T* p = valid ? src + gr * ld + gk : src;
    cp_async_16(dst + r * Cfg::kSmemStride + col, p, valid ? 16 : 0);
  }
}

template <typename T, typename Cfg>
__global__ void __launch_bounds__(Cfg::kThreads, Cfg::kMinBlocksPerSm)
    linear_mma_kernel(KernelArgs args) {
  using Traits = TypeTraits<T>;
  constexpr int kStages = Cfg::kStages;
  constexpr int kMmaTilesM = Cfg::kMmaTilesM;
  constexpr int kMmaTilesN = Cfg::kMmaTilesN;
  constexpr int kStride = Cfg::kSmemStride;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* smem = reinterpret_cast<T*>(smem_raw);

  const T* x = static_cast<const T*>(args.x);
  const T* w = static_cast<const T*>(args.w);
  const long long m0 = static_cast<long long>(blockIdx.y) * Cfg::kBlockM;
  const long long n0 = static_cast<long long>(blockIdx.x) * Cfg::kBlockN;
  const int warp = static_cast<int>(threadIdx.x) / 32;
  const int lane = static_cast<int>(threadIdx.x) % 32;
  const int warp_m = warp / Cfg::kWarpsN;
  const int warp_n = warp % Cfg::kWarpsN;

  float acc[kMmaTilesM][kMmaTilesN][4];
#pragma unroll
  for (int i = 0; i < kMmaTilesM; ++i)
#pragma unroll
    for (int j = 0; j < kMmaTilesN; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;

  const int k_tiles = static_cast<int>((args.k + Cfg::kBlockK - 1) / Cfg::kBlockK);
  const auto load_stage = [&](int stage, int kt) {
    T* sx = smem + stage * Cfg::kStageElems;
    T* sw = sx + Cfg::kBlockM * kStride;
    const long long k0 = static_cast<long long>(kt) * Cfg::kBlockK;
    load_tile<T, Cfg, Cfg::kBlockM>(sx, x, args.ldx, m0, args.m, k0, args.k);
    load_tile<T, Cfg, Cfg::kBlockN>(sw, w, args.ldw, n0, args.n, k0, args.k);
  };

  // Prologue: tiles 0 .. kStages - 2 in flight, one commit group each (empty past the end, so
  // the group count below stays uniform).
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < k_tiles) load_stage(s, s);
    cp_async_commit();
  }
  for (int kt = 0; kt < k_tiles; ++kt) {
    // kStages - 1 + kt groups are committed; all but the newest kStages - 2 done means tile kt
    // has landed. The barrier publishes it to every warp and also ends every warp's reads of
    // tile kt - 1, whose buffer the load below refills.
    cp_async_wait<kStages - 2>();
    __syncthreads();
    const int next = kt + kStages - 1;
    if (next < k_tiles) load_stage(next % kStages, next);
    cp_async_commit();

    const T* stage = smem + (kt % kStages) * Cfg::kStageElems;
    const T* tile_x = stage + (warp_m * Cfg::kWarpM) * kStride;
    const T* tile_w = stage + (Cfg::kBlockM + warp_n * Cfg::kWarpN) * kStride;
#pragma unroll
    for (int kk = 0; kk < Cfg::kBlockK; kk += 16) {
      std::uint32_t a[kMmaTilesM][4];
#pragma unroll
      for (int i = 0; i < kMmaTilesM; ++i) {
        // Lanes 0-15 address rows 0-15 at k, lanes 16-31 the same rows at k + 8: the four 8x8
        // matrices land as the A fragment's a0..a3.
        ldmatrix_x4(a[i], tile_x + (i * 16 + lane % 16) * kStride + kk + (lane / 16) * 8);
      }
      std::uint32_t b[kMmaTilesN][2];
#pragma unroll
      for (int j = 0; j < kMmaTilesN; j += 2) {
        // Lanes 0-7: features 0-7 at k; 8-15: features 0-7 at k + 8; 16-23 and 24-31: features
        // 8-15 likewise. Gives (b0, b1) of two adjacent n8 tiles.
        std::uint32_t r[4];
        ldmatrix_x4(
            r, tile_w + (j * 8 + lane % 8 + (lane / 16) * 8) * kStride + kk + ((lane / 8) % 2) * 8);
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
  }

  // Epilogue: accumulator e of tile (i, j) sits at row lane/4 (+8 for e >= 2) and column
  // 2 * (lane % 4) (+1 for odd e) of that 16 x 8 tile.
  T* out = static_cast<T*>(args.out);
  const T* bias = static_cast<const T*>(args.bias);
#pragma unroll
  for (int j = 0; j < kMmaTilesN; ++j) {
    const long long col = n0 + warp_n * Cfg::kWarpN + j * 8 + (lane % 4) * 2;
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
        const long long row = m0 + warp_m * Cfg::kWarpM + i * 16 + lane / 4 + half * 8;
        if (row >= args.m) continue;
        linear_kernels::store_pair(out + row * args.ldo + col, acc[i][j][2 * half],
                                   acc[i][j][2 * half + 1], bias0, bias1, args.act, second,
                                   args.pair_stores != 0);
      }
    }
  }
}

// Decode-sized inputs (M <= 16 rows of x): out^T = w x^T on the tensor cores with the weight as
// the A operand, so that the features fill the MMA's 16-row side and the few tokens its 8-wide
// side, instead of a 64-row tile of mostly zeros. A block of 8 warps computes 16 features for
// every token, its warps taking every 8th 32-element chunk of K (4 chunks in flight per warp), and
// sums their partial results through shared memory; grids have N / 16 blocks, enough to keep every
// SM streaming the weight. No shared-memory staging: each lane loads 16 bytes (8 consecutive
// elements) of feature rows r and r + 8 and of token row r, where r = lane / 4, at K offset
// 8 * (lane % 4) within the chunk. mma.sync assigns K positions to lanes differently (lane q
// holds positions 2q, 2q + 1, 2q + 8, 2q + 9 of each 16), but a dot product does not depend on
// the order of K: elements 0-3 of every lane's load form one m16n8k16 step and elements 4-7 the
// next, for the weight and the tokens alike, so both operands see the same permutation of K.
constexpr int kSkinnyWarps = 8;
constexpr int kSkinnyUnroll = 4;
constexpr long long kSkinnyMaxRows = 16;

// A 16-byte read-only load; `once` (the weight, read once) keeps it out of L1, where the
// tokens' rows, read by every block, stay.
__device__ __forceinline__ uint4 load_16(const void* p, bool once) {
  uint4 v;
  if (once) {
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p));
  } else {
    asm volatile("ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p));
  }
  return v;
}

// TokenTiles: 8-token groups (1 for M <= 8, 2 for M <= 16).
template <typename T, int TokenTiles>
__global__ void __launch_bounds__(32 * kSkinnyWarps) linear_skinny_kernel(KernelArgs args) {
  using Traits = TypeTraits<T>;
  const int warp = static_cast<int>(threadIdx.x) / 32;
  const int lane = static_cast<int>(threadIdx.x) % 32;
  const int r = lane / 4;
  const int q = lane % 4;
  const long long f0 = static_cast<long long>(blockIdx.x) * 16;
  const T* w = static_cast<const T*>(args.w);
  const T* x = static_cast<const T*>(args.x);
  const int chunks = static_cast<int>((args.k + 31) / 32);

  // Rows past N or M load zeros (their pointers stay at a valid row).
  const bool lo_valid = f0 + r < args.n;
  const bool hi_valid = f0 + r + 8 < args.n;
  const T* w_lo = w + (lo_valid ? (f0 + r) * args.ldw : 0);
  const T* w_hi = w + (hi_valid ? (f0 + r + 8) * args.ldw : 0);
  bool token_valid[TokenTiles];
  const T* x_row[TokenTiles];
#pragma unroll
  for (int j = 0; j < TokenTiles; ++j) {
    const long long t = j * 8 + r;
    token_valid[j] = t < args.m;
    x_row[j] = x + (token_valid[j] ? t * args.ldx : 0);
  }

  float acc[TokenTiles][4];
#pragma unroll
  for (int j = 0; j < TokenTiles; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[j][e] = 0.0f;

  const uint4 zero = make_uint4(0, 0, 0, 0);
  for (int c0 = warp; c0 < chunks; c0 += kSkinnyWarps * kSkinnyUnroll) {
    uint4 wl[kSkinnyUnroll], wh[kSkinnyUnroll], xv[kSkinnyUnroll][TokenTiles];
#pragma unroll
    for (int u = 0; u < kSkinnyUnroll; ++u) {
      const int c = c0 + u * kSkinnyWarps;
      // K is a multiple of 8, so a lane's 8 elements are all inside K or all past it. Every
      // lane loads (past the end: the row's first 8 elements, inside any K > 0) and then zeroes
      // what is out of range, so the loads have no branches around them and all of them can be
      // in flight at once.
      const long long k0 = static_cast<long long>(c) * 32 + 8 * q;
      const bool k_valid = c < chunks && k0 < args.k;
      const long long off = k_valid ? k0 : 0;
      const uint4 lo = load_16(w_lo + off, true);
      const uint4 hi = load_16(w_hi + off, true);
      wl[u] = k_valid && lo_valid ? lo : zero;
      wh[u] = k_valid && hi_valid ? hi : zero;
#pragma unroll
      for (int j = 0; j < TokenTiles; ++j) {
        const uint4 t = load_16(x_row[j] + off, false);
        xv[u][j] = k_valid && token_valid[j] ? t : zero;
      }
    }
#pragma unroll
    for (int u = 0; u < kSkinnyUnroll; ++u) {
      const std::uint32_t a_first[4] = {wl[u].x, wh[u].x, wl[u].y, wh[u].y};
      const std::uint32_t a_second[4] = {wl[u].z, wh[u].z, wl[u].w, wh[u].w};
#pragma unroll
      for (int j = 0; j < TokenTiles; ++j) {
        mma_16816<T>(acc[j], a_first, xv[u][j].x, xv[u][j].y);
        mma_16816<T>(acc[j], a_second, xv[u][j].z, xv[u][j].w);
      }
    }
  }

  // Sum the warps' partial tiles: thread i of the block finishes entry i of the (token tile,
  // accumulator, lane) grid. Accumulator e of a lane is feature r (+8 for e >= 2) and token
  // 2 * q (+1 for odd e) of its tile.
  __shared__ float partial[kSkinnyWarps][TokenTiles * 4 * 32];
#pragma unroll
  for (int j = 0; j < TokenTiles; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) partial[warp][(j * 4 + e) * 32 + lane] = acc[j][e];
  __syncthreads();
  const int i = static_cast<int>(threadIdx.x);
  if (i >= TokenTiles * 4 * 32) return;
  float sum = 0.0f;
#pragma unroll
  for (int v = 0; v < kSkinnyWarps; ++v) sum += partial[v][i];
  const int j = i / 128;
  const int e = (i / 32) % 4;
  const int l = i % 32;
  const long long feature = f0 + l / 4 + (e >= 2 ? 8 : 0);
  const long long token = j * 8 + 2 * (l % 4) + (e & 1);
  if (feature >= args.n || token >= args.m) return;
  if (args.bias != nullptr) sum += Traits::to_float(static_cast<const T*>(args.bias)[feature]);
  static_cast<T*>(args.out)[token * args.ldo + feature] =
      Traits::from_float(activate(sum, args.act));
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

enum class TilingChoice { kLarge, kTall, kMedium, kSmall };

TilingChoice choose_tiling(long long m, long long n, int device) {
  int sms = 0;
  int smem_optin = 0;
  check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device),
             "cudaDeviceGetAttribute(multiProcessorCount)");
  check_cuda(cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
             "cudaDeviceGetAttribute(maxSharedMemoryPerBlockOptin)");
  TilingChoice best = TilingChoice::kMedium;
  double best_cost = linear_kernels::tiling_cost<TilingMedium>(m, n, sms, 0.85);
  // sm_86 / sm_89 parts allow 99 KiB per block: too little for the large and tall tiles' stages.
  if (smem_optin >= TilingLarge::kSmemBytes) {
    const double cost = linear_kernels::tiling_cost<TilingLarge>(m, n, sms, 1.0);
    if (cost <= best_cost) {
      best = TilingChoice::kLarge;
      best_cost = cost;
    }
  }
  if (smem_optin >= TilingTall::kSmemBytes) {
    const double cost = linear_kernels::tiling_cost<TilingTall>(m, n, sms, 0.95);
    if (cost < best_cost) {
      best = TilingChoice::kTall;
      best_cost = cost;
    }
  }
  // Row tiles map to gridDim.y (at most 65535 blocks).
  if ((m + TilingSmall::kBlockM - 1) / TilingSmall::kBlockM <= 65535) {
    const double cost = linear_kernels::tiling_cost<TilingSmall>(m, n, sms, 0.7);
    if (cost < best_cost) best = TilingChoice::kSmall;
  }
  return best;
}

template <typename T, typename Cfg>
void launch_tiled(const KernelArgs& args, int device, cudaStream_t stream) {
  const auto kernel = linear_mma_kernel<T, Cfg>;
  static std::atomic<std::uint64_t> opted_in{0};
  linear_kernels::allow_dynamic_smem(
      kernel, Cfg::kSmemBytes, device, opted_in,
      "cudaFuncSetAttribute(linear_mma_kernel, maxDynamicSharedMemorySize)");
  const dim3 grid(static_cast<unsigned>((args.n + Cfg::kBlockN - 1) / Cfg::kBlockN),
                  static_cast<unsigned>((args.m + Cfg::kBlockM - 1) / Cfg::kBlockM));
  kernel<<<grid, Cfg::kThreads, Cfg::kSmemBytes, stream>>>(args);
  check_launch("linear_mma_kernel");
}

enum class CudaGemm { kTiled, kSkinny, kWgmma };

// The kernel for args, by APHRODITE_CUDA_GEMM:
// - "auto" (or unset): the skinny kernel for M <= 16, the wgmma kernel where it runs (sm_90a
//   code on a compute capability 9.0 GPU), else the tiled kernel;
// - "mma": the mma.sync tiled kernel for every input;
// - "wgmma": the wgmma kernel for every input it takes; where it cannot run, a DeviceError.
// Inputs the 16-byte loads cannot take (see `tiled`) use the simple kernel whatever is asked.
CudaGemm choose_gemm(const LinearCudaArgs& a, bool tiled) {
  const char* env = std::getenv("APHRODITE_CUDA_GEMM");
  const std::string wanted = env == nullptr || *env == '\0' ? "auto" : env;
  if (wanted == "mma") return CudaGemm::kTiled;
  if (wanted != "auto" && wanted != "wgmma") {
    throw ValueError("APHRODITE_CUDA_GEMM must be 'mma', 'auto' or 'wgmma', got '" + wanted + "'");
  }
  if (!tiled || a.k == 0) return CudaGemm::kTiled;
  if (wanted == "auto" && a.m <= kSkinnyMaxRows) return CudaGemm::kSkinny;
  std::string why;
  const bool wgmma = wgmma_supported(a.device, &why);
  if (wanted == "wgmma" && !wgmma) {
    throw DeviceError("APHRODITE_CUDA_GEMM=wgmma cannot run here (" + why + ")");
  }
  return wgmma ? CudaGemm::kWgmma : CudaGemm::kTiled;
}

template <typename T>
void launch(const LinearCudaArgs& a) {
  const KernelArgs k = linear_kernels::kernel_args(a);
  cudaStream_t stream = to_cuda_stream(a.stream);

  const bool tiled =
      a.k % 8 == 0 && a.ldx % 8 == 0 && a.ldw % 8 == 0 && aligned16(a.x) && aligned16(a.w);
  // Rows map to gridDim.y (at most 65535 blocks).
  const long long max_rows = 65535LL * (tiled ? TilingMedium::kBlockM : 8);
  if (a.m > max_rows) {
    throw ValueError("linear on CUDA supports at most " + std::to_string(max_rows) +
                     " rows for these inputs, got " + std::to_string(a.m));
  }
  const CudaGemm gemm = choose_gemm(a, tiled);
  if (gemm == CudaGemm::kWgmma) {
    linear_wgmma(a);
  } else if (gemm == CudaGemm::kSkinny) {
    const unsigned blocks = static_cast<unsigned>((a.n + 15) / 16);
    if (a.m <= 8) {
      linear_skinny_kernel<T, 1><<<blocks, 32 * kSkinnyWarps, 0, stream>>>(k);
    } else {
      linear_skinny_kernel<T, 2><<<blocks, 32 * kSkinnyWarps, 0, stream>>>(k);
    }
    check_launch("linear_skinny_kernel");
  } else if (tiled) {
    switch (choose_tiling(a.m, a.n, a.device)) {
      case TilingChoice::kLarge:
        launch_tiled<T, TilingLarge>(k, a.device, stream);
        break;
      case TilingChoice::kTall:
        launch_tiled<T, TilingTall>(k, a.device, stream);
        break;
      case TilingChoice::kMedium:
        launch_tiled<T, TilingMedium>(k, a.device, stream);
        break;
      case TilingChoice::kSmall:
        launch_tiled<T, TilingSmall>(k, a.device, stream);
        break;
    }
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
