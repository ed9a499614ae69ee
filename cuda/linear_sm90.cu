// CUDA linear on Hopper (sm_90a): out = act(x @ w^T + bias), as linear.cu computes it, with the
// warpgroup tensor-core instructions (wgmma) fed by the bulk tensor copy engine (TMA).
//
// One block computes a BM x BN tile of out. Warpgroups 0 .. Consumers-1 (four warps each) are
// the consumers: each owns 64 rows of the tile (or, in column-split tilings, all its rows and a
// share of its columns) and issues m64nNk16 wgmma instructions whose operands the tensor cores
// read straight from shared memory, accumulating in float32 registers. The last warp is the
// producer: one of its threads issues the TMA copies of x's and w's 64-wide K slices into a ring of
// Stages shared-memory buffers. Each buffer has two mbarriers: `full` completes when the copies
// have landed (TMA counts the bytes it wrote) and `empty` when every consumer warpgroup has
// finished reading it. TMA writes each tile in the 128-byte swizzled layout that the wgmma
// descriptors name, and fills the parts of a box past the edges of x and w with zeros, so any M, N
// and K work (K a multiple of 8 and 16-byte aligned rows, as TMA needs; linear.cu checks that
// before choosing this kernel). The epilogue (bias, activation, one rounding) is the mma.sync
// kernel's, from the accumulator registers.
//
// Tilings: BM x BN tiles split among the consumer warpgroups by rows or by columns, chosen per
// shape by a cost model of SM use (or forced: APHRODITE_CUDA_WGMMA_TILING). Opt-in ones run blocks
// in clusters of two that share one operand's tile: each block copies half of it and TMA multicasts
// the half into both blocks' buffers, so the shared operand crosses L2 once per pair; a buffer's
// empty barrier then counts both blocks' consumers, and each producer, before its block exits,
// waits for the last releases its peer's consumers send it.
//
// Both operands are K-major ("TN": x is [M, K] and w is [N, K], row-major), the layout wgmma takes
// without transposes. Device code exists only in the sm_90a build (wgmma is an sm_90a feature);
// the host side runs it only on compute capability 9.0 devices of a build that has that code.
#include <cuda.h>  // CUtensorMap and its enums (the encoder itself comes from the driver)
#include <cudaTypedefs.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>

#include "cuda_check.cuh"
#include "linear_common.cuh"
#include "linear_sm90.cuh"

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define APHRODITE_WGMMA_DEVICE_CODE 1
#endif

namespace aphrodite::detail {

namespace {

using linear_kernels::KernelArgs;
using linear_kernels::TypeTraits;

// Which operand a pair of blocks (a thread block cluster of 2) shares: none; x, for two blocks
// of adjacent column tiles (the cluster runs along N); or w, for two blocks of adjacent row
// tiles (along M). Each block of the pair copies half of the shared tile and TMA multicasts it
// into both blocks' shared memory, so that operand crosses L2 once for two blocks.
enum class Multicast { kNone, kX, kW };

// A tiling: a BM x BN tile of out per block, Consumers warpgroups, K in 64-element slices (one
// 128-byte swizzle row of 2-byte elements) through Stages buffers, and the operand shared with a
// cluster peer. The consumers split the tile by rows, 64 each, when BM = 64 x Consumers (the
// default), and by columns otherwise: each takes all BM rows (BM / 64 independent m64
// accumulators) and BN / Consumers columns. With SplitK the two consumers of a 64-row tile split
// K instead: each takes every other k tile of the whole tile, and the second adds its
// accumulators into the first's through shared memory before the epilogue.
template <int Consumers, int BN, int Stages, Multicast Share = Multicast::kNone,
          int BM = 64 * Consumers, bool SplitK = false>
struct WgmmaTiling {
  static constexpr int kConsumers = Consumers;
  static constexpr int kBlockM = BM;
  static constexpr int kBlockN = BN;
  static constexpr bool kSplitK = SplitK;
  static constexpr bool kSplitRows = !SplitK && BM == 64 * Consumers;
  // Each consumer warpgroup's part: kRowBlocks blocks of 64 rows by kWgCols columns.
  static constexpr int kRowBlocks = kSplitRows || SplitK ? 1 : BM / 64;
  static constexpr int kWgCols = kSplitRows || SplitK ? BN : BN / Consumers;
  // The warpgroups that read each k tile: with SplitK the one whose tile it is, else all.
  static constexpr int kReaders = SplitK ? 1 : Consumers;
  static_assert(kSplitRows || SplitK || (BM % 64 == 0 && BN % (8 * Consumers) == 0),
                "a column split gives each warpgroup whole m64 blocks and 8-column groups");
  static_assert(64 * kRowBlocks * kWgCols * (SplitK ? 1 : Consumers) == BM * BN,
                "the warpgroups' parts cover the tile");
  static_assert(!SplitK || (Consumers == 2 && BM == 64 && Share == Multicast::kNone),
                "a K split is two warpgroups on one 64-row tile, unclustered");
  static constexpr int kBlockK = 64;
  static constexpr int kStages = Stages;
  static constexpr Multicast kShare = Share;
  static constexpr int kCluster = Share == Multicast::kNone ? 1 : 2;
  // Rows of each TMA box: a shared tile is copied in halves, one by each block of the pair.
  static constexpr int kBoxRowsX = Share == Multicast::kX ? kBlockM / 2 : kBlockM;
  static constexpr int kBoxRowsW = Share == Multicast::kW ? kBlockN / 2 : kBlockN;
  static constexpr int kThreads = 128 * kConsumers + 32;  // the consumers, then the producer warp
  static constexpr int kTileXBytes = kBlockM * kBlockK * 2;
  static constexpr int kTileWBytes = kBlockN * kBlockK * 2;
  static constexpr int kStageBytes = kTileXBytes + kTileWBytes;
  // The tiles, the 2 x Stages mbarriers, and room to start the tiles on a 1024-byte boundary
  // (the swizzle pattern's period, which the descriptors assume).
  static constexpr int kSmemBytes = kStages * kStageBytes + 2 * kStages * 8 + 1024;
  // Consumers release a buffer one tile late (one wgmma group stays in flight); the producer
  // refills buffer s only after that, so two buffers are the least that makes progress.
  static_assert(kStages >= 2, "the release trails the multiplies by one tile");
  static_assert(kTileXBytes % 1024 == 0 && kTileWBytes % 1024 == 0,
                "every tile starts on a swizzle period");
  static_assert(BN % 8 == 0 && BN <= 256 && kBlockM <= 256, "TMA boxes hold at most 256 rows");
  static_assert(kSmemBytes <= 227 * 1024, "an sm_90 block holds at most 227 KiB of shared memory");
  // A K split's second warpgroup hands its accumulators over in the (then idle) stage buffers.
  // Its stage count is even, so that each buffer always holds the same warpgroup's k tiles: a
  // consumer's full-barrier wait names a phase only by its parity, which is unambiguous only
  // when the waiter has waited on every phase before it (with an odd count a buffer alternates,
  // and a warpgroup could pass its wait on the other's still-landing tile). Four buffers or more
  // let both warpgroups keep a tile in flight while the one before it is refilled.
  static_assert(!SplitK ||
                    (64 * BN * 4 <= kStages * kStageBytes && kStages % 2 == 0 && kStages >= 4),
                "a K split's hand-over fits the stages, an even number of two or more per "
                "warpgroup");
  // A half tile starts on a swizzle period (8 rows of 128 bytes), so both halves land in the
  // layout one whole-tile copy writes.
  static_assert(kBoxRowsX % 8 == 0 && kBoxRowsW % 8 == 0, "half tiles are whole swizzle periods");
};

// 128 x 256: the most reuse per loaded byte, for large grids.
using WgmmaWide = WgmmaTiling<2, 256, 4>;
// 192 x 128: LLaVA's 576 image tokens are exactly 3 row tiles (96 tiles at N = 4096: one round
// on an H100/H200).
using WgmmaTall = WgmmaTiling<3, 128, 5>;
// 192 x 96: 576 rows at N = 4096 make 129 tiles, one round on an H100/H200's 132 SMs with 98%
// of them busy (192 x 128 leaves 36 idle).
using WgmmaTallNarrow = WgmmaTiling<3, 96, 6>;
// 128 x 128: more, smaller tiles for small grids.
using WgmmaSquare = WgmmaTiling<2, 128, 6>;
// Clusters of two, chosen only when forced (on an H200 each was slower than its unclustered twin
// at every projector shape: BENCHMARKS.md): 192 x 96 and 192 x 128 sharing the x tile (192 rows
// x 64 of K: twice or 1.5 times a w tile's bytes) between two column tiles, and 128 x 256
// sharing the w tile between two row tiles.
using WgmmaTallNarrowPairN = WgmmaTiling<3, 96, 6, Multicast::kX>;
using WgmmaTallPairN = WgmmaTiling<3, 128, 5, Multicast::kX>;
using WgmmaWidePairM = WgmmaTiling<2, 256, 4, Multicast::kW>;
// 64-row tiles (one consumer warpgroup) for inputs of a few hundred rows, where the tilings above
// leave most SMs idle (144 x 4096 is 43 tiles of 192 x 96, 129 of 64 x 96); more stages, since
// each k tile is less work to hide the copies behind. The clustered one shares the w tile
// between two row tiles, as cuBLAS does at such shapes.
using WgmmaThinNarrow = WgmmaTiling<1, 96, 10>;
using WgmmaThin = WgmmaTiling<1, 128, 9>;
using WgmmaThinPairM = WgmmaTiling<1, 128, 9, Multicast::kW>;
// 192 x 96 with two consumer warpgroups splitting the columns (each 192 x 48: three m64n48
// accumulators), plain and with the x tile shared along N: the shape of cuBLAS's kernel at
// 576 x 4096 (nvjet_sm90_tst_192x96_64x5_1x2: 384 threads, 5 stages, a cluster of two). Opt-in
// until measured.
using WgmmaTallNarrowSplit = WgmmaTiling<2, 96, 6, Multicast::kNone, 192>;
using WgmmaTallNarrowSplitPairN = WgmmaTiling<2, 96, 5, Multicast::kX, 192>;
// 64 x 96 and 64 x 128 with two consumer warpgroups splitting K: the 64-row tilings' grid and L2
// traffic, with two warpgroups issuing multiplies on each SM instead of one (at 144 x 4096 x
// 4096 the one-warpgroup 64 x 96 tiling ran at about half cuBLAS's speed). Opt-in until measured.
using WgmmaThinNarrowSplitK = WgmmaTiling<2, 96, 10, Multicast::kNone, 64, true>;
using WgmmaThinSplitK = WgmmaTiling<2, 128, 8, Multicast::kNone, 64, true>;

#ifdef APHRODITE_WGMMA_DEVICE_CODE

__device__ __forceinline__ std::uint32_t smem_u32(const void* p) {
  return static_cast<std::uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void mbar_init(std::uint32_t bar, std::uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}

// One arrival that also announces `bytes` of asynchronous copies the phase must wait for.
__device__ __forceinline__ void mbar_arrive_expect_tx(std::uint32_t bar, std::uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes)
               : "memory");
}

__device__ __forceinline__ void mbar_arrive(std::uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}

__device__ __forceinline__ bool mbar_try_wait(std::uint32_t bar, std::uint32_t parity) {
  std::uint32_t done = 0;
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
      "selp.u32 %0, 1, 0, p;\n"
      "}\n"
      : "=r"(done)
      : "r"(bar), "r"(parity)
      : "memory");
  return done != 0;
}

__device__ __forceinline__ unsigned long long global_timer_ns() {
  unsigned long long t = 0;
  asm volatile("mov.u64 %0, %globaltimer;\n" : "=l"(t));
  return t;
}

// Waits until the phase of the given parity has completed (acquire: what the phase's arrivals
// and copies wrote is visible afterwards). Waiting on the parity before the first phase returns
// at once, which lets the producer's first pass over the ring skip its waits. A wait that lasts
// 10 seconds (a copy that never lands) traps: a launch error instead of a hung GPU.
__device__ __forceinline__ void mbar_wait(std::uint32_t bar, std::uint32_t parity) {
  if (mbar_try_wait(bar, parity)) return;
  const unsigned long long start = global_timer_ns();
  while (!mbar_try_wait(bar, parity)) {
    if (global_timer_ns() - start > 10'000'000'000ull) __trap();
  }
}

// Copies the box of `map` at (column c0, row c1) into shared memory at dst, completing `bar`'s
// transaction count.
__device__ __forceinline__ void tma_load_2d(std::uint32_t dst, const CUtensorMap* map,
                                            std::uint32_t bar, int c0, int c1) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%2, %3}], [%4];\n" ::"r"(dst),
      "l"(reinterpret_cast<std::uint64_t>(map)), "r"(c0), "r"(c1), "r"(bar)
      : "memory");
}

// As tma_load_2d, and the same box also lands at dst's offset in the shared memory of every
// block of the cluster named in cta_mask, completing the transaction count of the mbarrier at
// bar's offset in each of them.
__device__ __forceinline__ void tma_load_2d_multicast(std::uint32_t dst, const CUtensorMap* map,
                                                      std::uint32_t bar, int c0, int c1,
                                                      std::uint16_t cta_mask) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
      ".multicast::cluster [%0], [%1, {%2, %3}], [%4], %5;\n" ::"r"(dst),
      "l"(reinterpret_cast<std::uint64_t>(map)), "r"(c0), "r"(c1), "r"(bar), "h"(cta_mask)
      : "memory");
}

__device__ __forceinline__ std::uint32_t cluster_rank() {
  std::uint32_t rank = 0;
  asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(rank));
  return rank;
}

// Every thread of every block of the cluster: what each wrote before is visible to all after.
__device__ __forceinline__ void cluster_sync() {
  asm volatile(
      "barrier.cluster.arrive.release;\n"
      "barrier.cluster.wait.acquire;\n" ::
          : "memory");
}

// One arrival on the mbarrier at offset `bar` of the cluster's block `rank` (this block's own
// included). It releases a buffer whose reads (wgmma's) completed at a wgmma wait, which needs
// no memory fence: the default (.cta) semantics, as CUTLASS's cluster barrier uses; the
// .release.cluster form costs a MEMBAR.ALL.GPU per arrival.
__device__ __forceinline__ void mbar_arrive_cluster(std::uint32_t bar, std::uint32_t rank) {
  asm volatile(
      "{\n"
      ".reg .b32 remote;\n"
      "mapa.shared::cluster.u32 remote, %0, %1;\n"
      "mbarrier.arrive.shared::cluster.b64 _, [remote];\n"
      "}\n" ::"r"(bar),
      "r"(rank)
      : "memory");
}

// A wgmma shared-memory matrix descriptor for a K-major tile stored as 128-byte rows with the
// 128-byte swizzle: start address, leading byte offset (unused for this layout; 16 by
// convention), stride byte offset 1024 (from one group of 8 rows to the next), swizzle mode 1.
__device__ __forceinline__ std::uint64_t smem_descriptor(std::uint32_t address) {
  std::uint64_t desc = (address & 0x3FFFFu) >> 4;
  desc |= std::uint64_t{16 >> 4} << 16;
  desc |= std::uint64_t{1024 >> 4} << 32;
  desc |= std::uint64_t{1} << 62;
  return desc;
}

// Waits until `threads` threads (whole warps) of the block have arrived at named barrier `id`.
__device__ __forceinline__ void named_barrier_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// Orders this thread's generic-proxy accesses to shared memory after the async proxy's (TMA,
// wgmma) ones before it.
__device__ __forceinline__ void fence_proxy_async_shared() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

__device__ __forceinline__ void wgmma_fence() {
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}

__device__ __forceinline__ void wgmma_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}

__device__ __forceinline__ void wgmma_wait_one() {
  asm volatile("wgmma.wait_group.sync.aligned 1;\n" ::: "memory");
}

__device__ __forceinline__ void wgmma_wait_all() {
  asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
}

// d += A (64 x 16, K-major, desc_a) * B (N x 16, K-major, desc_b)^T for one warpgroup; d holds
// the thread's N / 2 float32 accumulators. scale_d 0 would ignore d's old value.
template <typename T, int N>
__device__ __forceinline__ void wgmma_m64k16(float (&d)[N / 2], std::uint64_t desc_a,
                                             std::uint64_t desc_b, int scale_d);

// The m64nNk16 instruction for element type ptx_type ("bf16" or "f16"), on the operands of
// wgmma_m64k16 (scale_d as a predicate, A and B scaled by 1, neither transposed: K-major).
#define APHRODITE_WGMMA_M64N48K16(ptx_type)                                                        \
  asm volatile(                                                                                    \
      "{\n"                                                                                        \
      ".reg .pred p;\n"                                                                            \
      "setp.ne.b32 p, %26, 0;\n"                                                                   \
      "wgmma.mma_async.sync.aligned.m64n48k16.f32." ptx_type "." ptx_type                          \
      " "                                                                                          \
      "{%0, %1, %2, %3, %4, %5, %6, %7,"                                                           \
      " %8, %9, %10, %11, %12, %13, %14, %15,"                                                     \
      " %16, %17, %18, %19, %20, %21, %22, %23},"                                                  \
      " %24, %25, p, 1, 1, 0, 0;\n"                                                                \
      "}\n"                                                                                        \
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),        \
        "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),    \
        "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), \
        "+f"(d[21]), "+f"(d[22]), "+f"(d[23])                                                      \
      : "l"(desc_a), "l"(desc_b), "r"(scale_d)                                                     \
      : "memory")

#define APHRODITE_WGMMA_M64N96K16(ptx_type)                                                        \
  asm volatile(                                                                                    \
      "{\n"                                                                                        \
      ".reg .pred p;\n"                                                                            \
      "setp.ne.b32 p, %50, 0;\n"                                                                   \
      "wgmma.mma_async.sync.aligned.m64n96k16.f32." ptx_type "." ptx_type                          \
      " "                                                                                          \
      "{%0, %1, %2, %3, %4, %5, %6, %7,"                                                           \
      " %8, %9, %10, %11, %12, %13, %14, %15,"                                                     \
      " %16, %17, %18, %19, %20, %21, %22, %23,"                                                   \
      " %24, %25, %26, %27, %28, %29, %30, %31,"                                                   \
      " %32, %33, %34, %35, %36, %37, %38, %39,"                                                   \
      " %40, %41, %42, %43, %44, %45, %46, %47},"                                                  \
      " %48, %49, p, 1, 1, 0, 0;\n"                                                                \
      "}\n"                                                                                        \
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),        \
        "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),    \
        "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), \
        "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), \
        "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), \
        "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), \
        "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47])               \
      : "l"(desc_a), "l"(desc_b), "r"(scale_d)                                                     \
      : "memory")

#define APHRODITE_WGMMA_M64N128K16(ptx_type)                                                       \
  asm volatile(                                                                                    \
      "{\n"                                                                                        \
      ".reg .pred p;\n"                                                                            \
      "setp.ne.b32 p, %66, 0;\n"                                                                   \
      "wgmma.mma_async.sync.aligned.m64n128k16.f32." ptx_type "." ptx_type                         \
      " "                                                                                          \
      "{%0, %1, %2, %3, %4, %5, %6, %7,"                                                           \
      " %8, %9, %10, %11, %12, %13, %14, %15,"                                                     \
      " %16, %17, %18, %19, %20, %21, %22, %23,"                                                   \
      " %24, %25, %26, %27, %28, %29, %30, %31,"                                                   \
      " %32, %33, %34, %35, %36, %37, %38, %39,"                                                   \
      " %40, %41, %42, %43, %44, %45, %46, %47,"                                                   \
      " %48, %49, %50, %51, %52, %53, %54, %55,"                                                   \
      " %56, %57, %58, %59, %60, %61, %62, %63},"                                                  \
      " %64, %65, p, 1, 1, 0, 0;\n"                                                                \
      "}\n"                                                                                        \
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),        \
        "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),    \
        "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), \
        "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), \
        "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), \
        "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), \
        "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), \
        "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), \
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), \
        "+f"(d[63])                                                                                \
      : "l"(desc_a), "l"(desc_b), "r"(scale_d)                                                     \
      : "memory")

#define APHRODITE_WGMMA_M64N256K16(ptx_type)                                                       \
  asm volatile(                                                                                    \
      "{\n"                                                                                        \
      ".reg .pred p;\n"                                                                            \
      "setp.ne.b32 p, %130, 0;\n"                                                                  \
      "wgmma.mma_async.sync.aligned.m64n256k16.f32." ptx_type "." ptx_type                         \
      " "                                                                                          \
      "{%0, %1, %2, %3, %4, %5, %6, %7,"                                                           \
      " %8, %9, %10, %11, %12, %13, %14, %15,"                                                     \
      " %16, %17, %18, %19, %20, %21, %22, %23,"                                                   \
      " %24, %25, %26, %27, %28, %29, %30, %31,"                                                   \
      " %32, %33, %34, %35, %36, %37, %38, %39,"                                                   \
      " %40, %41, %42, %43, %44, %45, %46, %47,"                                                   \
      " %48, %49, %50, %51, %52, %53, %54, %55,"                                                   \
      " %56, %57, %58, %59, %60, %61, %62, %63,"                                                   \
      " %64, %65, %66, %67, %68, %69, %70, %71,"                                                   \
      " %72, %73, %74, %75, %76, %77, %78, %79,"                                                   \
      " %80, %81, %82, %83, %84, %85, %86, %87,"                                                   \
      " %88, %89, %90, %91, %92, %93, %94, %95,"                                                   \
      " %96, %97, %98, %99, %100, %101, %102, %103,"                                               \
      " %104, %105, %106, %107, %108, %109, %110, %111,"                                           \
      " %112, %113, %114, %115, %116, %117, %118, %119,"                                           \
      " %120, %121, %122, %123, %124, %125, %126, %127},"                                          \
      " %128, %129, p, 1, 1, 0, 0;\n"                                                              \
      "}\n"                                                                                        \
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),        \
        "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),    \
        "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), \
        "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), \
        "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), \
        "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), \
        "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), \
        "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), \
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), \
        "+f"(d[63]), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), \
        "+f"(d[70]), "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), \
        "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), \
        "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), \
        "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), "+f"(d[96]), "+f"(d[97]), \
        "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]),          \
        "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]),        \
        "+f"(d[110]), "+f"(d[111]), "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]),        \
        "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), "+f"(d[120]), "+f"(d[121]),        \
        "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])         \
      : "l"(desc_a), "l"(desc_b), "r"(scale_d)                                                     \
      : "memory")

template <>
__device__ __forceinline__ void wgmma_m64k16<__nv_bfloat16, 48>(float (&d)[24],
                                                                std::uint64_t desc_a,
                                                                std::uint64_t desc_b, int scale_d) {
  APHRODITE_WGMMA_M64N48K16("bf16");
}

template <>
__device__ __forceinline__ void wgmma_m64k16<__half, 48>(float (&d)[24], std::uint64_t desc_a,
                                                         std::uint64_t desc_b, int scale_d) {
  APHRODITE_WGMMA_M64N48K16("f16");
}

template <>
__device__ __forceinline__ void wgmma_m64k16<__nv_bfloat16, 96>(float (&d)[48],
                                                                std::uint64_t desc_a,
                                                                std::uint64_t desc_b, int scale_d) {
  APHRODITE_WGMMA_M64N96K16("bf16");
}

template <>
__device__ __forceinline__ void wgmma_m64k16<__half, 96>(float (&d)[48], std::uint64_t desc_a,
                                                         std::uint64_t desc_b, int scale_d) {
  APHRODITE_WGMMA_M64N96K16("f16");
}

template <>
__device__ __forceinline__ void wgmma_m64k16<__nv_bfloat16, 128>(float (&d)[64],
                                                                 std::uint64_t desc_a,
                                                                 std::uint64_t desc_b,
                                                                 int scale_d) {
  APHRODITE_WGMMA_M64N128K16("bf16");
}

template <>
__device__ __forceinline__ void wgmma_m64k16<__half, 128>(float (&d)[64], std::uint64_t desc_a,
                                                          std::uint64_t desc_b, int scale_d) {
  APHRODITE_WGMMA_M64N128K16("f16");
}

template <>
__device__ __forceinline__ void wgmma_m64k16<__nv_bfloat16, 256>(float (&d)[128],
                                                                 std::uint64_t desc_a,
                                                                 std::uint64_t desc_b,
                                                                 int scale_d) {
  APHRODITE_WGMMA_M64N256K16("bf16");
}

template <>
__device__ __forceinline__ void wgmma_m64k16<__half, 256>(float (&d)[128], std::uint64_t desc_a,
                                                          std::uint64_t desc_b, int scale_d) {
  APHRODITE_WGMMA_M64N256K16("f16");
}

#undef APHRODITE_WGMMA_M64N48K16
#undef APHRODITE_WGMMA_M64N96K16
#undef APHRODITE_WGMMA_M64N128K16
#undef APHRODITE_WGMMA_M64N256K16
#endif  // APHRODITE_WGMMA_DEVICE_CODE

template <typename T, typename Cfg>
__global__ void __launch_bounds__(Cfg::kThreads, 1)
    linear_wgmma_kernel(const __grid_constant__ CUtensorMap x_map,
                        const __grid_constant__ CUtensorMap w_map, KernelArgs args) {
#ifdef APHRODITE_WGMMA_DEVICE_CODE
  constexpr int kStages = Cfg::kStages;
  constexpr int kBlockN = Cfg::kBlockN;
  extern __shared__ unsigned char smem_raw[];
  const std::uint32_t raw = smem_u32(smem_raw);
  const std::uint32_t tiles = (raw + 1023u) & ~1023u;  // stage s at tiles + s * kStageBytes
  const std::uint32_t full = tiles + kStages * Cfg::kStageBytes;  // kStages mbarriers
  const std::uint32_t empty = full + kStages * 8;                 // kStages more

  const int warp = static_cast<int>(threadIdx.x) / 32;
  const int lane = static_cast<int>(threadIdx.x) % 32;
  // Row and column tiles are at most 65535 * 192 and 2^31 / 2 elements in: int coordinates, as
  // TMA takes them.
  const int m0 = static_cast<int>(blockIdx.y) * Cfg::kBlockM;
  const int n0 = static_cast<int>(blockIdx.x) * kBlockN;
  const int k_tiles = static_cast<int>((args.k + Cfg::kBlockK - 1) / Cfg::kBlockK);

  constexpr bool kPaired = Cfg::kCluster > 1;
  // This block's half of a shared tile (0 or 1), its peer's rank being the other.
  const std::uint32_t rank = kPaired ? cluster_rank() : 0;
  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) {
      mbar_init(full + 8 * s, 1);  // the producer's arrive.expect_tx
      // One arrival per consumer warpgroup that reads it (all, or with a K split the one whose k
      // tile it holds), of each block whose copies write into this buffer (with a shared tile,
      // the peer's multicast half lands here too).
      mbar_init(empty + 8 * s, Cfg::kReaders * Cfg::kCluster);
    }
    // Make the initialised barriers visible to the copy engine (the async proxy) too.
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();
  // Neither block of a pair copies into, or arrives on, the other before its barriers exist.
  if constexpr (kPaired) cluster_sync();

  if (warp == 4 * Cfg::kConsumers) {
    // Producer. Use u of buffer s (k tile u * kStages + s) waits for the consumers' release of
    // use u - 1, the empty barrier's phase u - 1; for u = 0 the wait on parity 1 returns at once.
    // Paired, the empty barrier counts both blocks' consumers: this block's multicast half is
    // written into the peer's buffer too. The full barrier expects the whole stage either way
    // (a peer's half may land before this expect_tx: the count then goes negative meanwhile,
    // and the phase cannot complete before this thread's arrival).
    if (lane == 0) {
      constexpr std::uint16_t kBoth = 0x3;
      for (int kt = 0; kt < k_tiles; ++kt) {
        const int s = kt % kStages;
        const std::uint32_t use = static_cast<std::uint32_t>(kt / kStages);
        mbar_wait(empty + 8 * s, (use & 1u) ^ 1u);
        const std::uint32_t stage = tiles + s * Cfg::kStageBytes;
        const std::uint32_t bar = full + 8 * s;
        const int k0 = kt * Cfg::kBlockK;
        mbar_arrive_expect_tx(bar, Cfg::kStageBytes);
        if constexpr (Cfg::kShare == Multicast::kX) {
          const int half = static_cast<int>(rank) * Cfg::kBoxRowsX;
          tma_load_2d_multicast(stage + half * 128, &x_map, bar, k0, m0 + half, kBoth);
        } else {
          tma_load_2d(stage, &x_map, bar, k0, m0);
        }
        if constexpr (Cfg::kShare == Multicast::kW) {
          const int half = static_cast<int>(rank) * Cfg::kBoxRowsW;
          tma_load_2d_multicast(stage + Cfg::kTileXBytes + half * 128, &w_map, bar, k0, n0 + half,
                                kBoth);
        } else {
          tma_load_2d(stage + Cfg::kTileXBytes, &w_map, bar, k0, n0);
        }
      }
      if constexpr (kPaired) {
        // The peer's consumers arrive on this block's empty barriers until they are done: wait
        // for every buffer's last release before this block may exit.
        for (int s = 0; s < kStages && s < k_tiles; ++s) {
          mbar_wait(empty + 8 * s, static_cast<std::uint32_t>((k_tiles - 1 - s) / kStages) & 1u);
        }
      }
    }
    return;
  }

  // Consumers: warpgroup wg multiplies rows [wg_row0, wg_row0 + 64 * kRowBlocks) by columns
  // [wg_col0, wg_col0 + kWgCols) of the tile (its rows, or its columns, by the tiling's split),
  // over every k tile, or with a K split over the k tiles kt = wg, wg + 2, ...
  constexpr int kRowBlocks = Cfg::kRowBlocks;
  constexpr int kWgCols = Cfg::kWgCols;
  constexpr int kKStride = Cfg::kSplitK ? Cfg::kConsumers : 1;
  const int wg = warp / 4;
  const int wg_row0 = Cfg::kSplitRows ? wg * 64 : 0;
  const int wg_col0 = Cfg::kSplitRows || Cfg::kSplitK ? 0 : wg * kWgCols;
  const int kt_first = Cfg::kSplitK ? wg : 0;
  float acc[kRowBlocks][kWgCols / 2];
#pragma unroll
  for (int r = 0; r < kRowBlocks; ++r) {
#pragma unroll
    for (int i = 0; i < kWgCols / 2; ++i) acc[r][i] = 0.0f;
  }
  for (int kt = kt_first; kt < k_tiles; kt += kKStride) {
    const int s = kt % kStages;
    mbar_wait(full + 8 * s, static_cast<std::uint32_t>(kt / kStages) & 1u);
    // Row offsets of 64 (x) and of a multiple of 8 (w) rows are whole swizzle periods.
    const std::uint32_t tile_x = tiles + s * Cfg::kStageBytes + wg_row0 * 128;
    const std::uint32_t tile_w = tiles + s * Cfg::kStageBytes + Cfg::kTileXBytes + wg_col0 * 128;
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < Cfg::kBlockK / 16; ++kk) {
      // 16 elements of K are 32 bytes along the (swizzled) 128-byte rows; the row blocks'
      // accumulators are independent, so their multiplies can overlap in the tensor pipe.
#pragma unroll
      for (int r = 0; r < kRowBlocks; ++r) {
        wgmma_m64k16<T, kWgCols>(acc[r], smem_descriptor(tile_x + r * 64 * 128 + kk * 32),
                                 smem_descriptor(tile_w + kk * 32), 1);
      }
    }
    wgmma_commit();
    // One group stays in flight, so this tile's multiplies overlap the wait for the next: once
    // the previous tile's group is complete (its shared-memory reads too), release its buffer.
    wgmma_wait_one();
    if (kt > kt_first && threadIdx.x % 128 == 0) {
      const std::uint32_t bar = empty + 8 * ((kt - kKStride) % kStages);
      if constexpr (kPaired) {
        mbar_arrive_cluster(bar, 0);
        mbar_arrive_cluster(bar, 1);
      } else {
        mbar_arrive(bar);
      }
    }
  }
  wgmma_wait_all();
  if constexpr (Cfg::kSplitK) {
    // The second warpgroup's sums go to the first through the stage buffers, idle now: both
    // warpgroups' multiplies have completed (named barrier 1 joins the 256 consumer threads;
    // the producer warp has left), and every copy into them landed before its tile was read.
    // Element i of thread t at i * 128 + t: a warp's 32 stores hit 32 banks.
    constexpr int kConsumerThreads = 128 * Cfg::kConsumers;
    float* handover = reinterpret_cast<float*>(smem_raw + (tiles - raw));
    const int t = static_cast<int>(threadIdx.x) % 128;
    named_barrier_sync(1, kConsumerThreads);
    if (wg == 1) {
      // The buffers were last written by TMA and read by wgmma (the async proxy).
      fence_proxy_async_shared();
#pragma unroll
      for (int i = 0; i < kWgCols / 2; ++i) handover[i * 128 + t] = acc[0][i];
    }
    named_barrier_sync(1, kConsumerThreads);
    if (wg == 1) return;
#pragma unroll
    for (int i = 0; i < kWgCols / 2; ++i) acc[0][i] += handover[i * 128 + t];
  }

  // Epilogue. Accumulators 4j .. 4j+3 of a thread's row block hold its 8-column block j at rows
  // q and q + 8 (q = 16 * warp-in-warpgroup + lane / 4), columns c and c + 1
  // (c = 8j + 2 * (lane % 4)): the mma.sync C-fragment layout, repeated along N.
  T* out = static_cast<T*>(args.out);
  const T* bias = static_cast<const T*>(args.bias);
  const long long row0 = m0 + wg_row0 + (warp % 4) * 16 + lane / 4;
#pragma unroll
  for (int j = 0; j < kWgCols / 8; ++j) {
    const long long col = n0 + wg_col0 + j * 8 + (lane % 4) * 2;
    if (col >= args.n) continue;
    const bool second = col + 1 < args.n;
    float bias0 = 0.0f, bias1 = 0.0f;
    if (bias != nullptr) {
      bias0 = TypeTraits<T>::to_float(bias[col]);
      if (second) bias1 = TypeTraits<T>::to_float(bias[col + 1]);
    }
#pragma unroll
    for (int r = 0; r < kRowBlocks; ++r) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const long long row = row0 + r * 64 + half * 8;
        if (row >= args.m) continue;
        linear_kernels::store_pair(out + row * args.ldo + col, acc[r][4 * j + 2 * half],
                                   acc[r][4 * j + 2 * half + 1], bias0, bias1, args.act, second,
                                   args.pair_stores != 0);
      }
    }
  }
  if constexpr (kPaired) {
    // The last buffer's release too (its reads completed at the wait above; released only
    // now, since an arrival between that wait and the epilogue makes ptxas serialise the
    // wgmma pipeline): both producers wait for it before their blocks exit.
    if (k_tiles > 0 && threadIdx.x % 128 == 0) {
      const std::uint32_t bar = empty + 8 * ((k_tiles - 1) % kStages);
      mbar_arrive_cluster(bar, 0);
      mbar_arrive_cluster(bar, 1);
    }
  }
#else
  // No wgmma in this architecture's code; the host never launches it there.
  (void)x_map;
  (void)w_map;
  (void)args;
  __trap();
#endif
}

// --- host side ---

using EncodeTiledFn = PFN_cuTensorMapEncodeTiled_v12000;

// The driver's tensor-map encoder, looked up once through the runtime (the package links only
// the static runtime, not libcuda).
EncodeTiledFn tensor_map_encoder() {
  static const EncodeTiledFn encoder = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found{};
    check_cuda(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000,
                                                cudaEnableDefault, &found),
               "cudaGetDriverEntryPointByVersion(cuTensorMapEncodeTiled)");
    if (found != cudaDriverEntryPointSuccess || fn == nullptr) {
      throw DeviceError(
          "the CUDA driver has no cuTensorMapEncodeTiled (a CUDA 12+ driver is "
          "needed for the wgmma linear kernel)");
    }
    return reinterpret_cast<EncodeTiledFn>(fn);
  }();
  return encoder;
}

// A map of the row-major [rows, k] matrix at base (row stride ld elements) in boxes of 64
// columns x box_rows rows, swizzled by 128 bytes, zeros past the edges.
CUtensorMap tile_map(const void* base, long long rows, long long k, long long ld, int box_rows,
                     DType dtype, const char* name) {
  // A single row may come with any row stride (it is never used); TMA needs a valid one.
  if (rows == 1) ld = k;
  CUtensorMap map;
  std::memset(&map, 0, sizeof(map));
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(k), static_cast<cuuint64_t>(rows)};
  const cuuint64_t row_stride_bytes[1] = {static_cast<cuuint64_t>(ld) * 2};
  const cuuint32_t box[2] = {64, static_cast<cuuint32_t>(box_rows)};
  const cuuint32_t element_strides[2] = {1, 1};
  const CUresult r =
      tensor_map_encoder()(&map,
                           dtype == DType::kBFloat16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16
                                                     : CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
                           2, const_cast<void*>(base), dims, row_stride_bytes, box, element_strides,
                           CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                           CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS) {
    throw DeviceError(std::string("cuTensorMapEncodeTiled failed for ") + name + " (CUresult " +
                      std::to_string(static_cast<int>(r)) + ", " + std::to_string(rows) + " x " +
                      std::to_string(k) + ", row stride " + std::to_string(ld) + ")");
  }
  return map;
}

template <typename T, typename Cfg>
void launch_wgmma(const LinearCudaArgs& a, cudaStream_t stream) {
  const auto kernel = linear_wgmma_kernel<T, Cfg>;
  static std::atomic<std::uint64_t> opted_in{0};
  linear_kernels::allow_dynamic_smem(
      kernel, Cfg::kSmemBytes, a.device, opted_in,
      "cudaFuncSetAttribute(linear_wgmma_kernel, maxDynamicSharedMemorySize)");
  const CUtensorMap x_map = tile_map(a.x, a.m, a.k, a.ldx, Cfg::kBoxRowsX, a.dtype, "x");
  const CUtensorMap w_map = tile_map(a.w, a.n, a.k, a.ldw, Cfg::kBoxRowsW, a.dtype, "weight");
  long long col_tiles = (a.n + Cfg::kBlockN - 1) / Cfg::kBlockN;
  long long row_tiles = (a.m + Cfg::kBlockM - 1) / Cfg::kBlockM;
  // A pair spans two column (x shared) or row (w shared) tiles: the grid rounds up to pairs, the
  // extra block's copies past the edge are zeros and its epilogue stores nothing.
  if (Cfg::kShare == Multicast::kX) col_tiles += col_tiles % 2;
  if (Cfg::kShare == Multicast::kW) row_tiles += row_tiles % 2;
  if (row_tiles > 65535) {
    throw ValueError("linear: " + std::to_string(a.m) +
                     " rows are more row tiles than this wgmma tiling's grid holds");
  }
  const dim3 grid(static_cast<unsigned>(col_tiles), static_cast<unsigned>(row_tiles));
  if constexpr (Cfg::kCluster == 1) {
    kernel<<<grid, Cfg::kThreads, Cfg::kSmemBytes, stream>>>(x_map, w_map,
                                                             linear_kernels::kernel_args(a));
  } else {
    cudaLaunchConfig_t config{};
    config.gridDim = grid;
    config.blockDim = dim3(Cfg::kThreads);
    config.dynamicSmemBytes = Cfg::kSmemBytes;
    config.stream = stream;
    cudaLaunchAttribute cluster{};
    cluster.id = cudaLaunchAttributeClusterDimension;
    cluster.val.clusterDim.x = Cfg::kShare == Multicast::kX ? 2 : 1;
    cluster.val.clusterDim.y = Cfg::kShare == Multicast::kW ? 2 : 1;
    cluster.val.clusterDim.z = 1;
    config.attrs = &cluster;
    config.numAttrs = 1;
    check_cuda(cudaLaunchKernelEx(&config, kernel, x_map, w_map, linear_kernels::kernel_args(a)),
               "cudaLaunchKernelEx(linear_wgmma_kernel, cluster of 2)");
  }
  check_launch("linear_wgmma_kernel");
}

// One wgmma tiling as the host sees it: the name APHRODITE_CUDA_WGMMA_TILING takes, its launch
// for each element type, and the cost model's relative rate (0: opt-in, chosen only when forced).
struct NamedTiling {
  const char* name;
  void (*launch_bf16)(const LinearCudaArgs&, cudaStream_t);
  void (*launch_f16)(const LinearCudaArgs&, cudaStream_t);
  int block_m;
  int block_n;
  double rate;
};

template <typename Cfg>
constexpr NamedTiling named(const char* name, double rate) {
  return {
      name, launch_wgmma<__nv_bfloat16, Cfg>, launch_wgmma<__half, Cfg>, Cfg::kBlockM, Cfg::kBlockN,
      rate};
}

// Names: rows x columns of a block's tile, "s2" for two consumer warpgroups splitting its
// columns (rather than its rows), "k2" for two splitting K, "c2n" / "c2m" for clusters of two
// blocks along N (sharing x) / along M (sharing w). Rates are estimates of each tiling's speed per
// SM (checked against bench_projector.py --tilings); a 64-row tile moves about 1.7 times the bytes
// per multiply of a 192-row one (both operands cross L2 once per 64 rows instead of w once per
// 192), and at the sizes where it is chosen L2 bandwidth bounds it. On equal costs the earlier
// entry wins.
constexpr NamedTiling kTilings[] = {
    named<WgmmaWide>("128x256", 1.0),
    named<WgmmaTall>("192x128", 0.95),
    named<WgmmaTallNarrow>("192x96", 0.9),
    named<WgmmaSquare>("128x128", 0.85),
    named<WgmmaThinNarrow>("64x96", 0.54),
    named<WgmmaThin>("64x128", 0.6),
    named<WgmmaTallNarrowPairN>("192x96c2n", 0),
    named<WgmmaTallPairN>("192x128c2n", 0),
    named<WgmmaWidePairM>("128x256c2m", 0),
    named<WgmmaThinPairM>("64x128c2m", 0),
    named<WgmmaTallNarrowSplit>("192x96s2", 0),
    named<WgmmaTallNarrowSplitPairN>("192x96s2c2n", 0),
    named<WgmmaThinNarrowSplitK>("64x96k2", 0),
    named<WgmmaThinSplitK>("64x128k2", 0),
};

// APHRODITE_CUDA_WGMMA_TILING: unset, empty or "auto" lets the cost model choose (nullptr); a
// name above forces that tiling for every shape (for measuring each against the model's choice:
// bench_projector.py --tilings).
const NamedTiling* forced_tiling() {
  const char* env = std::getenv("APHRODITE_CUDA_WGMMA_TILING");
  const std::string wanted = env == nullptr ? "" : env;
  if (wanted.empty() || wanted == "auto") return nullptr;
  std::string names = "'auto'";
  for (const NamedTiling& t : kTilings) {
    if (wanted == t.name) return &t;
    names += std::string(", '") + t.name + "'";
  }
  throw ValueError("APHRODITE_CUDA_WGMMA_TILING must be one of " + names + ", got '" + wanted +
                   "'");
}

// The cost model's choice among the tilings with a rate.
const NamedTiling& modelled_tiling(const LinearCudaArgs& a) {
  int sms = 0;
  check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, a.device),
             "cudaDeviceGetAttribute(multiProcessorCount)");
  const NamedTiling* best = &kTilings[0];
  double best_cost = std::numeric_limits<double>::infinity();
  for (const NamedTiling& t : kTilings) {
    if (t.rate <= 0.0) continue;
    const double cost = linear_kernels::tiling_cost(a.m, a.n, sms, t.block_m, t.block_n, t.rate);
    if (cost < best_cost) {
      best = &t;
      best_cost = cost;
    }
  }
  return *best;
}

bool built_with_sm90a() { return std::strstr(APHRODITE_CUDA_ARCHS_STRING, "90a") != nullptr; }

}  // namespace

bool wgmma_supported(int device, std::string* why) {
  int major = 0, minor = 0;
  check_cuda(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device),
             "cudaDeviceGetAttribute(computeCapabilityMajor)");
  check_cuda(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device),
             "cudaDeviceGetAttribute(computeCapabilityMinor)");
  if (major == 9 && minor == 0 && built_with_sm90a()) return true;
  if (why != nullptr) {
    *why = "this build: " APHRODITE_CUDA_ARCHS_STRING "; this device: compute capability " +
           std::to_string(major) + "." + std::to_string(minor);
  }
  return false;
}

void linear_wgmma(const LinearCudaArgs& args) {
  const NamedTiling* forced = forced_tiling();
  const NamedTiling& tiling = forced != nullptr ? *forced : modelled_tiling(args);
  const cudaStream_t stream = to_cuda_stream(args.stream);
  if (args.dtype == DType::kBFloat16) {
    tiling.launch_bf16(args, stream);
  } else {
    tiling.launch_f16(args, stream);
  }
}

}  // namespace aphrodite::detail
