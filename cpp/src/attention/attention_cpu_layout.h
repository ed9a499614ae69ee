// The query layout and the scalar steps the vector builds of attend_block share
// (attention_cpu_avx2.cpp with 8-float vectors, attention_cpu_avx512.cpp with 16). Internal linkage
// on purpose: each including file is compiled for its own instruction set, so each keeps its own
// copy.
#pragma once

#include <math.h>

#include <cstdint>

#include "attention/attention_cpu_kernels.h"

namespace aphrodite::detail {
namespace {  // NOLINT(google-build-namespaces): per-ISA copies, see above

// Rows from which the query is kept transposed ([head_size][rows rounded up to the vector
// width]) so that scores come out as [key][row] vectors; below it each score is one dot product.
constexpr int kTransposeRows = 8;

template <int Width>
int padded_rows(int rows) {
  return (rows + Width - 1) / Width * Width;
}

// pack_query of the vector builds: q [rows, head_size] as is below kTransposeRows rows, else
// transposed with the padding rows zeroed.
template <int Width>
void pack_query_for_width(const float* q, int rows, int head_size, float* packed) {
  if (rows < kTransposeRows) {
    for (std::int64_t i = 0; i < static_cast<std::int64_t>(rows) * head_size; ++i) packed[i] = q[i];
    return;
  }
  const int rp = padded_rows<Width>(rows);
  for (int d = 0; d < head_size; ++d) {
    float* dst = packed + static_cast<std::int64_t>(d) * rp;
    for (int r = 0; r < rp; ++r)
      dst[r] = r < rows ? q[static_cast<std::int64_t>(r) * head_size + d] : 0.0f;
  }
}

// Calls score(j, key_row) for the keys [jb, je) of `kv`, block by block: one division per block,
// not per key.
template <typename Score>
inline void for_each_key(const KeyBlocks& kv, int jb, int je, Score&& score) {
  for (int b0 = jb / kv.block_size * kv.block_size; b0 < je; b0 += kv.block_size) {
    const float* kblock = kv.k[b0 / kv.block_size];
    const int j1 = je < b0 + kv.block_size ? je : b0 + kv.block_size;
    for (int j = jb > b0 ? jb : b0; j < j1; ++j) score(j, kblock + (j - b0) * kv.stride);
  }
}

// max(a, b), NaN when either is NaN (a NaN score makes its row NaN, as in torch's softmax).
inline float max_nan(float a, float b) {
  if (a != a || b != b) return a + b;
  return a > b ? a : b;
}

// The scalar start of an online-softmax step over one row of scores sr[0, np) whose keys are
// [jb, je), jb < je: the scores outside them become -inf. Returns the row's new running max (of
// m and its scores) and sets *alpha to exp(m - new max), the factor for what was accumulated
// under m (0 while m is -inf).
inline float mask_scores_and_max(float* sr, int np, int jb, int je, float m, float* alpha) {
  const float neg_inf = -INFINITY;
  float block_max = neg_inf;
  for (int j = 0; j < np; ++j) {
    if (j < jb || j >= je) {
      sr[j] = neg_inf;
    } else {
      block_max = max_nan(block_max, sr[j]);
    }
  }
  const float m_new = max_nan(m, block_max);
  *alpha = m == neg_inf ? 0.0f : expf(m - m_new);
  return m_new;
}

}  // namespace
}  // namespace aphrodite::detail
