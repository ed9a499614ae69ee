// C++ tests of the attention ops: the portable, AVX2 and AVX-512 inner kernels against a
// double-precision reference (the Python tests cover whole batches against torch), and
// paged_attention through the public API on core-owned tensors.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "aphrodite/attention.h"
#include "aphrodite/buffer.h"
#include "attention/attention_cpu_kernels.h"

namespace aphrodite {
namespace {

using detail::AttentionCpuKernels;

std::vector<AttentionCpuKernels> kernel_builds() {
  std::vector<AttentionCpuKernels> builds{detail::attention_cpu_kernels_scalar()};
#if defined(__x86_64__)
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
      __builtin_cpu_supports("f16c")) {
    builds.push_back(detail::attention_cpu_kernels_avx2());
  }
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl")) {
    builds.push_back(detail::attention_cpu_kernels_avx512());
  }
#endif
  return builds;
}

// Two key blocks through attend_block with per-row key ranges, against softmax in double: once
// as two calls of one block each and once as one call over both (the blocks lie in memory in
// reverse order, so the kernel must follow the block pointers).
TEST(AttentionCpuKernels, AttendBlocksMatchDoubleReference) {
  std::mt19937 rng(11);
  std::normal_distribution<float> normal;
  for (const AttentionCpuKernels& k : kernel_builds()) {
    for (int rows : {1, 3, 4, 7, 8, 9, 17, 32, 33, 50, 64}) {
      for (int head_size : {8, 24, 40, 64, 80, 112, 128}) {
        for (bool one_call : {false, true}) {
          const int block = 16;
          const int stride = head_size + 8;  // keys farther apart than head_size, as in the cache
          std::vector<float> q(static_cast<std::size_t>(rows) * head_size);
          // Logical block b is stored at memory block 1 - b.
          std::vector<float> keys(static_cast<std::size_t>(2 * block) * stride);
          std::vector<float> values(keys.size());
          for (float& x : q) x = normal(rng);
          for (float& x : keys) x = normal(rng);
          for (float& x : values) x = normal(rng);
          auto key_row = [&](int j) {
            return &keys[((1 - j / block) * block + j % block) * stride];
          };
          auto value_row = [&](int j) {
            return &values[((1 - j / block) * block + j % block) * stride];
          };
          const float* k_blocks[2] = {key_row(0), key_row(block)};
          const float* v_blocks[2] = {value_row(0), value_row(block)};
          std::vector<int> begin(rows), end(rows);
          for (int r = 0; r < rows; ++r) {
            begin[r] = static_cast<int>(rng() % 20);
            end[r] = begin[r] + 1 + static_cast<int>(rng() % (2 * block - begin[r]));
          }
          std::vector<float> m(rows, -std::numeric_limits<float>::infinity()), l(rows, 0.0f);
          std::vector<float> acc(q.size(), 0.0f);
          std::vector<float> scratch(
              static_cast<std::size_t>(detail::attend_block_scratch_floats(rows, 2 * block)));
          std::vector<float> packed(
              static_cast<std::size_t>(detail::packed_query_floats(rows, head_size)));
          k.pack_query(q.data(), rows, head_size, packed.data());
          if (one_call) {
            const detail::KeyBlocks kv{k_blocks, v_blocks, block, stride};
            k.attend_block(packed.data(), rows, head_size, kv, 2 * block, begin.data(), end.data(),
                           m.data(), l.data(), acc.data(), scratch.data());
          } else {
            for (int b = 0; b < 2; ++b) {
              std::vector<int> kb(rows), ke(rows);
              for (int r = 0; r < rows; ++r) {
                kb[r] = std::min(std::max(begin[r] - b * block, 0), block);
                ke[r] = std::min(std::max(end[r] - b * block, 0), block);
              }
              const detail::KeyBlocks kv{&k_blocks[b], &v_blocks[b], block, stride};
              k.attend_block(packed.data(), rows, head_size, kv, block, kb.data(), ke.data(),
                             m.data(), l.data(), acc.data(), scratch.data());
            }
          }
          for (int r = 0; r < rows; ++r) {
            std::vector<double> w;
            double mx = -INFINITY;
            for (int j = begin[r]; j < end[r]; ++j) {
              double dot = 0;
              for (int d = 0; d < head_size; ++d) {
                dot += static_cast<double>(q[r * head_size + d]) * key_row(j)[d];
              }
              w.push_back(dot);
              mx = std::max(mx, dot);
            }
            double sum = 0;
            for (double& x : w) sum += (x = std::exp(x - mx));
            for (int d = 0; d < head_size; ++d) {
              double expect = 0;
              for (int j = begin[r]; j < end[r]; ++j) {
                expect += w[j - begin[r]] / sum * value_row(j)[d];
              }
              ASSERT_NEAR(acc[r * head_size + d] / l[r], expect, 2e-5 * (1 + std::fabs(expect)))
                  << "rows " << rows << " head_size " << head_size << " one call " << one_call
                  << " row " << r << " d " << d;
            }
          }
        }
      }
    }
  }
}

TEST(AttentionCpuKernels, HalfConversionsAgreeAcrossBuilds) {
  const std::vector<AttentionCpuKernels> builds = kernel_builds();
  std::vector<float> src = {0.0f,   -0.0f,    1.0f,  -2.5f,    65504.0f,  1e-7f,   3.14159f, 1e5f,
                            -1e-3f, 0.33333f, 7e-6f, 1.00049f, -65519.0f, 2.0e-8f, 256.06f,  -0.1f};
  for (DType dtype : {DType::kFloat16, DType::kBFloat16}) {
    std::vector<std::vector<std::uint16_t>> encoded;
    for (const AttentionCpuKernels& k : builds) {
      std::vector<std::uint16_t> out(src.size());
      k.row_from_f32(src.data(), 1.0f, static_cast<int>(src.size()), dtype, out.data());
      std::vector<float> back(src.size());
      k.rows_to_f32(out.data(), dtype, 0, 1, static_cast<int>(src.size()), 1.0f, back.data());
      for (std::size_t i = 0; i < src.size(); ++i) {
        const double tol = dtype == DType::kFloat16 ? 1e-3 : 8e-3;
        if (std::fabs(src[i]) >= 6.2e-5f && std::fabs(src[i]) <= 65504.0f) {
          EXPECT_NEAR(back[i], src[i], tol * std::fabs(src[i]))
              << dtype_name(dtype) << " " << src[i];
        }
      }
      encoded.push_back(out);
    }
    for (std::size_t b = 1; b < encoded.size(); ++b) EXPECT_EQ(encoded[b], encoded[0]);
  }
}

// One decode token and one 3-token chunk over a 2-block context, through the public API.
TEST(PagedAttention, PublicApiOnCoreTensors) {
  const int kv_heads = 2, heads = 4, head_size = 16, block_size = 8, num_blocks = 5;
  OwnedTensor key_cache =
      OwnedTensor::empty({num_blocks, block_size, kv_heads, head_size}, DType::kFloat32);
  OwnedTensor value_cache =
      OwnedTensor::empty({num_blocks, block_size, kv_heads, head_size}, DType::kFloat32);
  std::mt19937 rng(5);
  std::normal_distribution<float> normal;
  float* kc = key_cache.view.data_as<float>();
  float* vc = value_cache.view.data_as<float>();
  for (std::int64_t i = 0; i < key_cache.view.numel(); ++i) {
    kc[i] = normal(rng);
    vc[i] = normal(rng);
  }
  OwnedTensor query = OwnedTensor::empty({4, heads, head_size}, DType::kFloat32);
  for (std::int64_t i = 0; i < query.view.numel(); ++i)
    query.view.data_as<float>()[i] = normal(rng);
  OwnedTensor out = OwnedTensor::empty({4, heads, head_size}, DType::kFloat32);
  OwnedTensor tables = OwnedTensor::empty({2, 2}, DType::kInt32);
  OwnedTensor seq_lens = OwnedTensor::empty({2}, DType::kInt32);
  OwnedTensor qsl = OwnedTensor::empty({3}, DType::kInt32);
  const std::int32_t table_data[] = {3, 1, 4, 2};
  const std::int32_t len_data[] = {11, 13};
  const std::int32_t qsl_data[] = {0, 1, 4};
  std::memcpy(tables.view.data(), table_data, sizeof table_data);
  std::memcpy(seq_lens.view.data(), len_data, sizeof len_data);
  std::memcpy(qsl.view.data(), qsl_data, sizeof qsl_data);
  const float scale = 0.25f;
  paged_attention(out.view, query.view, key_cache.view, value_cache.view, tables.view,
                  seq_lens.view, qsl.view, scale, /*sliding_window=*/4);

  const int seq_of_token[] = {0, 1, 1, 1};
  const int pos_of_token[] = {10, 10, 11, 12};
  for (int t = 0; t < 4; ++t) {
    const int s = seq_of_token[t];
    for (int h = 0; h < heads; ++h) {
      const int g = h / (heads / kv_heads);
      const float* qr = query.view.data_as<float>() + (t * heads + h) * head_size;
      std::vector<double> w, o(head_size, 0.0);
      double mx = -INFINITY;
      for (int kp = pos_of_token[t] - 3; kp <= pos_of_token[t]; ++kp) {
        const int slot = table_data[s * 2 + kp / block_size] * block_size + kp % block_size;
        double dot = 0;
        for (int d = 0; d < head_size; ++d)
          dot += qr[d] * kc[(slot * kv_heads + g) * head_size + d];
        w.push_back(dot * scale);
        mx = std::max(mx, dot * scale);
      }
      double sum = 0;
      for (double& x : w) sum += (x = std::exp(x - mx));
      for (int i = 0; i < 4; ++i) {
        const int kp = pos_of_token[t] - 3 + i;
        const int slot = table_data[s * 2 + kp / block_size] * block_size + kp % block_size;
        for (int d = 0; d < head_size; ++d)
          o[d] += w[i] / sum * vc[(slot * kv_heads + g) * head_size + d];
      }
      for (int d = 0; d < head_size; ++d) {
        EXPECT_NEAR(out.view.data_as<float>()[(t * heads + h) * head_size + d], o[d], 1e-5);
      }
    }
  }

  OwnedTensor bad_tables = OwnedTensor::empty({2, 2}, DType::kInt32);
  const std::int32_t bad_data[] = {3, 1, 4, 7};
  std::memcpy(bad_tables.view.data(), bad_data, sizeof bad_data);
  EXPECT_THROW(paged_attention(out.view, query.view, key_cache.view, value_cache.view,
                               bad_tables.view, seq_lens.view, qsl.view, scale),
               ValueError);
  OwnedTensor int64_tables = OwnedTensor::empty({2, 2}, DType::kInt64);
  EXPECT_THROW(paged_attention(out.view, query.view, key_cache.view, value_cache.view,
                               int64_tables.view, seq_lens.view, qsl.view, scale),
               TypeError);
  // max_query_len: the second sequence has 3 query tokens; a bound of 3 holds, 2 does not.
  paged_attention(out.view, query.view, key_cache.view, value_cache.view, tables.view,
                  seq_lens.view, qsl.view, scale, 4, nullptr, 0, /*max_query_len=*/3);
  EXPECT_THROW(paged_attention(out.view, query.view, key_cache.view, value_cache.view, tables.view,
                               seq_lens.view, qsl.view, scale, 4, nullptr, 0, 2),
               ValueError);
  EXPECT_THROW(paged_attention(out.view, query.view, key_cache.view, value_cache.view, tables.view,
                               seq_lens.view, qsl.view, scale, 4, nullptr, 0, -1),
               ValueError);
}

}  // namespace
}  // namespace aphrodite
