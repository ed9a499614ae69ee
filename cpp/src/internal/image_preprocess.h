// Internal plan of preprocess_images, shared by the CPU kernels and the CUDA kernels.
//
// The host plans every image in plain integers (PIL's fixed-point bicubic coefficients included)
// and both backends execute the same plan with integer arithmetic only, so their resized pixels
// are identical. PIL (ImagingResampleInner) resamples in two separable passes with a uint8 image
// between them, in the order of the Pillow release's rule (pil_vertical_pass_first). Per image:
//   1. first pass into the uint8 "mid" image, restricted to what the crop window needs:
//      horizontal first: source rows [row0, row1) resampled to the output columns [x0, x1);
//      vertical first: output rows [y0, y1) resampled from source columns [col0, col1)
//      (the x bounds are then relative to col0). Without horizontal resampling (and horizontal
//      first) "mid" is the source itself, offset to the crop's columns;
//   2. second pass per output row in [y0, y1) (a copy when that axis keeps its size);
//   3. each uint8 value goes through a per-channel table giving the normalised value in the
//      output dtype; output pixels outside [y0, y1) x [x0, x1) are HF's zero padding.
#pragma once

#include <cstdint>
#include <vector>

#include "aphrodite/image.h"
#include "aphrodite/tensor.h"

namespace aphrodite::detail {

// PIL's fixed-point precision for 8-bit resampling: 32 - 8 - 2.
constexpr int kResamplePrecisionBits = 22;

struct ImagePlan {
  std::int64_t src_offset;  // byte offset of the image in the packed sources (CUDA)
  std::int64_t mid_offset;  // byte offset of the horizontal stage's output in the scratch buffer
  std::int64_t x_table;     // int32 offset of the x bounds (2 per column) then the x coefficients
  std::int64_t y_table;     // same for y (2 per row, then the coefficients)
  std::int32_t height, width;
  std::int32_t top, left;   // resized coordinates of output pixel (0, 0); may be negative
  std::int32_t y0, y1;      // output rows that fall inside the resized image
  std::int32_t x0, x1;      // output columns that fall inside the resized image
  std::int32_t row0, row1;  // source rows the vertical pass reads
  std::int32_t col0, col1;  // source columns the horizontal pass reads
  std::int32_t ksize_x, ksize_y;
  std::int32_t resample_x, resample_y;  // 0 when that axis keeps its size (PIL skips the pass)
  std::int32_t vertical_first;
};

// One source image's pixels: rows `row_stride` bytes apart, pixels `pixel_stride` bytes apart
// (3: packed RGB; 4: RGB plus one ignored byte, the layout Pillow keeps RGB images in), the three
// channels adjacent. Its last byte in use is (height - 1) * row_stride + (width - 1) *
// pixel_stride + 2: no kernel reads past it.
struct ImageSource {
  const std::uint8_t* pixels = nullptr;
  std::int64_t row_stride = 0;
  std::int32_t pixel_stride = 3;
};

struct PreprocessPlan {
  std::vector<ImagePlan> images;
  std::vector<ImageSource> sources;  // image i's pixels (image_source)
  std::vector<std::int32_t> tables;  // bounds (xmin, count) and coefficients, PIL's layout
  // Sum of the first passes' outputs ("mid" images) from packed RGB sources (CUDA's scratch).
  std::int64_t scratch_bytes = 0;
  std::int64_t crop_h = 0, crop_w = 0;
  // Normalised value of every (channel, uint8) pair, as the output dtype's bits (float16 and
  // bfloat16 in the low 16 bits).
  std::uint32_t lut[3][256] = {};
};

// The source of a uint8 [H, W, 3] CPU view; throws ValueError (naming it `name`) unless its
// channels are adjacent, its pixels 3 or 4 bytes apart and its rows at least a row of pixels
// apart (a size-1 dimension may have any stride).
ImageSource image_source(const TensorView& image, const char* name);

// Copies a height x width source into `dst` as packed RGB rows (height * width * 3 bytes).
void pack_rgb(const ImageSource& source, std::int64_t height, std::int64_t width,
              std::uint8_t* dst);

// Validates the arguments and plans every image (host work, no pixel is read).
PreprocessPlan plan_preprocess(const std::vector<TensorView>& images, const TensorView& out,
                               const ImagePreprocessParams& params);

// PIL's precompute_coeffs + normalize_coeffs_8bpc for BICUBIC (a = -0.5) resizing `in_size` to
// `out_size`, restricted to the outputs [first, first + count): writes (xmin, n) pairs to
// `bounds` and ksize coefficients per output to `coeffs`. ksize from bicubic_ksize.
int bicubic_ksize(int in_size, int out_size);
void bicubic_coeffs(int in_size, int out_size, int first, int count, int ksize,
                    std::int32_t* bounds, std::int32_t* coeffs);

// The CPU execution of a plan.
void preprocess_images_cpu(const PreprocessPlan& plan, const TensorView& out);

// Horizontal and vertical stages for one row, scalar and AVX2 (identical results).
// Horizontal: `src` is one source row (`pixel_stride` = 3 or 4 bytes per pixel), writes `count`
// packed RGB pixels to `dst`.
void resample_row_horizontal_scalar(const std::uint8_t* src, int pixel_stride, std::uint8_t* dst,
                                    int count, int ksize, const std::int32_t* bounds,
                                    const std::int32_t* coeffs);
// Vertical: reads taps rows `mid + (ymin + t) * mid_stride`, writes `bytes` bytes to `dst`.
void resample_row_vertical_scalar(const std::uint8_t* mid, std::int64_t mid_stride, int ymin,
                                  int taps, const std::int32_t* coeffs, std::uint8_t* dst,
                                  int bytes);
// The AVX2 horizontal pass multiplies 16-bit halves of the coefficients (madd): k = hi * 2^11 +
// lo with lo in [0, 2^11), |hi| <= 2^11. Per output pixel: the hi halves, then the lo halves,
// each as packed_tap_groups(ksize) groups of 4 taps of 16 int16
// [k0 k1 k0 k1 k0 k1 0 0 k2 k3 k2 k3 k2 k3 0 0] (taps past ksize are 0): packed_stride(ksize)
// int16 per pixel.
constexpr int kCoeffLowBits = 11;
inline int packed_tap_groups(int ksize) { return (ksize + 3) / 4; }
inline std::int64_t packed_stride(int ksize) { return 32 * packed_tap_groups(ksize); }
void pack_horizontal_coeffs(int count, int ksize, const std::int32_t* coeffs, std::int16_t* packed);
#if defined(__x86_64__) || defined(_M_X64)
// `src_end` bounds the source buffer: no load reads at or past it.
void resample_row_horizontal_avx2(const std::uint8_t* src, int pixel_stride,
                                  const std::uint8_t* src_end, std::uint8_t* dst, int count,
                                  int ksize, const std::int32_t* bounds, const std::int32_t* coeffs,
                                  const std::int16_t* packed);
void resample_row_vertical_avx2(const std::uint8_t* mid, std::int64_t mid_stride, int ymin,
                                int taps, const std::int32_t* coeffs, std::uint8_t* dst, int bytes);
#endif

#ifdef APHRODITE_WITH_CUDA
// Uploads the plan's sources once (packed as RGB) and runs the plan on `stream` into `out` (a
// CUDA tensor).
void preprocess_images_cuda(const PreprocessPlan& plan, const TensorView& out, StreamHandle stream);
#endif

}  // namespace aphrodite::detail
