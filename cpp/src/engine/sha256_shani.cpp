// SHA-256 compression on the x86 SHA extensions (compiled with -msha -msse4.1 -mssse3; called
// only after sha256.cpp has checked the CPU for them). The message schedule and the two-rounds-
// at-a-time instruction follow Intel's description of the extensions; the state is kept as the
// (ABEF, CDGH) register pair those instructions expect.
#include "internal/sha256_compress.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

namespace aphrodite::engine::detail {

void sha256_compress_shani(std::uint32_t* state, const std::uint8_t* data, std::size_t num_blocks) {
  // Big-endian word loads: byte-reverse each 32-bit lane.
  const __m128i byte_swap = _mm_set_epi64x(0x0c0d0e0f08090a0bULL, 0x0405060700010203ULL);
  __m128i tmp = _mm_loadu_si128(reinterpret_cast<const __m128i*>(state));
  __m128i state1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(state + 4));
  tmp = _mm_shuffle_epi32(tmp, 0xB1);                // CDAB
  state1 = _mm_shuffle_epi32(state1, 0x1B);          // EFGH
  __m128i state0 = _mm_alignr_epi8(tmp, state1, 8);  // ABEF
  state1 = _mm_blend_epi16(state1, tmp, 0xF0);       // CDGH

  for (std::size_t b = 0; b < num_blocks; ++b, data += 64) {
    const __m128i abef_save = state0;
    const __m128i cdgh_save = state1;
    // w[g % 4] holds message words 4g..4g+3 of the current group g (a ring of four registers).
    __m128i w[4];
    for (int i = 0; i < 4; ++i) {
      w[i] = _mm_shuffle_epi8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(data + 16 * i)),
                              byte_swap);
    }
    for (int g = 0; g < 16; ++g) {
      __m128i msg = _mm_add_epi32(
          w[g % 4],
          _mm_load_si128(reinterpret_cast<const __m128i*>(kSha256RoundConstants + 4 * g)));
      state1 = _mm_sha256rnds2_epu32(state1, state0, msg);
      if (g >= 3 && g <= 14) {
        // Finish the schedule of group g + 1 (its slot already holds msg1 of groups g-3, g-2).
        const __m128i carry = _mm_alignr_epi8(w[g % 4], w[(g + 3) % 4], 4);
        w[(g + 1) % 4] = _mm_sha256msg2_epu32(_mm_add_epi32(w[(g + 1) % 4], carry), w[g % 4]);
      }
      msg = _mm_shuffle_epi32(msg, 0x0E);
      state0 = _mm_sha256rnds2_epu32(state0, state1, msg);
      if (g >= 1 && g <= 12) w[(g + 3) % 4] = _mm_sha256msg1_epu32(w[(g + 3) % 4], w[g % 4]);
    }
    state0 = _mm_add_epi32(state0, abef_save);
    state1 = _mm_add_epi32(state1, cdgh_save);
  }

  tmp = _mm_shuffle_epi32(state0, 0x1B);        // FEBA
  state1 = _mm_shuffle_epi32(state1, 0xB1);     // DCHG
  state0 = _mm_blend_epi16(tmp, state1, 0xF0);  // DCBA
  state1 = _mm_alignr_epi8(state1, tmp, 8);     // ABEF
  _mm_storeu_si128(reinterpret_cast<__m128i*>(state), state0);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(state + 4), state1);
}

}  // namespace aphrodite::engine::detail
#endif
