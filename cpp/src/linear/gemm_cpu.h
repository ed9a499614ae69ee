// Internal interface of the CPU float32 GEMM behind aphrodite::linear.
//
// C[M, N] = act(A[M, K] @ W[N, K]^T + bias). The driver (gemm_cpu.cpp) splits C into tasks of
// row blocks x column slabs for the core's thread pool; per K chunk a task packs its slab of W
// into panels of kGemmNr features ([kc][kGemmNr], k-major, zero-padded past N) unless the weight
// came prepacked in the same layout, then calls a block kernel that walks the slab in
// kGemmMr x kGemmNr register tiles, reading A in place. On the last K chunk the kernel adds the
// bias and applies the activation before it stores the tile, so C is written once per chunk and
// never re-read for the epilogue.
//
// Decode-sized calls without a prepacked weight run through the same path (packing per call then
// costs about as much as the product). Decode-sized calls (up to 64 rows) with a prepacked weight
// take the whole K in one chunk and walk the slab one pair of panels at a time, so that each panel
// is one contiguous stream read from memory once (the row strips after the first find it in L2) and
// C is written once.
//
// SwiGLU: the panels interleave gate and up (gate panel q, up panel q, ...), slabs hold whole
// pairs, and a task computes its block of both into a per-thread scratch tile, then writes
// silu(gate + bg) * (up + bu) to C (the swiglu kernel) while that tile is still in cache.
//
// The kernels exist three times with one contract: *_scalar (portable, gemm_cpu.cpp), *_avx2
// (AVX2/FMA, gemm_f32_avx2.cpp) and *_avx512 (gemm_f32_avx512.cpp; it reuses the AVX2 packing
// and SwiGLU kernels, which are memory-bound); for prefill-sized products the block kernel also
// exists as *_amx (gemm_f32_amx.cpp: AMX tiles, float32 accuracy from split bfloat16 parts). The
// structs here are plain data so that the AVX2 file needs no templates shared with the rest of the
// library.
#pragma once

#include <cstdint>

#include "aphrodite/linear.h"

namespace aphrodite::detail {

constexpr int kGemmMr = 6;   // rows of a register tile
constexpr int kGemmNr = 16;  // columns of a register tile = features per packed panel
static_assert(kGemmNr == PackedWeight::kPanelWidth, "packed weights use the kernel's panels");

// Activation codes as the kernels see them (same values as aphrodite::Activation).
enum GemmActivation : int {
  kGemmActNone = static_cast<int>(Activation::kNone),
  kGemmActGeluErf = static_cast<int>(Activation::kGeluErf),
  kGemmActGeluTanh = static_cast<int>(Activation::kGeluTanh),
  kGemmActQuickGelu = static_cast<int>(Activation::kQuickGelu),
};

// One K chunk of one task: rows [0, m) of `a` against columns [0, n) of the slab, which span
// ceil(n / kGemmNr) packed panels.
struct GemmBlock {
  const float* a;  // A at (first row, first k of the chunk)
  std::int64_t lda;
  const float* panels;        // first panel at (first k of the chunk)
  std::int64_t panel_stride;  // floats between consecutive panels
  std::int64_t m;             // rows
  std::int64_t n;             // valid columns across the panels (<= num_panels * kGemmNr)
  std::int64_t kc;            // depth of the chunk
  float* c;                   // C at (first row, first column of the slab)
  std::int64_t ldc;
  const float* bias;  // bias at the slab's first column, or nullptr
  int accumulate;     // add to C (an earlier chunk wrote it) instead of overwriting
  int finish;         // last chunk: apply bias and activation
  int act;            // GemmActivation
};

using GemmBlockFn = void (*)(const GemmBlock& block);
// out[j] = silu(gate[j] + bias_gate[j]) * (up[j] + bias_up[j]) for j < n (biases may be null).
using SwigluFn = void (*)(const float* gate, const float* up, const float* bias_gate,
                          const float* bias_up, float* out, std::int64_t n);
// Packs `nr` (<= kGemmNr) rows of W starting at `w` (row stride ldw), `kc` values each, into
// dst[kc][kGemmNr]; features nr.. are zero.
using PackPanelFn = void (*)(const float* w, std::int64_t ldw, std::int64_t nr, std::int64_t kc,
                             float* dst);

void gemm_block_f32_scalar(const GemmBlock& block);
void pack_panel_f32_scalar(const float* w, std::int64_t ldw, std::int64_t nr, std::int64_t kc,
                           float* dst);
void swiglu_f32_scalar(const float* gate, const float* up, const float* bias_gate,
                       const float* bias_up, float* out, std::int64_t n);
#if defined(__x86_64__) || defined(_M_X64)
void gemm_block_f32_avx2(const GemmBlock& block);
void pack_panel_f32_avx2(const float* w, std::int64_t ldw, std::int64_t nr, std::int64_t kc,
                         float* dst);
void swiglu_f32_avx2(const float* gate, const float* up, const float* bias_gate,
                     const float* bias_up, float* out, std::int64_t n);
void gemm_block_f32_avx512(const GemmBlock& block);
#endif
#ifdef APHRODITE_HAVE_AMX_KERNELS
// The AMX path (gemm_f32_amx.cpp): float32 products on the bfloat16 tiles, each operand split into
// three bfloat16 parts. The driver splits x and the packed weight once per call into part tiles,
// chunk by chunk of kAmxChunk values of K: for each chunk, three planes (one per part) of
// [tile][kAmxSteps][16][32] bfloat16, where a tile is 16 rows of x (groups: amx_groups(m)) or one
// panel of W (pair-interleaved along K; padded to an even count: amx_padded_panels). Zeros past
// the rows, panels and K.
constexpr std::int64_t kAmxChunk = 1024;
constexpr std::int64_t kAmxSteps = kAmxChunk / 32;
std::int64_t amx_groups(std::int64_t rows);
std::int64_t amx_padded_panels(std::int64_t panels);
// bfloat16 values of the parts of `tiles` groups or padded panels over all chunks of k.
std::int64_t amx_parts_elems(std::int64_t tiles, std::int64_t k);
// Splits groups [group0, group1) of x [m, k] (row stride lda) into parts (of `groups` groups).
void amx_split_a(const float* a, std::int64_t lda, std::int64_t m, std::int64_t k,
                 std::int64_t groups, std::int64_t group0, std::int64_t group1,
                 std::uint16_t* parts);
// Splits panels [panel0, panel1) of a packed weight (n_panels panels of k * kGemmNr floats) into
// parts (of padded_panels panels).
void amx_split_w(const float* packed, std::int64_t n_panels, std::int64_t k,
                 std::int64_t padded_panels, std::int64_t panel0, std::int64_t panel1,
                 std::uint16_t* parts);
// One K chunk of one task: rows [16 * group0, + rows) of C by the slab of `panels` panels from
// panel0 (n valid columns), from the split operands.
struct AmxBlock {
  const std::uint16_t* a_parts;
  std::int64_t groups;  // of all of x (the parts' layout)
  std::int64_t group0;  // the block's first group of 16 rows (even)
  std::int64_t rows;
  const std::uint16_t* w_parts;
  std::int64_t padded_panels;  // of all of W (the parts' layout)
  std::int64_t panel0;         // the slab's first panel (even)
  std::int64_t panels;
  std::int64_t n;      // valid columns from the slab's first one
  std::int64_t k;      // all of K
  std::int64_t chunk;  // which chunk of K
  float* c;            // C at the block's first row and the slab's first column
  std::int64_t ldc;
  const float* bias;  // at the slab's first column, or nullptr
  int accumulate;     // add to C (an earlier chunk wrote it)
  int finish;         // last chunk: apply bias and activation
  int act;            // GemmActivation
};
void gemm_block_parts_amx(const AmxBlock& block);
#endif

// Ordered: a CPU that runs one set runs all the ones before it. kAmx is kAvx512 with the AMX
// kernel for products of at least kAmxMinRows rows (prefill-sized).
enum class CpuIsa { kScalar, kAvx2, kAvx512, kAmx };

// Rows from which the kAmx set multiplies on the AMX tiles (with a prepacked weight): below,
// splitting the weight into its bfloat16 parts costs about what the tiles gain over AVX-512 (at
// 128 rows AMX was 0.8-1.1x the AVX-512 GEMM with the weight in cache, 1.0-1.15x streaming it; at
// 256 rows 1.1-1.45x).
constexpr std::int64_t kAmxMinRows = 256;

// The best kernel set this CPU runs (AMX-BF16 with the kernel's permission and the AMX kernels
// built, else AVX-512 F/BW/DQ/VL with FMA, else AVX2 and FMA, else scalar).
CpuIsa best_cpu_isa();
// The set linear() uses: APHRODITE_CPU_ISA (read once) or set_linear_cpu_isa(), else the best.
CpuIsa active_cpu_isa();
void set_active_cpu_isa(CpuIsa isa);
const char* cpu_isa_name(CpuIsa isa);
// "amx" / "avx512" / "avx2" / "scalar" / "auto"; ValueError for other names or sets this CPU
// lacks.
CpuIsa parse_cpu_isa(const char* name);

struct GemmF32Args {
  const float* a;
  std::int64_t lda;
  // Exactly one of: the weight as [N, K] with row stride ldw, or prepacked panels.
  const float* w;
  std::int64_t ldw;
  const float* packed_w;
  const float* bias;  // [N] or nullptr
  float* c;
  std::int64_t ldc;
  std::int64_t m, n, k;  // n: rows of W (with kSwiGlu, C has n / 2 columns)
  Activation act;
};

// Runs the whole GEMM on the core's thread pool with the kernels of `isa`.
void gemm_f32(const GemmF32Args& args, CpuIsa isa);

// Panels W [n, k] packs into (gated: both halves rounded up to whole panels separately).
std::int64_t packed_panels(std::int64_t n, bool gated);

// Packs W [n, k] (row stride ldw) into packed_panels(n, gated) panels of k * kGemmNr floats at
// dst; gated: the gate/up interleaved order of kSwiGlu.
void pack_weight_f32(const float* w, std::int64_t ldw, std::int64_t n, std::int64_t k, bool gated,
                     float* dst, CpuIsa isa);

}  // namespace aphrodite::detail
