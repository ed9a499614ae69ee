// PIL's bicubic resampling coefficients (libImaging/Resample.c: precompute_coeffs and
// normalize_coeffs_8bpc), reproduced operation for operation in double precision so that the
// rounded fixed-point coefficients are PIL's exactly. This file is compiled with
// -ffp-contract=off (cpp/CMakeLists.txt): a fused multiply-add would round differently from PIL.
#include <cmath>
#include <cstdint>
#include <vector>

#include "internal/image_preprocess.h"

namespace aphrodite::detail {

namespace {

// PIL's bicubic_filter with a = -0.5 (Keys' kernel), support 2.
double bicubic_filter(double x) {
  constexpr double a = -0.5;
  if (x < 0.0) x = -x;
  if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
  if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
  return 0.0;
}

constexpr double kBicubicSupport = 2.0;

// PIL passes the box edges as float; the scale is computed from them.
double axis_scale(int in_size, int out_size) {
  const float in0 = 0.0f;
  const float in1 = static_cast<float>(in_size);
  return static_cast<double>(in1 - in0) / out_size;
}

double filter_scale(double scale) { return scale < 1.0 ? 1.0 : scale; }

}  // namespace

int bicubic_ksize(int in_size, int out_size) {
  const double support = kBicubicSupport * filter_scale(axis_scale(in_size, out_size));
  return static_cast<int>(std::ceil(support)) * 2 + 1;
}

void bicubic_coeffs(int in_size, int out_size, int first, int count, int ksize,
                    std::int32_t* bounds, std::int32_t* coeffs) {
  const double scale = axis_scale(in_size, out_size);
  const double filterscale = filter_scale(scale);
  const double support = kBicubicSupport * filterscale;
  const double in0 = static_cast<double>(0.0f);
  std::vector<double> weights(static_cast<std::size_t>(ksize));
  for (int i = 0; i < count; ++i) {
    const int xx = first + i;
    const double center = in0 + (xx + 0.5) * scale;
    double ww = 0.0;
    const double ss = 1.0 / filterscale;
    int xmin = static_cast<int>(center - support + 0.5);
    if (xmin < 0) xmin = 0;
    int xmax = static_cast<int>(center + support + 0.5);
    if (xmax > in_size) xmax = in_size;
    xmax -= xmin;
    std::int32_t* k = coeffs + static_cast<std::int64_t>(i) * ksize;
    for (int x = 0; x < xmax; ++x) {
      const double w = bicubic_filter((x + xmin - center + 0.5) * ss);
      weights[x] = w;
      ww += w;
    }
    for (int x = 0; x < xmax; ++x) {
      if (ww != 0.0) weights[x] /= ww;
    }
    for (int x = 0; x < ksize; ++x) {
      if (x >= xmax) {
        k[x] = 0;
      } else if (weights[x] < 0) {
        k[x] = static_cast<std::int32_t>(-0.5 + weights[x] * (1 << kResamplePrecisionBits));
      } else {
        k[x] = static_cast<std::int32_t>(0.5 + weights[x] * (1 << kResamplePrecisionBits));
      }
    }
    bounds[2 * i] = xmin;
    bounds[2 * i + 1] = xmax;
  }
}

}  // namespace aphrodite::detail
