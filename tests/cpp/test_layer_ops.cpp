// C++ tests of the layer ops through the public API on core-owned float32 tensors, against
// double-precision references (the Python tests compare every dtype with HF's torch code).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "aphrodite/buffer.h"
#include "aphrodite/layer_ops.h"

namespace aphrodite {
namespace {

void fill_normal(OwnedTensor& t, std::uint32_t seed, float scale = 1.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal;
  float* d = t.view.data_as<float>();
  for (std::int64_t i = 0; i < t.view.numel(); ++i) d[i] = scale * normal(rng);
}

TEST(LayerOps, RmsNormAndFusedAddMatchDoubleReference) {
  const std::int64_t rows = 5, hidden = 300;
  OwnedTensor x = OwnedTensor::empty({rows, hidden}, DType::kFloat32);
  OwnedTensor residual = OwnedTensor::empty({rows, hidden}, DType::kFloat32);
  OwnedTensor weight = OwnedTensor::empty({hidden}, DType::kFloat32);
  OwnedTensor out = OwnedTensor::empty({rows, hidden}, DType::kFloat32);
  fill_normal(x, 1, 3.0f);
  fill_normal(residual, 2);
  fill_normal(weight, 3);
  const float* xd = x.view.data_as<float>();
  const float* rd = residual.view.data_as<float>();
  const float* wd = weight.view.data_as<float>();
  std::vector<double> sum(static_cast<std::size_t>(rows * hidden));
  for (std::size_t i = 0; i < sum.size(); ++i) sum[i] = static_cast<double>(xd[i]) + rd[i];

  rms_norm(out.view, x.view, weight.view, 1e-5f);
  for (std::int64_t r = 0; r < rows; ++r) {
    double ss = 0.0;
    for (std::int64_t i = 0; i < hidden; ++i) ss += double(xd[r * hidden + i]) * xd[r * hidden + i];
    const double inv = 1.0 / std::sqrt(ss / hidden + 1e-5);
    for (std::int64_t i = 0; i < hidden; ++i) {
      const double ref = wd[i] * xd[r * hidden + i] * inv;
      EXPECT_NEAR(out.view.data_as<float>()[r * hidden + i], ref, 1e-5 * (std::fabs(ref) + 1));
    }
  }

  fused_add_rms_norm(x.view, residual.view, weight.view, 1e-5f);
  for (std::int64_t r = 0; r < rows; ++r) {
    double ss = 0.0;
    for (std::int64_t i = 0; i < hidden; ++i) ss += sum[r * hidden + i] * sum[r * hidden + i];
    const double inv = 1.0 / std::sqrt(ss / hidden + 1e-5);
    for (std::int64_t i = 0; i < hidden; ++i) {
      const std::int64_t j = r * hidden + i;
      EXPECT_NEAR(rd[j], sum[j], 1e-6 * (std::fabs(sum[j]) + 1));
      const double ref = wd[i] * sum[j] * inv;
      EXPECT_NEAR(xd[j], ref, 1e-5 * (std::fabs(ref) + 1));
    }
  }
}

TEST(LayerOps, RotaryEmbeddingRotatesPairsInPlace) {
  const std::int64_t tokens = 3, heads = 2, kv_heads = 1, head_size = 8, max_pos = 16;
  OwnedTensor q = OwnedTensor::empty({tokens, heads, head_size}, DType::kFloat32);
  OwnedTensor k = OwnedTensor::empty({tokens, kv_heads, head_size}, DType::kFloat32);
  OwnedTensor cos = OwnedTensor::empty({max_pos, head_size}, DType::kFloat32);
  OwnedTensor sin = OwnedTensor::empty({max_pos, head_size}, DType::kFloat32);
  OwnedTensor positions = OwnedTensor::empty({tokens}, DType::kInt64);
  fill_normal(q, 4);
  fill_normal(k, 5);
  for (std::int64_t p = 0; p < max_pos; ++p) {
    for (std::int64_t d = 0; d < head_size; ++d) {
      const double angle = p * std::pow(10000.0, -2.0 * (d % (head_size / 2)) / head_size);
      cos.view.data_as<float>()[p * head_size + d] = static_cast<float>(std::cos(angle));
      sin.view.data_as<float>()[p * head_size + d] = static_cast<float>(std::sin(angle));
    }
  }
  const std::int64_t pos[] = {0, 5, 15};
  for (int t = 0; t < 3; ++t) positions.view.data_as<std::int64_t>()[t] = pos[t];
  const std::vector<float> q0(q.view.data_as<float>(), q.view.data_as<float>() + q.view.numel());

  rotary_embedding(positions.view, q.view, k.view, cos.view, sin.view);
  const std::int64_t half = head_size / 2;
  for (std::int64_t t = 0; t < tokens; ++t) {
    for (std::int64_t h = 0; h < heads; ++h) {
      for (std::int64_t d = 0; d < half; ++d) {
        const std::int64_t base = (t * heads + h) * head_size;
        const double c = cos.view.data_as<float>()[pos[t] * head_size + d];
        const double s = sin.view.data_as<float>()[pos[t] * head_size + d];
        const double x1 = q0[base + d], x2 = q0[base + d + half];
        EXPECT_NEAR(q.view.data_as<float>()[base + d], x1 * c - x2 * s, 1e-5);
        EXPECT_NEAR(q.view.data_as<float>()[base + d + half], x2 * c + x1 * s, 1e-5);
      }
    }
  }
  positions.view.data_as<std::int64_t>()[1] = max_pos;  // outside the tables
  EXPECT_THROW(rotary_embedding(positions.view, q.view, k.view, cos.view, sin.view), ValueError);
}

TEST(LayerOps, SiluAndMulAndArgumentChecks) {
  OwnedTensor x = OwnedTensor::empty({2, 6}, DType::kFloat32);
  OwnedTensor out = OwnedTensor::empty({2, 3}, DType::kFloat32);
  fill_normal(x, 6, 2.0f);
  silu_and_mul(out.view, x.view);
  const float* xd = x.view.data_as<float>();
  for (int r = 0; r < 2; ++r) {
    for (int i = 0; i < 3; ++i) {
      const double g = xd[r * 6 + i];
      const double ref = g / (1.0 + std::exp(-g)) * xd[r * 6 + 3 + i];
      EXPECT_NEAR(out.view.data_as<float>()[r * 3 + i], ref, 1e-5 * (std::fabs(ref) + 1));
    }
  }
  OwnedTensor odd = OwnedTensor::empty({2, 5}, DType::kFloat32);
  EXPECT_THROW(silu_and_mul(out.view, odd.view), ValueError);
  OwnedTensor ints = OwnedTensor::empty({2, 3}, DType::kInt32);
  EXPECT_THROW(silu_and_mul(ints.view, x.view), TypeError);
  OwnedTensor w = OwnedTensor::empty({5}, DType::kFloat32);
  EXPECT_THROW(rms_norm(out.view, out.view, w.view, 1e-5f), ValueError);
}

}  // namespace
}  // namespace aphrodite
