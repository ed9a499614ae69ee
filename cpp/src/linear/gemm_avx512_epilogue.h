// The AVX-512 epilogue of the CPU GEMM's kernels (gemm_f32_avx512.cpp, gemm_f32_amx.cpp): column
// masks for the last partial panel and the GELU activations on 16 float32 lanes. Internal linkage
// on purpose, as in internal/simd_exp.h: each including file keeps its own copy, compiled for its
// own instruction set. Include internal/avx512_intrinsics.h first.
#pragma once

#include <cstdint>

#include "internal/simd_exp.h"
#include "linear/gemm_cpu.h"

namespace aphrodite::detail {
namespace {  // NOLINT(google-build-namespaces): per-ISA copies, see above

inline __mmask16 column_mask(std::int64_t valid) {
  if (valid >= 16) return static_cast<__mmask16>(0xFFFF);
  if (valid <= 0) return 0;
  return static_cast<__mmask16>((1u << valid) - 1u);
}

// 0.5 * x * erfc(-x / sqrt(2)), erfc from the same Chebyshev fit as the AVX2 kernels.
inline __m512 gelu_erf_ps(__m512 x) {
  const __m512 u = _mm512_mul_ps(x, _mm512_set1_ps(0.70710678118654752f));
  const __m512 z = _mm512_abs_ps(u);
  const __m512 one = _mm512_set1_ps(1.0f);
  const __m512 t = _mm512_div_ps(one, _mm512_fmadd_ps(_mm512_set1_ps(0.5f), z, one));
  __m512 p = _mm512_set1_ps(0.17087277f);
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-0.82215223f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(1.48851587f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-1.13520398f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(0.27886807f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-0.18628806f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(0.09678418f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(0.37409196f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(1.00002368f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-1.26551223f));
  // Past z = 8.8, erfc(z) < 3e-36 (below 1e-28 of GELU's scale there) is taken as 0, and the
  // exponent is kept above -80 so that nothing on the way is a denormal: an operation on one
  // costs a microcode assist (~100 cycles), which made GELU of large negative pre-activations
  // slower than the GEMM itself.
  const __m512 e = exp_ps(_mm512_max_ps(_mm512_fnmadd_ps(z, z, p), _mm512_set1_ps(-80.0f)));
  const __m512 erfc_z = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(z, _mm512_set1_ps(8.8f), _CMP_LE_OQ),
                                            _mm512_mul_ps(t, e));
  // erfc(-u) = erfc(|u|) for u < 0, 2 - erfc(|u|) for u >= 0.
  const __mmask16 positive = _mm512_cmp_ps_mask(u, _mm512_setzero_ps(), _CMP_GE_OQ);
  const __m512 erfc_neg_u =
      _mm512_mask_blend_ps(positive, erfc_z, _mm512_sub_ps(_mm512_set1_ps(2.0f), erfc_z));
  return _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.5f), x), erfc_neg_u);
}

// 0.5 * x * (1 + tanh(y)) == x / (1 + exp(-2y)), y = sqrt(2/pi) * (x + 0.044715 x^3).
inline __m512 gelu_tanh_ps(__m512 x) {
  const __m512 x3 = _mm512_mul_ps(_mm512_mul_ps(x, x), x);
  const __m512 y = _mm512_mul_ps(_mm512_set1_ps(0.7978845608028654f),
                                 _mm512_fmadd_ps(_mm512_set1_ps(0.044715f), x3, x));
  const __m512 e = exp_ps(_mm512_mul_ps(_mm512_set1_ps(-2.0f), y));
  return _mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.0f), e));
}

// x * sigmoid(1.702 x) == x / (1 + exp(-1.702 x)).
inline __m512 quick_gelu_ps(__m512 x) {
  const __m512 e = exp_ps(_mm512_mul_ps(_mm512_set1_ps(-1.702f), x));
  return _mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.0f), e));
}

inline __m512 activate_ps(__m512 v, int act) {
  if (act == kGemmActGeluErf) return gelu_erf_ps(v);
  if (act == kGemmActGeluTanh) return gelu_tanh_ps(v);
  if (act == kGemmActQuickGelu) return quick_gelu_ps(v);
  return v;
}

}  // namespace
}  // namespace aphrodite::detail
