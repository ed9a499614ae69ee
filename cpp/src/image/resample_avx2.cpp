// AVX2 versions of PIL's 8-bit resampling passes. The same exact integer sums as the scalar code
// (32-bit products and sums, which wrap identically in any order; the horizontal pass splits each
// coefficient into 16-bit halves for madd), so the results are identical.
#if defined(__x86_64__) || defined(_M_X64)

#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "internal/image_preprocess.h"

namespace aphrodite::detail {

namespace {

constexpr std::int32_t kBias = 1 << (kResamplePrecisionBits - 1);

inline std::uint8_t clip8_scalar(std::int32_t v) {
  v >>= kResamplePrecisionBits;
  return static_cast<std::uint8_t>(v < 0 ? 0 : (v > 255 ? 255 : v));
}

}  // namespace

namespace {

// Four taps per step: one 16-byte load (pixels x..x+3: 12 bytes used of packed RGB, all 16 of
// 4-byte pixels) broadcast to both 128-bit lanes, spread to int16 pairs
// [R_x R_x+1 G_x G_x+1 B_x B_x+1 0 0] (low lane) and the same for x+2, x+3 (high lane); madd with
// the coefficient pairs gives [R G B 0] per lane.
template <int kPixelStride>
void horizontal_avx2(const std::uint8_t* src, const std::uint8_t* src_end, std::uint8_t* dst,
                     int count, int ksize, const std::int32_t* bounds, const std::int32_t* coeffs,
                     const std::int16_t* packed) {
  constexpr char b = kPixelStride;  // byte offset of the next pixel
  const __m256i spread =
      _mm256_setr_epi8(0, -1, b, -1, 1, -1, b + 1, -1, 2, -1, b + 2, -1, -1, -1, -1, -1,  //
                       2 * b, -1, 3 * b, -1, 2 * b + 1, -1, 3 * b + 1, -1, 2 * b + 2, -1, 3 * b + 2,
                       -1, -1, -1, -1, -1);
  const __m128i bias = _mm_set1_epi32(kBias);
  const int groups = packed_tap_groups(ksize);
  const std::int64_t stride = packed_stride(ksize);
  const std::int64_t lo_offset = 16 * packed_tap_groups(ksize);
  constexpr std::int64_t kGroupBytes = 4 * kPixelStride;
  const std::int64_t last_load = kGroupBytes * (groups - 1) + 16;
  for (int i = 0; i < count; ++i) {
    const std::uint8_t* p = src + static_cast<std::int64_t>(bounds[2 * i]) * kPixelStride;
    if (src_end - p < last_load) {
      // The vector loads would read past the buffer: PIL's loop as it is.
      const int taps = bounds[2 * i + 1];
      const std::int32_t* k = coeffs + static_cast<std::int64_t>(i) * ksize;
      std::int32_t s0 = kBias, s1 = kBias, s2 = kBias;
      for (int x = 0; x < taps; ++x) {
        s0 += p[kPixelStride * x + 0] * k[x];
        s1 += p[kPixelStride * x + 1] * k[x];
        s2 += p[kPixelStride * x + 2] * k[x];
      }
      dst[3 * i + 0] = clip8_scalar(s0);
      dst[3 * i + 1] = clip8_scalar(s1);
      dst[3 * i + 2] = clip8_scalar(s2);
      continue;
    }
    const std::int16_t* kp = packed + i * stride;
    __m256i hi = _mm256_setzero_si256();
    __m256i lo = _mm256_setzero_si256();
    for (int g = 0; g < groups; ++g) {
      const __m256i px = _mm256_shuffle_epi8(
          _mm256_broadcastsi128_si256(
              _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + kGroupBytes * g))),
          spread);
      const auto* khi = reinterpret_cast<const __m256i*>(kp + 16 * g);
      const auto* klo = reinterpret_cast<const __m256i*>(kp + lo_offset + 16 * g);
      hi = _mm256_add_epi32(hi, _mm256_madd_epi16(px, _mm256_loadu_si256(khi)));
      lo = _mm256_add_epi32(lo, _mm256_madd_epi16(px, _mm256_loadu_si256(klo)));
    }
    // sum = 2^11 * sum(p * hi) + sum(p * lo) = sum(p * k), in the same wrapping int32 arithmetic.
    const __m256i acc = _mm256_add_epi32(_mm256_slli_epi32(hi, kCoeffLowBits), lo);
    __m128i sum = _mm_add_epi32(_mm256_castsi256_si128(acc), _mm256_extracti128_si256(acc, 1));
    sum = _mm_srai_epi32(_mm_add_epi32(sum, bias), kResamplePrecisionBits);
    // Saturating packs clamp to [0, 255] as clip8 does.
    const __m128i bytes = _mm_packus_epi16(_mm_packs_epi32(sum, sum), sum);
    const std::uint32_t rgb = static_cast<std::uint32_t>(_mm_cvtsi128_si32(bytes));
    if (i + 1 < count) {
      std::memcpy(dst + 3 * i, &rgb, 4);  // the 4th byte is overwritten by the next pixel
    } else {
      std::memcpy(dst + 3 * i, &rgb, 3);
    }
  }
}

}  // namespace

void resample_row_horizontal_avx2(const std::uint8_t* src, int pixel_stride,
                                  const std::uint8_t* src_end, std::uint8_t* dst, int count,
                                  int ksize, const std::int32_t* bounds, const std::int32_t* coeffs,
                                  const std::int16_t* packed) {
  if (pixel_stride == 4) {
    horizontal_avx2<4>(src, src_end, dst, count, ksize, bounds, coeffs, packed);
  } else {
    horizontal_avx2<3>(src, src_end, dst, count, ksize, bounds, coeffs, packed);
  }
}

void resample_row_vertical_avx2(const std::uint8_t* mid, std::int64_t mid_stride, int ymin,
                                int taps, const std::int32_t* coeffs, std::uint8_t* dst,
                                int bytes) {
  // Two rows per step: their bytes interleaved and widened to int16 pairs [a_j b_j], madd with
  // [k_t k_t+1] (16-bit halves of the coefficients, as in the horizontal pass). Accumulator q
  // holds bytes 4q..4q+3 of each 16-byte lane, so the saturating packs restore the byte order.
  constexpr std::int32_t kLowMask = (1 << kCoeffLowBits) - 1;
  const __m256i zero = _mm256_setzero_si256();
  const __m256i bias = _mm256_set1_epi32(kBias);
  const std::uint8_t* first = mid + static_cast<std::int64_t>(ymin) * mid_stride;
  int j = 0;
  for (; j + 32 <= bytes; j += 32) {
    __m256i hi[4] = {zero, zero, zero, zero};
    __m256i lo[4] = {zero, zero, zero, zero};
    for (int t = 0; t < taps; t += 2) {
      const bool pair = t + 1 < taps;
      const std::int32_t k0 = coeffs[t];
      const std::int32_t k1 = pair ? coeffs[t + 1] : 0;
      const __m256i khi = _mm256_set1_epi32(
          static_cast<std::int32_t>((static_cast<std::uint32_t>(k0 >> kCoeffLowBits) & 0xFFFFu) |
                                    (static_cast<std::uint32_t>(k1 >> kCoeffLowBits) << 16)));
      const __m256i klo = _mm256_set1_epi32(
          static_cast<std::int32_t>(static_cast<std::uint32_t>(k0 & kLowMask) |
                                    (static_cast<std::uint32_t>(k1 & kLowMask) << 16)));
      const std::uint8_t* row0 = first + t * mid_stride + j;
      const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row0));
      const __m256i b =
          pair ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row0 + mid_stride)) : zero;
      const __m256i ab_lo = _mm256_unpacklo_epi8(a, b);
      const __m256i ab_hi = _mm256_unpackhi_epi8(a, b);
      const __m256i w[4] = {_mm256_unpacklo_epi8(ab_lo, zero), _mm256_unpackhi_epi8(ab_lo, zero),
                            _mm256_unpacklo_epi8(ab_hi, zero), _mm256_unpackhi_epi8(ab_hi, zero)};
      for (int q = 0; q < 4; ++q) {
        hi[q] = _mm256_add_epi32(hi[q], _mm256_madd_epi16(w[q], khi));
        lo[q] = _mm256_add_epi32(lo[q], _mm256_madd_epi16(w[q], klo));
      }
    }
    __m256i acc[4];
    for (int q = 0; q < 4; ++q) {
      acc[q] =
          _mm256_add_epi32(_mm256_add_epi32(_mm256_slli_epi32(hi[q], kCoeffLowBits), lo[q]), bias);
      acc[q] = _mm256_srai_epi32(acc[q], kResamplePrecisionBits);
    }
    const __m256i packed =
        _mm256_packus_epi16(_mm256_packs_epi32(acc[0], acc[1]), _mm256_packs_epi32(acc[2], acc[3]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + j), packed);
  }
  for (; j < bytes; ++j) {
    std::int32_t s = kBias;
    for (int t = 0; t < taps; ++t) s += first[t * mid_stride + j] * coeffs[t];
    dst[j] = clip8_scalar(s);
  }
}

}  // namespace aphrodite::detail

#endif
