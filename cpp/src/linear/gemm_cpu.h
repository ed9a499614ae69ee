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
// Decode-sized calls (few rows) run through the same kernels; with a prepacked weight each panel
// is streamed once per call, with packing per call the packing costs as much as the product.
//
// The kernels exist twice with one contract: *_scalar (portable, gemm_cpu.cpp) and *_avx2
// (AVX2/FMA, gemm_f32_avx2.cpp). The structs here are plain data so that the AVX2 file needs no
// templates shared with the rest of the library.
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
// Packs `nr` (<= kGemmNr) rows of W starting at `w` (row stride ldw), `kc` values each, into
// dst[kc][kGemmNr]; features nr.. are zero.
using PackPanelFn = void (*)(const float* w, std::int64_t ldw, std::int64_t nr, std::int64_t kc,
                             float* dst);

void gemm_block_f32_scalar(const GemmBlock& block);
void pack_panel_f32_scalar(const float* w, std::int64_t ldw, std::int64_t nr, std::int64_t kc,
                           float* dst);
#if defined(__x86_64__) || defined(_M_X64)
void gemm_block_f32_avx2(const GemmBlock& block);
void pack_panel_f32_avx2(const float* w, std::int64_t ldw, std::int64_t nr, std::int64_t kc,
                         float* dst);
#endif

enum class CpuIsa { kScalar, kAvx2 };

// The best kernel set this CPU runs (AVX2 and FMA, else scalar).
CpuIsa best_cpu_isa();
const char* cpu_isa_name(CpuIsa isa);

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
  std::int64_t m, n, k;
  Activation act;
};

// Runs the whole GEMM on the core's thread pool with the kernels of `isa`.
void gemm_f32(const GemmF32Args& args, CpuIsa isa);

// Packs W [n, k] (row stride ldw) into ceil(n / kGemmNr) panels of k * kGemmNr floats at dst.
void pack_weight_f32(const float* w, std::int64_t ldw, std::int64_t n, std::int64_t k, float* dst,
                     CpuIsa isa);

}  // namespace aphrodite::detail
