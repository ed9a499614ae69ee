// CUDA reshape_and_cache and paged_attention (float16 / bfloat16, float32 accumulation).
//
// paged_attention, one call for a mixed batch (two or three kernels on the caller's stream):
// - paged_attention_kernel serves decode tokens and short chunks. A thread block owns a tile of
// query rows: up to kMaxRows rows made of `heads_per_block` query
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
//   to 128) on tensor cores; the other kernels skip those sequences. Which kernel owns a
//   sequence is decided on the device from query_start_loc, so the host needs no batch plan.
// The host reads no device data and allocates nothing: safe to capture in a CUDA graph.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <string>

#include "aphrodite/error.h"
#include "cuda_check.cuh"
#include "internal/attention_kernels.h"

namespace aphrodite::detail {

namespace {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxRows = 16;     // query rows per block
constexpr int kSplitKeys = 512;  // a context is split only when longer than this
constexpr int kMaxSplits = 32;

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
// when the head size has one (<= 128: its Q/K/V tiles then fit the default shared memory).
constexpr int kTensorCoreMinTokens = 64;

template <int D>
__device__ __forceinline__ bool uses_tensor_core_prefill(int q_len) {
  return D <= 128 && q_len >= kTensorCoreMinTokens;
}

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
// Prefill on tensor cores (FlashAttention-2 style): a block of 4 warps owns 64 query tokens of one
// query head, each warp 16 of them; K/V tiles of 32 keys come through the block table into shared
// memory; S = Q K^T and O += P V are mma.sync m16n8k16 with float32 accumulation, the online
// softmax runs on the accumulator fragments (a row lives in the 4 lanes of a quad).
//
// m16n8k16 fragments (g = lane / 4, t = lane % 4): A (16x16, row-major) a0 = A[g][2t..2t+1],
// a1 = A[g+8][2t..], a2 = A[g][2t+8..], a3 = A[g+8][2t+8..]; B (16x8) b0 = B[2t..2t+1][g],
// b1 = B[2t+8..2t+9][g]; C (16x8) c0,c1 = C[g][2t..2t+1], c2,c3 = C[g+8][2t..2t+1].
constexpr int kMmaRows = 64;
constexpr int kMmaKeys = 32;

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

template <typename T>
__device__ __forceinline__ std::uint32_t load_pair(const T* p) {
  return *reinterpret_cast<const std::uint32_t*>(p);
}

// Two elements a row apart, packed as one fragment register (low half: the first).
template <typename T>
__device__ __forceinline__ std::uint32_t gather_pair(const T* p, int pitch) {
  const unsigned short lo = *reinterpret_cast<const unsigned short*>(p);
  const unsigned short hi = *reinterpret_cast<const unsigned short*>(p + pitch);
  return static_cast<std::uint32_t>(lo) | (static_cast<std::uint32_t>(hi) << 16);
}

template <int D>
struct MmaTile {
  static constexpr int kPitch = D + 8;  // 16-byte pad: conflict-free fragment loads
  static constexpr std::size_t kSmemBytes = 2 * (kMmaRows + 2 * kMmaKeys) * kPitch;
};

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) prefill_mma_kernel(const PagedAttentionParams p) {
  using C = Convert<T>;
  using M = Mma<T>;
  constexpr int P = MmaTile<D>::kPitch;
  constexpr int DT = D / 8;  // n-tiles of the output
  constexpr int DV = D / 8;  // uint4 per K/V row
  const float neg_inf = -INFINITY;

  extern __shared__ __align__(16) unsigned char smem[];
  T* q_s = reinterpret_cast<T*>(smem);  // [kMmaRows][P]
  T* k_s = q_s + kMmaRows * P;          // [kMmaKeys][P]
  T* v_s = k_s + kMmaKeys * P;          // [kMmaKeys][P]

  const int tile = blockIdx.x;
  const int head = blockIdx.y;
  const int group = p.num_heads / p.num_kv_heads;
  const int kv_head = head / group;
  int lo = 0;
  int hi = p.num_seqs - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (p.query_start_loc[mid] / kMmaRows + mid <= tile) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  const int seq = lo;
  const int q_begin = p.query_start_loc[seq];
  const int q_end = p.query_start_loc[seq + 1];
  const int first_tile = q_begin / kMmaRows + seq;
  if (tile < first_tile) return;
  const int tok0 = q_begin + (tile - first_tile) * kMmaRows;
  if (tok0 >= q_end || !uses_tensor_core_prefill<D>(q_end - q_begin)) return;
  const int ntok = min(q_end - tok0, kMmaRows);
  const int pos0 = p.seq_lens[seq] - (q_end - q_begin) + (tok0 - q_begin);
  const int key_lo = p.sliding_window > 0 ? max(0, pos0 - p.sliding_window + 1) : 0;
  const int key_hi = pos0 + ntok;

  const T* query = static_cast<const T*>(p.query);
  for (int i = threadIdx.x; i < kMmaRows * D; i += kThreads) {
    const int r = i / D;
    const int d = i % D;
    q_s[r * P + d] =
        r < ntok ? query[(tok0 + r) * p.query_token_stride + head * D + d] : C::from_float(0.0f);
  }

  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int g = lane / 4;
  const int t = lane % 4;
  const int row_a = warp * 16 + g;  // this thread's two rows of the tile
  const int row_b = row_a + 8;
  const int pos_a = pos0 + row_a;
  const int pos_b = pos0 + row_b;
  float o[DT][4];
#pragma unroll
  for (int dt = 0; dt < DT; ++dt)
#pragma unroll
    for (int e = 0; e < 4; ++e) o[dt][e] = 0.0f;
  float m_a = neg_inf, m_b = neg_inf, l_a = 0.0f, l_b = 0.0f;

  const std::int32_t* table =
      p.block_tables + static_cast<std::int64_t>(seq) * p.max_blocks_per_seq;
  const T* key_cache = static_cast<const T*>(p.key_cache);
  const T* value_cache = static_cast<const T*>(p.value_cache);

  for (int kt0 = key_lo; kt0 < key_hi; kt0 += kMmaKeys) {
    __syncthreads();  // previous tile consumed (and q_s written)
    for (int i = threadIdx.x; i < kMmaKeys * DV; i += kThreads) {
      const int j = i / DV;
      const int c = i % DV;
      const int kpos = kt0 + j;
      uint4 kv = make_uint4(0, 0, 0, 0);
      uint4 vv = make_uint4(0, 0, 0, 0);
      if (kpos < key_hi) {
        const std::int64_t block = table[kpos / p.block_size];
        const std::int64_t row =
            ((block * p.block_size + kpos % p.block_size) * p.num_kv_heads + kv_head) * D + c * 8;
        kv = *reinterpret_cast<const uint4*>(key_cache + row);
        vv = *reinterpret_cast<const uint4*>(value_cache + row);
      }
      *reinterpret_cast<uint4*>(k_s + j * P + c * 8) = kv;
      *reinterpret_cast<uint4*>(v_s + j * P + c * 8) = vv;
    }
    __syncthreads();

    // S = Q K^T for this warp's 16 rows and the tile's 32 keys (4 n-tiles of 8 keys).
    float s[4][4];
#pragma unroll
    for (int nt = 0; nt < 4; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[nt][e] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < D; kk += 16) {
      std::uint32_t a[4];
      a[0] = load_pair(q_s + row_a * P + kk + 2 * t);
      a[1] = load_pair(q_s + row_b * P + kk + 2 * t);
      a[2] = load_pair(q_s + row_a * P + kk + 8 + 2 * t);
      a[3] = load_pair(q_s + row_b * P + kk + 8 + 2 * t);
#pragma unroll
      for (int nt = 0; nt < 4; ++nt) {
        const T* kr = k_s + (nt * 8 + g) * P + kk + 2 * t;
        M::run(s[nt], a, load_pair(kr), load_pair(kr + 8));
      }
    }

    // Scale, mask by position, online softmax per row (reduced over the quad's 4 lanes).
    float mx_a = neg_inf, mx_b = neg_inf;
#pragma unroll
    for (int nt = 0; nt < 4; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const bool second = e >= 2;
        const int row = second ? row_b : row_a;
        const int pos = second ? pos_b : pos_a;
        const int key = kt0 + nt * 8 + 2 * t + (e & 1);
        const bool visible = row < ntok && key < key_hi && key <= pos &&
                             (p.sliding_window <= 0 || key > pos - p.sliding_window);
        s[nt][e] = visible ? s[nt][e] * p.scale : neg_inf;
        if (second) {
          mx_b = fmaxf(mx_b, s[nt][e]);
        } else {
          mx_a = fmaxf(mx_a, s[nt][e]);
        }
      }
    }
#pragma unroll
    for (int lane_mask = 1; lane_mask <= 2; lane_mask *= 2) {
      mx_a = fmaxf(mx_a, __shfl_xor_sync(0xffffffffu, mx_a, lane_mask));
      mx_b = fmaxf(mx_b, __shfl_xor_sync(0xffffffffu, mx_b, lane_mask));
    }
    const float new_a = fmaxf(m_a, mx_a);
    const float new_b = fmaxf(m_b, mx_b);
    const float alpha_a = m_a == neg_inf ? 0.0f : __expf(m_a - new_a);
    const float alpha_b = m_b == neg_inf ? 0.0f : __expf(m_b - new_b);
    float sum_a = 0.0f, sum_b = 0.0f;
#pragma unroll
    for (int nt = 0; nt < 4; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const bool second = e >= 2;
        const float x = s[nt][e];
        const float pr = x == neg_inf ? 0.0f : __expf(x - (second ? new_b : new_a));
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
#pragma unroll
    for (int dt = 0; dt < DT; ++dt) {
      o[dt][0] *= alpha_a;
      o[dt][1] *= alpha_a;
      o[dt][2] *= alpha_b;
      o[dt][3] *= alpha_b;
    }

    // O += P V: P's accumulator fragments are the A fragments of two 16-key chunks.
#pragma unroll
    for (int kc = 0; kc < 2; ++kc) {
      std::uint32_t a[4];
      a[0] = M::pack(s[2 * kc][0], s[2 * kc][1]);
      a[1] = M::pack(s[2 * kc][2], s[2 * kc][3]);
      a[2] = M::pack(s[2 * kc + 1][0], s[2 * kc + 1][1]);
      a[3] = M::pack(s[2 * kc + 1][2], s[2 * kc + 1][3]);
#pragma unroll
      for (int dt = 0; dt < DT; ++dt) {
        const T* vr = v_s + (kc * 16 + 2 * t) * P + dt * 8 + g;
        M::run(o[dt], a, gather_pair(vr, P), gather_pair(vr + 8 * P, P));
      }
    }
  }

  T* out = static_cast<T*>(p.out);
  // Every row < ntok saw at least its own key: l > 0.
#pragma unroll
  for (int dt = 0; dt < DT; ++dt) {
    const int d = dt * 8 + 2 * t;
    if (row_a < ntok) {
      T* dst = out + (tok0 + row_a) * p.out_token_stride + head * D + d;
      dst[0] = C::from_float(o[dt][0] / l_a);
      dst[1] = C::from_float(o[dt][1] / l_a);
    }
    if (row_b < ntok) {
      T* dst = out + (tok0 + row_b) * p.out_token_stride + head * D + d;
      dst[0] = C::from_float(o[dt][2] / l_b);
      dst[1] = C::from_float(o[dt][3] / l_b);
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
  if (uses_tensor_core_prefill<D>(q_end - q_begin)) return;
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
  if (uses_tensor_core_prefill<D>(p.query_start_loc[seq + 1] - p.query_start_loc[seq])) return;
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
  const std::int64_t wanted = 2 * static_cast<std::int64_t>(sms);
  std::int64_t splits = 1;
  if (blocks < wanted && max_context > kSplitKeys) {
    splits = std::min<std::int64_t>(
        {(max_context + kSplitKeys - 1) / kSplitKeys, (wanted + blocks - 1) / blocks, kMaxSplits});
  }
  g.num_splits = static_cast<int>(std::max<std::int64_t>(1, splits));
  const std::int64_t per_split = (max_context + g.num_splits - 1) / g.num_splits;
  g.split_keys = static_cast<int>((per_split + 31) / 32 * 32);
  return g;
}

std::size_t workspace_bytes_for(const Geometry& g, int num_tokens, int num_heads, int head_size) {
  if (g.num_splits == 1) return 0;
  return static_cast<std::size_t>(num_tokens) * num_heads * g.num_splits *
         (static_cast<std::size_t>(head_size) + 2) * sizeof(float);
}

template <typename T, int D>
void launch_attention(const PagedAttentionParams& p, const Geometry& g, float* part_acc,
                      float* part_ml, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(g.num_tiles),
                  static_cast<unsigned>(p.num_kv_heads * g.head_chunks),
                  static_cast<unsigned>(g.num_splits));
  paged_attention_kernel<T, D>
      <<<grid, kThreads, Tile<D>::kSmemBytes, stream>>>(p, g, part_acc, part_ml);
  check_launch("paged_attention_kernel");
  if constexpr (D <= 128) {
    // Prefill chunks of >= kTensorCoreMinTokens tokens; the kernel above skipped them.
    const dim3 mma_grid(static_cast<unsigned>(p.num_tokens / kMmaRows + p.num_seqs),
                        static_cast<unsigned>(p.num_heads));
    prefill_mma_kernel<T, D><<<mma_grid, kThreads, MmaTile<D>::kSmemBytes, stream>>>(p);
    check_launch("prefill_mma_kernel");
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
                        float* part_ml, cudaStream_t stream) {
  switch (p.head_size) {
    case 64:
      return launch_attention<T, 64>(p, g, part_acc, part_ml, stream);
    case 80:
      return launch_attention<T, 80>(p, g, part_acc, part_ml, stream);
    case 96:
      return launch_attention<T, 96>(p, g, part_acc, part_ml, stream);
    case 112:
      return launch_attention<T, 112>(p, g, part_acc, part_ml, stream);
    case 128:
      return launch_attention<T, 128>(p, g, part_acc, part_ml, stream);
    case 256:
      return launch_attention<T, 256>(p, g, part_acc, part_ml, stream);
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
    dispatch_head_size<__half>(p, g, part_acc, part_ml, s);
  } else {
    dispatch_head_size<__nv_bfloat16>(p, g, part_acc, part_ml, s);
  }
}

}  // namespace aphrodite::detail
