// AVX2/FMA/F16C build of the CPU attention inner kernels (see attention_cpu_kernels.h). Only
// reached after the driver checked the CPU's features; raw pointers and intrinsics only.
#include <immintrin.h>
#include <math.h>

#include <cstdint>

#include "attention/attention_cpu_kernels.h"

namespace aphrodite::detail {

namespace {

// exp(x) for float32 lanes (Cephes polynomial, relative error ~1e-7); -inf and very negative
// inputs give 0.
inline __m256 exp256(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-88.3762626647949f)),
                    _mm256_set1_ps(88.3762626647949f));
  __m256 fx = _mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f));
  fx = _mm256_floor_ps(fx);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), x);
  y = _mm256_add_ps(y, _mm256_set1_ps(1.0f));
  const __m256i e =
      _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

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

// s[r][j0 .. j0 + 8V) = q[r] . kt[:, j0 .. j0 + 8V) for R rows; kt is [head_size][np].
template <int R, int V>
void qk_tile(const float* q, int head_size, const float* kt, int np, int j0, float* s) {
  __m256 c[R][V];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) c[r][v] = _mm256_setzero_ps();
  for (int d = 0; d < head_size; ++d) {
    __m256 kv[V];
    for (int v = 0; v < V; ++v)
      kv[v] = _mm256_loadu_ps(kt + static_cast<std::int64_t>(d) * np + j0 + 8 * v);
    for (int r = 0; r < R; ++r) {
      const __m256 qb = _mm256_broadcast_ss(q + static_cast<std::int64_t>(r) * head_size + d);
      for (int v = 0; v < V; ++v) c[r][v] = _mm256_fmadd_ps(qb, kv[v], c[r][v]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v)
      _mm256_storeu_ps(s + static_cast<std::int64_t>(r) * np + j0 + 8 * v, c[r][v]);
}

template <int R>
void qk_rows(const float* q, int head_size, const float* kt, int np, float* s) {
  int j0 = 0;
  for (; j0 + 16 <= np; j0 += 16) qk_tile<R, 2>(q, head_size, kt, np, j0, s);
  if (j0 < np) qk_tile<R, 1>(q, head_size, kt, np, j0, s);
}

// acc[r][d0 .. d0 + 8V) = alpha[r] * acc[r][...] + sum_j p[r][j] * v[j][...] for R rows.
template <int R, int V>
void pv_tile(const float* p, int np, const float* alpha, const float* v, std::int64_t kv_stride,
             int num_keys, float* acc, int head_size, int d0) {
  __m256 c[R][V];
  for (int r = 0; r < R; ++r) {
    const __m256 a = _mm256_broadcast_ss(alpha + r);
    for (int w = 0; w < V; ++w)
      c[r][w] = _mm256_mul_ps(
          a, _mm256_loadu_ps(acc + static_cast<std::int64_t>(r) * head_size + d0 + 8 * w));
  }
  for (int j = 0; j < num_keys; ++j) {
    __m256 vv[V];
    for (int w = 0; w < V; ++w) vv[w] = _mm256_loadu_ps(v + j * kv_stride + d0 + 8 * w);
    for (int r = 0; r < R; ++r) {
      const __m256 pb = _mm256_broadcast_ss(p + static_cast<std::int64_t>(r) * np + j);
      for (int w = 0; w < V; ++w) c[r][w] = _mm256_fmadd_ps(pb, vv[w], c[r][w]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int w = 0; w < V; ++w)
      _mm256_storeu_ps(acc + static_cast<std::int64_t>(r) * head_size + d0 + 8 * w, c[r][w]);
}

template <int R>
void pv_rows(const float* p, int np, const float* alpha, const float* v, std::int64_t kv_stride,
             int num_keys, float* acc, int head_size) {
  int d0 = 0;
  for (; d0 + 16 <= head_size; d0 += 16)
    pv_tile<R, 2>(p, np, alpha, v, kv_stride, num_keys, acc, head_size, d0);
  if (d0 < head_size) pv_tile<R, 1>(p, np, alpha, v, kv_stride, num_keys, acc, head_size, d0);
}

// Rows from which the transposed-K tiles pay off; below it each score is one dot product.
constexpr int kTransposeRows = 8;

void attend_block(const float* q, int rows, int head_size, const float* k, const float* v,
                  std::int64_t kv_stride, int num_keys, const int* key_begin, const int* key_end,
                  float* m, float* l, float* acc, float* scratch) {
  const int np = (num_keys + 7) / 8 * 8;
  float* kt = scratch;
  float* s = kt + static_cast<std::int64_t>(np) * head_size;
  float* alpha = s + static_cast<std::int64_t>(rows) * np;
  const float neg_inf = -INFINITY;

  if (rows >= kTransposeRows) {
    for (int j = 0; j < np; ++j) {
      const float* kr = k + j * kv_stride;
      for (int d = 0; d < head_size; ++d) {
        kt[static_cast<std::int64_t>(d) * np + j] = j < num_keys ? kr[d] : 0.0f;
      }
    }
    int r = 0;
    for (; r + 4 <= rows; r += 4) {
      qk_rows<4>(q + static_cast<std::int64_t>(r) * head_size, head_size, kt, np,
                 s + static_cast<std::int64_t>(r) * np);
    }
    for (; r < rows; ++r) {
      qk_rows<1>(q + static_cast<std::int64_t>(r) * head_size, head_size, kt, np,
                 s + static_cast<std::int64_t>(r) * np);
    }
  } else {
    for (int r = 0; r < rows; ++r) {
      const float* qr = q + static_cast<std::int64_t>(r) * head_size;
      float* sr = s + static_cast<std::int64_t>(r) * np;
      for (int j = key_begin[r]; j < key_end[r]; ++j) {
        const float* kr = k + j * kv_stride;
        __m256 c0 = _mm256_setzero_ps();
        __m256 c1 = _mm256_setzero_ps();
        int d = 0;
        for (; d + 16 <= head_size; d += 16) {
          c0 = _mm256_fmadd_ps(_mm256_loadu_ps(qr + d), _mm256_loadu_ps(kr + d), c0);
          c1 = _mm256_fmadd_ps(_mm256_loadu_ps(qr + d + 8), _mm256_loadu_ps(kr + d + 8), c1);
        }
        if (d < head_size)
          c0 = _mm256_fmadd_ps(_mm256_loadu_ps(qr + d), _mm256_loadu_ps(kr + d), c0);
        sr[j] = hsum(_mm256_add_ps(c0, c1));
      }
    }
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
    float block_max = neg_inf;
    for (int j = 0; j < np; ++j) {
      if (j < jb || j >= je) {
        sr[j] = neg_inf;
      } else if (sr[j] > block_max) {
        block_max = sr[j];
      }
    }
    const float m_new = m[r] > block_max ? m[r] : block_max;
    alpha[r] = m[r] == neg_inf ? 0.0f : expf(m[r] - m_new);
    const __m256 vmax = _mm256_set1_ps(m_new);
    const __m256 vneg = _mm256_set1_ps(neg_inf);
    __m256 sum = _mm256_setzero_ps();
    for (int j = 0; j < np; j += 8) {
      const __m256 x = _mm256_loadu_ps(sr + j);
      const __m256 valid = _mm256_cmp_ps(x, vneg, _CMP_GT_OQ);
      const __m256 pj = _mm256_and_ps(exp256(_mm256_sub_ps(x, vmax)), valid);
      _mm256_storeu_ps(sr + j, pj);
      sum = _mm256_add_ps(sum, pj);
    }
    l[r] = l[r] * alpha[r] + hsum(sum);
    m[r] = m_new;
  }

  int r = 0;
  for (; r + 4 <= rows; r += 4) {
    pv_rows<4>(s + static_cast<std::int64_t>(r) * np, np, alpha + r, v, kv_stride, num_keys,
               acc + static_cast<std::int64_t>(r) * head_size, head_size);
  }
  for (; r < rows; ++r) {
    pv_rows<1>(s + static_cast<std::int64_t>(r) * np, np, alpha + r, v, kv_stride, num_keys,
               acc + static_cast<std::int64_t>(r) * head_size, head_size);
  }
}

}  // namespace

AttentionCpuKernels attention_cpu_kernels_avx2() {
  return {&rows_to_f32, &row_from_f32, &attend_block};
}

}  // namespace aphrodite::detail
