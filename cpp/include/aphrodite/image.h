// Image preprocessing for vision towers: the CLIP/LLaVA pipeline of HF's CLIPImageProcessorPil.
//
// Each RGB uint8 image (its own size) is resized so that its shortest edge becomes
// `shortest_edge` with PIL's bicubic resampling (the same fixed-point coefficients, pass order and
// uint8 rounding, so the resized pixels equal PIL's exactly; params.pass_order names the Pillow
// release), center-cropped to the output size
// (zero-padded the way HF pads an image smaller than the crop), rescaled and normalised:
//   out[n, c, y, x] = (float(pixel * rescale_factor) - mean[c]) / std[c]   (float32 arithmetic)
// then rounded to the output dtype. Only the pixels that survive the crop are computed.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "aphrodite/tensor.h"

namespace aphrodite {

// Which separable pass PIL's bicubic resize (ImagingResampleInner) runs first when both axes
// change size. The intermediate image is rounded to uint8, so the order shows in the result, and
// Pillow changed its rule between releases (found by comparing Image.resize with each pass order
// done on its own; Pillow 10.4, 11.0, 11.3, 12.0, 12.1, 12.2, 12.3 and 13.0 checked):
enum class PilPassOrder : std::int32_t {
  // Pillow 10.x to 12.1: always the horizontal pass first.
  kHorizontalFirst = 0,
  // Pillow 12.2 and 12.3: vertical first when the height shrinks and in_h > 100 * in_w.
  kVerticalFirstWhenTall = 1,
  // Pillow 13: vertical first when the height shrinks and (in_h - out_h) > 2 * (in_w - out_w).
  kVerticalFirstWhenHeightShrinksMore = 2,
};

struct ImagePreprocessParams {
  // Target length of the shorter edge (HF size={"shortest_edge": ...}).
  std::int64_t shortest_edge = 224;
  double rescale_factor = 1.0 / 255.0;
  float mean[3] = {0.48145466f, 0.4578275f, 0.40821073f};  // OpenAI CLIP
  float std[3] = {0.26862954f, 0.26130258f, 0.27577711f};
  bool do_resize = true;
  // Without the crop every (resized) image must already have the output's height and width.
  bool do_center_crop = true;
  // The Pillow release whose resize the output reproduces (the current one by default).
  PilPassOrder pass_order = PilPassOrder::kVerticalFirstWhenHeightShrinksMore;
};

// Whether PIL resizes (in_h, in_w) to (out_h, out_w) vertical pass first under `order`.
bool pil_vertical_pass_first(std::int64_t in_h, std::int64_t in_w, std::int64_t out_h,
                             std::int64_t out_w, PilPassOrder order);

// HF's get_resize_output_image_size(default_to_square=False): the (height, width) whose shorter
// side is `shortest_edge`, the longer one int(shortest_edge * long / short) (truncated).
std::pair<std::int64_t, std::int64_t> shortest_edge_resize_size(std::int64_t height,
                                                                std::int64_t width,
                                                                std::int64_t shortest_edge);

// Throws ValueError (naming the image `name`) unless an image of height x width can be
// preprocessed with `params` into a crop of crop_h x crop_w: both sides in [1, 2^29), the resized
// image too (a 1 x 20,000,000 strip resized to shortest edge 336 is not), and, without the center
// crop, the (resized) image exactly crop-sized. preprocess_images checks each image this way; a
// server checks an image when a request brings it, before it reaches a batch.
void check_image_size(std::int64_t height, std::int64_t width, const ImagePreprocessParams& params,
                      std::int64_t crop_h, std::int64_t crop_w, const std::string& name = "image");

// Preprocesses `images` into `out` (float32/float16/bfloat16 [N, 3, crop_h, crop_w], contiguous,
// on the CPU or a CUDA device; the crop size is out's last two dimensions). Each image is a uint8
// [H, W, 3] view on the CPU with adjacent channels, its pixels 3 bytes apart or 4 (RGB and an
// ignored byte: how Pillow keeps RGB images, read in place) and its rows top to bottom, at least
// a row of pixels apart. `out` must not overlap an image (ValueError). On CUDA the images are
// uploaded once and the kernels run on `stream` without synchronising; the result equals the CPU
// op's bit for bit.
void preprocess_images(const std::vector<TensorView>& images, const TensorView& out,
                       const ImagePreprocessParams& params, StreamHandle stream = 0);

}  // namespace aphrodite
