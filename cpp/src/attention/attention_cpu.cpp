// CPU reshape_and_cache and paged_attention: metadata checks, work split and the portable build
// of the inner kernels (the AVX2 build lives in attention_cpu_avx2.cpp).
//
// paged_attention splits the batch into work items (see WorkItem): the query heads of one GQA
// group and a few consecutive tokens share every K/V block read from the cache. Each item walks
// its blocks through the block table with an online softmax, so no score matrix larger than
// rows x block_size exists at any time.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "aphrodite/error.h"
#include "aphrodite/parallel.h"
#include "attention/attention_cpu_kernels.h"
#include "attention/attention_cpu_layout.h"
#include "internal/attention_kernels.h"
#include "internal/cpu_features.h"
#include "internal/float16.h"
#include "linear/gemm_cpu.h"

namespace aphrodite::detail {

namespace {

float load_scalar(const void* src, DType dtype, std::int64_t i) {
  switch (dtype) {
    case DType::kFloat16:
      return half_to_float(static_cast<const std::uint16_t*>(src)[i]);
    case DType::kBFloat16:
      return bf16_to_float(static_cast<const std::uint16_t*>(src)[i]);
    default:
      return static_cast<const float*>(src)[i];
  }
}

void rows_to_f32_scalar(const void* src, DType dtype, std::int64_t src_stride, int rows,
                        int head_size, float mul, float* dst) {
  for (int r = 0; r < rows; ++r) {
    for (int d = 0; d < head_size; ++d) {
      dst[static_cast<std::int64_t>(r) * head_size + d] =
          mul * load_scalar(src, dtype, r * src_stride + d);
    }
  }
}

void row_from_f32_scalar(const float* src, float mul, int head_size, DType dtype, void* dst) {
  for (int d = 0; d < head_size; ++d) {
    const float x = src[d] * mul;
    if (dtype == DType::kFloat32) {
      static_cast<float*>(dst)[d] = x;
    } else if (dtype == DType::kFloat16) {
      static_cast<std::uint16_t*>(dst)[d] = float_to_half(x);
    } else {
      static_cast<std::uint16_t*>(dst)[d] = float_to_bf16(x);
    }
  }
}

void pack_query_scalar(const float* q, int rows, int head_size, float* packed) {
  std::memcpy(packed, q, static_cast<std::size_t>(rows) * head_size * sizeof(float));
}

void attend_block_scalar(const float* q, int rows, int head_size, const KeyBlocks& kv, int num_keys,
                         const int* key_begin, const int* key_end, float* m, float* l, float* acc,
                         float* scratch) {
  float* s = scratch;
  for (int r = 0; r < rows; ++r) {
    const int jb = key_begin[r];
    const int je = key_end[r];
    if (jb >= je) continue;
    const float* qr = q + static_cast<std::int64_t>(r) * head_size;
    float block_max = -std::numeric_limits<float>::infinity();
    for (int j = jb; j < je; ++j) {
      const float* kr = kv.key(j);
      float dot = 0.0f;
      for (int d = 0; d < head_size; ++d) dot += qr[d] * kr[d];
      s[j] = dot;
      block_max = max_nan(block_max, dot);
    }
    const float m_new = max_nan(m[r], block_max);
    const float alpha = std::isinf(m[r]) ? 0.0f : std::exp(m[r] - m_new);
    float* ar = acc + static_cast<std::int64_t>(r) * head_size;
    for (int d = 0; d < head_size; ++d) ar[d] *= alpha;
    float sum = 0.0f;
    for (int j = jb; j < je; ++j) {
      const float pj = std::exp(s[j] - m_new);
      sum += pj;
      const float* vr = kv.value(j);
      for (int d = 0; d < head_size; ++d) ar[d] += pj * vr[d];
    }
    l[r] = l[r] * alpha + sum;
    m[r] = m_new;
  }
  (void)num_keys;
}

// The kernel set follows linear()'s (APHRODITE_CPU_ISA / set_linear_cpu_isa, else the best the
// CPU runs), so one switch selects the instruction set of every CPU op.
const AttentionCpuKernels& kernels() {
  static const AttentionCpuKernels scalar = attention_cpu_kernels_scalar();
#if defined(__x86_64__) || defined(_M_X64)
  static const AttentionCpuKernels avx2 =
      cpu_features().avx2_fma ? attention_cpu_kernels_avx2() : scalar;
  static const AttentionCpuKernels avx512 =
      cpu_features().avx512 ? attention_cpu_kernels_avx512() : avx2;
  switch (active_cpu_isa()) {
    case CpuIsa::kAmx:  // AMX is for the GEMM's prefill products: attention stays on AVX-512
    case CpuIsa::kAvx512:
      return avx512;
    case CpuIsa::kAvx2:
      return avx2;
    case CpuIsa::kScalar:
      break;
  }
#endif
  return scalar;
}

void bad_metadata(const std::string& message) { throw ValueError("paged_attention: " + message); }

// The CPU path reads the metadata on the host anyway, so it checks all of it: a bad batch fails
// with a message here instead of reading out of bounds.
void check_metadata(const PagedAttentionParams& p) {
  const std::int32_t* qsl = p.query_start_loc;
  if (qsl[0] < 0) bad_metadata("query_start_loc[0] must be >= 0");
  for (int s = 0; s < p.num_seqs; ++s) {
    const std::int64_t q_len = static_cast<std::int64_t>(qsl[s + 1]) - qsl[s];
    if (q_len < 0)
      bad_metadata("query_start_loc must be non-decreasing (at sequence " + std::to_string(s) +
                   ")");
    const std::int64_t len = p.seq_lens[s];
    if (len < q_len) {
      bad_metadata("seq_lens[" + std::to_string(s) + "] = " + std::to_string(len) +
                   " is below the sequence's query length " + std::to_string(q_len));
    }
    if (p.max_query_len > 0 && q_len > p.max_query_len) {
      bad_metadata("sequence " + std::to_string(s) + " has " + std::to_string(q_len) +
                   " query tokens, more than max_query_len = " + std::to_string(p.max_query_len));
    }
    if (q_len == 0) continue;
    const std::int64_t blocks = (len + p.block_size - 1) / p.block_size;
    if (blocks > p.max_blocks_per_seq) {
      bad_metadata("seq_lens[" + std::to_string(s) + "] = " + std::to_string(len) +
                   " needs more blocks than block_tables has columns");
    }
    for (std::int64_t b = 0; b < blocks; ++b) {
      const std::int32_t id =
          p.block_tables[static_cast<std::int64_t>(s) * p.max_blocks_per_seq + b];
      if (id < 0 || id >= p.num_blocks) {
        bad_metadata("block_tables[" + std::to_string(s) + ", " + std::to_string(b) +
                     "] = " + std::to_string(id) + " is not a block of the cache");
      }
    }
  }
  if (qsl[p.num_seqs] > p.num_tokens) {
    bad_metadata("query_start_loc[-1] = " + std::to_string(qsl[p.num_seqs]) +
                 " exceeds the number of query tokens " + std::to_string(p.num_tokens));
  }
}

// Query rows of one KV head an item handles at most (whole GQA groups; at least one token).
constexpr int kRowsPerHead = 64;

// A tile of work: tokens [token_begin, token_end) of one sequence against KV heads
// [kv_head_begin, kv_head_end). Prefill chunks take one KV head each (their cost is compute);
// decode tokens take several, so that each cache block is read as one contiguous run of
// block_size * heads * head_size elements instead of head_size-long rows a page apart.
struct WorkItem {
  int seq;
  int token_begin;
  int token_end;
  int kv_head_begin;
  int kv_head_end;
};

// How far ahead (in cache blocks) run_item prefetches K/V, for items that prefetch: those with
// fewer query rows per KV head than kPrefetchMaxRows (see run_item).
constexpr int kPrefetchBlocks = 2;
constexpr int kPrefetchMaxRows = 16;

struct Scratch {
  std::vector<float> q_rows, q, acc, m, l, kf, vf, block;
  std::vector<int> pos_begin, pos_end, key_begin, key_end;
  std::vector<const float*> k_blocks, v_blocks;
};

void run_item(const PagedAttentionParams& p, const AttentionCpuKernels& kern, const WorkItem& item,
              Scratch& sc) {
  const int group = p.num_heads / p.num_kv_heads;
  const int D = p.head_size;
  const int bs = p.block_size;
  const int tokens = item.token_end - item.token_begin;
  const int heads = item.kv_head_end - item.kv_head_begin;
  const int head_rows = tokens * group;  // rows of one KV head: token-major, then group head
  const int rows = heads * head_rows;    // KV-head-major
  const std::size_t esize = dtype_size(p.dtype);
  const std::size_t packed = static_cast<std::size_t>(packed_query_floats(head_rows, D));
  sc.q_rows.resize(static_cast<std::size_t>(rows) * D);
  sc.q.resize(packed * heads);
  sc.acc.assign(static_cast<std::size_t>(rows) * D, 0.0f);
  sc.m.assign(rows, -std::numeric_limits<float>::infinity());
  sc.l.assign(rows, 0.0f);
  sc.pos_begin.resize(head_rows);
  sc.pos_end.resize(head_rows);
  sc.key_begin.resize(head_rows);
  sc.key_end.resize(head_rows);
  const int max_step_keys = std::max(1, kKeysPerStep / bs) * bs;
  sc.block.resize(static_cast<std::size_t>(attend_block_scratch_floats(head_rows, max_step_keys)));
  sc.k_blocks.resize(static_cast<std::size_t>(max_step_keys / bs));
  sc.v_blocks.resize(static_cast<std::size_t>(max_step_keys / bs));
  if (p.dtype != DType::kFloat32) {
    sc.kf.resize(static_cast<std::size_t>(max_step_keys) * D);
    sc.vf.resize(static_cast<std::size_t>(max_step_keys) * D);
  }

  const std::int32_t q_begin = p.query_start_loc[item.seq];
  const std::int32_t q_len = p.query_start_loc[item.seq + 1] - q_begin;
  const std::int64_t len = p.seq_lens[item.seq];
  std::int64_t first_key = len;
  std::int64_t last_key = 0;  // exclusive
  for (int t = 0; t < tokens; ++t) {
    const int token = item.token_begin + t;
    const std::int64_t pos = len - q_len + (token - q_begin);
    const std::int64_t begin =
        p.sliding_window > 0 ? std::max<std::int64_t>(0, pos - p.sliding_window + 1) : 0;
    first_key = std::min(first_key, begin);
    last_key = std::max(last_key, pos + 1);
    for (int h = 0; h < heads; ++h) {
      const char* qrow = static_cast<const char*>(p.query) +
                         (token * p.query_token_stride +
                          static_cast<std::int64_t>(item.kv_head_begin + h) * group * D) *
                             static_cast<std::int64_t>(esize);
      kern.rows_to_f32(
          qrow, p.dtype, D, group, D, p.scale,
          sc.q_rows.data() + (static_cast<std::size_t>(h) * head_rows + t * group) * D);
    }
    for (int g = 0; g < group; ++g) {
      sc.pos_begin[t * group + g] = static_cast<int>(begin);
      sc.pos_end[t * group + g] = static_cast<int>(pos + 1);
    }
  }

  for (int h = 0; h < heads; ++h) {
    kern.pack_query(sc.q_rows.data() + static_cast<std::size_t>(h) * head_rows * D, head_rows, D,
                    sc.q.data() + h * packed);
  }

  const std::int32_t* table =
      p.block_tables + static_cast<std::int64_t>(item.seq) * p.max_blocks_per_seq;
  const std::int64_t key_stride = static_cast<std::int64_t>(p.num_kv_heads) * D;  // elements
  const std::int64_t run_bytes =
      static_cast<std::int64_t>(heads) * D * static_cast<std::int64_t>(esize);
  // Few rows (decode) read each block once and wait on memory: prefetch ahead, one block per
  // step. Prefill chunks spend far longer on a block than it takes to load, and their context is
  // shared by the chunks before them, so it is mostly cached: the prefetches would only cost
  // issue slots. Decode with short head rows (up to 256 bytes, e.g. 64 float32) is the
  // exception: there a step's fixed costs outweigh the prefetch's gain, and whole steps of
  // kKeysPerStep keys without prefetches were 1.25x faster (BENCHMARKS.md, 16/8 heads of 64),
  // where at 128 floats one block per step with prefetches was 1.25x faster (32/8 heads of 128).
  const bool few_rows = head_rows < kPrefetchMaxRows;
  const bool short_head_rows =
      static_cast<std::int64_t>(D) * static_cast<std::int64_t>(esize) <= 256;
  const bool prefetch = few_rows && !short_head_rows;
  auto prefetch_block = [&](std::int64_t bi) {
    const std::int64_t first =
        (static_cast<std::int64_t>(table[bi]) * bs * p.num_kv_heads + item.kv_head_begin) * D;
    for (int j = 0; j < bs; ++j) {
      const std::int64_t at = (first + j * key_stride) * static_cast<std::int64_t>(esize);
      for (std::int64_t b = 0; b < run_bytes; b += 64) {
        __builtin_prefetch(static_cast<const char*>(p.key_cache) + at + b);
        __builtin_prefetch(static_cast<const char*>(p.value_cache) + at + b);
      }
    }
  };
  // Steps of whole cache blocks, up to kKeysPerStep keys each; one block per step when
  // prefetching, which then runs kPrefetchBlocks blocks ahead (a few blocks' K/V in flight).
  const int step_blocks = prefetch ? 1 : std::max(1, kKeysPerStep / bs);
  const std::int64_t end_block = (last_key + bs - 1) / bs;
  for (std::int64_t b0 = first_key / bs; b0 < end_block; b0 += step_blocks) {
    const int nblocks = static_cast<int>(std::min<std::int64_t>(step_blocks, end_block - b0));
    const std::int64_t base = b0 * bs;
    const int n = static_cast<int>(std::min<std::int64_t>(nblocks * bs, last_key - base));
    if (prefetch) {
      // Blocks are scattered and each holds short runs: load one a few blocks ahead while this
      // one is computed.
      if (b0 + kPrefetchBlocks < end_block) prefetch_block(b0 + kPrefetchBlocks);
    }
    for (int r = 0; r < head_rows; ++r) {
      sc.key_begin[r] = static_cast<int>(std::clamp<std::int64_t>(sc.pos_begin[r] - base, 0, n));
      sc.key_end[r] = static_cast<int>(std::clamp<std::int64_t>(sc.pos_end[r] - base, 0, n));
    }
    for (int h = 0; h < heads; ++h) {
      std::int64_t kv_stride = key_stride;
      for (int i = 0; i < nblocks; ++i) {
        const std::int64_t offset =
            (static_cast<std::int64_t>(table[b0 + i]) * bs * p.num_kv_heads + item.kv_head_begin +
             h) *
            D;
        if (p.dtype == DType::kFloat32) {
          sc.k_blocks[i] = static_cast<const float*>(p.key_cache) + offset;
          sc.v_blocks[i] = static_cast<const float*>(p.value_cache) + offset;
        } else {
          // Converted to float32, block by block, into the step's scratch (rows D apart).
          const std::int64_t at = offset * static_cast<std::int64_t>(esize);
          const int rows_here = std::min(bs, n - i * bs);
          float* kf = sc.kf.data() + static_cast<std::size_t>(i) * bs * D;
          float* vf = sc.vf.data() + static_cast<std::size_t>(i) * bs * D;
          kern.rows_to_f32(static_cast<const char*>(p.key_cache) + at, p.dtype, key_stride,
                           rows_here, D, 1.0f, kf);
          kern.rows_to_f32(static_cast<const char*>(p.value_cache) + at, p.dtype, key_stride,
                           rows_here, D, 1.0f, vf);
          sc.k_blocks[i] = kf;
          sc.v_blocks[i] = vf;
          kv_stride = D;
        }
      }
      const KeyBlocks kv{sc.k_blocks.data(), sc.v_blocks.data(), bs, kv_stride};
      const std::size_t r0 = static_cast<std::size_t>(h) * head_rows;
      kern.attend_block(sc.q.data() + h * packed, head_rows, D, kv, n, sc.key_begin.data(),
                        sc.key_end.data(), sc.m.data() + r0, sc.l.data() + r0,
                        sc.acc.data() + r0 * D, sc.block.data());
    }
  }

  for (int h = 0; h < heads; ++h) {
    for (int t = 0; t < tokens; ++t) {
      const int token = item.token_begin + t;
      for (int g = 0; g < group; ++g) {
        const std::size_t r = static_cast<std::size_t>(h) * head_rows + t * group + g;
        char* orow = static_cast<char*>(p.out) +
                     (token * p.out_token_stride +
                      (static_cast<std::int64_t>(item.kv_head_begin + h) * group + g) * D) *
                         static_cast<std::int64_t>(esize);
        // l > 0: every row sees at least its own key.
        kern.row_from_f32(sc.acc.data() + r * D, 1.0f / sc.l[r], D, p.dtype, orow);
      }
    }
  }
}

}  // namespace

AttentionCpuKernels attention_cpu_kernels_scalar() {
  return {&rows_to_f32_scalar, &row_from_f32_scalar, &pack_query_scalar, &attend_block_scalar};
}

void paged_attention_cpu(const PagedAttentionParams& p) {
  check_metadata(p);
  const int group = p.num_heads / p.num_kv_heads;
  const int tokens_per_item = std::max(1, kRowsPerHead / group);
  // Sequences whose tokens fit one item (decode) share KV heads per item: as many as keep at
  // least 4 items per thread for load balance.
  std::int64_t short_seqs = 0;
  std::int64_t long_items = 0;
  for (int s = 0; s < p.num_seqs; ++s) {
    const int q_len = p.query_start_loc[s + 1] - p.query_start_loc[s];
    if (q_len == 0) continue;
    if (q_len <= tokens_per_item) {
      ++short_seqs;
    } else {
      long_items += static_cast<std::int64_t>((q_len + tokens_per_item - 1) / tokens_per_item) *
                    p.num_kv_heads;
    }
  }
  int heads_per_short_item = p.num_kv_heads;
  const std::int64_t wanted = 4 * static_cast<std::int64_t>(num_threads());
  while (heads_per_short_item > 1 &&
         long_items + short_seqs * (p.num_kv_heads / heads_per_short_item) < wanted) {
    int h = heads_per_short_item - 1;
    while (p.num_kv_heads % h != 0) --h;
    heads_per_short_item = h;
  }
  std::vector<WorkItem> items;
  for (int s = 0; s < p.num_seqs; ++s) {
    const int begin = p.query_start_loc[s];
    const int end = p.query_start_loc[s + 1];
    if (end - begin <= tokens_per_item) {
      for (int h = 0; h < p.num_kv_heads && end > begin; h += heads_per_short_item) {
        items.push_back({s, begin, end, h, h + heads_per_short_item});
      }
      continue;
    }
    for (int t = begin; t < end; t += tokens_per_item) {
      for (int h = 0; h < p.num_kv_heads; ++h) {
        items.push_back({s, t, std::min(end, t + tokens_per_item), h, h + 1});
      }
    }
  }
  // The pool hands tasks out in order; a chunk's cost grows with its context, so the ones that
  // see the most keys go first and the cheap ones fill the gaps at the end.
  auto cost = [&](const WorkItem& w) {
    const std::int64_t q_len = p.query_start_loc[w.seq + 1] - p.query_start_loc[w.seq];
    const std::int64_t last_pos =
        p.seq_lens[w.seq] - q_len + (w.token_end - p.query_start_loc[w.seq]);
    const std::int64_t keys =
        p.sliding_window > 0 ? std::min<std::int64_t>(last_pos, p.sliding_window) : last_pos;
    return keys * (w.token_end - w.token_begin) * (w.kv_head_end - w.kv_head_begin);
  };
  std::stable_sort(items.begin(), items.end(),
                   [&](const WorkItem& a, const WorkItem& b) { return cost(a) > cost(b); });
  const AttentionCpuKernels& kern = kernels();
  parallel_run(static_cast<std::int64_t>(items.size()), [&](std::int64_t i) {
    thread_local Scratch scratch;
    run_item(p, kern, items[static_cast<std::size_t>(i)], scratch);
  });
}

void reshape_and_cache_cpu(const ReshapeAndCacheParams& p) {
  std::vector<std::int64_t> slots(static_cast<std::size_t>(p.num_tokens));
  for (std::int64_t t = 0; t < p.num_tokens; ++t) {
    const std::int64_t slot = p.slot_mapping_is_int64
                                  ? static_cast<const std::int64_t*>(p.slot_mapping)[t]
                                  : static_cast<const std::int32_t*>(p.slot_mapping)[t];
    if (slot < -1 || slot >= p.num_slots) {
      throw ValueError("reshape_and_cache: slot_mapping[" + std::to_string(t) +
                       "] = " + std::to_string(slot) + " is outside the cache's " +
                       std::to_string(p.num_slots) + " slots (and is not -1)");
    }
    slots[static_cast<std::size_t>(t)] = slot;
  }
  const std::size_t esize = dtype_size(p.dtype);
  const std::int64_t row = static_cast<std::int64_t>(p.num_kv_heads) * p.head_size;
  const std::size_t row_bytes = static_cast<std::size_t>(row) * esize;
  parallel_for(0, p.num_tokens, 64, [&](std::int64_t begin, std::int64_t end) {
    for (std::int64_t t = begin; t < end; ++t) {
      const std::int64_t slot = slots[static_cast<std::size_t>(t)];
      if (slot < 0) continue;
      std::memcpy(static_cast<char*>(p.key_cache) + static_cast<std::size_t>(slot * row) * esize,
                  static_cast<const char*>(p.key) +
                      static_cast<std::size_t>(t * p.key_token_stride) * esize,
                  row_bytes);
      std::memcpy(static_cast<char*>(p.value_cache) + static_cast<std::size_t>(slot * row) * esize,
                  static_cast<const char*>(p.value) +
                      static_cast<std::size_t>(t * p.value_token_stride) * esize,
                  row_bytes);
    }
  });
}

}  // namespace aphrodite::detail
