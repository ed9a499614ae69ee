// preprocess_images in C++: the AVX2 row kernels equal the scalar ones, and the public op's
// shapes, padding and argument checks.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <random>
#include <vector>

#include "aphrodite/buffer.h"
#include "aphrodite/error.h"
#include "aphrodite/image.h"
#include "internal/image_preprocess.h"

namespace {

using aphrodite::DType;
using aphrodite::OwnedTensor;
using aphrodite::TensorView;

#if defined(__x86_64__) || defined(_M_X64)
TEST(ImagePreprocess, Avx2RowKernelsEqualScalar) {
  if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma")) {
    GTEST_SKIP() << "CPU without AVX2/FMA";
  }
  std::mt19937 rng(1234);
  // {4, 12} and {10, 30}: 3x upscales, where a coefficient is exactly 1.0 (2^22, the largest).
  const int sizes[][2] = {{1, 1},    {7, 3}, {100, 336}, {1920, 597},
                          {50, 400}, {5, 2}, {4, 12},    {10, 30}};
  for (const auto& size : sizes) {
    const int in = size[0];
    const int outn = size[1];
    const int ksize = aphrodite::detail::bicubic_ksize(in, outn);
    std::vector<std::int32_t> bounds(2 * outn), coeffs(static_cast<std::size_t>(outn) * ksize);
    aphrodite::detail::bicubic_coeffs(in, outn, 0, outn, ksize, bounds.data(), coeffs.data());
    std::vector<std::int16_t> packed(
        static_cast<std::size_t>(outn * aphrodite::detail::packed_stride(ksize)));
    aphrodite::detail::pack_horizontal_coeffs(outn, ksize, coeffs.data(), packed.data());
    // The same pixels packed (3 bytes each) and 4 bytes apart with a junk byte that must not
    // matter; the 4-byte row ends after its last pixel's third byte, as a view can.
    std::vector<std::uint8_t> row(static_cast<std::size_t>(in) * 3);
    std::vector<std::uint8_t> row4(static_cast<std::size_t>(in) * 4 - 1);
    // Random bytes, then only 0 and 255 (the largest sums, over- and undershoots to clamp).
    for (int extremes = 0; extremes < 2; ++extremes) {
      for (auto& v : row) v = static_cast<std::uint8_t>(extremes ? (rng() & 1) * 255 : rng() & 255);
      for (std::size_t j = 0; j < row4.size(); ++j) {
        row4[j] = j % 4 == 3 ? static_cast<std::uint8_t>(rng() & 255) : row[j / 4 * 3 + j % 4];
      }
      std::vector<std::uint8_t> a(static_cast<std::size_t>(outn) * 3), b(a.size()), c(a.size()),
          d(a.size());
      aphrodite::detail::resample_row_horizontal_scalar(row.data(), 3, a.data(), outn, ksize,
                                                        bounds.data(), coeffs.data());
      aphrodite::detail::resample_row_horizontal_avx2(row.data(), 3, row.data() + row.size(),
                                                      b.data(), outn, ksize, bounds.data(),
                                                      coeffs.data(), packed.data());
      aphrodite::detail::resample_row_horizontal_scalar(row4.data(), 4, c.data(), outn, ksize,
                                                        bounds.data(), coeffs.data());
      aphrodite::detail::resample_row_horizontal_avx2(row4.data(), 4, row4.data() + row4.size(),
                                                      d.data(), outn, ksize, bounds.data(),
                                                      coeffs.data(), packed.data());
      EXPECT_EQ(a, b) << in << " -> " << outn;
      EXPECT_EQ(a, c) << in << " -> " << outn << " (4-byte pixels, scalar)";
      EXPECT_EQ(a, d) << in << " -> " << outn << " (4-byte pixels)";
    }

    const int width = 77;  // bytes per row: exercises the 32-byte blocks and the tail
    std::vector<std::uint8_t> rows(static_cast<std::size_t>(in) * width);
    for (auto& v : rows) v = static_cast<std::uint8_t>(rng() & 255);
    for (int i = 0; i < outn; ++i) {
      std::vector<std::uint8_t> va(width), vb(width);
      const std::int32_t* k = coeffs.data() + static_cast<std::int64_t>(i) * ksize;
      aphrodite::detail::resample_row_vertical_scalar(rows.data(), width, bounds[2 * i],
                                                      bounds[2 * i + 1], k, va.data(), width);
      aphrodite::detail::resample_row_vertical_avx2(rows.data(), width, bounds[2 * i],
                                                    bounds[2 * i + 1], k, vb.data(), width);
      ASSERT_EQ(va, vb) << in << " -> " << outn << " row " << i;
    }
  }
}
#endif

TEST(ImagePreprocess, ShortestEdgeSizeTruncatesLikeHf) {
  EXPECT_EQ(aphrodite::shortest_edge_resize_size(480, 640, 336), std::make_pair(336L, 448L));
  EXPECT_EQ(aphrodite::shortest_edge_resize_size(1080, 1920, 336), std::make_pair(336L, 597L));
  EXPECT_EQ(aphrodite::shortest_edge_resize_size(7, 3, 336), std::make_pair(784L, 336L));
  EXPECT_EQ(aphrodite::shortest_edge_resize_size(5, 5, 2), std::make_pair(2L, 2L));
}

TEST(ImagePreprocess, UniformImageStaysUniformAndPads) {
  // A constant image resamples to the same constant (the coefficients sum to one); a 4x2 image
  // resized to shortest edge 2 stays 4x2 and is padded to 4x4 with HF's zero pixels.
  std::vector<std::uint8_t> pixels(4 * 2 * 3, 200);
  TensorView img(pixels.data(), DType::kUInt8, aphrodite::Device::cpu(), {4, 2, 3});
  OwnedTensor out = OwnedTensor::empty({1, 3, 4, 4}, DType::kFloat32);
  aphrodite::ImagePreprocessParams params;
  params.shortest_edge = 2;
  params.mean[0] = params.mean[1] = params.mean[2] = 0.0f;
  params.std[0] = params.std[1] = params.std[2] = 1.0f;
  params.rescale_factor = 1.0;
  aphrodite::preprocess_images({img}, out.view, params);
  const float* o = out.view.data_as<float>();
  for (int c = 0; c < 3; ++c) {
    for (int y = 0; y < 4; ++y) {
      for (int x = 0; x < 4; ++x) {
        EXPECT_EQ(o[(c * 4 + y) * 4 + x], (x == 1 || x == 2) ? 200.0f : 0.0f);
      }
    }
  }
}

TEST(ImagePreprocess, FourBytePixelsAndStridedRowsEqualPackedRgb) {
  // The same images packed and as [H, W, 3] views of 4-byte pixels with padded rows, through
  // every path: downscaling both ways (a tall image goes vertical pass first), upscaling,
  // one axis only, no resize, single pixels and single rows/columns.
  std::mt19937 rng(99);
  const int sizes[][2] = {{48, 64}, {300, 20}, {5, 7}, {1, 1}, {1, 40}, {40, 1}, {24, 50}};
  for (const auto& size : sizes) {
    const int h = size[0];
    const int w = size[1];
    const std::int64_t row_stride = static_cast<std::int64_t>(w) * 4 + 8;
    std::vector<std::uint8_t> packed(static_cast<std::size_t>(h) * w * 3);
    std::vector<std::uint8_t> wide(static_cast<std::size_t>(h * row_stride));
    for (auto& v : wide) v = static_cast<std::uint8_t>(rng() & 255);
    for (int y = 0; y < h; ++y) {
      for (int x = 0; x < w; ++x) {
        for (int c = 0; c < 3; ++c) {
          packed[(static_cast<std::size_t>(y) * w + x) * 3 + c] = wide[y * row_stride + x * 4 + c];
        }
      }
    }
    const std::int64_t packed_shape[] = {h, w, 3};
    const std::int64_t wide_strides[] = {row_stride, 4, 1};
    TensorView a(packed.data(), DType::kUInt8, aphrodite::Device::cpu(), {h, w, 3});
    TensorView b(wide.data(), DType::kUInt8, aphrodite::Device::cpu(), 3, packed_shape,
                 wide_strides);
    std::vector<std::uint8_t> repacked(packed.size());
    aphrodite::detail::pack_rgb(aphrodite::detail::image_source(b, "b"), h, w, repacked.data());
    EXPECT_EQ(repacked, packed);
    for (const int edge : {16, 24, 7, 100}) {
      for (const int crop : {16, 40}) {
        aphrodite::ImagePreprocessParams params;
        params.shortest_edge = edge;
        OwnedTensor want = OwnedTensor::empty({2, 3, crop, crop}, DType::kFloat32);
        OwnedTensor got = OwnedTensor::empty({2, 3, crop, crop}, DType::kFloat32);
        // Two images: the pool splits whole images; one: it splits each image's rows.
        aphrodite::preprocess_images({a, a}, want.view, params);
        aphrodite::preprocess_images({b, a}, got.view, params);
        const auto count = static_cast<std::size_t>(want.view.numel());
        const float* x = want.view.data_as<float>();
        const float* y = got.view.data_as<float>();
        EXPECT_TRUE(std::equal(x, x + count, y)) << h << "x" << w << " edge " << edge;
        OwnedTensor one = OwnedTensor::empty({1, 3, crop, crop}, DType::kFloat32);
        aphrodite::preprocess_images({b}, one.view, params);
        const float* z = one.view.data_as<float>();
        EXPECT_TRUE(std::equal(x, x + count / 2, z)) << h << "x" << w << " edge " << edge;
      }
    }
  }
}

TEST(ImagePreprocess, RejectsBadArguments) {
  std::vector<std::uint8_t> pixels(6 * 6 * 3, 0);
  TensorView img(pixels.data(), DType::kUInt8, aphrodite::Device::cpu(), {6, 6, 3});
  TensorView bad_channels(pixels.data(), DType::kUInt8, aphrodite::Device::cpu(), {6, 9, 2});
  OwnedTensor out = OwnedTensor::empty({1, 3, 4, 4}, DType::kFloat32);
  OwnedTensor out_int = OwnedTensor::empty({1, 3, 4, 4}, DType::kInt32);
  aphrodite::ImagePreprocessParams params;
  params.shortest_edge = 4;
  EXPECT_THROW(aphrodite::preprocess_images({bad_channels}, out.view, params),
               aphrodite::ValueError);
  // Pixels 5 bytes apart, channels 2 apart, rows overlapping: not an RGB layout the op reads.
  const std::int64_t shape[] = {2, 2, 3};
  for (const auto& strides : {std::vector<std::int64_t>{20, 5, 1}, {12, 6, 2}, {6, 4, 1}}) {
    TensorView strided(pixels.data(), DType::kUInt8, aphrodite::Device::cpu(), 3, shape,
                       strides.data());
    EXPECT_THROW(aphrodite::preprocess_images({strided}, out.view, params), aphrodite::ValueError);
  }
  EXPECT_THROW(aphrodite::preprocess_images({img, img}, out.view, params), aphrodite::ValueError);
  // An image in out's own memory (it would be overwritten while it is read).
  TensorView in_out(out.view.data(), DType::kUInt8, aphrodite::Device::cpu(), {6, 6, 3});
  EXPECT_THROW(aphrodite::preprocess_images({in_out}, out.view, params), aphrodite::ValueError);
  EXPECT_THROW(aphrodite::preprocess_images({img}, out_int.view, params), aphrodite::TypeError);
  params.shortest_edge = 0;
  EXPECT_THROW(aphrodite::preprocess_images({img}, out.view, params), aphrodite::ValueError);
  params.shortest_edge = 5;
  params.do_center_crop = false;
  EXPECT_THROW(aphrodite::preprocess_images({img}, out.view, params), aphrodite::ValueError);
}

}  // namespace
