// AVX2/FMA kernels of the CPU GEMM (contract in gemm_cpu.h). Compiled with -mavx2 -mfma; only
// called after best_cpu_isa() saw both features. Plain functions and intrinsics only.
#include <immintrin.h>

#include <cstdint>

#include "internal/simd_exp.h"
#include "linear/gemm_cpu.h"

namespace aphrodite::detail {

namespace {

inline __m256i column_mask(std::int64_t valid) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(valid)),
                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// 0.5 * x * (1 + erf(x / sqrt(2))) written as 0.5 * x * erfc(-x / sqrt(2)), with erfc from the
// Chebyshev fit of Numerical Recipes (erfcc: relative error < 1.2e-7 for every argument), so
// the negative tail keeps its relative precision instead of cancelling in 1 + erf.
inline __m256 gelu_erf_ps(__m256 x) {
  const __m256 u = _mm256_mul_ps(x, _mm256_set1_ps(0.70710678118654752f));
  const __m256 z = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), u);
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 t = _mm256_div_ps(one, _mm256_fmadd_ps(_mm256_set1_ps(0.5f), z, one));
  __m256 p = _mm256_set1_ps(0.17087277f);
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(-0.82215223f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(1.48851587f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(-1.13520398f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(0.27886807f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(-0.18628806f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(0.09678418f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(0.37409196f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(1.00002368f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(-1.26551223f));
  // Past z = 8.8, erfc(z) < 3e-36 (below 1e-28 of GELU's scale there) is taken as 0, and the
  // exponent is kept above -80 so that nothing on the way is a denormal: an operation on one
  // costs a microcode assist (~100 cycles), which made GELU of large negative pre-activations
  // slower than the GEMM itself.
  const __m256 e = exp_ps(_mm256_max_ps(_mm256_fnmadd_ps(z, z, p), _mm256_set1_ps(-80.0f)));
  const __m256 erfc_z =
      _mm256_and_ps(_mm256_mul_ps(t, e), _mm256_cmp_ps(z, _mm256_set1_ps(8.8f), _CMP_LE_OQ));
  // erfc(-u) = erfc(|u|) for u < 0, 2 - erfc(|u|) for u >= 0.
  const __m256 positive = _mm256_cmp_ps(u, _mm256_setzero_ps(), _CMP_GE_OQ);
  const __m256 erfc_neg_u =
      _mm256_blendv_ps(erfc_z, _mm256_sub_ps(_mm256_set1_ps(2.0f), erfc_z), positive);
  return _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(0.5f), x), erfc_neg_u);
}

// 0.5 * x * (1 + tanh(y)) == x / (1 + exp(-2y)), y = sqrt(2/pi) * (x + 0.044715 x^3).
inline __m256 gelu_tanh_ps(__m256 x) {
  const __m256 x3 = _mm256_mul_ps(_mm256_mul_ps(x, x), x);
  const __m256 y = _mm256_mul_ps(_mm256_set1_ps(0.7978845608028654f),
                                 _mm256_fmadd_ps(_mm256_set1_ps(0.044715f), x3, x));
  const __m256 e = exp_ps(_mm256_mul_ps(_mm256_set1_ps(-2.0f), y));
  return _mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.0f), e));
}

// x * sigmoid(1.702 x) == x / (1 + exp(-1.702 x)).
inline __m256 quick_gelu_ps(__m256 x) {
  const __m256 e = exp_ps(_mm256_mul_ps(_mm256_set1_ps(-1.702f), x));
  return _mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.0f), e));
}

inline __m256 activate_ps(__m256 v, int act) {
  if (act == kGemmActGeluErf) return gelu_erf_ps(v);
  if (act == kGemmActGeluTanh) return gelu_tanh_ps(v);
  if (act == kGemmActQuickGelu) return quick_gelu_ps(v);
  return v;
}

// One MR x 16 register tile over `kc` values of k. `nr` < 16 only on the last panel of a slab:
// then loads and stores of C and of the bias are masked (the packed panel is zero-padded, so the
// product itself needs no mask).
template <int MR>
inline void tile(const GemmBlock& b, const float* a, const float* panel, float* c, int nr,
                 const float* bias) {
  __m256 acc0[MR];
  __m256 acc1[MR];
  const bool full = nr == kGemmNr;
  const __m256i mask0 = column_mask(nr);
  const __m256i mask1 = column_mask(nr - 8);
  if (b.accumulate) {
#pragma GCC unroll 6
    for (int i = 0; i < MR; ++i) {
      const float* ci = c + i * b.ldc;
      acc0[i] = full ? _mm256_loadu_ps(ci) : _mm256_maskload_ps(ci, mask0);
      acc1[i] = full ? _mm256_loadu_ps(ci + 8) : _mm256_maskload_ps(ci + 8, mask1);
    }
  } else {
#pragma GCC unroll 6
    for (int i = 0; i < MR; ++i) {
      acc0[i] = _mm256_setzero_ps();
      acc1[i] = _mm256_setzero_ps();
    }
  }

  const std::int64_t lda = b.lda;
  const float* bk = panel;
  for (std::int64_t k = 0; k < b.kc; ++k, bk += kGemmNr) {
    const __m256 b0 = _mm256_load_ps(bk);
    const __m256 b1 = _mm256_load_ps(bk + 8);
#pragma GCC unroll 6
    for (int i = 0; i < MR; ++i) {
      const __m256 av = _mm256_broadcast_ss(a + i * lda + k);
      acc0[i] = _mm256_fmadd_ps(av, b0, acc0[i]);
      acc1[i] = _mm256_fmadd_ps(av, b1, acc1[i]);
    }
  }

  if (b.finish) {
    if (bias != nullptr) {
      const __m256 bias0 = full ? _mm256_loadu_ps(bias) : _mm256_maskload_ps(bias, mask0);
      const __m256 bias1 = full ? _mm256_loadu_ps(bias + 8) : _mm256_maskload_ps(bias + 8, mask1);
#pragma GCC unroll 6
      for (int i = 0; i < MR; ++i) {
        acc0[i] = _mm256_add_ps(acc0[i], bias0);
        acc1[i] = _mm256_add_ps(acc1[i], bias1);
      }
    }
    if (b.act != kGemmActNone) {
#pragma GCC unroll 6
      for (int i = 0; i < MR; ++i) {
        acc0[i] = activate_ps(acc0[i], b.act);
        acc1[i] = activate_ps(acc1[i], b.act);
      }
    }
  }

#pragma GCC unroll 6
  for (int i = 0; i < MR; ++i) {
    float* ci = c + i * b.ldc;
    if (full) {
      _mm256_storeu_ps(ci, acc0[i]);
      _mm256_storeu_ps(ci + 8, acc1[i]);
    } else {
      _mm256_maskstore_ps(ci, mask0, acc0[i]);
      _mm256_maskstore_ps(ci + 8, mask1, acc1[i]);
    }
  }
}

template <int MR>
void row_strip(const GemmBlock& b, std::int64_t i0) {
  const float* a = b.a + i0 * b.lda;
  for (std::int64_t j0 = 0; j0 < b.n; j0 += kGemmNr) {
    const std::int64_t left = b.n - j0;
    const int nr = left < kGemmNr ? static_cast<int>(left) : kGemmNr;
    tile<MR>(b, a, b.panels + (j0 / kGemmNr) * b.panel_stride, b.c + i0 * b.ldc + j0, nr,
             b.bias != nullptr ? b.bias + j0 : nullptr);
  }
}

template <int MR>
void strip_of_height(const GemmBlock& b, std::int64_t i0, std::int64_t rows) {
  if constexpr (MR > 0) {
    if (rows == MR) {
      row_strip<MR>(b, i0);
    } else {
      strip_of_height<MR - 1>(b, i0, rows);
    }
  }
}

}  // namespace

void gemm_block_f32_avx2(const GemmBlock& b) {
  // Strips of even height (8 rows: 4 + 4, not 6 + 2): a short strip does few FMAs per weight
  // load, and at decode-like row counts it would be a large share of the work.
  const std::int64_t strips = (b.m + kGemmMr - 1) / kGemmMr;
  if (strips == 0) return;
  const std::int64_t base = b.m / strips, taller = b.m % strips;
  std::int64_t i0 = 0;
  for (std::int64_t s = 0; s < strips; ++s) {
    const std::int64_t rows = base + (s < taller ? 1 : 0);
    strip_of_height<kGemmMr>(b, i0, rows);
    i0 += rows;
  }
}

void swiglu_f32_avx2(const float* gate, const float* up, const float* bias_gate,
                     const float* bias_up, float* out, std::int64_t n) {
  const __m256 one = _mm256_set1_ps(1.0f);
  for (std::int64_t j = 0; j < n; j += 8) {
    const std::int64_t left = n - j;
    const bool full = left >= 8;
    const __m256i mask = column_mask(left);
    __m256 g = full ? _mm256_loadu_ps(gate + j) : _mm256_maskload_ps(gate + j, mask);
    __m256 u = full ? _mm256_loadu_ps(up + j) : _mm256_maskload_ps(up + j, mask);
    if (bias_gate != nullptr) {
      g = _mm256_add_ps(
          g, full ? _mm256_loadu_ps(bias_gate + j) : _mm256_maskload_ps(bias_gate + j, mask));
    }
    if (bias_up != nullptr) {
      u = _mm256_add_ps(
          u, full ? _mm256_loadu_ps(bias_up + j) : _mm256_maskload_ps(bias_up + j, mask));
    }
    // silu(g) = g / (1 + exp(-g)); exp overflowing to its clamp gives the correct ~0.
    const __m256 s =
        _mm256_div_ps(g, _mm256_add_ps(one, exp_ps(_mm256_sub_ps(_mm256_setzero_ps(), g))));
    const __m256 v = _mm256_mul_ps(s, u);
    if (full) {
      _mm256_storeu_ps(out + j, v);
    } else {
      _mm256_maskstore_ps(out + j, mask, v);
    }
  }
}

void pack_panel_f32_avx2(const float* w, std::int64_t ldw, std::int64_t nr, std::int64_t kc,
                         float* dst) {
  if (nr == kGemmNr) {
    // 8 x 8 transposes: rows j..j+7 of W, k..k+7 -> 8 packed rows of 8 features.
    std::int64_t k = 0;
    for (; k + 8 <= kc; k += 8) {
      for (int half = 0; half < 2; ++half) {
        const float* src = w + half * 8 * ldw + k;
        __m256 r0 = _mm256_loadu_ps(src + 0 * ldw);
        __m256 r1 = _mm256_loadu_ps(src + 1 * ldw);
        __m256 r2 = _mm256_loadu_ps(src + 2 * ldw);
        __m256 r3 = _mm256_loadu_ps(src + 3 * ldw);
        __m256 r4 = _mm256_loadu_ps(src + 4 * ldw);
        __m256 r5 = _mm256_loadu_ps(src + 5 * ldw);
        __m256 r6 = _mm256_loadu_ps(src + 6 * ldw);
        __m256 r7 = _mm256_loadu_ps(src + 7 * ldw);
        const __m256 t0 = _mm256_unpacklo_ps(r0, r1);
        const __m256 t1 = _mm256_unpackhi_ps(r0, r1);
        const __m256 t2 = _mm256_unpacklo_ps(r2, r3);
        const __m256 t3 = _mm256_unpackhi_ps(r2, r3);
        const __m256 t4 = _mm256_unpacklo_ps(r4, r5);
        const __m256 t5 = _mm256_unpackhi_ps(r4, r5);
        const __m256 t6 = _mm256_unpacklo_ps(r6, r7);
        const __m256 t7 = _mm256_unpackhi_ps(r6, r7);
        const __m256 s0 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(1, 0, 1, 0));
        const __m256 s1 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(3, 2, 3, 2));
        const __m256 s2 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(1, 0, 1, 0));
        const __m256 s3 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(3, 2, 3, 2));
        const __m256 s4 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(1, 0, 1, 0));
        const __m256 s5 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(3, 2, 3, 2));
        const __m256 s6 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(1, 0, 1, 0));
        const __m256 s7 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(3, 2, 3, 2));
        r0 = _mm256_permute2f128_ps(s0, s4, 0x20);
        r1 = _mm256_permute2f128_ps(s1, s5, 0x20);
        r2 = _mm256_permute2f128_ps(s2, s6, 0x20);
        r3 = _mm256_permute2f128_ps(s3, s7, 0x20);
        r4 = _mm256_permute2f128_ps(s0, s4, 0x31);
        r5 = _mm256_permute2f128_ps(s1, s5, 0x31);
        r6 = _mm256_permute2f128_ps(s2, s6, 0x31);
        r7 = _mm256_permute2f128_ps(s3, s7, 0x31);
        float* d = dst + k * kGemmNr + half * 8;
        _mm256_store_ps(d + 0 * kGemmNr, r0);
        _mm256_store_ps(d + 1 * kGemmNr, r1);
        _mm256_store_ps(d + 2 * kGemmNr, r2);
        _mm256_store_ps(d + 3 * kGemmNr, r3);
        _mm256_store_ps(d + 4 * kGemmNr, r4);
        _mm256_store_ps(d + 5 * kGemmNr, r5);
        _mm256_store_ps(d + 6 * kGemmNr, r6);
        _mm256_store_ps(d + 7 * kGemmNr, r7);
      }
    }
    for (; k < kc; ++k) {
      for (int j = 0; j < kGemmNr; ++j) dst[k * kGemmNr + j] = w[j * ldw + k];
    }
    return;
  }
  for (std::int64_t k = 0; k < kc; ++k) {
    float* d = dst + k * kGemmNr;
    _mm256_store_ps(d, _mm256_setzero_ps());
    _mm256_store_ps(d + 8, _mm256_setzero_ps());
    for (std::int64_t j = 0; j < nr; ++j) d[j] = w[j * ldw + k];
  }
}

}  // namespace aphrodite::detail
