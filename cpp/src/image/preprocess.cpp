// preprocess_images: argument checks, the per-image plan (sizes, crop window, PIL's coefficients,
// the normalisation table) and the choice of backend.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

#include "aphrodite/backend.h"
#include "aphrodite/image.h"
#include "internal/image_preprocess.h"

namespace aphrodite {

namespace {

// Python's floor division by 2 (HF's center crop uses `//`).
std::int64_t floor_half(std::int64_t v) { return v >= 0 ? v / 2 : -((-v + 1) / 2); }

std::uint16_t float_to_bfloat16_bits(float f) {
  std::uint32_t u = 0;
  std::memcpy(&u, &f, sizeof(u));
  if (std::isnan(f)) return static_cast<std::uint16_t>((u >> 16) | 0x40u);
  u += 0x7FFFu + ((u >> 16) & 1u);  // round to nearest, ties to even
  return static_cast<std::uint16_t>(u >> 16);
}

std::uint16_t float_to_float16_bits(float f) {
  std::uint32_t u = 0;
  std::memcpy(&u, &f, sizeof(u));
  const std::uint32_t sign = (u >> 16) & 0x8000u;
  const std::uint32_t abs = u & 0x7FFFFFFFu;
  if (abs >= 0x7F800000u) {  // inf or nan
    return static_cast<std::uint16_t>(sign | 0x7C00u | (abs > 0x7F800000u ? 0x200u : 0u));
  }
  if (abs >= 0x477FF000u) return static_cast<std::uint16_t>(sign | 0x7C00u);  // rounds to inf
  if (abs < 0x38800000u) {
    // Subnormal half (or zero): scale so that the half's ulp (2^-24) is an integer step; the
    // float addition rounds to nearest even.
    float magnitude = 0.0f;
    std::memcpy(&magnitude, &abs, sizeof(abs));
    const float shifted = magnitude + 0.5f;  // 0.5 = 2^-1: aligns bit 2^-24 to the float's ulp
    std::uint32_t bits = 0;
    std::memcpy(&bits, &shifted, sizeof(bits));
    return static_cast<std::uint16_t>(sign | (bits - 0x3F000000u));
  }
  // Normal: rebias the exponent and round the 13 dropped mantissa bits to nearest even.
  const std::uint32_t rounded = abs + 0xFFFu + ((abs >> 13) & 1u);
  return static_cast<std::uint16_t>(sign | ((rounded - 0x38000000u) >> 13));
}

std::uint32_t to_dtype_bits(float v, DType dtype) {
  switch (dtype) {
    case DType::kFloat32: {
      std::uint32_t u = 0;
      std::memcpy(&u, &v, sizeof(u));
      return u;
    }
    case DType::kFloat16:
      return float_to_float16_bits(v);
    default:
      return float_to_bfloat16_bits(v);
  }
}

// Plans one axis: the output range [first, last) of the crop that lands inside the resized
// image, PIL's coefficients for it, and the source range [src_first, src_last) it reads.
struct AxisPlan {
  std::int32_t offset = 0, first = 0, last = 0;
  std::int32_t src_first = 0, src_last = 0;
  std::int32_t ksize = 0;
  bool resample = false;
  std::int64_t table = 0;
};

AxisPlan plan_axis(std::int64_t src_size, std::int64_t resized, std::int64_t crop,
                   std::vector<std::int32_t>& tables) {
  AxisPlan a;
  const std::int64_t offset = floor_half(resized - crop);
  a.offset = static_cast<std::int32_t>(offset);
  a.first = static_cast<std::int32_t>(std::max<std::int64_t>(0, -offset));
  a.last = static_cast<std::int32_t>(std::min<std::int64_t>(crop, resized - offset));
  a.resample = resized != src_size;
  const int count = a.last - a.first;
  const int r_first = a.first + a.offset;  // first resized index used
  if (!a.resample) {
    a.src_first = r_first;
    a.src_last = r_first + count;
    return a;
  }
  a.ksize = detail::bicubic_ksize(static_cast<int>(src_size), static_cast<int>(resized));
  a.table = static_cast<std::int64_t>(tables.size());
  tables.resize(tables.size() + static_cast<std::size_t>(count) * (2 + a.ksize));
  std::int32_t* bounds = tables.data() + a.table;
  detail::bicubic_coeffs(static_cast<int>(src_size), static_cast<int>(resized), r_first, count,
                         a.ksize, bounds, bounds + 2 * count);
  a.src_first = bounds[0];
  a.src_last = bounds[2 * (count - 1)] + bounds[2 * (count - 1) + 1];
  return a;
}

}  // namespace

std::pair<std::int64_t, std::int64_t> shortest_edge_resize_size(std::int64_t height,
                                                                std::int64_t width,
                                                                std::int64_t shortest_edge) {
  if (height <= 0 || width <= 0 || shortest_edge <= 0) {
    throw ValueError(
        "shortest_edge_resize_size: sizes must be positive, got height=" + std::to_string(height) +
        " width=" + std::to_string(width) + " shortest_edge=" + std::to_string(shortest_edge));
  }
  const bool portrait = width <= height;
  const std::int64_t short_side = portrait ? width : height;
  const std::int64_t long_side = portrait ? height : width;
  if (shortest_edge > std::numeric_limits<std::int64_t>::max() / long_side) {
    throw ValueError("shortest_edge_resize_size: resizing " + std::to_string(height) + "x" +
                     std::to_string(width) + " to shortest edge " + std::to_string(shortest_edge) +
                     " overflows");
  }
  // Python's int(size * long / short): an exact product, a correctly rounded true division, a
  // truncation.
  const double ratio =
      static_cast<double>(shortest_edge * long_side) / static_cast<double>(short_side);
  const auto new_long = static_cast<std::int64_t>(ratio);
  return portrait ? std::make_pair(new_long, shortest_edge)
                  : std::make_pair(shortest_edge, new_long);
}

bool pil_vertical_pass_first(std::int64_t in_h, std::int64_t in_w, std::int64_t out_h,
                             std::int64_t out_w, PilPassOrder order) {
  if (in_w == out_w || in_h <= out_h) return false;  // one pass, or the height does not shrink
  switch (order) {
    case PilPassOrder::kHorizontalFirst:
      return false;
    case PilPassOrder::kVerticalFirstWhenTall:
      return in_h > 100 * in_w;
    case PilPassOrder::kVerticalFirstWhenHeightShrinksMore:
      return in_h - out_h > 2 * (in_w - out_w);
  }
  throw ValueError("pass_order: unknown value " + std::to_string(static_cast<int>(order)));
}

namespace detail {

ImageSource image_source(const TensorView& image, const char* name) {
  const std::int64_t h = image.size(0);
  const std::int64_t w = image.size(1);
  ImageSource source;
  source.pixels = image.data_as<const std::uint8_t>();
  // Size-1 dimensions may carry any stride (DLPack, torch): they are never stepped over.
  const std::int64_t pixel_stride = w == 1 ? 3 : image.stride(1);
  const std::int64_t row_stride = h == 1 ? w * pixel_stride : image.stride(0);
  if (image.stride(2) != 1 || (pixel_stride != 3 && pixel_stride != 4) ||
      row_stride < w * pixel_stride) {
    throw ValueError(std::string(name) +
                     ": expected RGB pixels with adjacent channels, 3 or 4 bytes per pixel (RGB, "
                     "or RGB and one ignored byte) and non-overlapping rows, got " +
                     image.describe());
  }
  source.pixel_stride = static_cast<std::int32_t>(pixel_stride);
  source.row_stride = row_stride;
  return source;
}

void pack_rgb(const ImageSource& source, std::int64_t height, std::int64_t width,
              std::uint8_t* dst) {
  const auto row_bytes = static_cast<std::size_t>(width * 3);
  for (std::int64_t y = 0; y < height; ++y) {
    const std::uint8_t* row = source.pixels + y * source.row_stride;
    std::uint8_t* out = dst + y * width * 3;
    if (source.pixel_stride == 3) {
      std::memcpy(out, row, row_bytes);
      continue;
    }
    for (std::int64_t x = 0; x < width; ++x) {
      std::memcpy(out + 3 * x, row + x * source.pixel_stride, 3);
    }
  }
}

PreprocessPlan plan_preprocess(const std::vector<TensorView>& images, const TensorView& out,
                               const ImagePreprocessParams& params) {
  check_dtype(out, "out", {DType::kFloat32, DType::kFloat16, DType::kBFloat16});
  check_dim(out, "out", 4);
  check_shape(out, "out", {static_cast<std::int64_t>(images.size()), 3, -1, -1});
  check_contiguous(out, "out");
  if (out.size(2) <= 0 || out.size(3) <= 0) {
    throw ValueError("out: the crop size (its last two dimensions) must be positive, got " +
                     out.describe());
  }
  if (params.do_resize && params.shortest_edge <= 0) {
    throw ValueError("shortest_edge must be positive, got " + std::to_string(params.shortest_edge));
  }
  switch (params.pass_order) {
    case PilPassOrder::kHorizontalFirst:
    case PilPassOrder::kVerticalFirstWhenTall:
    case PilPassOrder::kVerticalFirstWhenHeightShrinksMore:
      break;
    default:
      throw ValueError("pass_order: unknown value " +
                       std::to_string(static_cast<int>(params.pass_order)));
  }
  PreprocessPlan plan;
  plan.crop_h = out.size(2);
  plan.crop_w = out.size(3);
  plan.images.reserve(images.size());
  plan.sources.reserve(images.size());
  std::int64_t src_offset = 0;
  for (std::size_t i = 0; i < images.size(); ++i) {
    const std::string name = "images[" + std::to_string(i) + "]";
    const TensorView& img = images[i];
    check_dtype(img, name.c_str(), {DType::kUInt8});
    check_shape(img, name.c_str(), {-1, -1, 3});
    check_device(img, name.c_str(), Device::cpu());
    plan.sources.push_back(image_source(img, name.c_str()));
    check_no_overlap(out, "out", img, name.c_str());
    const std::int64_t h = img.size(0);
    const std::int64_t w = img.size(1);
    check_image_size(h, w, params, plan.crop_h, plan.crop_w, name);
    std::int64_t rh = h;
    std::int64_t rw = w;
    if (params.do_resize) std::tie(rh, rw) = shortest_edge_resize_size(h, w, params.shortest_edge);
    const AxisPlan ax = plan_axis(w, rw, plan.crop_w, plan.tables);
    const AxisPlan ay = plan_axis(h, rh, plan.crop_h, plan.tables);
    ImagePlan ip{};
    ip.vertical_first =
        ax.resample && ay.resample && pil_vertical_pass_first(h, w, rh, rw, params.pass_order) ? 1
                                                                                               : 0;
    if (ip.vertical_first) {
      // The horizontal pass reads "mid", whose first column is source column src_first.
      const int count = ax.last - ax.first;
      std::int32_t* bounds = plan.tables.data() + ax.table;
      for (int c = 0; c < count; ++c) bounds[2 * c] -= ax.src_first;
    }
    ip.src_offset = src_offset;
    src_offset += h * w * 3;
    ip.x_table = ax.table;
    ip.y_table = ay.table;
    ip.height = static_cast<std::int32_t>(h);
    ip.width = static_cast<std::int32_t>(w);
    ip.top = ay.offset;
    ip.left = ax.offset;
    ip.y0 = ay.first;
    ip.y1 = ay.last;
    ip.x0 = ax.first;
    ip.x1 = ax.last;
    ip.row0 = ay.src_first;
    ip.row1 = ay.src_last;
    ip.col0 = ax.src_first;
    ip.col1 = ax.src_last;
    ip.ksize_x = ax.ksize;
    ip.ksize_y = ay.ksize;
    ip.resample_x = ax.resample ? 1 : 0;
    ip.resample_y = ay.resample ? 1 : 0;
    ip.mid_offset = plan.scratch_bytes;
    std::int64_t mid_bytes = 0;
    if (ip.vertical_first) {
      mid_bytes = static_cast<std::int64_t>(ip.y1 - ip.y0) * (ip.col1 - ip.col0) * 3;
    } else if (ip.resample_x) {
      mid_bytes = static_cast<std::int64_t>(ip.row1 - ip.row0) * (ip.x1 - ip.x0) * 3;
    }
    plan.scratch_bytes += mid_bytes;
    plan.images.push_back(ip);
  }
  // HF: rescale in float64 then cast to float32; normalise in float32.
  for (int c = 0; c < 3; ++c) {
    for (int v = 0; v < 256; ++v) {
      const auto rescaled = static_cast<float>(static_cast<double>(v) * params.rescale_factor);
      const float normalised = (rescaled - params.mean[c]) / params.std[c];
      plan.lut[c][v] = to_dtype_bits(normalised, out.dtype());
    }
  }
  return plan;
}

}  // namespace detail

void check_image_size(std::int64_t height, std::int64_t width, const ImagePreprocessParams& params,
                      std::int64_t crop_h, std::int64_t crop_w, const std::string& name) {
  // Sides below 2^29: the kernels' 32-bit offsets and coefficient tables stay in range.
  constexpr std::int64_t kMaxSide = std::numeric_limits<std::int32_t>::max() / 4;
  if (crop_h < 1 || crop_w < 1) {
    throw ValueError("the crop size must be positive, got " + std::to_string(crop_h) + "x" +
                     std::to_string(crop_w));
  }
  if (height <= 0 || width <= 0 || height > kMaxSide || width > kMaxSide) {
    throw ValueError(name + ": height and width must be in [1, " + std::to_string(kMaxSide) +
                     "], got " + std::to_string(height) + "x" + std::to_string(width));
  }
  std::int64_t rh = height;
  std::int64_t rw = width;
  if (params.do_resize) {
    if (params.shortest_edge <= 0) {
      throw ValueError("shortest_edge must be positive, got " +
                       std::to_string(params.shortest_edge));
    }
    std::tie(rh, rw) = shortest_edge_resize_size(height, width, params.shortest_edge);
  }
  if (rh > kMaxSide || rw > kMaxSide) {
    throw ValueError(name + ": resizing " + std::to_string(height) + "x" + std::to_string(width) +
                     " to shortest edge " + std::to_string(params.shortest_edge) + " gives " +
                     std::to_string(rh) + "x" + std::to_string(rw) +
                     ", too large (the aspect ratio is too extreme)");
  }
  if (!params.do_center_crop && (rh != crop_h || rw != crop_w)) {
    throw ValueError(
        name + ": without center crop the " + std::string(params.do_resize ? "resized " : "") +
        "image must be " + std::to_string(crop_h) + "x" + std::to_string(crop_w) +
        " (out's last dimensions), got " + std::to_string(rh) + "x" + std::to_string(rw));
  }
}

void preprocess_images(const std::vector<TensorView>& images, const TensorView& out,
                       const ImagePreprocessParams& params, StreamHandle stream) {
  const detail::PreprocessPlan plan = detail::plan_preprocess(images, out, params);
  if (out.device().is_cpu()) {
    detail::preprocess_images_cpu(plan, out);
    return;
  }
  backend_for(out.device());
#ifdef APHRODITE_WITH_CUDA
  detail::preprocess_images_cuda(plan, out, stream);
#else
  (void)stream;
#endif
}

}  // namespace aphrodite
