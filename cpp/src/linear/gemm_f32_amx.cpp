// AMX kernel of the CPU GEMM (contract in gemm_cpu.h): float32 products of float32 accuracy on the
// bfloat16 tile units. Compiled with -mamx-tile/-mamx-bf16/-mavx512bf16 besides the AVX-512 flags;
// only called after cpu_features() saw AMX-BF16 and got the tile state from the OS.
//
// AMX multiplies bfloat16 only. Each float32 operand is split into three bfloat16 parts,
// x = x0 + x1 + x2 exactly (each part rounds what the earlier ones left to 8 significant bits, so
// the three hold all 24), and a . b is the sum of six of the nine part products:
// a0b0 + a0b1 + a1b0 + a0b2 + a1b1 + a2b0. The three left out are below 2^-24 |a||b|, float32's
// own rounding, and the tile unit accumulates in float32: the result has a float32 GEMM's
// accuracy (the tests hold it to the AVX-512 kernels' bound against float64), for six bfloat16
// products per multiply-add, which AMX runs at about 16 times the AVX-512 float32 rate.
// Not kept: denormal inputs (the bfloat16 conversion reads them as zero, an error below 1e-38
// |b| per product), and magnitudes above bfloat16's largest finite value (3.39e38) or infinite
// ones, whose split gives NaN where float32 products might give +-inf.
//
// A call splits each operand once: the rows of x, and the packed panels of W, into tiles of their
// three parts per K chunk (amx_split_a / amx_split_w, run across the thread pool by the driver).
// Then each task's chunk (gemm_block_parts_amx) computes every 32 x 32 block of its part of C in
// four float32 accumulator tiles, fed per 32 of K by two tiles of A and two of W for each part
// product, ordered so that each part of A is loaded once per step (18 tile loads for 24
// products). The accumulators leave through a 32 x 32 buffer in L1, where the AVX-512 epilogue
// adds the earlier chunks' C, the bias and the activation on the way to C (two buffers: a block's
// epilogue runs after the next block's products are issued).
#include <algorithm>
#include <cstdint>

#include "internal/avx512_intrinsics.h"
#include "linear/gemm_avx512_epilogue.h"
#include "linear/gemm_cpu.h"

namespace aphrodite::detail {

namespace {

constexpr int kParts = 3;
constexpr int kTileRows = 16;                   // rows of A, or K pairs of W, per tile
constexpr int kTileK = 32;                      // K values per tile row (bfloat16)
constexpr int kTileElems = kTileRows * kTileK;  // 1 KiB of bfloat16
constexpr int kBlock = 2 * kTileRows;           // a block of C: 2 x 2 accumulator tiles
constexpr int kTileBytesPerRow = 64;

// The tile configuration: palette 1, tiles 0-7 all 16 rows of 64 bytes (accumulators 0-3: 16 x 16
// float32; 4-5: A, 16 rows x 32 bfloat16; 6-7: W, 16 K pairs x 16 columns x 2 bfloat16).
struct alignas(64) TileConfig {
  std::uint8_t palette_id;
  std::uint8_t start_row;
  std::uint8_t reserved[14];
  std::uint16_t colsb[16];
  std::uint8_t rows[16];
};
static_assert(sizeof(TileConfig) == 64, "ldtilecfg reads 64 bytes");

void configure_tiles() {
  TileConfig config{};
  config.palette_id = 1;
  for (int t = 0; t < 8; ++t) {
    config.colsb[t] = kTileBytesPerRow;
    config.rows[t] = kTileRows;
  }
  // Through an asm statement that names the memory it reads: GCC 12's _tile_loadconfig lets the
  // stores above be dropped as dead.
  asm volatile("ldtilecfg %0" ::"m"(config));
}

std::int64_t ceil_div(std::int64_t a, std::int64_t b) { return (a + b - 1) / b; }

// The 32-deep steps chunk c of K holds (the last chunk may hold fewer than kAmxSteps; the parts'
// layout keeps room for kAmxSteps, and the steps past these are neither written nor read).
std::int64_t chunk_steps(std::int64_t k, std::int64_t c) {
  return ceil_div(std::min(k - c * kAmxChunk, kAmxChunk), kTileK);
}

// 16 bfloat16 values (as bits) to float32.
inline __m512 widen(__m256i bits) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}

// 16 float32 values to bfloat16 bits, rounded to nearest even.
inline __m256i narrow(__m512 v) { return (__m256i)_mm512_cvtneps_pbh(v); }

// x = part[0] + part[1] + part[2] exactly, lane by lane: every subtraction is exact (the
// remainder of rounding to 8 bits fits in float32) and the last remainder has at most 8 bits.
inline void split(__m512 x, __m256i (&part)[kParts]) {
  part[0] = narrow(x);
  const __m512 r1 = _mm512_sub_ps(x, widen(part[0]));
  part[1] = narrow(r1);
  part[2] = narrow(_mm512_sub_ps(r1, widen(part[1])));
}

// acc[0..3] += (the two A tiles in 4, 5) x (the W tiles at w and w + next_panel, into 6, 7).
#define APHRODITE_AMX_PRODUCT(w, next_panel)              \
  do {                                                    \
    _tile_loadd(6, (w), kTileBytesPerRow);                \
    _tile_loadd(7, (w) + (next_panel), kTileBytesPerRow); \
    _tile_dpbf16ps(0, 4, 6);                              \
    _tile_dpbf16ps(1, 4, 7);                              \
    _tile_dpbf16ps(2, 5, 6);                              \
    _tile_dpbf16ps(3, 5, 7);                              \
  } while (0)

#define APHRODITE_AMX_LOAD_A(a, next_group)               \
  do {                                                    \
    _tile_loadd(4, (a), kTileBytesPerRow);                \
    _tile_loadd(5, (a) + (next_group), kTileBytesPerRow); \
  } while (0)

// The 32 x 32 block of C at (row0, col0) of the task's block from its accumulators in acc: plus
// C's earlier chunks, and on the last chunk plus bias, then the activation; rows and columns past
// the block's edges are dropped.
void store_block(const AmxBlock& b, const float (*acc)[kBlock], std::int64_t row0,
                 std::int64_t col0) {
  const std::int64_t rows = std::min<std::int64_t>(kBlock, b.rows - row0);
  for (int h = 0; h < 2; ++h) {
    const std::int64_t col = col0 + 16 * h;
    const __mmask16 mask = column_mask(b.n - col);
    if (mask == 0) continue;
    const __m512 bias = b.finish && b.bias != nullptr ? _mm512_maskz_loadu_ps(mask, b.bias + col)
                                                      : _mm512_setzero_ps();
    for (std::int64_t i = 0; i < rows; ++i) {
      float* c = b.c + (row0 + i) * b.ldc + col;
      __m512 v = _mm512_load_ps(acc[i] + 16 * h);
      if (b.accumulate) v = _mm512_add_ps(_mm512_maskz_loadu_ps(mask, c), v);
      if (b.finish) v = activate_ps(_mm512_add_ps(v, bias), b.act);
      _mm512_mask_storeu_ps(c, mask, v);
    }
  }
}

}  // namespace

std::int64_t amx_groups(std::int64_t rows) { return 2 * ceil_div(rows, kBlock); }

std::int64_t amx_padded_panels(std::int64_t panels) { return 2 * ceil_div(panels, 2); }

std::int64_t amx_parts_elems(std::int64_t tiles, std::int64_t k) {
  return ceil_div(k, kAmxChunk) * kParts * tiles * kAmxSteps * kTileElems;
}

void amx_split_a(const float* a, std::int64_t lda, std::int64_t m, std::int64_t k,
                 std::int64_t groups, std::int64_t group0, std::int64_t group1,
                 std::uint16_t* parts) {
  const std::int64_t plane = groups * kAmxSteps * kTileElems;
  for (std::int64_t c = 0; c * kAmxChunk < k; ++c) {
    std::uint16_t* chunk = parts + c * kParts * plane;
    const std::int64_t steps = chunk_steps(k, c);
    for (std::int64_t g = group0; g < group1; ++g) {
      for (int r = 0; r < kTileRows; ++r) {
        const std::int64_t row = g * kTileRows + r;
        for (std::int64_t s = 0; s < steps; ++s) {
          const std::int64_t k0 = c * kAmxChunk + s * kTileK;
          __m512 lo = _mm512_setzero_ps(), hi = _mm512_setzero_ps();
          if (row < m) {
            const float* src = a + row * lda + k0;
            lo = _mm512_maskz_loadu_ps(column_mask(k - k0), src);
            hi = _mm512_maskz_loadu_ps(column_mask(k - k0 - 16), src + 16);
          }
          __m256i lo_parts[kParts], hi_parts[kParts];
          split(lo, lo_parts);
          split(hi, hi_parts);
          std::uint16_t* t = chunk + (g * kAmxSteps + s) * kTileElems + r * kTileK;
          for (int p = 0; p < kParts; ++p) {
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(t + p * plane), lo_parts[p]);
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(t + p * plane + 16), hi_parts[p]);
          }
        }
      }
    }
  }
}

void amx_split_w(const float* packed, std::int64_t n_panels, std::int64_t k,
                 std::int64_t padded_panels, std::int64_t panel0, std::int64_t panel1,
                 std::uint16_t* parts) {
  const std::int64_t plane = padded_panels * kAmxSteps * kTileElems;
  for (std::int64_t c = 0; c * kAmxChunk < k; ++c) {
    std::uint16_t* chunk = parts + c * kParts * plane;
    const std::int64_t steps = chunk_steps(k, c);
    for (std::int64_t q = panel0; q < panel1; ++q) {
      const float* panel = q < n_panels ? packed + q * k * kGemmNr : nullptr;
      for (std::int64_t s = 0; s < steps; ++s) {
        for (int r = 0; r < kTileRows; ++r) {
          const std::int64_t kk = c * kAmxChunk + s * kTileK + 2 * r;
          __m512 even = _mm512_setzero_ps(), odd = _mm512_setzero_ps();
          if (panel != nullptr && kk < k) even = _mm512_loadu_ps(panel + kk * kGemmNr);
          if (panel != nullptr && kk + 1 < k) odd = _mm512_loadu_ps(panel + (kk + 1) * kGemmNr);
          __m256i even_parts[kParts], odd_parts[kParts];
          split(even, even_parts);
          split(odd, odd_parts);
          std::uint16_t* t = chunk + (q * kAmxSteps + s) * kTileElems + r * kTileK;
          for (int p = 0; p < kParts; ++p) {
            // Feature j's pair is 32-bit lane j: the even k in its low half, the odd one above.
            const __m512i pairs =
                _mm512_or_si512(_mm512_cvtepu16_epi32(even_parts[p]),
                                _mm512_slli_epi32(_mm512_cvtepu16_epi32(odd_parts[p]), 16));
            _mm512_storeu_si512(t + p * plane, pairs);
          }
        }
      }
    }
  }
}

void gemm_block_parts_amx(const AmxBlock& b) {
  if (b.rows <= 0 || b.n <= 0) return;
  const std::int64_t a_plane = b.groups * kAmxSteps * kTileElems;
  const std::int64_t w_plane = b.padded_panels * kAmxSteps * kTileElems;
  const std::int64_t steps = chunk_steps(b.k, b.chunk);
  const std::uint16_t* a_chunk = b.a_parts + b.chunk * kParts * a_plane;
  const std::uint16_t* w_chunk = b.w_parts + b.chunk * kParts * w_plane;
  // Tile offsets, in bfloat16 values: the next group of 16 rows of A, the next panel of W.
  constexpr std::int64_t kNext = kAmxSteps * kTileElems;
  const std::int64_t groups = amx_groups(b.rows);
  // Two accumulator buffers: a block's epilogue runs after the next block's products, by when the
  // tile stores into its buffer have long completed (reading them right away stalls the loads).
  alignas(64) float acc[2][kBlock][kBlock];
  std::int64_t pending_row = -1, pending_col = 0;
  int buffer = 0;
  configure_tiles();
  for (std::int64_t q = 0; q < b.panels; q += 2) {
    for (std::int64_t g = 0; g < groups; g += 2) {
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      const std::uint16_t* a = a_chunk + (b.group0 + g) * kNext;
      const std::uint16_t* w = w_chunk + (b.panel0 + q) * kNext;
      for (std::int64_t s = 0; s < steps; ++s) {
        const std::uint16_t* as = a + s * kTileElems;
        const std::uint16_t* ws = w + s * kTileElems;
        APHRODITE_AMX_LOAD_A(as, kNext);                 // a0
        APHRODITE_AMX_PRODUCT(ws, kNext);                // a0 w0
        APHRODITE_AMX_PRODUCT(ws + w_plane, kNext);      // a0 w1
        APHRODITE_AMX_PRODUCT(ws + 2 * w_plane, kNext);  // a0 w2
        APHRODITE_AMX_LOAD_A(as + a_plane, kNext);       // a1
        APHRODITE_AMX_PRODUCT(ws, kNext);                // a1 w0
        APHRODITE_AMX_PRODUCT(ws + w_plane, kNext);      // a1 w1
        APHRODITE_AMX_LOAD_A(as + 2 * a_plane, kNext);   // a2
        APHRODITE_AMX_PRODUCT(ws, kNext);                // a2 w0
      }
      if (pending_row >= 0) store_block(b, acc[buffer ^ 1], pending_row, pending_col);
      constexpr int kAccStride = kBlock * sizeof(float);
      _tile_stored(0, &acc[buffer][0][0], kAccStride);
      _tile_stored(1, &acc[buffer][0][16], kAccStride);
      _tile_stored(2, &acc[buffer][16][0], kAccStride);
      _tile_stored(3, &acc[buffer][16][16], kAccStride);
      pending_row = g * kTileRows;
      pending_col = q * kGemmNr;
      buffer ^= 1;
    }
  }
  _tile_release();
  if (pending_row >= 0) store_block(b, acc[buffer ^ 1], pending_row, pending_col);
}

#undef APHRODITE_AMX_PRODUCT
#undef APHRODITE_AMX_LOAD_A

}  // namespace aphrodite::detail
