// The CPU attention inner kernels, in three builds: portable C++ (attention_cpu.cpp), AVX2/FMA
// (attention_cpu_avx2.cpp) and AVX-512 (attention_cpu_avx512.cpp). The driver picks one table at
// run time: the CPU kernel set linear() uses (APHRODITE_CPU_ISA or the best the CPU runs).
#pragma once

#include <cstdint>

#include "aphrodite/tensor.h"

namespace aphrodite::detail {

// The keys of one attend_block call: up to a step's worth of cache blocks. Key j's row is
// k[j / block_size] + (j % block_size) * stride floats (likewise for v); a block's rows are
// `stride` floats apart (the cache's KV heads interleave), blocks lie anywhere.
struct KeyBlocks {
  const float* const* k;
  const float* const* v;
  int block_size;
  std::int64_t stride;

  const float* key(int j) const { return k[j / block_size] + (j % block_size) * stride; }
  const float* value(int j) const { return v[j / block_size] + (j % block_size) * stride; }
};

// Keys one attend_block call takes at most: several cache blocks per online-softmax step keep
// the output accumulators in registers for longer (one rescale per step, not per block).
constexpr int kKeysPerStep = 64;

// Floats of scratch attend_block needs for `rows` query rows and up to `num_keys` keys per call
// (rows and keys rounded up to 16, the widest build's vector).
inline std::int64_t attend_block_scratch_floats(int rows, int num_keys) {
  const std::int64_t keys = (num_keys + 15) / 16 * 16;
  const std::int64_t padded_rows = (rows + 15) / 16 * 16;
  return (keys + 6) * padded_rows;
}

// Floats of the packed query (pack_query) of `rows` rows.
inline std::int64_t packed_query_floats(int rows, int head_size) {
  return (rows + 15) / 16 * 16 * static_cast<std::int64_t>(head_size);
}

struct AttentionCpuKernels {
  // dst[r * head_size + d] = mul * src[r * src_stride + d] for r < rows, converted to float32.
  void (*rows_to_f32)(const void* src, DType dtype, std::int64_t src_stride, int rows,
                      int head_size, float mul, float* dst);
  // dst[d] = mul * src[d] converted to dtype (round to nearest even).
  void (*row_from_f32)(const float* src, float mul, int head_size, DType dtype, void* dst);
  // Lays out q [rows, head_size] (already scaled) the way attend_block reads it.
  void (*pack_query)(const float* q, int rows, int head_size, float* packed);
  // Online-softmax update of `rows` query rows (q packed by pack_query) with `num_keys` keys
  // (at most kKeysPerStep, in kv's blocks). Row r sees the keys [key_begin[r], key_end[r]);
  // m/l/acc are its running max, sum and unnormalised output; scratch holds
  // attend_block_scratch_floats(rows, num_keys) floats.
  void (*attend_block)(const float* q, int rows, int head_size, const KeyBlocks& kv, int num_keys,
                       const int* key_begin, const int* key_end, float* m, float* l, float* acc,
                       float* scratch);
};

AttentionCpuKernels attention_cpu_kernels_scalar();
#if defined(__x86_64__) || defined(_M_X64)
AttentionCpuKernels attention_cpu_kernels_avx2();
AttentionCpuKernels attention_cpu_kernels_avx512();
#endif

}  // namespace aphrodite::detail
