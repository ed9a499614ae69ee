// AVX2/FMA/F16C build of the CPU attention inner kernels (see attention_cpu_kernels.h). Only
// reached after the driver checked the CPU's features; raw pointers and intrinsics only.
#include <immintrin.h>
#include <math.h>

#include <cstdint>

#include "attention/attention_cpu_kernels.h"
#include "attention/attention_cpu_layout.h"
#include "internal/simd_exp.h"

namespace aphrodite::detail {

namespace {

// The small fixed loops over register tiles below carry `#pragma GCC unroll`: fully unrolled, the
// accumulator arrays live in registers instead of being stored back on every iteration.

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline __m256 load8(const void* src, DType dtype, std::int64_t offset) {
  switch (dtype) {
    case DType::kFloat16:
      return _mm256_cvtph_ps(_mm_loadu_si128(
          reinterpret_cast<const __m128i*>(static_cast<const std::uint16_t*>(src) + offset)));
    case DType::kBFloat16:
      return _mm256_castsi256_ps(_mm256_slli_epi32(
          _mm256_cvtepu16_epi32(_mm_loadu_si128(
              reinterpret_cast<const __m128i*>(static_cast<const std::uint16_t*>(src) + offset))),
          16));
    default:
      return _mm256_loadu_ps(static_cast<const float*>(src) + offset);
  }
}

void rows_to_f32(const void* src, DType dtype, std::int64_t src_stride, int rows, int head_size,
                 float mul, float* dst) {
  const __m256 vmul = _mm256_set1_ps(mul);
  for (int r = 0; r < rows; ++r) {
    for (int d = 0; d < head_size; d += 8) {
      const __m256 x = load8(src, dtype, r * src_stride + d);
      _mm256_storeu_ps(dst + static_cast<std::int64_t>(r) * head_size + d, _mm256_mul_ps(x, vmul));
    }
  }
}

void row_from_f32(const float* src, float mul, int head_size, DType dtype, void* dst) {
  const __m256 vmul = _mm256_set1_ps(mul);
  for (int d = 0; d < head_size; d += 8) {
    const __m256 x = _mm256_mul_ps(_mm256_loadu_ps(src + d), vmul);
    if (dtype == DType::kFloat32) {
      _mm256_storeu_ps(static_cast<float*>(dst) + d, x);
    } else if (dtype == DType::kFloat16) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<std::uint16_t*>(dst) + d),
                       _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    } else {
      // bfloat16: round to nearest even on the upper 16 bits; NaN stays a quiet NaN.
      const __m256i bits = _mm256_castps_si256(x);
      const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
      __m256i rounded = _mm256_srli_epi32(
          _mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
      const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q));
      rounded = _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7fc0), nan);
      const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(rounded, rounded), 0xd8);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<std::uint16_t*>(dst) + d),
                       _mm256_castsi256_si128(packed));
    }
  }
}

void pack_query(const float* q, int rows, int head_size, float* packed) {
  pack_query_for_width<8>(q, rows, head_size, packed);
}

// st[j][rv * 8 ..] = k[j] . qt[:, rv * 8 ..] for KJ keys from j0 and NV row vectors from rv0.
template <int KJ, int NV>
void qk_tile(const float* qt, int rp, int rv0, const float* k, std::int64_t kv_stride, int j0,
             int head_size, float* st) {
  __m256 c[KJ][NV];
#pragma GCC unroll 8
  for (int j = 0; j < KJ; ++j)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) c[j][v] = _mm256_setzero_ps();
  const float* kr = k + j0 * kv_stride;
  for (int d = 0; d < head_size; ++d) {
    __m256 qv[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      qv[v] = _mm256_loadu_ps(qt + static_cast<std::int64_t>(d) * rp + (rv0 + v) * 8);
    }
#pragma GCC unroll 8
    for (int j = 0; j < KJ; ++j) {
      const __m256 kb = _mm256_broadcast_ss(kr + j * kv_stride + d);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) c[j][v] = _mm256_fmadd_ps(kb, qv[v], c[j][v]);
    }
  }
#pragma GCC unroll 8
  for (int j = 0; j < KJ; ++j)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v)
      _mm256_storeu_ps(st + static_cast<std::int64_t>(j0 + j) * rp + (rv0 + v) * 8, c[j][v]);
}

template <int KJ, int NV>
void qk_keys(const float* qt, int rp, int rv0, const KeyBlocks& kv, int num_keys, int head_size,
             float* st) {
  for (int b0 = 0; b0 < num_keys; b0 += kv.block_size) {
    const float* k = kv.k[b0 / kv.block_size];
    const int n = num_keys - b0 < kv.block_size ? num_keys - b0 : kv.block_size;
    float* sb = st + static_cast<std::int64_t>(b0) * rp;
    int j = 0;
    for (; j + KJ <= n; j += KJ) qk_tile<KJ, NV>(qt, rp, rv0, k, kv.stride, j, head_size, sb);
    for (; j < n; ++j) qk_tile<1, NV>(qt, rp, rv0, k, kv.stride, j, head_size, sb);
  }
}

// acc[r][d0 .. d0 + 8V) = alpha[r] * acc[r][...] + sum_j p(r, j) * v[j][...] for R rows, where
// p(r, j) = p[r * p_row + j * p_key].
template <int R, int V>
void pv_tile(const float* p, std::int64_t p_row, std::int64_t p_key, const float* alpha,
             const KeyBlocks& kv, int num_keys, float* acc, int head_size, int d0) {
  __m256 c[R][V];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    const __m256 a = _mm256_broadcast_ss(alpha + r);
#pragma GCC unroll 8
    for (int w = 0; w < V; ++w)
      c[r][w] = _mm256_mul_ps(
          a, _mm256_loadu_ps(acc + static_cast<std::int64_t>(r) * head_size + d0 + 8 * w));
  }
  for (int b0 = 0; b0 < num_keys; b0 += kv.block_size) {
    const float* vb = kv.v[b0 / kv.block_size] + d0;
    const float* pk = p + b0 * p_key;
    const int n = num_keys - b0 < kv.block_size ? num_keys - b0 : kv.block_size;
    for (int j = 0; j < n; ++j) {
      __m256 vv[V];
#pragma GCC unroll 8
      for (int w = 0; w < V; ++w) vv[w] = _mm256_loadu_ps(vb + j * kv.stride + 8 * w);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const __m256 pb = _mm256_broadcast_ss(pk + r * p_row + j * p_key);
#pragma GCC unroll 8
        for (int w = 0; w < V; ++w) c[r][w] = _mm256_fmadd_ps(pb, vv[w], c[r][w]);
      }
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int w = 0; w < V; ++w)
      _mm256_storeu_ps(acc + static_cast<std::int64_t>(r) * head_size + d0 + 8 * w, c[r][w]);
}

template <int R>
void pv_rows(const float* p, std::int64_t p_row, std::int64_t p_key, const float* alpha,
             const KeyBlocks& kv, int num_keys, float* acc, int head_size) {
  int d0 = 0;
  for (; d0 + 16 <= head_size; d0 += 16)
    pv_tile<R, 2>(p, p_row, p_key, alpha, kv, num_keys, acc, head_size, d0);
  if (d0 < head_size) pv_tile<R, 1>(p, p_row, p_key, alpha, kv, num_keys, acc, head_size, d0);
}

void pv_all_rows(const float* p, std::int64_t p_row, std::int64_t p_key, const float* alpha,
                 const KeyBlocks& kv, int num_keys, float* acc, int rows, int head_size) {
  int r = 0;
  for (; r + 4 <= rows; r += 4) {
    pv_rows<4>(p + r * p_row, p_row, p_key, alpha + r, kv, num_keys,
               acc + static_cast<std::int64_t>(r) * head_size, head_size);
  }
  for (; r < rows; ++r) {
    pv_rows<1>(p + r * p_row, p_row, p_key, alpha + r, kv, num_keys,
               acc + static_cast<std::int64_t>(r) * head_size, head_size);
  }
}

// Many rows: scores as [key][row] from the transposed query, softmax vectorised over rows.
void attend_block_transposed(const float* qt, int rows, int head_size, const KeyBlocks& kv,
                             int num_keys, const int* key_begin, const int* key_end, float* m,
                             float* l, float* acc, float* scratch) {
  const int rp = padded_rows<8>(rows);
  float* st = scratch;                                           // [num_keys][rp]
  float* alpha = st + static_cast<std::int64_t>(num_keys) * rp;  // [rp]
  float* mp = alpha + rp;
  float* lp = mp + rp;
  int* kb = reinterpret_cast<int*>(lp + rp);
  int* ke = kb + rp;
  for (int r = 0; r < rp; ++r) {
    const bool real = r < rows;
    mp[r] = real ? m[r] : -INFINITY;
    lp[r] = real ? l[r] : 0.0f;
    kb[r] = real ? key_begin[r] : 0;
    ke[r] = real ? key_end[r] : 0;
  }
  const int rv_total = rp / 8;
  for (int rv0 = 0; rv0 < rv_total;) {
    const int nv = rv_total - rv0 < 4 ? rv_total - rv0 : 4;
    switch (nv) {
      case 4:
        qk_keys<2, 4>(qt, rp, rv0, kv, num_keys, head_size, st);
        break;
      case 3:
        qk_keys<2, 3>(qt, rp, rv0, kv, num_keys, head_size, st);
        break;
      case 2:
        qk_keys<4, 2>(qt, rp, rv0, kv, num_keys, head_size, st);
        break;
      default:
        qk_keys<8, 1>(qt, rp, rv0, kv, num_keys, head_size, st);
        break;
    }
    rv0 += nv;
  }

  const __m256 vneg = _mm256_set1_ps(-INFINITY);
  for (int rv = 0; rv < rv_total; ++rv) {
    const __m256 m_old = _mm256_loadu_ps(mp + rv * 8);
    const __m256i kbv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kb + rv * 8));
    const __m256i kev = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ke + rv * 8));
    __m256 mx = vneg;
    __m256 nan_rows = _mm256_setzero_ps();
    for (int j = 0; j < num_keys; ++j) {
      float* sj = st + static_cast<std::int64_t>(j) * rp + rv * 8;
      const __m256i jv = _mm256_set1_epi32(j);
      // valid: key_begin <= j < key_end
      const __m256i valid =
          _mm256_andnot_si256(_mm256_cmpgt_epi32(kbv, jv), _mm256_cmpgt_epi32(kev, jv));
      const __m256 x = _mm256_blendv_ps(vneg, _mm256_loadu_ps(sj), _mm256_castsi256_ps(valid));
      _mm256_storeu_ps(sj, x);
      mx = _mm256_max_ps(mx, x);
      nan_rows = _mm256_or_ps(nan_rows, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
    }
    // A NaN score makes its row's maximum NaN (all bits set), hence its output NaN.
    const __m256 m_new = _mm256_or_ps(_mm256_max_ps(m_old, mx), nan_rows);
    // A row with no key yet (m_old = -inf) has nothing to rescale.
    const __m256 had_keys = _mm256_cmp_ps(m_old, vneg, _CMP_GT_OQ);
    const __m256 a = _mm256_and_ps(exp_ps(_mm256_sub_ps(m_old, m_new)), had_keys);
    __m256 sum = _mm256_setzero_ps();
    for (int j = 0; j < num_keys; ++j) {
      float* sj = st + static_cast<std::int64_t>(j) * rp + rv * 8;
      const __m256 x = _mm256_loadu_ps(sj);
      const __m256 valid = _mm256_cmp_ps(x, vneg, _CMP_NEQ_UQ);  // masked keys only (NaN stays)
      const __m256 pj = _mm256_and_ps(exp_ps(_mm256_sub_ps(x, m_new)), valid);
      _mm256_storeu_ps(sj, pj);
      sum = _mm256_add_ps(sum, pj);
    }
    // Rows that still saw no key keep alpha 1 so that their (zero) state stays as it is.
    const __m256 has_max = _mm256_cmp_ps(m_new, vneg, _CMP_GT_OQ);
    _mm256_storeu_ps(alpha + rv * 8, _mm256_blendv_ps(_mm256_set1_ps(1.0f), a, has_max));
    _mm256_storeu_ps(lp + rv * 8, _mm256_fmadd_ps(_mm256_loadu_ps(lp + rv * 8), a, sum));
    _mm256_storeu_ps(mp + rv * 8, m_new);
  }
  for (int r = 0; r < rows; ++r) {
    m[r] = mp[r];
    l[r] = lp[r];
  }
  pv_all_rows(st, 1, rp, alpha, kv, num_keys, acc, rows, head_size);
}

// Few rows (decode): one dot product per score.
void attend_block_rows(const float* q, int rows, int head_size, const KeyBlocks& kv, int num_keys,
                       const int* key_begin, const int* key_end, float* m, float* l, float* acc,
                       float* scratch) {
  const int np = (num_keys + 7) / 8 * 8;
  float* s = scratch;
  float* alpha = s + static_cast<std::int64_t>(rows) * np;
  const float neg_inf = -INFINITY;
  for (int r = 0; r < rows; ++r) {
    const float* qr = q + static_cast<std::int64_t>(r) * head_size;
    float* sr = s + static_cast<std::int64_t>(r) * np;
    for_each_key(kv, key_begin[r], key_end[r], [&](int j, const float* kr) {
      __m256 c0 = _mm256_setzero_ps();
      __m256 c1 = _mm256_setzero_ps();
      int d = 0;
      for (; d + 16 <= head_size; d += 16) {
        c0 = _mm256_fmadd_ps(_mm256_loadu_ps(qr + d), _mm256_loadu_ps(kr + d), c0);
        c1 = _mm256_fmadd_ps(_mm256_loadu_ps(qr + d + 8), _mm256_loadu_ps(kr + d + 8), c1);
      }
      if (d < head_size) {
        c0 = _mm256_fmadd_ps(_mm256_loadu_ps(qr + d), _mm256_loadu_ps(kr + d), c0);
      }
      sr[j] = hsum(_mm256_add_ps(c0, c1));
    });
  }

  // Online softmax: mask, new running max, rescale factor, probabilities in place of scores.
  for (int r = 0; r < rows; ++r) {
    float* sr = s + static_cast<std::int64_t>(r) * np;
    const int jb = key_begin[r];
    const int je = key_end[r];
    if (jb >= je) {
      alpha[r] = 1.0f;
      for (int j = 0; j < np; ++j) sr[j] = 0.0f;
      continue;
    }
    const float m_new = mask_scores_and_max(sr, np, jb, je, m[r], &alpha[r]);
    const __m256 vmax = _mm256_set1_ps(m_new);
    const __m256 vneg = _mm256_set1_ps(neg_inf);
    __m256 sum = _mm256_setzero_ps();
    for (int j = 0; j < np; j += 8) {
      const __m256 x = _mm256_loadu_ps(sr + j);
      const __m256 valid = _mm256_cmp_ps(x, vneg, _CMP_NEQ_UQ);  // masked keys only (NaN stays)
      const __m256 pj = _mm256_and_ps(exp_ps(_mm256_sub_ps(x, vmax)), valid);
      _mm256_storeu_ps(sr + j, pj);
      sum = _mm256_add_ps(sum, pj);
    }
    l[r] = l[r] * alpha[r] + hsum(sum);
    m[r] = m_new;
  }
  pv_all_rows(s, np, 1, alpha, kv, num_keys, acc, rows, head_size);
}

void attend_block(const float* q, int rows, int head_size, const KeyBlocks& kv, int num_keys,
                  const int* key_begin, const int* key_end, float* m, float* l, float* acc,
                  float* scratch) {
  if (rows >= kTransposeRows) {
    attend_block_transposed(q, rows, head_size, kv, num_keys, key_begin, key_end, m, l, acc,
                            scratch);
  } else {
    attend_block_rows(q, rows, head_size, kv, num_keys, key_begin, key_end, m, l, acc, scratch);
  }
}

}  // namespace

AttentionCpuKernels attention_cpu_kernels_avx2() {
  return {&rows_to_f32, &row_from_f32, &pack_query, &attend_block};
}

}  // namespace aphrodite::detail
