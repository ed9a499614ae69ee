// CUDA reshape_and_cache and paged_attention (float16 / bfloat16, float32 accumulation).
//
// paged_attention, one call for a mixed batch (three or four kernels on the caller's stream):
// - decode_mma_kernel serves single-token sequences (head sizes up to 128): a block per
//   (sequence, GQA group or 16 heads of one, context split), K/V streamed through a three-stage
//   cp.async pipeline into shared memory and the group's heads as the rows of tensor-core tiles.
//   decode_kernel does the same for head size 256 on CUDA cores, warps streaming K/V through
//   registers with no block barrier (see its comment).
// - paged_attention_kernel serves short chunks. A thread block owns a tile of
//   query rows: up to kMaxRows rows made of `heads_per_block` query
//   heads of one GQA group times `tokens_per_block` consecutive tokens of one sequence. All of
//   them share each K/V tile the block reads through the block table (16-byte loads into shared
//   memory), so a KV head's cache is read once per tile of tokens, not once per query head.
// - Tiles are numbered without a host-side plan: sequence s owns the tiles
//   [qsl[s] / TQ + s, qsl[s + 1] / TQ + s + 1), a range at least as long as its ceil(q_len / TQ)
//   tiles, so a block finds its sequence by binary search over query_start_loc and at most
//   num_seqs blocks find no tokens and return.
// - Long contexts with few tiles are split across blocks (flash-decoding): blockIdx.z picks a
//   range of split_keys keys, partial (max, sum, unnormalised output) go to the workspace and a
//   second kernel merges them. The split count depends on shapes only (and the device's SM
//   count), so replays of a captured CUDA graph see the same launch configuration.
// - prefill_mma_kernel serves sequences with >= kTensorCoreMinTokens query tokens (head sizes up
//   to 128, where its shared memory fits the device: not at 128 on sm_86/sm_89, whose blocks
//   get at most 99 KiB; the CUDA-core kernels then serve them, and decode_kernel the decodes)
//   on tensor cores, a block per window of kMmaRows batch tokens and query head; the
//   other kernels skip those sequences. Which kernel owns a
//   sequence is decided on the device from query_start_loc, so the host needs no batch plan.
//   The decode kernels share the split count and the workspace layout with
//   paged_attention_kernel, so one merge kernel serves all three.
// The host reads no device data and allocates nothing: safe to capture in a CUDA graph.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "aphrodite/error.h"
#include "cuda_check.cuh"
#include "internal/attention_kernels.h"

namespace aphrodite::detail {

namespace {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxRows = 16;     // query rows per block
constexpr int kSplitKeys = 256;  // a context is split only when longer than this
constexpr int kMaxSplits = 32;
// Splits are added until the general kernel's grid has this many blocks per SM: decode batches
// then run several waves of short blocks instead of one ragged wave of long ones.
constexpr int kBlocksPerSm = 16;

template <typename T>
struct Convert;
template <>
struct Convert<__half> {
  static __device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half from_float(float x) { return __float2half_rn(x); }
};
template <>
struct Convert<__nv_bfloat16> {
  static __device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float x) {
    return __float2bfloat16_rn(x);
  }
};

// ---------------------------------------------------------------------------------------------
// reshape_and_cache: one block per token; Vec is uint4 (8 elements) when every pointer and
// stride allows 16-byte accesses, else one 2-byte element.
template <typename Vec>
__global__ void reshape_and_cache_kernel(const Vec* __restrict__ key, const Vec* __restrict__ value,
                                         Vec* __restrict__ key_cache, Vec* __restrict__ value_cache,
                                         const void* __restrict__ slot_mapping, bool slots_int64,
                                         std::int64_t key_stride, std::int64_t value_stride,
                                         int row_vecs, std::int64_t num_slots) {
  const std::int64_t t = blockIdx.x;
  const std::int64_t slot = slots_int64 ? static_cast<const std::int64_t*>(slot_mapping)[t]
                                        : static_cast<const std::int32_t*>(slot_mapping)[t];
  // -1 skips the token; other out-of-range slots cannot be reported from here and are skipped.
  if (slot < 0 || slot >= num_slots) return;
  for (int i = threadIdx.x; i < row_vecs; i += blockDim.x) {
    key_cache[slot * row_vecs + i] = key[t * key_stride + i];
    value_cache[slot * row_vecs + i] = value[t * value_stride + i];
  }
}

bool aligned16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

// ---------------------------------------------------------------------------------------------
// paged_attention

struct Geometry {
  int heads_per_block;   // a divisor of the GQA group size, <= kMaxRows
  int tokens_per_block;  // kMaxRows / heads_per_block
  int head_chunks;       // group / heads_per_block
  int num_tiles;         // num_tokens / tokens_per_block + num_seqs
  int num_splits;        // 1: no split, the block writes `out` directly
  int split_keys;        // keys per split (when num_splits > 1)
  int decode_heads;      // query heads per decode_kernel block: 8, 4, 2 or 1, dividing the group
  int decode_chunks;     // group / decode_heads
};

template <int D>
struct Tile {
  static constexpr int kKeys = D > 128 ? 16 : 32;  // keys per shared-memory tile
  static constexpr int kKPitch = D + 8;  // K rows padded by 16 bytes: conflict-free uint4 reads
  static constexpr int kVecs = D / 8;    // uint4 per row
  static constexpr int kDimsPerThread = (D + kThreads - 1) / kThreads;
  static constexpr std::size_t kSmemBytes =
      2 * (kMaxRows * D + kKeys * kKPitch + kKeys * D) + 4 * (kMaxRows * kKeys + 3 * kMaxRows);
};

__device__ __forceinline__ float warp_max(float x) {
  for (int o = 16; o > 0; o /= 2) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}
__device__ __forceinline__ float warp_sum(float x) {
  for (int o = 16; o > 0; o /= 2) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// Sequences with at least this many query tokens (prefill chunks) go to the tensor-core kernel
// when the head size has one (<= 128) and it runs on this device (p.cuda_tensor_cores).
constexpr int kTensorCoreMinTokens = 64;

template <int D>
__device__ __forceinline__ bool uses_tensor_core_prefill(const PagedAttentionParams& p, int q_len) {
  return D <= 128 && p.cuda_tensor_cores != 0 && q_len >= kTensorCoreMinTokens;
}

// Block-table column of a key and its row within the block. Block sizes are powers of two in
// practice (8, 16, 32), where a shift and a mask replace two integer divisions per key.
struct BlockIndexer {
  int block_size;
  int shift;
  bool pow2;
  __device__ explicit BlockIndexer(int size)
      : block_size(size), shift(0), pow2((size & (size - 1)) == 0) {
    while ((1 << shift) < size) ++shift;  // log2(size) when pow2
  }
  __device__ __forceinline__ int column(int key) const {
    return pow2 ? key >> shift : key / block_size;
  }
  __device__ __forceinline__ int row(int key) const {
    return pow2 ? key & (block_size - 1) : key % block_size;
  }
};

// The sequence whose query tokens contain `token` (query_start_loc[seq] <= token < [seq + 1]).
__device__ __forceinline__ int sequence_of(const std::int32_t* qsl, int num_seqs, int token) {
  int lo = 0;
  int hi = num_seqs - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (qsl[mid] <= token) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

// ---------------------------------------------------------------------------------------------
// Prefill on tensor cores (FlashAttention-2 style): a block of 4 warps owns kMmaRows = 128 query
// tokens of one query head, each warp 32 of them (two m16 tiles, so every K/V fragment read from
// shared memory feeds both: with 16 rows per warp the ldmatrix traffic, not the tensor cores, was
// the limit). Q stays in shared memory and its fragments are read per k-step; K/V tiles of 64
// keys come through the block table into shared memory with cp.async, double-buffered: the next
// tile's copies are in flight while the current one is computed. S = Q K^T and O += P V are
// mma.sync m16n8k16 with float32 accumulation, their operands loaded with ldmatrix (.trans for V);
// the online softmax runs on the accumulator fragments in the log2 domain (a row lives in the
// 4 lanes of a quad), the position mask is only evaluated on tiles that cross it, and a warp
// skips the tiles none of its rows sees (the causal tail of the block's last tiles).
//
// m16n8k16 fragments (g = lane / 4, t = lane % 4): A (16x16, row-major) a0 = A[g][2t..2t+1],
// a1 = A[g+8][2t..], a2 = A[g][2t+8..], a3 = A[g+8][2t+8..]; B (16x8) b0 = B[2t..2t+1][g],
// b1 = B[2t+8..2t+9][g]; C (16x8) c0,c1 = C[g][2t..2t+1], c2,c3 = C[g+8][2t..2t+1].
constexpr int kMmaWarpRows = 32;
constexpr int kMmaRows = kWarps * kMmaWarpRows;
constexpr int kMmaKeys = 64;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// The running max of a row moves only when a score exceeds it by more than this (log2 units):
// exponentials are then at most 2^8, far from float32 overflow and exact in relative terms.
constexpr float kLazyMaxSlack = 8.0f;

// 2^x on the special function unit (relative error ~2^-22; 2^-inf = 0, subnormals flushed):
// exp2f also handles inputs below -126, which the softmax's arguments do not need.
__device__ __forceinline__ float exp2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

template <typename T>
struct Mma;
template <>
struct Mma<__half> {
  static __device__ __forceinline__ void run(float* c, const std::uint32_t* a, std::uint32_t b0,
                                             std::uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ std::uint32_t pack(float lo, float hi) {
    const __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const std::uint32_t*>(&h);
  }
};
template <>
struct Mma<__nv_bfloat16> {
  static __device__ __forceinline__ void run(float* c, const std::uint32_t* a, std::uint32_t b0,
                                             std::uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ std::uint32_t pack(float lo, float hi) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const std::uint32_t*>(&h);
  }
};

__device__ __forceinline__ std::uint32_t shared_address(const void* p) {
  return static_cast<std::uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy that bypasses registers (sm_80+). With valid == false nothing is
// read and the 16 bytes are zero-filled, so masked keys hold finite V rows (0 * NaN would poison
// O). The "memory" clobbers keep the compiler from moving shared-memory accesses across these.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(shared_address(dst)),
               "l"(src), "r"(valid ? 16 : 0)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
__device__ __forceinline__ void cp_async_wait_all() {
  asm volatile("cp.async.wait_group 0;\n" ::: "memory");
}
// Waits until at most `Pending` of this thread's most recent cp.async groups are in flight.
template <int Pending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(Pending) : "memory");
}

// Four 8x8 b16 matrices; lanes 8i..8i+7 give the row addresses of matrix i, register i receives
// matrix i's fragment (row lane / 4, columns 2 (lane % 4) and +1; with .trans the transpose's).
__device__ __forceinline__ void ldmatrix_x4(std::uint32_t* r, const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(shared_address(p))
               : "memory");
}
__device__ __forceinline__ void ldmatrix_x4_trans(std::uint32_t* r, const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(shared_address(p))
               : "memory");
}

template <int D>
struct MmaTile {
  // Rows padded by 16 bytes: the 8 row addresses of an ldmatrix phase hit distinct banks.
  static constexpr int kPitch = D + 8;
  static constexpr int kQElems = kMmaRows * kPitch;
  static constexpr int kStageElems = 2 * kMmaKeys * kPitch;  // a K tile, then a V tile
  // Q, then two stages of K/V (2-byte elements), then two tiles' K/V row offsets (int64).
  static constexpr std::size_t kOffsetsAt = (kQElems + 2 * kStageElems) * 2;
  static constexpr std::size_t kSmemBytes = kOffsetsAt + 2 * kMmaKeys * sizeof(std::int64_t);
  static_assert(kOffsetsAt % alignof(std::int64_t) == 0, "the offsets are 8-byte aligned");
};

// Issues the cp.async copies of keys [kt0, kt0 + kMmaKeys) of KV head `kv_head` from the paged
// caches into `ks` and `vs` (rows of `Pitch` elements), without committing them: the tile loader
// of both tensor-core kernels. Keys at or past key_hi are zero-filled and their block-table
// entries are never read.
template <typename T, int D, int Pitch>
__device__ __forceinline__ void copy_kv_tile(const PagedAttentionParams& p,
                                             const std::int32_t* table, const BlockIndexer& blocks,
                                             int kv_head, int kt0, int key_hi, T* ks, T* vs) {
  constexpr int DV = D / 8;                          // uint4 per K/V row
  constexpr int kCopies = kMmaKeys * DV / kThreads;  // 16-byte copies of K (and of V) per thread
  static_assert(kMmaKeys * DV % kThreads == 0, "a tile is an exact number of copies per thread");
  const T* key_cache = static_cast<const T*>(p.key_cache);
  const T* value_cache = static_cast<const T*>(p.value_cache);
  // A key's elements start at table[column] * block_elems + row * row_elems + head_elems: only
  // the block's offset needs 64 bits.
  const int row_elems = p.num_kv_heads * D;
  const int head_elems = kv_head * D;
  const std::int64_t block_elems = static_cast<std::int64_t>(p.block_size) * row_elems;
  // The power-of-two test is taken once per tile: inside the unrolled copies it made every copy
  // a branch between a shift and an integer division (the loader was a third of the kernel's
  // instructions).
  const auto issue = [&](auto locate) {
#pragma unroll
    for (int u = 0; u < kCopies; ++u) {
      const int i = static_cast<int>(threadIdx.x) + u * kThreads;
      const int j = i / DV;
      const int c = i % DV;
      const int kpos = kt0 + j;
      const bool valid = kpos < key_hi;
      int column = 0;
      int row = 0;
      // A key past key_hi may lie past the sequence's table row: its entry is never read.
      if (valid) locate(kpos, column, row);
      const std::int64_t offset = valid ? static_cast<std::int64_t>(table[column]) * block_elems +
                                              (row * row_elems + head_elems + c * 8)
                                        : 0;
      cp_async16(ks + j * Pitch + c * 8, key_cache + offset, valid);
      cp_async16(vs + j * Pitch + c * 8, value_cache + offset, valid);
    }
  };
  if (blocks.pow2) {
    issue([&](int key, int& column, int& row) {
      column = key >> blocks.shift;
      row = key & (blocks.block_size - 1);
    });
  } else {
    issue([&](int key, int& column, int& row) {
      column = key / blocks.block_size;
      row = key - column * blocks.block_size;
    });
  }
}

// copy_kv_tile with the tile's rows located beforehand: offsets[j] is the byte offset of key
// kt0 + j of the KV head in both caches, and the keys from `valid_keys` on (past key_hi) are
// zero-filled. A copy is then a shared-memory load and two 64-bit adds instead of a block-table
// lookup.
template <typename T, int D, int Pitch>
__device__ __forceinline__ void copy_kv_rows(const PagedAttentionParams& p,
                                             const std::int64_t* offsets, int valid_keys, T* ks,
                                             T* vs) {
  constexpr int DV = D / 8;
  constexpr int kCopies = kMmaKeys * DV / kThreads;
  const char* key_bytes = static_cast<const char*>(p.key_cache);
  const char* value_bytes = static_cast<const char*>(p.value_cache);
  const int tid = static_cast<int>(threadIdx.x);
  if constexpr (kThreads % DV == 0) {
    // A thread copies the same chunk of every row it takes (rows tid / DV + u kThreads / DV):
    // the chunk goes into the base pointers once, the rows' shared addresses into immediates.
    const int c = tid % DV;
    key_bytes += c * 16;
    value_bytes += c * 16;
#pragma unroll
    for (int u = 0; u < kCopies; ++u) {
      const int j = tid / DV + u * (kThreads / DV);
      const std::int64_t offset = offsets[j];
      const bool valid = j < valid_keys;
      cp_async16(ks + j * Pitch + c * 8, key_bytes + offset, valid);
      cp_async16(vs + j * Pitch + c * 8, value_bytes + offset, valid);
    }
  } else {
#pragma unroll
    for (int u = 0; u < kCopies; ++u) {
      const int j = (tid + u * kThreads) / DV;
      const int c = (tid + u * kThreads) % DV;
      const std::int64_t offset = offsets[j] + c * 16;
      const bool valid = j < valid_keys;
      cp_async16(ks + j * Pitch + c * 8, key_bytes + offset, valid);
      cp_async16(vs + j * Pitch + c * 8, value_bytes + offset, valid);
    }
  }
}

// Query rows [tok0, tok0 + ntok) (ntok <= kMmaRows) of sequence `seq`, query head `head`.
template <typename T, int D>
__device__ __forceinline__ void prefill_rows(const PagedAttentionParams p, unsigned char* smem,
                                             int seq, int q_begin, int q_end, int tok0, int ntok,
                                             int head) {
  using C = Convert<T>;
  using M = Mma<T>;
  using Tl = MmaTile<D>;
  constexpr int P = Tl::kPitch;
  constexpr int KT = kMmaKeys;
  constexpr int DT = D / 8;              // n-tiles of the output
  constexpr int DK = D / 16;             // k-steps of Q K^T
  constexpr int DV = D / 8;              // uint4 per K/V row
  constexpr int SK = 32;                 // keys per softmax step
  constexpr int NS = SK / 8;             // n-tiles of S
  constexpr int MT = kMmaWarpRows / 16;  // m-tiles per warp
  static_assert(DT % 2 == 0 && NS % 2 == 0, "ldmatrix.x4 covers two n-tiles");
  static_assert(KT % SK == 0, "a tile is a whole number of softmax steps");
  const float neg_inf = -INFINITY;

  T* const q_s = reinterpret_cast<T*>(smem);
  T* const kv_s = q_s + Tl::kQElems;  // stage s: K at s * kStageElems, V after it

  const int group = p.num_heads / p.num_kv_heads;
  const int kv_head = head / group;
  const int pos0 = p.seq_lens[seq] - (q_end - q_begin) + (tok0 - q_begin);
  const int window = p.sliding_window;
  const int key_lo = window > 0 ? max(0, pos0 - window + 1) : 0;
  const int key_hi = pos0 + ntok;  // > key_lo: every row sees its own key
  const int num_key_tiles = (key_hi - key_lo + KT - 1) / KT;

  const std::int32_t* table =
      p.block_tables + static_cast<std::int64_t>(seq) * p.max_blocks_per_seq;
  const BlockIndexer blocks(p.block_size);
  // Tile t's row byte offsets (copy_kv_rows) are in buffer t % 2. Threads 0 .. KT-1 store those
  // of tile it + 2 during iteration it, after the barrier that follows every read of tile it's
  // (issued in iteration it - 1); the barrier of iteration it + 1 publishes them to the
  // copies of tile it + 2 issued after it.
  std::int64_t* const offsets = reinterpret_cast<std::int64_t*>(smem + Tl::kOffsetsAt);
  const int row_elems = p.num_kv_heads * D;
  const std::int64_t block_elems = static_cast<std::int64_t>(p.block_size) * row_elems;
  // The byte offset of key kt0 + threadIdx.x (threads below KT; 0 past key_hi, whose table
  // entries are never read).
  const auto locate = [&](int kt0) -> std::int64_t {
    const int key = kt0 + static_cast<int>(threadIdx.x);
    if (threadIdx.x >= KT || key >= key_hi) return 0;
    const std::int64_t element =
        static_cast<std::int64_t>(table[blocks.column(key)]) * block_elems +
        (blocks.row(key) * row_elems + kv_head * D);
    return element * static_cast<std::int64_t>(sizeof(T));
  };
  const auto store_offset = [&](int buffer, std::int64_t offset) {
    if (threadIdx.x < KT) offsets[buffer * KT + threadIdx.x] = offset;
  };

  // Tile 0 locates its own rows (in flight while Q is staged); tile 1's are located for the
  // loop's first iteration.
  copy_kv_tile<T, D, P>(p, table, blocks, kv_head, key_lo, key_hi, kv_s, kv_s + KT * P);
  cp_async_commit();
  if (num_key_tiles > 1) store_offset(1, locate(key_lo + KT));
  const T* query = static_cast<const T*>(p.query);
  if (reinterpret_cast<std::uintptr_t>(query) % 16 == 0 && p.query_token_stride % 8 == 0) {
    for (int i = threadIdx.x; i < kMmaRows * DV; i += kThreads) {
      const int r = i / DV;
      const int c = i % DV;
      uint4 v = make_uint4(0, 0, 0, 0);
      if (r < ntok) {
        v = *reinterpret_cast<const uint4*>(query + (tok0 + r) * p.query_token_stride + head * D +
                                            c * 8);
      }
      *reinterpret_cast<uint4*>(q_s + r * P + c * 8) = v;
    }
  } else {
    for (int i = threadIdx.x; i < kMmaRows * D; i += kThreads) {
      const int r = i / D;
      const int d = i % D;
      q_s[r * P + d] =
          r < ntok ? query[(tok0 + r) * p.query_token_stride + head * D + d] : C::from_float(0.0f);
    }
  }
  // The loop's first barrier makes Q visible to every warp.

  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int g = lane / 4;
  const int t = lane % 4;
  const int warp_row0 = warp * kMmaWarpRows;  // this warp's rows: [warp_row0, + kMmaWarpRows)
  // The warp's first and last positions (rows past ntok see nothing).
  const int warp_pos_lo = pos0 + warp_row0;
  const int warp_pos_hi = pos0 + min(ntok, warp_row0 + kMmaWarpRows) - 1;
  float o[MT][DT][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int dt = 0; dt < DT; ++dt)
#pragma unroll
      for (int e = 0; e < 4; ++e) o[mt][dt][e] = 0.0f;
  // Running max and sum of rows g (index 0) and g + 8 (index 1) of each m-tile.
  float m_run[MT][2];
  float l_run[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      m_run[mt][h] = neg_inf;
      l_run[mt][h] = 0.0f;
    }
  const float scale_log2 = p.scale * kLog2e;
  // ldmatrix row addresses of this lane: matrix lane / 8, row lane % 8 of it.
  const int ld_row = lane % 8;
  const int ld_hi = (lane / 8) % 2;  // second 8 of the k dimension (K) / of the keys (V)
  const int ld_pair = lane / 16;     // second n-tile of the pair
  // A fragments of Q: lanes 0-15 address rows 0-15 at column 0, lanes 16-31 the same rows at 8.
  const T* q_lane = q_s + (warp_row0 + lane % 16) * P + (lane / 16) * 8;

  for (int it = 0; it < num_key_tiles; ++it) {
    const int kt0 = key_lo + it * KT;
    const int stage = it % 2;
    // Tile it + 2's block-table reads are in flight across the wait and the barrier; the
    // offsets are stored after the barrier, when their buffer is free.
    const std::int64_t located = it + 2 < num_key_tiles ? locate(kt0 + 2 * KT) : 0;
    cp_async_wait_all();
    // Tile `it` (and Q) are visible to every warp, and every warp is done with the other stage
    // (tile it - 1), which the next copies overwrite.
    __syncthreads();
    if (it + 1 < num_key_tiles) {
      T* ks = kv_s + (stage ^ 1) * Tl::kStageElems;
      copy_kv_rows<T, D, P>(p, offsets + (stage ^ 1) * KT, key_hi - (kt0 + KT), ks, ks + KT * P);
      cp_async_commit();
    }
    if (it + 2 < num_key_tiles) store_offset(stage, located);
    // No row of this warp sees the tile: past the causal limit of its last row, before the
    // window of its first one, or no rows at all.
    if (warp_pos_hi < warp_pos_lo || kt0 > warp_pos_hi ||
        (window > 0 && kt0 + KT - 1 <= warp_pos_lo - window)) {
      continue;
    }
    // The tile in two steps of SK keys: S for 32 rows x 64 keys would not fit the registers
    // next to O.
#pragma unroll 1
    for (int step = 0; step < KT / SK; ++step) {
      const int ks0 = kt0 + step * SK;  // first key of the step
      const T* ks = kv_s + stage * Tl::kStageElems + step * SK * P;
      const T* vs = ks + KT * P;

      // S = Q K^T for the warp's 32 rows and the step's SK keys.
      float s[MT][NS][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < NS; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) s[mt][nt][e] = 0.0f;
#pragma unroll
      for (int kk = 0; kk < DK; ++kk) {
        std::uint32_t qa[MT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) ldmatrix_x4(qa[mt], q_lane + mt * 16 * P + kk * 16);
#pragma unroll
        for (int np = 0; np < NS / 2; ++np) {
          std::uint32_t b[4];
          ldmatrix_x4(b, ks + ((2 * np + ld_pair) * 8 + ld_row) * P + kk * 16 + ld_hi * 8);
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
            M::run(s[mt][2 * np], qa[mt], b[0], b[1]);
            M::run(s[mt][2 * np + 1], qa[mt], b[2], b[3]);
          }
        }
      }

      // Mask by position only where the step crosses the warp's causal diagonal, the sliding
      // window's edge or key_hi (rows past ntok are never stored). Scores stay unscaled: the
      // scale (positive, checked by the op) goes into the exponent's fma below.
      const bool unmasked = ks0 + SK - 1 <= warp_pos_lo && ks0 + SK <= key_hi &&
                            (window <= 0 || ks0 > warp_pos_hi - window);
      if (!unmasked) {
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
          for (int nt = 0; nt < NS; ++nt) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const int row = warp_row0 + mt * 16 + g + (e >= 2 ? 8 : 0);
              const int pos = pos0 + row;
              const int key = ks0 + nt * 8 + 2 * t + (e & 1);
              const bool visible =
                  row < ntok && key < key_hi && key <= pos && (window <= 0 || key > pos - window);
              if (!visible) s[mt][nt][e] = neg_inf;
            }
          }
        }
      }

      // Online softmax per row (reduced over the quad's 4 lanes), with a lazy running max: it
      // moves only when a score passes it by more than kLazyMaxSlack (log2 units), so the
      // exponentials stay below 2^kLazyMaxSlack and O and l, which share it, are rescaled only
      // when it moves; the warp skips the rescale when none of its rows moved (most steps after
      // the first). A row with no visible key so far keeps m = -inf, l = 0, O = 0 (its
      // exponentials are taken against 0: exp2(-inf) = 0).
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        float alpha[2];
        bool moved = false;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          float mx = neg_inf;
#pragma unroll
          for (int nt = 0; nt < NS; ++nt) {
            mx = fmaxf(mx, fmaxf(s[mt][nt][2 * h], s[mt][nt][2 * h + 1]));
          }
          mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
          mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
          mx *= scale_log2;  // the running max is kept in the scaled log2 domain
          alpha[h] = 1.0f;
          if (mx > m_run[mt][h] + kLazyMaxSlack) {      // never for mx = -inf
            alpha[h] = exp2_approx(m_run[mt][h] - mx);  // 0 for m_run = -inf
            m_run[mt][h] = mx;
            moved = true;
          }
          const float m_ref = m_run[mt][h] == neg_inf ? 0.0f : m_run[mt][h];
          float sum = 0.0f;
#pragma unroll
          for (int nt = 0; nt < NS; ++nt) {
#pragma unroll
            for (int e = 2 * h; e < 2 * h + 2; ++e) {
              const float pr = exp2_approx(fmaf(s[mt][nt][e], scale_log2, -m_ref));
              s[mt][nt][e] = pr;
              sum += pr;
            }
          }
          sum += __shfl_xor_sync(0xffffffffu, sum, 1);
          sum += __shfl_xor_sync(0xffffffffu, sum, 2);
          l_run[mt][h] = l_run[mt][h] * alpha[h] + sum;
        }
        if (__any_sync(0xffffffffu, moved)) {
#pragma unroll
          for (int dt = 0; dt < DT; ++dt) {
            o[mt][dt][0] *= alpha[0];
            o[mt][dt][1] *= alpha[0];
            o[mt][dt][2] *= alpha[1];
            o[mt][dt][3] *= alpha[1];
          }
        }
      }

      // O += P V: P's accumulator fragments are the A fragments of 16-key chunks; V's B
      // fragments come transposed from its key-major rows, each feeding both m-tiles.
#pragma unroll
      for (int kc = 0; kc < NS / 2; ++kc) {
        std::uint32_t a[MT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          a[mt][0] = M::pack(s[mt][2 * kc][0], s[mt][2 * kc][1]);
          a[mt][1] = M::pack(s[mt][2 * kc][2], s[mt][2 * kc][3]);
          a[mt][2] = M::pack(s[mt][2 * kc + 1][0], s[mt][2 * kc + 1][1]);
          a[mt][3] = M::pack(s[mt][2 * kc + 1][2], s[mt][2 * kc + 1][3]);
        }
#pragma unroll
        for (int dp = 0; dp < DT / 2; ++dp) {
          std::uint32_t b[4];
          ldmatrix_x4_trans(b, vs + (kc * 16 + ld_hi * 8 + ld_row) * P + (2 * dp + ld_pair) * 8);
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
            M::run(o[mt][2 * dp], a[mt], b[0], b[1]);
            M::run(o[mt][2 * dp + 1], a[mt], b[2], b[3]);
          }
        }
      }
    }
  }

  T* out = static_cast<T*>(p.out);
  // Every row < ntok saw at least its own key: l > 0.
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = warp_row0 + mt * 16 + g + 8 * h;
      if (row >= ntok) continue;
      const float inv = 1.0f / l_run[mt][h];
      T* dst = out + (tok0 + row) * p.out_token_stride + head * D + 2 * t;
#pragma unroll
      for (int dt = 0; dt < DT; ++dt) {
        dst[dt * 8] = C::from_float(o[mt][dt][2 * h] * inv);
        dst[dt * 8 + 1] = C::from_float(o[mt][dt][2 * h + 1] * inv);
      }
    }
  }
}

// A block owns a window of kMmaRows consecutive tokens of the batch (windows numbered from the
// token count alone, so no block is launched per sequence) and one query head; it computes the
// rows of each tensor-core sequence in its window, one after the other (sequences of
// kTensorCoreMinTokens = 64 tokens or more: up to three per 128-token window).
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) prefill_mma_kernel(const PagedAttentionParams p) {
  extern __shared__ __align__(16) unsigned char smem[];
  // Blocks start in the order of their linear index, x fastest: heads along x and windows along
  // y from the last to the first, so every head's heavy (late, causal) windows run first and the
  // grid's tail is made of light ones.
  const int head = static_cast<int>(blockIdx.x);
  const int window = static_cast<int>(gridDim.y) - 1 - static_cast<int>(blockIdx.y);
  const int w0 = window * kMmaRows;
  const int w1 = min(w0 + kMmaRows, p.num_tokens);
  const std::int32_t* qsl = p.query_start_loc;
  bool first = true;
  // Sequences before sequence_of(w0) end at or before w0.
  for (int seq = sequence_of(qsl, p.num_seqs, w0); seq < p.num_seqs && qsl[seq] < w1; ++seq) {
    const int q_begin = qsl[seq];
    const int q_end = qsl[seq + 1];
    const int tok0 = max(q_begin, w0);
    const int tok1 = min(q_end, w1);
    if (tok0 >= tok1 || !uses_tensor_core_prefill<D>(p, q_end - q_begin)) continue;
    if (!first) __syncthreads();  // every warp is done with the previous rows' shared memory
    first = false;
    prefill_rows<T, D>(p, smem, seq, q_begin, q_end, tok0, tok1 - tok0, head);
  }
}

// ---------------------------------------------------------------------------------------------
// Decode on tensor cores (head sizes <= 128). A block owns one single-token sequence, up to
// kDecodeRows query heads of one GQA group (the rows of an m16 tile; rows past the block's heads
// are zero) and one split of the context. Decode is bound by reading K/V, so what matters is the
// number of bytes in flight: K/V tiles of kMmaKeys keys stream into shared memory through a
// kDecodeStages-deep cp.async pipeline, kDecodeStages - 1 tiles ahead of the one being used,
// and no register holds loaded data. The arithmetic is small next to the copy: each warp takes
// 16 keys of every tile (S = Q K^T and O += P V on mma.sync, fragments as in prefill_rows) with
// its own online softmax; the warps merge through shared memory at the end and the splits through
// the workspace, in decode_kernel's layout.
constexpr int kDecodeRows = 16;
constexpr int kDecodeStages = 3;

template <int D>
struct DecodeMmaTile {
  static constexpr int kPitch = D + 8;  // as MmaTile: conflict-free ldmatrix rows
  static constexpr int kStageElems = 2 * kMmaKeys * kPitch;  // a K tile, then a V tile
  static constexpr std::size_t kSmemBytes = kDecodeStages * kStageElems * 2;
  // The warps' (m, l, O) rows, written over the pipeline's buffers once the loop is done.
  static constexpr std::size_t kMergeBytes = kWarps * kDecodeRows * (D + 2) * sizeof(float);
  static_assert(kMergeBytes <= kSmemBytes, "the merge reuses the pipeline's shared memory");
};

// Two consecutive 2-byte elements as an mma operand register (first in the low half); `p` need
// only be 2-byte aligned.
template <typename T>
__device__ __forceinline__ std::uint32_t load_pair_unaligned(const T* p) {
  const auto* h = reinterpret_cast<const std::uint16_t*>(p);
  return static_cast<std::uint32_t>(h[0]) | (static_cast<std::uint32_t>(h[1]) << 16);
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads)
    decode_mma_kernel(const PagedAttentionParams p, const Geometry g, float* __restrict__ part_acc,
                      float* __restrict__ part_ml) {
  using C = Convert<T>;
  using M = Mma<T>;
  using Tl = DecodeMmaTile<D>;
  constexpr int P = Tl::kPitch;
  constexpr int KT = kMmaKeys;
  constexpr int DT = D / 8;   // n-tiles of the output
  constexpr int DK = D / 16;  // k-steps of Q K^T
  static_assert(KT == kWarps * 16, "each warp takes 16 keys of a tile");
  static_assert(DT % 2 == 0, "ldmatrix.x4 covers two n-tiles");
  const float neg_inf = -INFINITY;
  extern __shared__ __align__(16) unsigned char smem[];
  T* const kv_s = reinterpret_cast<T*>(smem);  // stage s: K at s * kStageElems, V after it

  const int seq = blockIdx.x;
  const int token = p.query_start_loc[seq];
  if (p.query_start_loc[seq + 1] - token != 1) return;
  const int group = p.num_heads / p.num_kv_heads;
  const int chunks = (group + kDecodeRows - 1) / kDecodeRows;
  const int kv_head = blockIdx.y / chunks;
  const int first = (blockIdx.y % chunks) * kDecodeRows;  // the block's first head in the group
  const int rows = min(kDecodeRows, group - first);
  const int head0 = kv_head * group + first;
  const int split = blockIdx.z;
  const int seq_len = p.seq_lens[seq];
  const int pos = seq_len - 1;
  // Every key in [key_lo, key_hi) is visible to the token (causal and window bounds).
  int key_lo = p.sliding_window > 0 ? max(0, pos - p.sliding_window + 1) : 0;
  int key_hi = seq_len;
  if (g.num_splits > 1) {
    key_lo = max(key_lo, split * g.split_keys);
    key_hi = min(key_hi, (split + 1) * g.split_keys);
  }
  const int num_key_tiles = key_hi > key_lo ? (key_hi - key_lo + KT - 1) / KT : 0;

  const std::int32_t* table =
      p.block_tables + static_cast<std::int64_t>(seq) * p.max_blocks_per_seq;
  const BlockIndexer blocks(p.block_size);
  // Issues the copies of tile `it` (keys key_lo + it * KT ...) into stage it % kDecodeStages as
  // one cp.async group; past the last tile the group is empty, so every thread commits the same
  // groups.
  const auto load_tile = [&](int it) {
    if (it < num_key_tiles) {
      T* ks = kv_s + (it % kDecodeStages) * Tl::kStageElems;
      copy_kv_tile<T, D, P>(p, table, blocks, kv_head, key_lo + it * KT, key_hi, ks, ks + KT * P);
    }
    cp_async_commit();
  };
#pragma unroll
  for (int it = 0; it < kDecodeStages - 1; ++it) load_tile(it);

  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int gr = lane / 4;  // this thread's rows: gr and gr + 8
  const int t = lane % 4;
  // Q's A fragments straight from global memory (read once); rows past the block's heads are 0.
  const T* query = static_cast<const T*>(p.query);
  const T* q_a = query + static_cast<std::int64_t>(token) * p.query_token_stride + (head0 + gr) * D;
  const T* q_b = q_a + 8 * D;
  const bool has_a = gr < rows;
  const bool has_b = gr + 8 < rows;
  std::uint32_t qf[DK][4];
#pragma unroll
  for (int kk = 0; kk < DK; ++kk) {
    const int d = kk * 16 + 2 * t;
    qf[kk][0] = has_a ? load_pair_unaligned(q_a + d) : 0u;
    qf[kk][1] = has_b ? load_pair_unaligned(q_b + d) : 0u;
    qf[kk][2] = has_a ? load_pair_unaligned(q_a + d + 8) : 0u;
    qf[kk][3] = has_b ? load_pair_unaligned(q_b + d + 8) : 0u;
  }
  float o[DT][4];
#pragma unroll
  for (int dt = 0; dt < DT; ++dt)
#pragma unroll
    for (int e = 0; e < 4; ++e) o[dt][e] = 0.0f;
  float m_a = neg_inf, m_b = neg_inf, l_a = 0.0f, l_b = 0.0f;
  const float scale_log2 = p.scale * kLog2e;
  const int ld_row = lane % 8;
  const int ld_hi = (lane / 8) % 2;
  const int ld_pair = lane / 16;

  for (int it = 0; it < num_key_tiles; ++it) {
    cp_async_wait<kDecodeStages - 2>();  // this thread's copies of tile `it` have landed
    // Everyone's copies of tile `it` are visible, and every warp is done with tile it - 1,
    // whose stage the next copies overwrite.
    __syncthreads();
    load_tile(it + kDecodeStages - 1);
    const T* ks = kv_s + (it % kDecodeStages) * Tl::kStageElems + warp * 16 * P;
    const T* vs = ks + KT * P;

    // S = Q K^T for the warp's 16 keys (two n-tiles).
    float s[2][4];
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[nt][e] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < DK; ++kk) {
      std::uint32_t b[4];
      ldmatrix_x4(b, ks + (ld_pair * 8 + ld_row) * P + kk * 16 + ld_hi * 8);
      M::run(s[0], qf[kk], b[0], b[1]);
      M::run(s[1], qf[kk], b[2], b[3]);
    }
    // Keys from key_lo on are visible up to key_hi (the last tile's tail is masked).
    const int k0 = key_lo + it * KT + warp * 16;
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int key = k0 + nt * 8 + 2 * t + (e & 1);
        s[nt][e] = key < key_hi ? s[nt][e] * scale_log2 : neg_inf;
      }

    // Online softmax per row (reduced over the quad's 4 lanes); a warp may see no visible key
    // in a tile (the tail), and the guards keep its rows at m = -inf, l = 0, O = 0.
    float mx_a = fmaxf(fmaxf(s[0][0], s[0][1]), fmaxf(s[1][0], s[1][1]));
    float mx_b = fmaxf(fmaxf(s[0][2], s[0][3]), fmaxf(s[1][2], s[1][3]));
#pragma unroll
    for (int lane_mask = 1; lane_mask <= 2; lane_mask *= 2) {
      mx_a = fmaxf(mx_a, __shfl_xor_sync(0xffffffffu, mx_a, lane_mask));
      mx_b = fmaxf(mx_b, __shfl_xor_sync(0xffffffffu, mx_b, lane_mask));
    }
    const float new_a = fmaxf(m_a, mx_a);
    const float new_b = fmaxf(m_b, mx_b);
    const float alpha_a = m_a == neg_inf ? 0.0f : exp2_approx(m_a - new_a);
    const float alpha_b = m_b == neg_inf ? 0.0f : exp2_approx(m_b - new_b);
    float sum_a = 0.0f, sum_b = 0.0f;
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const bool second = e >= 2;
        const float x = s[nt][e];
        const float pr = x == neg_inf ? 0.0f : exp2_approx(x - (second ? new_b : new_a));
        s[nt][e] = pr;
        if (second) {
          sum_b += pr;
        } else {
          sum_a += pr;
        }
      }
    }
#pragma unroll
    for (int lane_mask = 1; lane_mask <= 2; lane_mask *= 2) {
      sum_a += __shfl_xor_sync(0xffffffffu, sum_a, lane_mask);
      sum_b += __shfl_xor_sync(0xffffffffu, sum_b, lane_mask);
    }
    l_a = l_a * alpha_a + sum_a;
    l_b = l_b * alpha_b + sum_b;
    m_a = new_a;
    m_b = new_b;

    // O = alpha O + P V, P's accumulator fragments being the A fragment of the 16 keys.
    std::uint32_t a[4];
    a[0] = M::pack(s[0][0], s[0][1]);
    a[1] = M::pack(s[0][2], s[0][3]);
    a[2] = M::pack(s[1][0], s[1][1]);
    a[3] = M::pack(s[1][2], s[1][3]);
#pragma unroll
    for (int dp = 0; dp < DT / 2; ++dp) {
      o[2 * dp][0] *= alpha_a;
      o[2 * dp][1] *= alpha_a;
      o[2 * dp][2] *= alpha_b;
      o[2 * dp][3] *= alpha_b;
      o[2 * dp + 1][0] *= alpha_a;
      o[2 * dp + 1][1] *= alpha_a;
      o[2 * dp + 1][2] *= alpha_b;
      o[2 * dp + 1][3] *= alpha_b;
      std::uint32_t b[4];
      ldmatrix_x4_trans(b, vs + (ld_hi * 8 + ld_row) * P + (2 * dp + ld_pair) * 8);
      M::run(o[2 * dp], a, b[0], b[1]);
      M::run(o[2 * dp + 1], a, b[2], b[3]);
    }
  }

  // Merge the warps: (m, l, O) of each row through shared memory, over the pipeline's buffers
  // (no copy is in flight: the groups past the last tile were empty).
  cp_async_wait_all();
  __syncthreads();
  float* m_w = reinterpret_cast<float*>(smem);  // [kWarps][kDecodeRows]
  float* l_w = m_w + kWarps * kDecodeRows;      // [kWarps][kDecodeRows]
  float* o_w = l_w + kWarps * kDecodeRows;      // [kWarps][kDecodeRows][D]
  const int row_a = warp * kDecodeRows + gr;
  const int row_b = row_a + 8;
  if (t == 0) {
    m_w[row_a] = m_a;
    m_w[row_b] = m_b;
    l_w[row_a] = l_a;
    l_w[row_b] = l_b;
  }
#pragma unroll
  for (int dt = 0; dt < DT; ++dt) {
    const int d = dt * 8 + 2 * t;
    o_w[row_a * D + d] = o[dt][0];
    o_w[row_a * D + d + 1] = o[dt][1];
    o_w[row_b * D + d] = o[dt][2];
    o_w[row_b * D + d + 1] = o[dt][3];
  }
  __syncthreads();

  T* out = static_cast<T*>(p.out);
  for (int i = threadIdx.x; i < rows * D; i += kThreads) {
    const int r = i / D;
    const int d = i % D;
    float mx = neg_inf;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) mx = fmaxf(mx, m_w[w * kDecodeRows + r]);
    float num = 0.0f;
    float den = 0.0f;
    if (mx != neg_inf) {  // else the split held no key: its partial stays empty
#pragma unroll
      for (int w = 0; w < kWarps; ++w) {
        const float weight = exp2f(m_w[w * kDecodeRows + r] - mx);
        num = fmaf(weight, o_w[(w * kDecodeRows + r) * D + d], num);
        den = fmaf(weight, l_w[w * kDecodeRows + r], den);
      }
    }
    const int head = head0 + r;
    if (g.num_splits == 1) {
      // den > 0: the token sees its own key.
      out[static_cast<std::int64_t>(token) * p.out_token_stride + head * D + d] =
          C::from_float(num / den);
    } else {
      const std::int64_t slot =
          (static_cast<std::int64_t>(token) * p.num_heads + head) * g.num_splits + split;
      part_acc[slot * D + d] = num;
      if (d == 0) {
        // The merge works in the natural-log domain, as the general kernel's partials.
        part_ml[slot * 2] = mx == neg_inf ? neg_inf : mx * kLn2;
        part_ml[slot * 2 + 1] = den;
      }
    }
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads)
    paged_attention_kernel(const PagedAttentionParams p, const Geometry g,
                           float* __restrict__ part_acc, float* __restrict__ part_ml) {
  using C = Convert<T>;
  using TileT = Tile<D>;
  constexpr int KT = TileT::kKeys;
  constexpr int KP = TileT::kKPitch;
  constexpr int DV = TileT::kVecs;
  constexpr int DPT = TileT::kDimsPerThread;
  const float neg_inf = -INFINITY;

  extern __shared__ __align__(16) unsigned char smem[];
  T* q_s = reinterpret_cast<T*>(smem);                  // [kMaxRows][D]
  T* k_s = q_s + kMaxRows * D;                          // [KT][KP]
  T* v_s = k_s + KT * KP;                               // [KT][D]
  float* p_s = reinterpret_cast<float*>(v_s + KT * D);  // [kMaxRows][KT] scores, then probs
  float* m_s = p_s + kMaxRows * KT;                     // running max per row
  float* l_s = m_s + kMaxRows;                          // running sum per row
  float* alpha_s = l_s + kMaxRows;                      // rescale of this tile per row

  // Sequence and tokens of this tile (see the file comment for the numbering).
  const int tile = blockIdx.x;
  const int tq = g.tokens_per_block;
  int lo = 0;
  int hi = p.num_seqs - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (p.query_start_loc[mid] / tq + mid <= tile) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  const int seq = lo;
  const int q_begin = p.query_start_loc[seq];
  const int q_end = p.query_start_loc[seq + 1];
  const int first_tile = q_begin / tq + seq;
  if (tile < first_tile) return;
  const int tok0 = q_begin + (tile - first_tile) * tq;
  if (tok0 >= q_end) return;
  // decode_kernel and prefill_mma_kernel own these sequences.
  if (q_end - q_begin == 1 || uses_tensor_core_prefill<D>(p, q_end - q_begin)) return;
  const int tok1 = min(q_end, tok0 + tq);
  const int hpb = g.heads_per_block;
  const int rows = (tok1 - tok0) * hpb;
  const int group = p.num_heads / p.num_kv_heads;
  const int kv_head = blockIdx.y / g.head_chunks;
  const int head0 = kv_head * group + (blockIdx.y % g.head_chunks) * hpb;
  const int split = blockIdx.z;

  const int pos0 = p.seq_lens[seq] - (q_end - q_begin) + (tok0 - q_begin);
  int key_lo = p.sliding_window > 0 ? max(0, pos0 - p.sliding_window + 1) : 0;
  int key_hi = pos0 + (tok1 - tok0);  // exclusive: one past the last token's position
  if (g.num_splits > 1) {
    key_lo = max(key_lo, split * g.split_keys);
    key_hi = min(key_hi, (split + 1) * g.split_keys);
  }

  const T* query = static_cast<const T*>(p.query);
  for (int i = threadIdx.x; i < kMaxRows * D; i += kThreads) {
    const int r = i / D;
    float x = 0.0f;
    if (r < rows) {
      const std::int64_t token = tok0 + r / hpb;
      x = C::to_float(query[token * p.query_token_stride + (head0 + r % hpb) * D + i % D]);
    }
    q_s[i] = C::from_float(x);
  }
  if (threadIdx.x < kMaxRows) {
    m_s[threadIdx.x] = neg_inf;
    l_s[threadIdx.x] = 0.0f;
  }
  float acc[kMaxRows][DPT];
#pragma unroll
  for (int r = 0; r < kMaxRows; ++r)
#pragma unroll
    for (int b = 0; b < DPT; ++b) acc[r][b] = 0.0f;

  const std::int32_t* table =
      p.block_tables + static_cast<std::int64_t>(seq) * p.max_blocks_per_seq;
  const T* key_cache = static_cast<const T*>(p.key_cache);
  const T* value_cache = static_cast<const T*>(p.value_cache);
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;

  // K/V tiles are software-pipelined through registers: the loads of tile t + 1 are issued
  // before tile t is computed, so their latency overlaps the arithmetic.
  constexpr int kLoads = (KT * DV + kThreads - 1) / kThreads;  // uint4 of K (and of V) per thread
  uint4 k_next[kLoads];
  uint4 v_next[kLoads];
  const auto fetch = [&](int tile_start) {
#pragma unroll
    for (int u = 0; u < kLoads; ++u) {
      const int i = threadIdx.x + u * kThreads;
      const int kpos = tile_start + i / DV;
      k_next[u] = make_uint4(0, 0, 0, 0);
      v_next[u] = make_uint4(0, 0, 0, 0);
      if (i < KT * DV && kpos < key_hi) {
        const std::int64_t block = table[kpos / p.block_size];
        const std::int64_t row =
            ((block * p.block_size + kpos % p.block_size) * p.num_kv_heads + kv_head) * D +
            (i % DV) * 8;
        k_next[u] = *reinterpret_cast<const uint4*>(key_cache + row);
        v_next[u] = *reinterpret_cast<const uint4*>(value_cache + row);
      }
    }
  };
  if (key_lo < key_hi) fetch(key_lo);

  for (int kt0 = key_lo; kt0 < key_hi; kt0 += KT) {
    __syncthreads();  // the previous tile's readers are done (and q_s/m_s/l_s are initialised)
#pragma unroll
    for (int u = 0; u < kLoads; ++u) {
      const int i = threadIdx.x + u * kThreads;
      if (i < KT * DV) {
        *reinterpret_cast<uint4*>(k_s + (i / DV) * KP + (i % DV) * 8) = k_next[u];
        *reinterpret_cast<uint4*>(v_s + (i / DV) * D + (i % DV) * 8) = v_next[u];
      }
    }
    __syncthreads();
    if (kt0 + KT < key_hi) fetch(kt0 + KT);

    // Scores, masked by position (causal and sliding window).
    for (int i = threadIdx.x; i < kMaxRows * KT; i += kThreads) {
      const int r = i / KT;
      const int j = i % KT;
      const int kpos = kt0 + j;
      float score = neg_inf;
      if (r < rows && kpos < key_hi) {
        const int pos = pos0 + r / hpb;
        if (kpos <= pos && (p.sliding_window <= 0 || kpos > pos - p.sliding_window)) {
          float dot = 0.0f;
#pragma unroll
          for (int c = 0; c < DV; ++c) {
            const uint4 qa = *reinterpret_cast<const uint4*>(q_s + r * D + c * 8);
            const uint4 ka = *reinterpret_cast<const uint4*>(k_s + j * KP + c * 8);
            const T* qh = reinterpret_cast<const T*>(&qa);
            const T* kh = reinterpret_cast<const T*>(&ka);
#pragma unroll
            for (int e = 0; e < 8; ++e) dot = fmaf(C::to_float(qh[e]), C::to_float(kh[e]), dot);
          }
          score = dot * p.scale;
        }
      }
      p_s[i] = score;
    }
    __syncthreads();

    // Online softmax, one warp per row.
    for (int r = warp; r < kMaxRows; r += kWarps) {
      const float x = lane < KT ? p_s[r * KT + lane] : neg_inf;
      const float m_old = m_s[r];
      const float m_new = fmaxf(m_old, warp_max(x));
      float prob = 0.0f;
      float alpha = 1.0f;
      if (m_new != neg_inf) {
        prob = x == neg_inf ? 0.0f : __expf(x - m_new);
        alpha = m_old == neg_inf ? 0.0f : __expf(m_old - m_new);
      }
      const float sum = warp_sum(prob);
      if (lane < KT) p_s[r * KT + lane] = prob;
      if (lane == 0) {
        l_s[r] = l_s[r] * alpha + sum;
        m_s[r] = m_new;
        alpha_s[r] = alpha;
      }
    }
    __syncthreads();

    // acc = alpha * acc + P V; each thread owns DPT output dims of every row.
#pragma unroll
    for (int b = 0; b < DPT; ++b) {
      const int d = threadIdx.x + b * kThreads;
      if (d < D) {
#pragma unroll
        for (int r = 0; r < kMaxRows; ++r) acc[r][b] *= alpha_s[r];
        for (int j = 0; j < KT; j += 4) {
          const float v0 = C::to_float(v_s[(j + 0) * D + d]);
          const float v1 = C::to_float(v_s[(j + 1) * D + d]);
          const float v2 = C::to_float(v_s[(j + 2) * D + d]);
          const float v3 = C::to_float(v_s[(j + 3) * D + d]);
#pragma unroll
          for (int r = 0; r < kMaxRows; ++r) {
            if (r < rows) {
              const float4 pr = *reinterpret_cast<const float4*>(p_s + r * KT + j);
              acc[r][b] = fmaf(pr.x, v0, fmaf(pr.y, v1, fmaf(pr.z, v2, fmaf(pr.w, v3, acc[r][b]))));
            }
          }
        }
      }
    }
  }
  __syncthreads();  // final m_s/l_s visible (also when this block had no keys)

  T* out = static_cast<T*>(p.out);
#pragma unroll
  for (int b = 0; b < DPT; ++b) {
    const int d = threadIdx.x + b * kThreads;
    if (d >= D) continue;
#pragma unroll
    for (int r = 0; r < kMaxRows; ++r) {
      if (r >= rows) continue;
      const std::int64_t token = tok0 + r / hpb;
      const int head = head0 + r % hpb;
      if (g.num_splits == 1) {
        // l > 0: every row sees at least its own key.
        out[token * p.out_token_stride + head * D + d] = C::from_float(acc[r][b] / l_s[r]);
      } else {
        const std::int64_t slot = (token * p.num_heads + head) * g.num_splits + split;
        part_acc[slot * D + d] = acc[r][b];
        if (d == 0) {
          part_ml[slot * 2] = m_s[r];
          part_ml[slot * 2 + 1] = l_s[r];
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Decode (sequences with exactly one query token): a block owns R query heads of one GQA group
// (all of them share each K/V load) and one split of the context. Its 4 warps take interleaved
// runs of keys with their own online softmax in registers, so the loop has no block barrier; the
// warps merge through shared memory at the end and the splits through the workspace.
//
// Within a warp, a key row of D / 8 16-byte vectors is read by a segment of kLanesPerKey lanes
// (D / 8 rounded up to a power of two; lanes past D / 8 idle), so a warp reads 32 / kLanesPerKey
// keys per step, and kSteps steps' K and V loads are issued before any of them is used.
template <int D>
struct DecodeLayout {
  static constexpr int kVecs = D / 8;
  static constexpr int kLanesPerKey = kVecs <= 8 ? 8 : (kVecs <= 16 ? 16 : 32);
  static constexpr int kKeysPerStep = 32 / kLanesPerKey;
  static_assert(kVecs <= 32, "a key row must fit one warp");
};

__device__ __forceinline__ uint4 load_streaming(const void* p) {
  return __ldg(static_cast<const uint4*>(p));
}

template <typename T, int D, int R>
__global__ void __launch_bounds__(kThreads)
    decode_kernel(const PagedAttentionParams p, const Geometry g, float* __restrict__ part_acc,
                  float* __restrict__ part_ml) {
  using C = Convert<T>;
  using L = DecodeLayout<D>;
  constexpr int W = L::kLanesPerKey;
  constexpr int KPS = L::kKeysPerStep;
  constexpr int U = R >= 8 ? 4 : 8;  // steps per iteration (register budget at 8 heads)
  constexpr int KW = U * KPS;        // keys per warp per iteration
  const float neg_inf = -INFINITY;

  __shared__ float m_w[kWarps][R];
  __shared__ float l_w[kWarps][R];
  __shared__ float acc_w[kWarps][R][D];

  const int seq = blockIdx.x;
  const int token = p.query_start_loc[seq];
  if (p.query_start_loc[seq + 1] - token != 1) return;
  const int group = p.num_heads / p.num_kv_heads;
  const int chunks = group / R;
  const int kv_head = blockIdx.y / chunks;
  const int head0 = kv_head * group + (blockIdx.y % chunks) * R;
  const int split = blockIdx.z;
  const int seq_len = p.seq_lens[seq];
  const int pos = seq_len - 1;
  // Every key in [key_lo, key_hi) is visible to the token (causal and window bounds).
  int key_lo = p.sliding_window > 0 ? max(0, pos - p.sliding_window + 1) : 0;
  int key_hi = seq_len;
  if (g.num_splits > 1) {
    key_lo = max(key_lo, split * g.split_keys);
    key_hi = min(key_hi, (split + 1) * g.split_keys);
  }

  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int seg = lane / W;
  const int vec = lane % W;
  const bool active = vec < L::kVecs;

  // q pre-scaled into the log2 domain: probabilities are exp2 of score differences.
  const float q_scale = p.scale * kLog2e;
  const T* query = static_cast<const T*>(p.query);
  float q[R][8];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int e = 0; e < 8; ++e)
      q[r][e] = active ? C::to_float(query[static_cast<std::int64_t>(token) * p.query_token_stride +
                                           (head0 + r) * D + vec * 8 + e]) *
                             q_scale
                       : 0.0f;
  float acc[R][8];
  float m[R];
  float l[R];  // this lane's segment's sum (equal across the segment's lanes)
#pragma unroll
  for (int r = 0; r < R; ++r) {
    m[r] = neg_inf;
    l[r] = 0.0f;
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[r][e] = 0.0f;
  }

  const std::int32_t* table =
      p.block_tables + static_cast<std::int64_t>(seq) * p.max_blocks_per_seq;
  const T* key_cache = static_cast<const T*>(p.key_cache);
  const T* value_cache = static_cast<const T*>(p.value_cache);
  const BlockIndexer blocks(p.block_size);

  // Block-table entries are read one iteration ahead, so the K/V loads do not wait for them.
  constexpr int kStride = kWarps * KW;
  int base = key_lo + warp * KW;
  std::int32_t entry[U];
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int key = base + u * KPS + seg;
    entry[u] = active && key < key_hi ? table[blocks.column(key)] : 0;
  }
  for (; base < key_hi; base += kStride) {
    uint4 kr[U];
    uint4 vr[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int key = base + u * KPS + seg;
      kr[u] = make_uint4(0, 0, 0, 0);
      vr[u] = make_uint4(0, 0, 0, 0);
      if (active && key < key_hi) {
        const std::int64_t row =
            ((static_cast<std::int64_t>(entry[u]) * p.block_size + blocks.row(key)) *
                 p.num_kv_heads +
             kv_head) *
                D +
            vec * 8;
        kr[u] = load_streaming(key_cache + row);
        vr[u] = load_streaming(value_cache + row);
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int key = base + kStride + u * KPS + seg;
      entry[u] = active && key < key_hi ? table[blocks.column(key)] : 0;
    }

    // Scores of the segment's keys, reduced over the segment's lanes (xor offsets < W stay in it).
    float s[U][R];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const T* kh = reinterpret_cast<const T*>(&kr[u]);
      float kf[8];
#pragma unroll
      for (int e = 0; e < 8; ++e) kf[e] = C::to_float(kh[e]);
      const bool visible = base + u * KPS + seg < key_hi;
#pragma unroll
      for (int r = 0; r < R; ++r) {
        float dot = 0.0f;
#pragma unroll
        for (int e = 0; e < 8; ++e) dot = fmaf(q[r][e], kf[e], dot);
#pragma unroll
        for (int o = W / 2; o > 0; o /= 2) dot += __shfl_xor_sync(0xffffffffu, dot, o);
        s[u][r] = visible ? dot : neg_inf;
      }
    }

    // One max update per iteration, shared by the warp (xor offsets >= W cross segments).
#pragma unroll
    for (int r = 0; r < R; ++r) {
      float mx = s[0][r];
#pragma unroll
      for (int u = 1; u < U; ++u) mx = fmaxf(mx, s[u][r]);
#pragma unroll
      for (int o = W; o < 32; o *= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
      // Finite: key `base` (step 0 of segment 0) is visible. exp2f(-inf) = 0 on the first pass.
      const float m_new = fmaxf(m[r], mx);
      const float alpha = exp2f(m[r] - m_new);
      m[r] = m_new;
      l[r] *= alpha;
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[r][e] *= alpha;
#pragma unroll
      for (int u = 0; u < U; ++u) {
        s[u][r] = exp2f(s[u][r] - m_new);
        l[r] += s[u][r];
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const T* vh = reinterpret_cast<const T*>(&vr[u]);
      float vf[8];
#pragma unroll
      for (int e = 0; e < 8; ++e) vf[e] = C::to_float(vh[e]);
#pragma unroll
      for (int r = 0; r < R; ++r)
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[r][e] = fmaf(s[u][r], vf[e], acc[r][e]);
    }
  }

  // Sum the segments (same max across the warp), then merge the warps.
#pragma unroll
  for (int r = 0; r < R; ++r) {
#pragma unroll
    for (int o = W; o < 32; o *= 2) {
      l[r] += __shfl_xor_sync(0xffffffffu, l[r], o);
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[r][e] += __shfl_xor_sync(0xffffffffu, acc[r][e], o);
    }
  }
  if (lane == 0) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
      m_w[warp][r] = m[r];
      l_w[warp][r] = l[r];
    }
  }
  if (seg == 0 && active) {
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int e = 0; e < 8; ++e) acc_w[warp][r][vec * 8 + e] = acc[r][e];
  }
  __syncthreads();

  T* out = static_cast<T*>(p.out);
  for (int i = threadIdx.x; i < R * D; i += kThreads) {
    const int r = i / D;
    const int d = i % D;
    float mx = neg_inf;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) mx = fmaxf(mx, m_w[w][r]);
    float num = 0.0f;
    float den = 0.0f;
    if (mx != neg_inf) {  // else no warp had a key (an empty split): the partial stays empty
#pragma unroll
      for (int w = 0; w < kWarps; ++w) {
        const float weight = exp2f(m_w[w][r] - mx);
        num = fmaf(weight, acc_w[w][r][d], num);
        den = fmaf(weight, l_w[w][r], den);
      }
    }
    const int head = head0 + r;
    if (g.num_splits == 1) {
      // den > 0: the token sees its own key.
      out[static_cast<std::int64_t>(token) * p.out_token_stride + head * D + d] =
          C::from_float(num / den);
    } else {
      const std::int64_t slot =
          (static_cast<std::int64_t>(token) * p.num_heads + head) * g.num_splits + split;
      part_acc[slot * D + d] = num;
      if (d == 0) {
        // The merge works in the natural-log domain, as the general kernel's partials.
        part_ml[slot * 2] = mx == neg_inf ? neg_inf : mx * kLn2;
        part_ml[slot * 2 + 1] = den;
      }
    }
  }
}

// Merges the splits of one (token, head): out = sum_i e^(m_i - M) acc_i / sum_i e^(m_i - M) l_i.
template <typename T, int D>
__global__ void __launch_bounds__(D)
    combine_splits_kernel(const PagedAttentionParams p, int num_splits,
                          const float* __restrict__ part_acc, const float* __restrict__ part_ml) {
  using C = Convert<T>;
  const std::int64_t token = blockIdx.x;
  const int head = blockIdx.y;
  // Tokens outside every sequence were not computed; leave them as the CPU path does.
  if (token < p.query_start_loc[0] || token >= p.query_start_loc[p.num_seqs]) return;
  const int seq = sequence_of(p.query_start_loc, p.num_seqs, static_cast<int>(token));
  // The tensor-core kernel wrote these tokens directly.
  if (uses_tensor_core_prefill<D>(p, p.query_start_loc[seq + 1] - p.query_start_loc[seq])) return;
  const std::int64_t base = (token * p.num_heads + head) * num_splits;
  float max_m = -INFINITY;
  for (int i = 0; i < num_splits; ++i) max_m = fmaxf(max_m, part_ml[(base + i) * 2]);
  const int d = threadIdx.x;
  float num = 0.0f;
  float den = 0.0f;
  for (int i = 0; i < num_splits; ++i) {
    const float m = part_ml[(base + i) * 2];
    if (m == -INFINITY) continue;  // this split held no key the row sees
    const float w = __expf(m - max_m);
    num = fmaf(w, part_acc[(base + i) * D + d], num);
    den = fmaf(w, part_ml[(base + i) * 2 + 1], den);
  }
  static_cast<T*>(p.out)[token * p.out_token_stride + head * D + d] = C::from_float(num / den);
}

int sm_count(int device) {
  int count = 0;
  check_cuda(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device),
             "cudaDeviceGetAttribute(multiProcessorCount)");
  return count;
}

Geometry make_geometry(int num_tokens, int num_seqs, int num_heads, int num_kv_heads,
                       std::int64_t max_context, int sms) {
  Geometry g{};
  const int group = num_heads / num_kv_heads;
  g.heads_per_block = 1;
  for (int h = std::min(group, kMaxRows); h >= 1; --h) {
    if (group % h == 0) {
      g.heads_per_block = h;
      break;
    }
  }
  g.tokens_per_block = kMaxRows / g.heads_per_block;
  g.head_chunks = group / g.heads_per_block;
  g.num_tiles = num_tokens / g.tokens_per_block + num_seqs;
  const std::int64_t blocks = static_cast<std::int64_t>(g.num_tiles) * num_kv_heads * g.head_chunks;
  const std::int64_t wanted = kBlocksPerSm * static_cast<std::int64_t>(sms);
  std::int64_t splits = 1;
  if (blocks < wanted && max_context > kSplitKeys) {
    splits = std::min<std::int64_t>(
        {(max_context + kSplitKeys - 1) / kSplitKeys, (wanted + blocks - 1) / blocks, kMaxSplits});
  }
  g.num_splits = static_cast<int>(std::max<std::int64_t>(1, splits));
  const std::int64_t per_split = (max_context + g.num_splits - 1) / g.num_splits;
  g.split_keys = static_cast<int>((per_split + 63) / 64 * 64);
  g.decode_heads = group % 8 == 0 ? 8 : (group % 4 == 0 ? 4 : (group % 2 == 0 ? 2 : 1));
  g.decode_chunks = group / g.decode_heads;
  return g;
}

std::size_t workspace_bytes_for(const Geometry& g, int num_tokens, int num_heads, int head_size) {
  if (g.num_splits == 1) return 0;
  return static_cast<std::size_t>(num_tokens) * num_heads * g.num_splits *
         (static_cast<std::size_t>(head_size) + 2) * sizeof(float);
}

template <typename T, int D>
void launch_decode_mma(const PagedAttentionParams& p, const Geometry& g, float* part_acc,
                       float* part_ml, cudaStream_t stream) {
  constexpr std::size_t smem_bytes = DecodeMmaTile<D>::kSmemBytes;
  check_cuda(
      cudaFuncSetAttribute(decode_mma_kernel<T, D>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                           static_cast<int>(smem_bytes)),
      "cudaFuncSetAttribute(decode_mma_kernel)");
  const int group = p.num_heads / p.num_kv_heads;
  const int chunks = (group + kDecodeRows - 1) / kDecodeRows;
  const dim3 decode_grid(static_cast<unsigned>(p.num_seqs),
                         static_cast<unsigned>(p.num_kv_heads * chunks),
                         static_cast<unsigned>(g.num_splits));
  decode_mma_kernel<T, D><<<decode_grid, kThreads, smem_bytes, stream>>>(p, g, part_acc, part_ml);
  check_launch("decode_mma_kernel");
}

// Whether the tensor-core kernels for head size D run on `device`: their shared memory (103 KiB
// at head size 128) must fit the per-block opt-in limit, which sm_86/sm_89 parts cap at 99 KiB;
// APHRODITE_CUDA_ATTENTION_TENSOR_CORES=0 turns them off (the CUDA-core kernels then serve every
// sequence, as for head size 256).
template <int D>
bool tensor_cores_usable(int device) {
  if constexpr (D > 128) {
    (void)device;
    return false;
  } else {
    const char* env = std::getenv("APHRODITE_CUDA_ATTENTION_TENSOR_CORES");
    if (env != nullptr && std::string(env) == "0") return false;
    int optin = 0;
    check_cuda(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
               "cudaDeviceGetAttribute(maxSharedMemoryPerBlockOptin)");
    const std::size_t needed = std::max(DecodeMmaTile<D>::kSmemBytes, MmaTile<D>::kSmemBytes);
    return needed <= static_cast<std::size_t>(optin);
  }
}

template <typename T, int D>
void launch_attention(PagedAttentionParams p, const Geometry& g, float* part_acc, float* part_ml,
                      int device, cudaStream_t stream) {
  p.cuda_tensor_cores = tensor_cores_usable<D>(device) ? 1 : 0;
  // With a known bound on the query lengths, the kernels for longer queries are not launched
  // (their blocks would all find no sequence of theirs and return).
  const bool unknown = p.max_query_len <= 0;
  if (unknown || p.max_query_len >= 2) {
    const dim3 grid(static_cast<unsigned>(g.num_tiles),
                    static_cast<unsigned>(p.num_kv_heads * g.head_chunks),
                    static_cast<unsigned>(g.num_splits));
    paged_attention_kernel<T, D>
        <<<grid, kThreads, Tile<D>::kSmemBytes, stream>>>(p, g, part_acc, part_ml);
    check_launch("paged_attention_kernel");
  }
  // Single-token sequences; the kernel above skipped them.
  bool decoded = false;
  if constexpr (D <= 128) {
    if (p.cuda_tensor_cores != 0) {
      launch_decode_mma<T, D>(p, g, part_acc, part_ml, stream);
      decoded = true;
    }
  }
  if (!decoded) {
    const dim3 decode_grid(static_cast<unsigned>(p.num_seqs),
                           static_cast<unsigned>(p.num_kv_heads * g.decode_chunks),
                           static_cast<unsigned>(g.num_splits));
    switch (g.decode_heads) {
      case 8:
        decode_kernel<T, D, 8><<<decode_grid, kThreads, 0, stream>>>(p, g, part_acc, part_ml);
        break;
      case 4:
        decode_kernel<T, D, 4><<<decode_grid, kThreads, 0, stream>>>(p, g, part_acc, part_ml);
        break;
      case 2:
        decode_kernel<T, D, 2><<<decode_grid, kThreads, 0, stream>>>(p, g, part_acc, part_ml);
        break;
      default:
        decode_kernel<T, D, 1><<<decode_grid, kThreads, 0, stream>>>(p, g, part_acc, part_ml);
        break;
    }
    check_launch("decode_kernel");
  }
  if constexpr (D <= 128) {
    if (p.cuda_tensor_cores != 0 && (unknown || p.max_query_len >= kTensorCoreMinTokens)) {
      // Prefill chunks of >= kTensorCoreMinTokens tokens; the kernels above skipped them.
      constexpr std::size_t smem_bytes = MmaTile<D>::kSmemBytes;
      // Above the default 48 KiB a kernel must opt in (not a stream operation: capture safe).
      check_cuda(cudaFuncSetAttribute(prefill_mma_kernel<T, D>,
                                      cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(smem_bytes)),
                 "cudaFuncSetAttribute(prefill_mma_kernel)");
      // One block per (head, window); see the kernel for the order.
      const int windows = (p.num_tokens + kMmaRows - 1) / kMmaRows;  // <= 65535: checked above
      const dim3 mma_grid(static_cast<unsigned>(p.num_heads), static_cast<unsigned>(windows));
      prefill_mma_kernel<T, D><<<mma_grid, kThreads, smem_bytes, stream>>>(p);
      check_launch("prefill_mma_kernel");
    }
  }
  if (g.num_splits > 1) {
    const dim3 combine_grid(static_cast<unsigned>(p.num_tokens),
                            static_cast<unsigned>(p.num_heads));
    combine_splits_kernel<T, D><<<combine_grid, D, 0, stream>>>(p, g.num_splits, part_acc, part_ml);
    check_launch("combine_splits_kernel");
  }
}

template <typename T>
void dispatch_head_size(const PagedAttentionParams& p, const Geometry& g, float* part_acc,
                        float* part_ml, int device, cudaStream_t stream) {
  switch (p.head_size) {
    case 64:
      return launch_attention<T, 64>(p, g, part_acc, part_ml, device, stream);
    case 80:
      return launch_attention<T, 80>(p, g, part_acc, part_ml, device, stream);
    case 96:
      return launch_attention<T, 96>(p, g, part_acc, part_ml, device, stream);
    case 112:
      return launch_attention<T, 112>(p, g, part_acc, part_ml, device, stream);
    case 128:
      return launch_attention<T, 128>(p, g, part_acc, part_ml, device, stream);
    case 256:
      return launch_attention<T, 256>(p, g, part_acc, part_ml, device, stream);
    default:
      throw ValueError("CUDA paged attention: unsupported head size " +
                       std::to_string(p.head_size));
  }
}

}  // namespace

void reshape_and_cache_cuda(const ReshapeAndCacheParams& p, int device, StreamHandle stream) {
  DeviceGuard guard(device);
  const int row = p.num_kv_heads * p.head_size;
  const bool vectorised = aligned16(p.key) && aligned16(p.value) && aligned16(p.key_cache) &&
                          aligned16(p.value_cache) && p.key_token_stride % 8 == 0 &&
                          p.value_token_stride % 8 == 0 && row % 8 == 0;
  const cudaStream_t s = to_cuda_stream(stream);
  const unsigned grid = static_cast<unsigned>(p.num_tokens);
  if (vectorised) {
    reshape_and_cache_kernel<uint4>
        <<<grid, 128, 0, s>>>(static_cast<const uint4*>(p.key), static_cast<const uint4*>(p.value),
                              static_cast<uint4*>(p.key_cache), static_cast<uint4*>(p.value_cache),
                              p.slot_mapping, p.slot_mapping_is_int64, p.key_token_stride / 8,
                              p.value_token_stride / 8, row / 8, p.num_slots);
  } else {
    reshape_and_cache_kernel<std::uint16_t><<<grid, 128, 0, s>>>(
        static_cast<const std::uint16_t*>(p.key), static_cast<const std::uint16_t*>(p.value),
        static_cast<std::uint16_t*>(p.key_cache), static_cast<std::uint16_t*>(p.value_cache),
        p.slot_mapping, p.slot_mapping_is_int64, p.key_token_stride, p.value_token_stride, row,
        p.num_slots);
  }
  check_launch("reshape_and_cache_kernel");
}

std::size_t paged_attention_cuda_workspace_bytes(int num_tokens, int num_seqs, int num_heads,
                                                 int num_kv_heads, int head_size,
                                                 std::int64_t max_context, int device) {
  DeviceGuard guard(device);
  const Geometry g =
      make_geometry(num_tokens, num_seqs, num_heads, num_kv_heads, max_context, sm_count(device));
  return workspace_bytes_for(g, num_tokens, num_heads, head_size);
}

void paged_attention_cuda(const PagedAttentionParams& p, void* workspace,
                          std::size_t workspace_bytes, int device, StreamHandle stream) {
  DeviceGuard guard(device);
  if (!aligned16(p.key_cache) || !aligned16(p.value_cache)) {
    throw ValueError("CUDA paged attention needs 16-byte aligned key_cache and value_cache");
  }
  // The tensor-core prefill grid has a 128-token window per block along y (at most 65535).
  if (p.num_tokens > 65535LL * kMmaRows) {
    throw ValueError("CUDA paged attention takes at most " + std::to_string(65535 * kMmaRows) +
                     " query tokens per call");
  }
  const std::int64_t max_context = static_cast<std::int64_t>(p.max_blocks_per_seq) * p.block_size;
  Geometry g = make_geometry(p.num_tokens, p.num_seqs, p.num_heads, p.num_kv_heads, max_context,
                             sm_count(device));
  const std::size_t needed = workspace_bytes_for(g, p.num_tokens, p.num_heads, p.head_size);
  float* part_acc = nullptr;
  float* part_ml = nullptr;
  if (needed > 0 && workspace != nullptr && workspace_bytes >= needed && aligned16(workspace)) {
    part_acc = static_cast<float*>(workspace);
    part_ml = part_acc + static_cast<std::size_t>(p.num_tokens) * p.num_heads * g.num_splits *
                             static_cast<std::size_t>(p.head_size);
  } else {
    g.num_splits = 1;  // no (or too small a) workspace: one block per tile, no merge
  }
  const cudaStream_t s = to_cuda_stream(stream);
  if (p.dtype == DType::kFloat16) {
    dispatch_head_size<__half>(p, g, part_acc, part_ml, device, s);
  } else {
    dispatch_head_size<__nv_bfloat16>(p, g, part_acc, part_ml, device, s);
  }
}

}  // namespace aphrodite::detail
