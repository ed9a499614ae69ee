// Image preprocessing for vision towers: the CLIP/LLaVA pipeline of HF's CLIPImageProcessorPil.
//
// Each RGB uint8 image (its own size) is resized so that its shortest edge becomes
// `shortest_edge` with PIL's bicubic resampling (the same fixed-point coefficients, pass order and
// uint8 rounding, so the resized pixels equal PIL's exactly), center-cropped to the output size
// (zero-padded the way HF pads an image smaller than the crop), rescaled and normalised:
//   out[n, c, y, x] = (float(pixel * rescale_factor) - mean[c]) / std[c]   (float32 arithmetic)
// then rounded to the output dtype. Only the pixels that survive the crop are computed.
#pragma once

#include <cstdint>
#include <utility>
#include <vector>

#include "aphrodite/tensor.h"

namespace aphrodite {

struct ImagePreprocessParams {
  // Target length of the shorter edge (HF size={"shortest_edge": ...}).
  std::int64_t shortest_edge = 224;
  double rescale_factor = 1.0 / 255.0;
  float mean[3] = {0.48145466f, 0.4578275f, 0.40821073f};  // OpenAI CLIP
  float std[3] = {0.26862954f, 0.26130258f, 0.27577711f};
  bool do_resize = true;
  // Without the crop every (resized) image must already have the output's height and width.
  bool do_center_crop = true;
};

// HF's get_resize_output_image_size(default_to_square=False): the (height, width) whose shorter
// side is `shortest_edge`, the longer one int(shortest_edge * long / short) (truncated).
std::pair<std::int64_t, std::int64_t> shortest_edge_resize_size(std::int64_t height,
                                                                std::int64_t width,
                                                                std::int64_t shortest_edge);

// Preprocesses `images` (each uint8 [H, W, 3], contiguous, on the CPU) into `out`
// (float32/float16/bfloat16 [N, 3, crop_h, crop_w], contiguous, on the CPU or a CUDA device; the
// crop size is out's last two dimensions). On CUDA the images are uploaded once and the kernels
// run on `stream` without synchronising; the result equals the CPU op's bit for bit.
void preprocess_images(const std::vector<TensorView>& images, const TensorView& out,
                       const ImagePreprocessParams& params, StreamHandle stream = 0);

}  // namespace aphrodite
