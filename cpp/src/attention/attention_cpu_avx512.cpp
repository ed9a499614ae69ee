// AVX-512 build of the CPU attention inner kernels (see attention_cpu_kernels.h): the same
// algorithm as the AVX2 build with 16-float vectors, which doubles the multiply-adds per
// instruction on CPUs with two 512-bit FMA units. Conversions to and from float16/bfloat16 are the
// AVX2 build's. Only reached after the driver checked the CPU's features.
#include <math.h>

#include <cstdint>

#include "attention/attention_cpu_kernels.h"
#include "attention/attention_cpu_layout.h"
#include "internal/avx512_intrinsics.h"
#include "internal/simd_exp.h"

namespace aphrodite::detail {

namespace {

// As in the AVX2 build, fixed register-tile loops carry `#pragma GCC unroll` so that the
// accumulator arrays stay in registers.

// Lanes [0, n) of a 16-float vector (n >= 16: all).
inline __mmask16 lanes(int n) {
  return n >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << n) - 1u);
}

constexpr int kVec = 16;

void pack_query(const float* q, int rows, int head_size, float* packed) {
  pack_query_for_width<kVec>(q, rows, head_size, packed);
}

// st[j][rv * 16 ..] = k[j] . qt[:, rv * 16 ..] for KJ keys from j0 and NV row vectors from rv0.
template <int KJ, int NV>
void qk_tile(const float* qt, int rp, int rv0, const float* k, std::int64_t kv_stride, int j0,
             int head_size, float* st) {
  __m512 c[KJ][NV];
#pragma GCC unroll 16
  for (int j = 0; j < KJ; ++j)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) c[j][v] = _mm512_setzero_ps();
  const float* kr = k + j0 * kv_stride;
  for (int d = 0; d < head_size; ++d) {
    __m512 qv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      qv[v] = _mm512_loadu_ps(qt + static_cast<std::int64_t>(d) * rp + (rv0 + v) * kVec);
    }
#pragma GCC unroll 16
    for (int j = 0; j < KJ; ++j) {
      const __m512 kb = _mm512_set1_ps(kr[j * kv_stride + d]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) c[j][v] = _mm512_fmadd_ps(kb, qv[v], c[j][v]);
    }
  }
#pragma GCC unroll 16
  for (int j = 0; j < KJ; ++j)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v)
      _mm512_storeu_ps(st + static_cast<std::int64_t>(j0 + j) * rp + (rv0 + v) * kVec, c[j][v]);
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

// acc[r][d0 .. d0 + 16V) = alpha[r] * acc[r][...] + sum_j p(r, j) * v[j][...] for R rows, where
// p(r, j) = p[r * p_row + j * p_key]; the last vector covers only the lanes in `tail`.
template <int R, int V>
void pv_tile(const float* p, std::int64_t p_row, std::int64_t p_key, const float* alpha,
             const KeyBlocks& kv, int num_keys, float* acc, int head_size, int d0, __mmask16 tail) {
  __m512 c[R][V];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
    const __m512 a = _mm512_set1_ps(alpha[r]);
    float* ar = acc + static_cast<std::int64_t>(r) * head_size + d0;
#pragma GCC unroll 8
    for (int w = 0; w < V - 1; ++w) c[r][w] = _mm512_mul_ps(a, _mm512_loadu_ps(ar + kVec * w));
    c[r][V - 1] = _mm512_mul_ps(a, _mm512_maskz_loadu_ps(tail, ar + kVec * (V - 1)));
  }
  for (int b0 = 0; b0 < num_keys; b0 += kv.block_size) {
    const float* vb = kv.v[b0 / kv.block_size] + d0;
    const float* pk = p + b0 * p_key;
    const int n = num_keys - b0 < kv.block_size ? num_keys - b0 : kv.block_size;
    for (int j = 0; j < n; ++j) {
      const float* vr = vb + j * kv.stride;
      __m512 vv[V];
#pragma GCC unroll 8
      for (int w = 0; w < V - 1; ++w) vv[w] = _mm512_loadu_ps(vr + kVec * w);
      vv[V - 1] = _mm512_maskz_loadu_ps(tail, vr + kVec * (V - 1));
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        const __m512 pb = _mm512_set1_ps(pk[r * p_row + j * p_key]);
#pragma GCC unroll 8
        for (int w = 0; w < V; ++w) c[r][w] = _mm512_fmadd_ps(pb, vv[w], c[r][w]);
      }
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
    float* ar = acc + static_cast<std::int64_t>(r) * head_size + d0;
#pragma GCC unroll 8
    for (int w = 0; w < V - 1; ++w) _mm512_storeu_ps(ar + kVec * w, c[r][w]);
    _mm512_mask_storeu_ps(ar + kVec * (V - 1), tail, c[r][V - 1]);
  }
}

// Head-size columns in tiles of up to 4 vectors (16 accumulators for 4 rows).
template <int R>
void pv_rows(const float* p, std::int64_t p_row, std::int64_t p_key, const float* alpha,
             const KeyBlocks& kv, int num_keys, float* acc, int head_size) {
  int d0 = 0;
  const __mmask16 all = lanes(kVec);
  for (; d0 + 4 * kVec <= head_size; d0 += 4 * kVec)
    pv_tile<R, 4>(p, p_row, p_key, alpha, kv, num_keys, acc, head_size, d0, all);
  const int rest = head_size - d0;
  if (rest <= 0) return;
  const int vecs = (rest + kVec - 1) / kVec;
  const __mmask16 tail = lanes(rest - (vecs - 1) * kVec);
  switch (vecs) {
    case 3:
      pv_tile<R, 3>(p, p_row, p_key, alpha, kv, num_keys, acc, head_size, d0, tail);
      break;
    case 2:
      pv_tile<R, 2>(p, p_row, p_key, alpha, kv, num_keys, acc, head_size, d0, tail);
      break;
    default:
      pv_tile<R, 1>(p, p_row, p_key, alpha, kv, num_keys, acc, head_size, d0, tail);
      break;
  }
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
  const int rp = padded_rows<kVec>(rows);
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
  const int rv_total = rp / kVec;
  for (int rv0 = 0; rv0 < rv_total;) {
    const int nv = rv_total - rv0 < 4 ? rv_total - rv0 : 4;
    switch (nv) {
      case 4:
        qk_keys<4, 4>(qt, rp, rv0, kv, num_keys, head_size, st);
        break;
      case 3:
        qk_keys<8, 3>(qt, rp, rv0, kv, num_keys, head_size, st);
        break;
      case 2:
        qk_keys<8, 2>(qt, rp, rv0, kv, num_keys, head_size, st);
        break;
      default:
        qk_keys<16, 1>(qt, rp, rv0, kv, num_keys, head_size, st);
        break;
    }
    rv0 += nv;
  }

  const __m512 vneg = _mm512_set1_ps(-INFINITY);
  for (int rv = 0; rv < rv_total; ++rv) {
    const __m512 m_old = _mm512_loadu_ps(mp + rv * kVec);
    const __m512i kbv = _mm512_loadu_si512(kb + rv * kVec);
    const __m512i kev = _mm512_loadu_si512(ke + rv * kVec);
    __m512 mx = vneg;
    __mmask16 nan_rows = 0;
    for (int j = 0; j < num_keys; ++j) {
      float* sj = st + static_cast<std::int64_t>(j) * rp + rv * kVec;
      const __m512i jv = _mm512_set1_epi32(j);
      // valid: key_begin <= j < key_end
      const __mmask16 valid = _mm512_cmple_epi32_mask(kbv, jv) & _mm512_cmpgt_epi32_mask(kev, jv);
      const __m512 x = _mm512_mask_loadu_ps(vneg, valid, sj);
      _mm512_storeu_ps(sj, x);
      mx = _mm512_max_ps(mx, x);
      nan_rows |= _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
    }
    // A NaN score makes its row's maximum NaN, hence its output NaN.
    const __m512 m_new =
        _mm512_mask_mov_ps(_mm512_max_ps(m_old, mx), nan_rows, _mm512_set1_ps(NAN));
    // A row with no key yet (m_old = -inf) has nothing to rescale.
    const __mmask16 had_keys = _mm512_cmp_ps_mask(m_old, vneg, _CMP_GT_OQ);
    const __m512 a = _mm512_maskz_mov_ps(had_keys, exp_ps(_mm512_sub_ps(m_old, m_new)));
    __m512 sum = _mm512_setzero_ps();
    for (int j = 0; j < num_keys; ++j) {
      float* sj = st + static_cast<std::int64_t>(j) * rp + rv * kVec;
      const __m512 x = _mm512_loadu_ps(sj);
      const __mmask16 valid = _mm512_cmp_ps_mask(x, vneg, _CMP_NEQ_UQ);  // masked keys only
      const __m512 pj = _mm512_maskz_mov_ps(valid, exp_ps(_mm512_sub_ps(x, m_new)));
      _mm512_storeu_ps(sj, pj);
      sum = _mm512_add_ps(sum, pj);
    }
    // Rows that still saw no key keep alpha 1 so that their (zero) state stays as it is.
    const __mmask16 has_max = _mm512_cmp_ps_mask(m_new, vneg, _CMP_GT_OQ);
    _mm512_storeu_ps(alpha + rv * kVec, _mm512_mask_mov_ps(_mm512_set1_ps(1.0f), has_max, a));
    _mm512_storeu_ps(lp + rv * kVec, _mm512_fmadd_ps(_mm512_loadu_ps(lp + rv * kVec), a, sum));
    _mm512_storeu_ps(mp + rv * kVec, m_new);
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
  const int np = (num_keys + kVec - 1) / kVec * kVec;
  float* s = scratch;
  float* alpha = s + static_cast<std::int64_t>(rows) * np;
  const float neg_inf = -INFINITY;
  for (int r = 0; r < rows; ++r) {
    const float* qr = q + static_cast<std::int64_t>(r) * head_size;
    float* sr = s + static_cast<std::int64_t>(r) * np;
    for_each_key(kv, key_begin[r], key_end[r], [&](int j, const float* kr) {
      __m512 c0 = _mm512_setzero_ps();
      __m512 c1 = _mm512_setzero_ps();
      int d = 0;
      for (; d + 2 * kVec <= head_size; d += 2 * kVec) {
        c0 = _mm512_fmadd_ps(_mm512_loadu_ps(qr + d), _mm512_loadu_ps(kr + d), c0);
        c1 = _mm512_fmadd_ps(_mm512_loadu_ps(qr + d + kVec), _mm512_loadu_ps(kr + d + kVec), c1);
      }
      for (; d < head_size; d += kVec) {
        const __mmask16 mask = lanes(head_size - d);
        c0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, qr + d),
                             _mm512_maskz_loadu_ps(mask, kr + d), c0);
      }
      sr[j] = _mm512_reduce_add_ps(_mm512_add_ps(c0, c1));
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
    const __m512 vmax = _mm512_set1_ps(m_new);
    const __m512 vneg = _mm512_set1_ps(neg_inf);
    __m512 sum = _mm512_setzero_ps();
    for (int j = 0; j < np; j += kVec) {
      const __m512 x = _mm512_loadu_ps(sr + j);
      const __mmask16 valid = _mm512_cmp_ps_mask(x, vneg, _CMP_NEQ_UQ);  // masked keys only
      const __m512 pj = _mm512_maskz_mov_ps(valid, exp_ps(_mm512_sub_ps(x, vmax)));
      _mm512_storeu_ps(sr + j, pj);
      sum = _mm512_add_ps(sum, pj);
    }
    l[r] = l[r] * alpha[r] + _mm512_reduce_add_ps(sum);
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

AttentionCpuKernels attention_cpu_kernels_avx512() {
  AttentionCpuKernels k = attention_cpu_kernels_avx2();
  k.pack_query = &pack_query;
  k.attend_block = &attend_block;
  return k;
}

}  // namespace aphrodite::detail
