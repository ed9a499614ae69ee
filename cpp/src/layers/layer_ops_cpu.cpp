// CPU layer ops: RMSNorm (with the residual add), rotary embedding, SiLU-and-multiply. One pass
// over each row in float32, rounding to the dtype where HF's eager code stores an intermediate
// tensor (see aphrodite/layer_ops.h). Rows are spread over the core's thread pool.
//
// Built with -ffp-contract=off (cpp/CMakeLists.txt): a product and the sum it feeds are rounded
// separately, as torch's separate elementwise ops round them (rotary_embedding matches them bit
// for bit).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "aphrodite/error.h"
#include "aphrodite/parallel.h"
#include "internal/float16.h"
#include "internal/layer_ops_kernels.h"

namespace aphrodite::detail {

namespace {

// Elements of one dtype as float32 values: load, store, and rounding a float32 to the dtype.
struct F32 {
  using Storage = float;
  static float load(Storage v) { return v; }
  static Storage store(float v) { return v; }
};
struct F16 {
  using Storage = std::uint16_t;
  static float load(Storage v) { return half_to_float(v); }
  static Storage store(float v) { return float_to_half(v); }
};
struct BF16 {
  using Storage = std::uint16_t;
  static float load(Storage v) { return bf16_to_float(v); }
  static Storage store(float v) { return float_to_bf16(v); }
};
template <typename E>
float round_to(float v) {
  return E::load(E::store(v));
}

// Work items of at least this many elements per thread-pool chunk.
constexpr std::int64_t kGrainElements = 1 << 14;

std::int64_t grain_rows(std::int64_t row_elements) {
  return std::max<std::int64_t>(1, kGrainElements / std::max<std::int64_t>(1, row_elements));
}

template <typename E>
void rms_norm_rows(const RmsNormParams& p, std::int64_t r0, std::int64_t r1) {
  using S = typename E::Storage;
  const std::int64_t n = p.hidden;
  const S* weight = static_cast<const S*>(p.weight);
  std::vector<float> row(static_cast<std::size_t>(n));
  for (std::int64_t r = r0; r < r1; ++r) {
    const S* x = static_cast<const S*>(p.x) + r * p.x_stride;
    S* res = p.residual ? static_cast<S*>(p.residual) + r * p.residual_stride : nullptr;
    // Eight partial sums: the loop vectorises, and the float32 sum's error stays small.
    float partial[8] = {};
    for (std::int64_t i = 0; i < n; ++i) {
      float v = E::load(x[i]);
      if (res != nullptr) {
        const S sum = E::store(v + E::load(res[i]));
        res[i] = sum;
        v = E::load(sum);
      }
      row[static_cast<std::size_t>(i)] = v;
      partial[i % 8] += v * v;
    }
    float sum_sq = 0.0f;
    for (float s : partial) sum_sq += s;
    const float inv = 1.0f / std::sqrt(sum_sq / static_cast<float>(n) + p.eps);
    S* out = static_cast<S*>(p.out) + r * p.out_stride;
    for (std::int64_t i = 0; i < n; ++i) {
      const float normed = round_to<E>(row[static_cast<std::size_t>(i)] * inv);
      out[i] = E::store(E::load(weight[i]) * normed);
    }
  }
}

template <typename E>
void rotate_rows(void* base, std::int64_t stride, int heads, int head_size, std::int64_t token,
                 const float* cos, const float* sin) {
  using S = typename E::Storage;
  const int half = head_size / 2;
  S* row = static_cast<S*>(base) + token * stride;
  for (int h = 0; h < heads; ++h) {
    S* x = row + static_cast<std::int64_t>(h) * head_size;
    for (int d = 0; d < half; ++d) {
      const float x1 = E::load(x[d]);
      const float x2 = E::load(x[d + half]);
      const float c1 = round_to<E>(cos[d]);
      const float s1 = round_to<E>(sin[d]);
      const float c2 = round_to<E>(cos[d + half]);
      const float s2 = round_to<E>(sin[d + half]);
      // x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1]; each product rounded.
      const float a1 = round_to<E>(x1 * c1);
      const float b1 = round_to<E>(-x2 * s1);
      const float a2 = round_to<E>(x2 * c2);
      const float b2 = round_to<E>(x1 * s2);
      x[d] = E::store(a1 + b1);
      x[d + half] = E::store(a2 + b2);
    }
  }
}

template <typename E>
void rotary_tokens(const RotaryParams& p, std::int64_t t0, std::int64_t t1) {
  for (std::int64_t t = t0; t < t1; ++t) {
    const std::int64_t pos = p.positions_int64 ? static_cast<const std::int64_t*>(p.positions)[t]
                                               : static_cast<const std::int32_t*>(p.positions)[t];
    const float* cos = p.cos + pos * p.head_size;
    const float* sin = p.sin + pos * p.head_size;
    rotate_rows<E>(p.query, p.query_stride, p.num_heads, p.head_size, t, cos, sin);
    rotate_rows<E>(p.key, p.key_stride, p.num_kv_heads, p.head_size, t, cos, sin);
  }
}

template <typename E>
void silu_and_mul_rows(const SiluAndMulParams& p, std::int64_t r0, std::int64_t r1) {
  using S = typename E::Storage;
  for (std::int64_t r = r0; r < r1; ++r) {
    const S* gate = static_cast<const S*>(p.x) + r * p.x_stride;
    const S* up = gate + p.n;
    S* out = static_cast<S*>(p.out) + r * p.out_stride;
    for (std::int64_t i = 0; i < p.n; ++i) {
      const float g = E::load(gate[i]);
      const float silu = round_to<E>(g / (1.0f + std::exp(-g)));
      out[i] = E::store(silu * E::load(up[i]));
    }
  }
}

template <template <typename> class Fn, typename... Args>
void by_dtype(DType dtype, Args&&... args) {
  switch (dtype) {
    case DType::kFloat32:
      return Fn<F32>::run(args...);
    case DType::kFloat16:
      return Fn<F16>::run(args...);
    case DType::kBFloat16:
      return Fn<BF16>::run(args...);
    default:
      throw TypeError(std::string("layer ops: unsupported dtype ") + dtype_name(dtype));
  }
}

template <typename E>
struct RmsNormRun {
  static void run(const RmsNormParams& p) {
    parallel_for(0, p.rows, grain_rows(p.hidden),
                 [&](std::int64_t r0, std::int64_t r1) { rms_norm_rows<E>(p, r0, r1); });
  }
};
template <typename E>
struct RotaryRun {
  static void run(const RotaryParams& p) {
    parallel_for(0, p.tokens,
                 grain_rows(static_cast<std::int64_t>(p.num_heads + p.num_kv_heads) * p.head_size),
                 [&](std::int64_t t0, std::int64_t t1) { rotary_tokens<E>(p, t0, t1); });
  }
};
template <typename E>
struct SiluAndMulRun {
  static void run(const SiluAndMulParams& p) {
    parallel_for(0, p.rows, grain_rows(2 * p.n),
                 [&](std::int64_t r0, std::int64_t r1) { silu_and_mul_rows<E>(p, r0, r1); });
  }
};

}  // namespace

void rms_norm_cpu(const RmsNormParams& p) { by_dtype<RmsNormRun>(p.dtype, p); }

void rotary_embedding_cpu(const RotaryParams& p) {
  // The positions are read on the host anyway: check them all before writing anything.
  for (std::int64_t t = 0; t < p.tokens; ++t) {
    const std::int64_t pos = p.positions_int64 ? static_cast<const std::int64_t*>(p.positions)[t]
                                               : static_cast<const std::int32_t*>(p.positions)[t];
    if (pos < 0 || pos >= p.max_positions) {
      throw ValueError("rotary_embedding: positions[" + std::to_string(t) +
                       "] = " + std::to_string(pos) + " is outside the cos/sin tables (" +
                       std::to_string(p.max_positions) + " positions)");
    }
  }
  by_dtype<RotaryRun>(p.dtype, p);
}

void silu_and_mul_cpu(const SiluAndMulParams& p) { by_dtype<SiluAndMulRun>(p.dtype, p); }

}  // namespace aphrodite::detail
