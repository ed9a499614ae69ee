// AVX2 versions of PIL's 8-bit resampling passes. Same integer arithmetic as the scalar code
// (32-bit products and sums, which wrap identically in any order), so the results are identical.
#if defined(__x86_64__) || defined(_M_X64)

#include <immintrin.h>

#include <cstdint>

#include "internal/image_preprocess.h"

namespace aphrodite::detail {

namespace {

constexpr std::int32_t kBias = 1 << (kResamplePrecisionBits - 1);

inline std::uint8_t clip8_scalar(std::int32_t v) {
  v >>= kResamplePrecisionBits;
  return static_cast<std::uint8_t>(v < 0 ? 0 : (v > 255 ? 255 : v));
}

}  // namespace

void resample_row_horizontal_avx2(const std::uint8_t* src, const std::uint8_t* src_end,
                                  std::uint8_t* dst, int count, int ksize,
                                  const std::int32_t* bounds, const std::int32_t* coeffs) {
  // Two taps per 256-bit vector: lanes [R0 G0 B0 0 R1 G1 B1 0] times [k0 x4, k1 x4].
  const __m128i spread01 = _mm_setr_epi8(0, 1, 2, -1, 3, 4, 5, -1, -1, -1, -1, -1, -1, -1, -1, -1);
  const __m128i spread23 = _mm_setr_epi8(6, 7, 8, -1, 9, 10, 11, -1, -1, -1, -1, -1, -1, -1, -1, -1);
  const __m256i pick01 = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
  const __m256i pick23 = _mm256_setr_epi32(2, 2, 2, 2, 3, 3, 3, 3);
  for (int i = 0; i < count; ++i) {
    const int xmin = bounds[2 * i];
    const int taps = bounds[2 * i + 1];
    const std::int32_t* k = coeffs + static_cast<std::int64_t>(i) * ksize;
    const std::uint8_t* p = src + static_cast<std::int64_t>(xmin) * 3;
    __m256i acc0 = _mm256_setzero_si256();
    __m256i acc1 = _mm256_setzero_si256();
    int x = 0;
    for (; x + 4 <= taps && p + 3 * x + 16 <= src_end; x += 4) {
      const __m128i px = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 3 * x));
      const __m256i k4 = _mm256_castsi128_si256(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(k + x)));
      const __m256i v01 = _mm256_cvtepu8_epi32(_mm_shuffle_epi8(px, spread01));
      const __m256i v23 = _mm256_cvtepu8_epi32(_mm_shuffle_epi8(px, spread23));
      acc0 = _mm256_add_epi32(acc0, _mm256_mullo_epi32(v01, _mm256_permutevar8x32_epi32(k4, pick01)));
      acc1 = _mm256_add_epi32(acc1, _mm256_mullo_epi32(v23, _mm256_permutevar8x32_epi32(k4, pick23)));
    }
    for (; x + 2 <= taps && p + 3 * x + 8 <= src_end; x += 2) {
      const __m128i px = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 3 * x));
      const __m256i k2 = _mm256_castsi128_si256(
          _mm_loadl_epi64(reinterpret_cast<const __m128i*>(k + x)));
      const __m256i v01 = _mm256_cvtepu8_epi32(_mm_shuffle_epi8(px, spread01));
      acc0 = _mm256_add_epi32(acc0, _mm256_mullo_epi32(v01, _mm256_permutevar8x32_epi32(k2, pick01)));
    }
    const __m256i acc = _mm256_add_epi32(acc0, acc1);
    const __m128i sum = _mm_add_epi32(_mm256_castsi256_si128(acc), _mm256_extracti128_si256(acc, 1));
    std::int32_t s0 = kBias + _mm_extract_epi32(sum, 0);
    std::int32_t s1 = kBias + _mm_extract_epi32(sum, 1);
    std::int32_t s2 = kBias + _mm_extract_epi32(sum, 2);
    for (; x < taps; ++x) {
      s0 += p[3 * x + 0] * k[x];
      s1 += p[3 * x + 1] * k[x];
      s2 += p[3 * x + 2] * k[x];
    }
    dst[3 * i + 0] = clip8_scalar(s0);
    dst[3 * i + 1] = clip8_scalar(s1);
    dst[3 * i + 2] = clip8_scalar(s2);
  }
}

void resample_row_vertical_avx2(const std::uint8_t* mid, std::int64_t mid_stride, int ymin,
                                int taps, const std::int32_t* coeffs, std::uint8_t* dst,
                                int bytes) {
  const __m256i bias = _mm256_set1_epi32(kBias);
  // packs/packus interleave 128-bit lanes; this puts the 4-byte groups back in order.
  const __m256i unshuffle = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  const std::uint8_t* first = mid + static_cast<std::int64_t>(ymin) * mid_stride;
  int j = 0;
  for (; j + 32 <= bytes; j += 32) {
    __m256i a0 = bias, a1 = bias, a2 = bias, a3 = bias;
    for (int t = 0; t < taps; ++t) {
      const __m256i v =
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(first + t * mid_stride + j));
      const __m256i k = _mm256_set1_epi32(coeffs[t]);
      const __m128i lo = _mm256_castsi256_si128(v);
      const __m128i hi = _mm256_extracti128_si256(v, 1);
      a0 = _mm256_add_epi32(a0, _mm256_mullo_epi32(_mm256_cvtepu8_epi32(lo), k));
      a1 = _mm256_add_epi32(a1, _mm256_mullo_epi32(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)), k));
      a2 = _mm256_add_epi32(a2, _mm256_mullo_epi32(_mm256_cvtepu8_epi32(hi), k));
      a3 = _mm256_add_epi32(a3, _mm256_mullo_epi32(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)), k));
    }
    a0 = _mm256_srai_epi32(a0, kResamplePrecisionBits);
    a1 = _mm256_srai_epi32(a1, kResamplePrecisionBits);
    a2 = _mm256_srai_epi32(a2, kResamplePrecisionBits);
    a3 = _mm256_srai_epi32(a3, kResamplePrecisionBits);
    const __m256i packed = _mm256_packus_epi16(_mm256_packs_epi32(a0, a1), _mm256_packs_epi32(a2, a3));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + j),
                        _mm256_permutevar8x32_epi32(packed, unshuffle));
  }
  for (; j < bytes; ++j) {
    std::int32_t s = kBias;
    for (int t = 0; t < taps; ++t) s += first[t * mid_stride + j] * coeffs[t];
    dst[j] = clip8_scalar(s);
  }
}

}  // namespace aphrodite::detail

#endif
