// CPU execution of a preprocessing plan: PIL's two 8-bit resampling passes restricted to the
// crop window, then the normalisation table into the planar output. Parallel over images when
// there are enough of them, else over the rows of each image.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "aphrodite/parallel.h"
#include "internal/cpu_features.h"
#include "internal/image_preprocess.h"
#include "linear/gemm_cpu.h"

namespace aphrodite::detail {

namespace {

// PIL's clip8: drop the fraction bits and clamp to [0, 255].
inline std::uint8_t clip8(std::int32_t v) {
  v >>= kResamplePrecisionBits;
  return static_cast<std::uint8_t>(v < 0 ? 0 : (v > 255 ? 255 : v));
}

constexpr std::int32_t kRoundingBias = 1 << (kResamplePrecisionBits - 1);

// The AVX2 passes unless the CPU lacks them or the CPU kernel set (APHRODITE_CPU_ISA, shared
// with linear()) is forced to the portable code.
bool use_avx2() { return cpu_features().avx2_fma && active_cpu_isa() != CpuIsa::kScalar; }

struct ImageContext {
  const PreprocessPlan& plan;
  const ImagePlan& ip;
  ImageSource source;
  std::uint8_t* mid;  // first pass output (when there is one)
  void* out;          // this image's [3, crop_h, crop_w] block
  bool avx2;
  const std::int16_t* x_packed;  // the x coefficients for the AVX2 pass (pack_horizontal_coeffs)

  const std::int32_t* x_bounds() const { return plan.tables.data() + ip.x_table; }
  const std::int32_t* x_coeffs() const { return x_bounds() + 2 * (ip.x1 - ip.x0); }
  const std::int32_t* y_bounds() const { return plan.tables.data() + ip.y_table; }
  const std::int32_t* y_coeffs() const { return y_bounds() + 2 * (ip.y1 - ip.y0); }
  const std::uint8_t* src() const { return source.pixels; }
  int src_bpp() const { return source.pixel_stride; }
  std::int64_t src_stride() const { return source.row_stride; }
  // One past the source's last byte in use (the ignored byte of its last pixel excluded).
  const std::uint8_t* src_end() const {
    return src() + (ip.height - 1) * src_stride() +
           static_cast<std::int64_t>(ip.width - 1) * src_bpp() + 3;
  }

  // Rows of the first pass: source rows [row0, row1) (horizontal first) or output rows
  // [y0, y1) (vertical first); zero when there is no first pass.
  std::int64_t first_pass_rows() const {
    if (ip.vertical_first) return ip.y1 - ip.y0;
    return ip.resample_x ? ip.row1 - ip.row0 : 0;
  }
  // Bytes per pixel of "mid": the vertical pass keeps the source's layout, the horizontal one
  // writes packed RGB, and without a first pass "mid" is the source itself.
  int mid_bpp() const { return ip.vertical_first || !ip.resample_x ? src_bpp() : 3; }
  std::int64_t mid_stride() const {
    if (ip.vertical_first) return static_cast<std::int64_t>(ip.col1 - ip.col0) * src_bpp();
    return ip.resample_x ? static_cast<std::int64_t>(ip.x1 - ip.x0) * 3 : src_stride();
  }
  std::int64_t mid_bytes() const { return first_pass_rows() * mid_stride(); }

  // The bytes of `pixels` pixels `bpp` apart that the vertical pass resamples: the last pixel's
  // ignored byte is left out (it may lie past the source's end).
  static int row_bytes(int pixels, int bpp) { return (pixels - 1) * bpp + 3; }

  void horizontal_row(const std::uint8_t* row, int bpp, const std::uint8_t* row_buffer_end,
                      std::uint8_t* dst) const {
    const int count = ip.x1 - ip.x0;
#if defined(__x86_64__) || defined(_M_X64)
    if (avx2) {
      resample_row_horizontal_avx2(row, bpp, row_buffer_end, dst, count, ip.ksize_x, x_bounds(),
                                   x_coeffs(), x_packed);
      return;
    }
#endif
    (void)row_buffer_end;
    resample_row_horizontal_scalar(row, bpp, dst, count, ip.ksize_x, x_bounds(), x_coeffs());
  }

  // Output row `i` (relative to y0) of the vertical pass over `rows` (whose row 0 is source
  // row `origin`), `bytes` bytes wide.
  void vertical_row(const std::uint8_t* rows, std::int64_t stride, int origin, std::int64_t i,
                    std::uint8_t* dst, int bytes) const {
    const int ymin = y_bounds()[2 * i] - origin;
    const int taps = y_bounds()[2 * i + 1];
    const std::int32_t* k = y_coeffs() + i * ip.ksize_y;
#if defined(__x86_64__) || defined(_M_X64)
    if (avx2) {
      resample_row_vertical_avx2(rows, stride, ymin, taps, k, dst, bytes);
      return;
    }
#endif
    resample_row_vertical_scalar(rows, stride, ymin, taps, k, dst, bytes);
  }

  void first_pass(std::int64_t begin, std::int64_t end) const {
    const std::int64_t stride = mid_stride();
    for (std::int64_t r = begin; r < end; ++r) {
      if (ip.vertical_first) {
        vertical_row(src() + static_cast<std::int64_t>(ip.col0) * src_bpp(), src_stride(), 0, r,
                     mid + r * stride, row_bytes(ip.col1 - ip.col0, src_bpp()));
      } else {
        horizontal_row(src() + (ip.row0 + r) * src_stride(), src_bpp(), src_end(),
                       mid + r * stride);
      }
    }
  }

  // Second pass and normalisation for output rows [begin, end) of the crop.
  template <typename Bits>
  void second_pass(std::int64_t begin, std::int64_t end) const {
    const std::int64_t crop_h = plan.crop_h;
    const std::int64_t crop_w = plan.crop_w;
    const int count = ip.x1 - ip.x0;
    std::vector<std::uint8_t> pixels(static_cast<std::size_t>(count) * 4);
    const std::int64_t stride = mid_stride();
    Bits* planes = static_cast<Bits*>(out);
    Bits pad[3];
    for (int c = 0; c < 3; ++c) pad[c] = static_cast<Bits>(plan.lut[c][0]);
    for (std::int64_t y = begin; y < end; ++y) {
      Bits* rows[3];
      for (int c = 0; c < 3; ++c) rows[c] = planes + (c * crop_h + y) * crop_w;
      if (y < ip.y0 || y >= ip.y1) {
        for (int c = 0; c < 3; ++c) std::fill(rows[c], rows[c] + crop_w, pad[c]);
        continue;
      }
      const std::int64_t i = y - ip.y0;
      const std::uint8_t* line = pixels.data();
      int line_bpp = 3;
      if (ip.vertical_first) {
        horizontal_row(mid + i * stride, mid_bpp(), mid + mid_bytes(), pixels.data());
      } else {
        // "mid" rows are source rows from row0 on: the first pass's output, or the source
        // itself at the crop's first column.
        const std::uint8_t* mid0 = ip.resample_x
                                       ? mid
                                       : src() + ip.row0 * src_stride() +
                                             static_cast<std::int64_t>(ip.x0 + ip.left) * src_bpp();
        line_bpp = mid_bpp();
        if (ip.resample_y) {
          vertical_row(mid0, stride, ip.row0, i, pixels.data(), row_bytes(count, line_bpp));
        } else {
          line = mid0 + (y + ip.top - ip.row0) * stride;
        }
      }
      for (int c = 0; c < 3; ++c) {
        Bits* o = rows[c];
        std::fill(o, o + ip.x0, pad[c]);
        const std::uint32_t* lut = plan.lut[c];
        const std::uint8_t* channel = line + c;
        for (int x = 0; x < count; ++x) {
          o[ip.x0 + x] = static_cast<Bits>(lut[channel[static_cast<std::ptrdiff_t>(x) * line_bpp]]);
        }
        std::fill(o + ip.x1, o + crop_w, pad[c]);
      }
    }
  }

  void second_pass_rows(std::int64_t begin, std::int64_t end, std::size_t elem_size) const {
    if (elem_size == 4) {
      second_pass<std::uint32_t>(begin, end);
    } else {
      second_pass<std::uint16_t>(begin, end);
    }
  }
};

// Rows per parallel task: enough work to amortise the dispatch.
std::int64_t row_grain(std::int64_t row_work) {
  constexpr std::int64_t kTargetWork = 1 << 16;
  return std::max<std::int64_t>(1, kTargetWork / std::max<std::int64_t>(1, row_work));
}

}  // namespace

void pack_horizontal_coeffs(int count, int ksize, const std::int32_t* coeffs,
                            std::int16_t* packed) {
  const int groups = packed_tap_groups(ksize);
  constexpr std::int32_t kLowMask = (1 << kCoeffLowBits) - 1;
  for (int i = 0; i < count; ++i) {
    const std::int32_t* k = coeffs + static_cast<std::int64_t>(i) * ksize;
    std::int16_t* hi = packed + i * packed_stride(ksize);
    std::int16_t* lo = hi + 16 * groups;
    for (int j = 0; j < 16 * groups; ++j) {
      // Lane j: 8 int16 per pair of taps [a b a b a b 0 0].
      const int pair = j / 8;
      const int slot = j % 8;
      const int x = 2 * pair + (slot & 1);
      const std::int32_t v = slot < 6 && x < ksize ? k[x] : 0;
      hi[j] = static_cast<std::int16_t>(v >> kCoeffLowBits);
      lo[j] = static_cast<std::int16_t>(v & kLowMask);
    }
  }
}

void resample_row_horizontal_scalar(const std::uint8_t* src, int pixel_stride, std::uint8_t* dst,
                                    int count, int ksize, const std::int32_t* bounds,
                                    const std::int32_t* coeffs) {
  for (int i = 0; i < count; ++i) {
    const int xmin = bounds[2 * i];
    const int taps = bounds[2 * i + 1];
    const std::int32_t* k = coeffs + static_cast<std::int64_t>(i) * ksize;
    const std::uint8_t* p = src + static_cast<std::int64_t>(xmin) * pixel_stride;
    std::int32_t s0 = kRoundingBias, s1 = kRoundingBias, s2 = kRoundingBias;
    for (int x = 0; x < taps; ++x, p += pixel_stride) {
      s0 += p[0] * k[x];
      s1 += p[1] * k[x];
      s2 += p[2] * k[x];
    }
    dst[3 * i + 0] = clip8(s0);
    dst[3 * i + 1] = clip8(s1);
    dst[3 * i + 2] = clip8(s2);
  }
}

void resample_row_vertical_scalar(const std::uint8_t* mid, std::int64_t mid_stride, int ymin,
                                  int taps, const std::int32_t* coeffs, std::uint8_t* dst,
                                  int bytes) {
  constexpr int kChunk = 256;
  std::int32_t acc[kChunk];
  for (int j0 = 0; j0 < bytes; j0 += kChunk) {
    const int n = std::min(kChunk, bytes - j0);
    std::fill(acc, acc + n, kRoundingBias);
    for (int t = 0; t < taps; ++t) {
      const std::uint8_t* row = mid + (ymin + t) * mid_stride + j0;
      const std::int32_t k = coeffs[t];
      for (int j = 0; j < n; ++j) acc[j] += row[j] * k;
    }
    for (int j = 0; j < n; ++j) dst[j0 + j] = clip8(acc[j]);
  }
}

void preprocess_images_cpu(const PreprocessPlan& plan, const TensorView& out) {
  const std::size_t elem = dtype_size(out.dtype());
  const std::int64_t image_elems = 3 * plan.crop_h * plan.crop_w;
  auto* out_bytes = static_cast<std::uint8_t*>(out.data());
  const bool avx2 = use_avx2();
  const auto n = static_cast<std::int64_t>(plan.images.size());
  // The AVX2 form of image i's x coefficients, into `packed` (none without AVX2 or x resize).
  auto pack_x = [&](std::int64_t i, std::vector<std::int16_t>& packed) -> const std::int16_t* {
    const ImagePlan& ip = plan.images[static_cast<std::size_t>(i)];
    if (!avx2 || !ip.resample_x) return nullptr;
    const int count = ip.x1 - ip.x0;
    packed.resize(static_cast<std::size_t>(count * packed_stride(ip.ksize_x)));
    pack_horizontal_coeffs(count, ip.ksize_x, plan.tables.data() + ip.x_table + 2 * count,
                           packed.data());
    return packed.data();
  };
  auto context = [&](std::int64_t i, std::uint8_t* mid, const std::int16_t* x_packed) {
    return ImageContext{plan,
                        plan.images[static_cast<std::size_t>(i)],
                        plan.sources[static_cast<std::size_t>(i)],
                        mid,
                        out_bytes + i * image_elems * static_cast<std::int64_t>(elem),
                        avx2,
                        x_packed};
  };
  if (n >= num_threads()) {
    // Whole images per thread: no synchronisation between the two passes.
    parallel_for(0, n, 1, [&](std::int64_t begin, std::int64_t end) {
      std::vector<std::uint8_t> mid;
      std::vector<std::int16_t> packed;
      for (std::int64_t i = begin; i < end; ++i) {
        ImageContext ctx = context(i, nullptr, pack_x(i, packed));
        mid.resize(static_cast<std::size_t>(ctx.mid_bytes()));
        ctx.mid = mid.data();
        ctx.first_pass(0, ctx.first_pass_rows());
        ctx.second_pass_rows(0, plan.crop_h, elem);
      }
    });
    return;
  }
  // Few images: split each image's rows across the pool, one pass after the other.
  std::vector<std::uint8_t> mid;
  std::vector<std::int16_t> packed;
  for (std::int64_t i = 0; i < n; ++i) {
    const ImagePlan& ip = plan.images[static_cast<std::size_t>(i)];
    ImageContext ctx = context(i, nullptr, pack_x(i, packed));
    mid.resize(std::max(mid.size(), static_cast<std::size_t>(ctx.mid_bytes())));
    ctx.mid = mid.data();
    const std::int64_t first_work =
        ip.vertical_first
            ? static_cast<std::int64_t>(ip.col1 - ip.col0) * ctx.src_bpp() * ip.ksize_y
            : static_cast<std::int64_t>(ip.x1 - ip.x0) * 3 * ip.ksize_x;
    parallel_for(0, ctx.first_pass_rows(), row_grain(first_work),
                 [&](std::int64_t b, std::int64_t e) { ctx.first_pass(b, e); });
    const std::int64_t second_work =
        plan.crop_w * 3 * std::max(1, ip.vertical_first ? ip.ksize_x : ip.ksize_y);
    parallel_for(0, plan.crop_h, row_grain(second_work),
                 [&](std::int64_t b, std::int64_t e) { ctx.second_pass_rows(b, e, elem); });
  }
}

}  // namespace aphrodite::detail
