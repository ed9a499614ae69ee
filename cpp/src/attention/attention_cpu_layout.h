// The query layout the vector builds of attend_block share (attention_cpu_avx2.cpp with 8-float
// vectors, attention_cpu_avx512.cpp with 16). Internal linkage on purpose: each including file is
// compiled for its own instruction set, so each keeps its own copy.
#pragma once

#include <cstdint>

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

}  // namespace
}  // namespace aphrodite::detail
