// The CPU GEMM behind aphrodite::linear: every kernel set this CPU runs (scalar, AVX2/FMA,
// AVX-512) against a double-precision reference, with and without SwiGLU, through every edge of the
// blocking (partial register tiles, partial panels, several K chunks, strided rows, prepacked
// weights, thread counts), plus the public API's checks and the projector.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "aphrodite/error.h"
#include "aphrodite/linear.h"
#include "aphrodite/llava_projector.h"
#include "aphrodite/parallel.h"
#include "linear/gemm_cpu.h"

namespace aphrodite {
namespace {

using detail::CpuIsa;

double activate_ref(double v, Activation act) {
  if (act == Activation::kGeluErf) return 0.5 * v * std::erfc(-v / std::sqrt(2.0));
  if (act == Activation::kGeluTanh) {
    const double y = std::sqrt(2.0 / M_PI) * (v + 0.044715 * v * v * v);
    return 0.5 * v * (1.0 + std::tanh(y));
  }
  if (act == Activation::kQuickGelu) return v / (1.0 + std::exp(-1.702 * v));
  return v;
}

std::vector<float> random_vector(std::size_t n, std::mt19937& rng, float scale = 1.0f) {
  std::normal_distribution<float> dist(0.0f, scale);
  std::vector<float> v(n);
  for (float& f : v) f = dist(rng);
  return v;
}

struct Case {
  std::int64_t m, n, k;
  std::int64_t lda, ldw, ldc;
  bool bias;
  Activation act;
};

// Norm-wise relative error of the kernel's C against the double reference, over the valid
// region only; also fails when anything outside the valid columns of C was written.
double run_case(const Case& c, CpuIsa isa, bool prepack, std::mt19937& rng) {
  std::vector<float> a = random_vector(static_cast<std::size_t>(c.m * c.lda), rng);
  std::vector<float> w =
      random_vector(static_cast<std::size_t>(c.n * c.ldw), rng,
                    1.0f / std::sqrt(static_cast<float>(std::max<std::int64_t>(c.k, 1))));
  std::vector<float> bias = random_vector(static_cast<std::size_t>(c.n), rng);
  const float sentinel = 12345.0f;
  std::vector<float> out(static_cast<std::size_t>(c.m * c.ldc), sentinel);
  const bool gated = c.act == Activation::kSwiGlu;
  const std::int64_t out_n = gated ? c.n / 2 : c.n;

  std::vector<float> packed;
  detail::GemmF32Args args{};
  args.a = a.data();
  args.lda = c.lda;
  if (prepack) {
    const std::int64_t panels = detail::packed_panels(c.n, gated);
    // 16 spare floats, so that the start can move to a 64-byte boundary (the kernels load
    // packed panels with aligned loads, as from a Buffer).
    packed.resize(static_cast<std::size_t>(panels * c.k * detail::kGemmNr + 16));
    float* base = packed.data();
    while (reinterpret_cast<std::uintptr_t>(base) % 64 != 0) ++base;
    detail::pack_weight_f32(w.data(), c.ldw, c.n, c.k, gated, base, isa);
    args.packed_w = base;
  } else {
    args.w = w.data();
    args.ldw = c.ldw;
  }
  args.bias = c.bias ? bias.data() : nullptr;
  args.c = out.data();
  args.ldc = c.ldc;
  args.m = c.m;
  args.n = c.n;
  args.k = c.k;
  args.act = c.act;
  detail::gemm_f32(args, isa);

  double err2 = 0.0, ref2 = 0.0;
  for (std::int64_t i = 0; i < c.m; ++i) {
    for (std::int64_t j = 0; j < c.ldc; ++j) {
      const float got = out[static_cast<std::size_t>(i * c.ldc + j)];
      if (j >= out_n) {
        EXPECT_EQ(got, sentinel) << "wrote past N at row " << i << " col " << j;
        continue;
      }
      auto dot = [&](std::int64_t row) {
        double acc = c.bias ? bias[static_cast<std::size_t>(row)] : 0.0;
        for (std::int64_t p = 0; p < c.k; ++p) {
          acc += static_cast<double>(a[static_cast<std::size_t>(i * c.lda + p)]) *
                 w[static_cast<std::size_t>(row * c.ldw + p)];
        }
        return acc;
      };
      double ref;
      if (gated) {
        const double g = dot(j);
        ref = g / (1.0 + std::exp(-g)) * dot(out_n + j);
      } else {
        ref = activate_ref(dot(j), c.act);
      }
      err2 += (got - ref) * (got - ref);
      ref2 += ref * ref;
    }
  }
  return ref2 > 0 ? std::sqrt(err2 / ref2) : std::sqrt(err2);
}

std::vector<CpuIsa> isas() {
  std::vector<CpuIsa> v{CpuIsa::kScalar};
  if (detail::best_cpu_isa() >= CpuIsa::kAvx2) v.push_back(CpuIsa::kAvx2);
  if (detail::best_cpu_isa() >= CpuIsa::kAvx512) v.push_back(CpuIsa::kAvx512);
  if (detail::best_cpu_isa() >= CpuIsa::kAmx) v.push_back(CpuIsa::kAmx);
  return v;
}

std::vector<Case> cases() {
  const Activation acts[] = {Activation::kNone, Activation::kGeluErf, Activation::kGeluTanh,
                             Activation::kQuickGelu, Activation::kSwiGlu};
  // Rows 1..13, 23, 25 hit every partial register tile (6 rows AVX2 / scalar, 12 AVX-512); N off
  // the 16-wide panels (and, for SwiGLU, halves off the panels); K = 600 takes three 256-deep
  // chunks (accumulation into C) unless the weight is prepacked and M <= 64 (one chunk);
  // K = 0 writes act(bias). Products under 1M multiply-adds run on the calling thread.
  const std::int64_t shapes[][3] = {
      {1, 1, 1},
      {1, 40, 600},
      {2, 16, 7},
      {3, 34, 256},
      {4, 33, 257},
      {5, 64, 31},
      {6, 5, 513},
      {7, 66, 600},
      {13, 48, 0},
      {50, 70, 300},
      {12, 50, 33},
      {25, 96, 65},
      {23, 31, 19},
      {11, 130, 40},
      {9, 2, 300},
      {8, 46, 129},
      // Over the inline-run threshold (1M multiply-adds): split across the pool.
      {70, 300, 129},
      {3, 1000, 400},
      {64, 96, 200},
      {40, 200, 160},
      // From kAmxMinRows (256) rows and with a prepacked weight, the AMX set runs its tile
      // kernel: rows off its 32-row blocks and 16-row tiles, N off its 32-column blocks, K off its
      // 32-deep steps and over one 1,024-deep chunk, SwiGLU, row blocks split across the pool.
      {256, 40, 600},
      {260, 33, 1100},
      {290, 66, 0},
      {400, 100, 70},
      {321, 18, 31},
      {300, 520, 300}};
  std::vector<Case> out;
  int i = 0;
  for (const auto& s : shapes) {
    Activation act = acts[i % 5];
    if (act == Activation::kSwiGlu && s[1] % 2 != 0) act = Activation::kNone;
    const bool bias = i % 4 != 1;
    // Every other case with padded row strides (views into wider tensors).
    const std::int64_t pad = i % 2 == 0 ? 0 : 3;
    out.push_back({s[0], s[1], s[2], s[2] + pad, s[2] + pad, s[1] + pad, bias, act});
    ++i;
  }
  return out;
}

class LinearKernels : public ::testing::TestWithParam<int> {
 protected:
  void SetUp() override {
    saved_threads_ = num_threads();
    set_num_threads(GetParam());
  }
  void TearDown() override { set_num_threads(saved_threads_); }

 private:
  int saved_threads_ = 1;
};

TEST_P(LinearKernels, MatchReferenceOnEveryEdge) {
  std::mt19937 rng(42);
  for (CpuIsa isa : isas()) {
    for (bool prepack : {false, true}) {
      for (const Case& c : cases()) {
        const double err = run_case(c, isa, prepack, rng);
        // Float32 GEMMs land at 1e-7 .. 7e-7 here; the bound is tight enough to catch the AMX
        // kernel dropping one of its 2^-16-sized part products (2.5e-6 or more).
        EXPECT_LT(err, 1.5e-6) << detail::cpu_isa_name(isa) << " prepack=" << prepack
                               << " m=" << c.m << " n=" << c.n << " k=" << c.k
                               << " act=" << activation_name(c.act);
      }
    }
  }
}

// 1 thread: one task; 3 threads: column slabs and row blocks split across the pool.
INSTANTIATE_TEST_SUITE_P(Threads, LinearKernels, ::testing::Values(1, 3));

TEST(Linear, PublicApiChecksArguments) {
  std::vector<float> x(4 * 8), w(5 * 8), out(4 * 5), bias(5);
  const TensorView xv(x.data(), DType::kFloat32, Device::cpu(), {4, 8});
  const TensorView wv(w.data(), DType::kFloat32, Device::cpu(), {5, 8});
  const TensorView ov(out.data(), DType::kFloat32, Device::cpu(), {4, 5});
  const TensorView bv(bias.data(), DType::kFloat32, Device::cpu(), {5});
  EXPECT_NO_THROW(linear(ov, xv, wv, bv, Activation::kGeluTanh));

  const TensorView wrong_k(w.data(), DType::kFloat32, Device::cpu(), {4, 10});
  EXPECT_THROW(linear(ov, xv, wrong_k, std::nullopt), ValueError);
  const TensorView bad_bias(bias.data(), DType::kFloat32, Device::cpu(), {4});
  EXPECT_THROW(linear(ov, xv, wv, bad_bias), ValueError);
  const TensorView half_x(x.data(), DType::kFloat16, Device::cpu(), {4, 8});
  EXPECT_THROW(linear(ov, half_x, wv, std::nullopt), TypeError);
  const TensorView aliased(x.data(), DType::kFloat32, Device::cpu(), {4, 5});
  EXPECT_THROW(linear(aliased, xv, wv, std::nullopt), ValueError);
  EXPECT_THROW(parse_activation("relu"), ValueError);
  EXPECT_EQ(parse_activation("gelu_tanh"), Activation::kGeluTanh);

  const PackedWeight packed = pack_linear_weight(wv);
  EXPECT_EQ(packed.out_features(), 5);
  EXPECT_EQ(packed.in_features(), 8);
  std::vector<float> out2(4 * 5);
  const TensorView ov2(out2.data(), DType::kFloat32, Device::cpu(), {4, 5});
  linear(ov2, xv, packed, bv, Activation::kGeluTanh);
  EXPECT_EQ(out, out2);
  EXPECT_THROW(linear(ov2, xv, PackedWeight{}, std::nullopt), ValueError);
}

TEST(Linear, SwiGluNeedsEvenRowsAndAGatedPackedWeight) {
  std::vector<float> x(3 * 8, 0.5f), w(6 * 8, 0.25f), out(3 * 3), bias(6, 0.1f);
  const TensorView xv(x.data(), DType::kFloat32, Device::cpu(), {3, 8});
  const TensorView wv(w.data(), DType::kFloat32, Device::cpu(), {6, 8});
  const TensorView ov(out.data(), DType::kFloat32, Device::cpu(), {3, 3});
  const TensorView bv(bias.data(), DType::kFloat32, Device::cpu(), {6});
  linear(ov, xv, wv, bv, Activation::kSwiGlu);
  const double g = 8 * 0.5 * 0.25 + 0.1;
  for (float v : out) EXPECT_NEAR(v, g / (1 + std::exp(-g)) * g, 1e-6);

  const TensorView odd_w(w.data(), DType::kFloat32, Device::cpu(), {5, 8});
  EXPECT_THROW(pack_linear_weight(odd_w, /*gated=*/true), ValueError);
  EXPECT_THROW(linear(ov, xv, odd_w, std::nullopt, Activation::kSwiGlu), ValueError);
  const PackedWeight plain = pack_linear_weight(wv);
  EXPECT_THROW(linear(ov, xv, plain, bv, Activation::kSwiGlu), ValueError);
  const PackedWeight gated = pack_linear_weight(wv, /*gated=*/true);
  EXPECT_TRUE(gated.gated());
  std::vector<float> out2(3 * 3);
  const TensorView ov2(out2.data(), DType::kFloat32, Device::cpu(), {3, 3});
  linear(ov2, xv, gated, bv, Activation::kSwiGlu);
  EXPECT_EQ(out, out2);
  std::vector<float> wide(3 * 6);
  const TensorView wide_out(wide.data(), DType::kFloat32, Device::cpu(), {3, 6});
  EXPECT_THROW(linear(wide_out, xv, gated, bv, Activation::kNone), ValueError);
}

TEST(Linear, CpuIsaCanBeForcedAndRestored) {
  const std::string before = linear_cpu_isa();
  set_linear_cpu_isa("scalar");
  EXPECT_STREQ(linear_cpu_isa(), "scalar");
  set_linear_cpu_isa("auto");
  EXPECT_STREQ(linear_cpu_isa(), detail::cpu_isa_name(detail::best_cpu_isa()));
  EXPECT_THROW(set_linear_cpu_isa("neon"), ValueError);
  if (detail::best_cpu_isa() < CpuIsa::kAvx512) {
    EXPECT_THROW(set_linear_cpu_isa("avx512"), ValueError);
  }
  set_linear_cpu_isa(before.c_str());
}

TEST(LlavaProjector, MatchesReferenceWithAndWithoutWorkspace) {
  const std::int64_t t = 11, d_in = 40, h = 50, d_out = 19;
  std::mt19937 rng(3);
  std::vector<float> x = random_vector(t * d_in, rng);
  std::vector<float> w1 = random_vector(h * d_in, rng, 0.15f);
  std::vector<float> b1 = random_vector(h, rng);
  std::vector<float> w2 = random_vector(d_out * h, rng, 0.15f);
  std::vector<float> b2 = random_vector(d_out, rng);
  const Device cpu = Device::cpu();
  const TensorView xv(x.data(), DType::kFloat32, cpu, {t, d_in});
  const TensorView w1v(w1.data(), DType::kFloat32, cpu, {h, d_in});
  const TensorView b1v(b1.data(), DType::kFloat32, cpu, {h});
  const TensorView w2v(w2.data(), DType::kFloat32, cpu, {d_out, h});
  const TensorView b2v(b2.data(), DType::kFloat32, cpu, {d_out});

  for (Activation act : {Activation::kGeluErf, Activation::kGeluTanh}) {
    std::vector<double> ref(static_cast<std::size_t>(t * d_out));
    for (std::int64_t i = 0; i < t; ++i) {
      std::vector<double> hid(static_cast<std::size_t>(h));
      for (std::int64_t j = 0; j < h; ++j) {
        double acc = b1[static_cast<std::size_t>(j)];
        for (std::int64_t p = 0; p < d_in; ++p)
          acc += static_cast<double>(x[static_cast<std::size_t>(i * d_in + p)]) *
                 w1[static_cast<std::size_t>(j * d_in + p)];
        hid[static_cast<std::size_t>(j)] = activate_ref(acc, act);
      }
      for (std::int64_t j = 0; j < d_out; ++j) {
        double acc = b2[static_cast<std::size_t>(j)];
        for (std::int64_t p = 0; p < h; ++p)
          acc += hid[static_cast<std::size_t>(p)] * w2[static_cast<std::size_t>(j * h + p)];
        ref[static_cast<std::size_t>(i * d_out + j)] = acc;
      }
    }
    std::vector<float> workspace(static_cast<std::size_t>(t * h));
    const TensorView wsv(workspace.data(), DType::kFloat32, cpu, {t, h});
    for (bool with_workspace : {false, true}) {
      std::vector<float> out(static_cast<std::size_t>(t * d_out));
      const TensorView ov(out.data(), DType::kFloat32, cpu, {t, d_out});
      llava_projector(ov, xv, w1v, b1v, w2v, b2v, act,
                      with_workspace ? std::optional<TensorView>(wsv) : std::nullopt);
      double err2 = 0, ref2 = 0;
      for (std::size_t i = 0; i < out.size(); ++i) {
        err2 += (out[i] - ref[i]) * (out[i] - ref[i]);
        ref2 += ref[i] * ref[i];
      }
      EXPECT_LT(std::sqrt(err2 / ref2), 1e-5) << activation_name(act) << " " << with_workspace;
    }
  }
  std::vector<float> out(static_cast<std::size_t>(t * d_out));
  const TensorView ov(out.data(), DType::kFloat32, cpu, {t, d_out});
  EXPECT_THROW(llava_projector(ov, xv, w1v, b1v, w2v, b2v, Activation::kNone), ValueError);
  EXPECT_THROW(llava_projector(ov, xv, w2v, b1v, w2v, b2v), ValueError);
  // A workspace over the first GEMM's inputs is refused under its own name.
  std::vector<float> shared(static_cast<std::size_t>(t * h + t * d_in));
  const TensorView x_in_shared(shared.data(), DType::kFloat32, cpu, {t, d_in});
  const TensorView ws_over_x(shared.data(), DType::kFloat32, cpu, {t, h});
  try {
    llava_projector(ov, x_in_shared, w1v, b1v, w2v, b2v, Activation::kGeluErf, ws_over_x);
    ADD_FAILURE() << "an overlapping workspace was accepted";
  } catch (const ValueError& e) {
    EXPECT_NE(std::string(e.what()).find("workspace"), std::string::npos) << e.what();
  }
  EXPECT_THROW(parse_activation(nullptr), ValueError);
}

}  // namespace
}  // namespace aphrodite
