// AVX-512 kernels of the CPU GEMM (contract in gemm_cpu.h). Compiled with -mavx512f/bw/dq/vl and
// -mfma; only called after best_cpu_isa() saw those features. Plain functions and intrinsics only.
//
// A packed panel row (16 features) is exactly one zmm register, so a register tile spans two
// panels: 12 rows x 32 columns = 24 accumulators, 2 weight loads and 12 broadcasts per k, which
// keeps both FMA ports busy while the loads stay under two per cycle.
#include <cstdint>

#include "internal/avx512_intrinsics.h"
#include "linear/gemm_avx512_epilogue.h"
#include "linear/gemm_cpu.h"

namespace aphrodite::detail {

namespace {

constexpr int kTileRows = 12;
// How far ahead along k (in cache lines of a panel) the tile prefetches the weight.
constexpr std::int64_t kPrefetchK = 32;

// One MR x (NP * 16) register tile over `kc` values of k, NP consecutive panels of the slab.
// `valid` (columns of C that exist from this tile's first column) masks C and bias; the packed
// panels are zero-padded, so the product needs no mask.
template <int MR, int NP>
inline void tile(const GemmBlock& b, const float* a, const float* panel, float* c,
                 std::int64_t valid, const float* bias) {
  __m512 acc[NP][MR];
  __mmask16 mask[NP];
#pragma GCC unroll 2
  for (int p = 0; p < NP; ++p) mask[p] = column_mask(valid - 16 * p);
  if (b.accumulate) {
#pragma GCC unroll 12
    for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 2
      for (int p = 0; p < NP; ++p)
        acc[p][i] = _mm512_maskz_loadu_ps(mask[p], c + i * b.ldc + 16 * p);
    }
  } else {
#pragma GCC unroll 12
    for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 2
      for (int p = 0; p < NP; ++p) acc[p][i] = _mm512_setzero_ps();
    }
  }

  const std::int64_t lda = b.lda;
  const std::int64_t stride = b.panel_stride;
  for (std::int64_t k = 0; k < b.kc; ++k) {
    __m512 w[NP];
#pragma GCC unroll 2
    for (int p = 0; p < NP; ++p) {
      // Each panel is a stream of one cache line per k; asking for the line kPrefetchK steps
      // ahead keeps the memory busy while the multiply-adds of a few-row call run (decode: 16
      // rows read the weight 1.2x faster with it; prefetches past a panel's end are harmless).
      _mm_prefetch(reinterpret_cast<const char*>(panel + p * stride + (k + kPrefetchK) * kGemmNr),
                   _MM_HINT_T0);
      w[p] = _mm512_load_ps(panel + p * stride + k * kGemmNr);
    }
#pragma GCC unroll 12
    for (int i = 0; i < MR; ++i) {
      const __m512 av = _mm512_set1_ps(a[i * lda + k]);
#pragma GCC unroll 2
      for (int p = 0; p < NP; ++p) acc[p][i] = _mm512_fmadd_ps(av, w[p], acc[p][i]);
    }
  }

  if (b.finish) {
    if (bias != nullptr) {
#pragma GCC unroll 2
      for (int p = 0; p < NP; ++p) {
        const __m512 bv = _mm512_maskz_loadu_ps(mask[p], bias + 16 * p);
#pragma GCC unroll 12
        for (int i = 0; i < MR; ++i) acc[p][i] = _mm512_add_ps(acc[p][i], bv);
      }
    }
    if (b.act != kGemmActNone) {
#pragma GCC unroll 12
      for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 2
        for (int p = 0; p < NP; ++p) acc[p][i] = activate_ps(acc[p][i], b.act);
      }
    }
  }

#pragma GCC unroll 12
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 2
    for (int p = 0; p < NP; ++p) _mm512_mask_storeu_ps(c + i * b.ldc + 16 * p, mask[p], acc[p][i]);
  }
}

template <int MR>
void row_strip(const GemmBlock& b, std::int64_t i0) {
  const float* a = b.a + i0 * b.lda;
  float* c = b.c + i0 * b.ldc;
  std::int64_t j0 = 0;
  // Two panels while a second one exists (more than 16 columns left), then the last one alone.
  for (; j0 + kGemmNr < b.n; j0 += 2 * kGemmNr) {
    tile<MR, 2>(b, a, b.panels + (j0 / kGemmNr) * b.panel_stride, c + j0, b.n - j0,
                b.bias != nullptr ? b.bias + j0 : nullptr);
  }
  if (j0 < b.n) {
    tile<MR, 1>(b, a, b.panels + (j0 / kGemmNr) * b.panel_stride, c + j0, b.n - j0,
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

void gemm_block_f32_avx512(const GemmBlock& b) {
  // Strips of even height (16 rows: 8 + 8, not 12 + 4): a short strip does few FMAs per weight
  // load, and at decode-like row counts it would be a large share of the work.
  const std::int64_t strips = (b.m + kTileRows - 1) / kTileRows;
  if (strips == 0) return;
  const std::int64_t base = b.m / strips, taller = b.m % strips;
  std::int64_t i0 = 0;
  for (std::int64_t s = 0; s < strips; ++s) {
    const std::int64_t rows = base + (s < taller ? 1 : 0);
    strip_of_height<kTileRows>(b, i0, rows);
    i0 += rows;
  }
}

}  // namespace aphrodite::detail
