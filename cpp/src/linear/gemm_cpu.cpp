// CPU GEMM driver (task split, packing, K chunks) and the portable scalar kernels.
#include "linear/gemm_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <memory>
#include <new>

#include "aphrodite/parallel.h"

namespace aphrodite::detail {

namespace {

// Depth of a K chunk: a packed slab (kGemmKc x kMaxSlabPanels * kGemmNr floats, 256 KiB) stays
// in L2 while a kGemmMr-row strip of A (6 KiB) stays in L1 across the slab's panels.
constexpr std::int64_t kGemmKc = 256;
constexpr std::int64_t kMaxSlabPanels = 16;
// Row blocks are cut no smaller than this (each block repacks its slab of W) and no larger than
// kMaxRowBlock (so the C block that K chunks accumulate into stays in L2).
constexpr std::int64_t kMinRowBlock = 4 * kGemmMr;
constexpr std::int64_t kMaxRowBlock = 64 * kGemmMr;

float gelu_erf(float x) {
  // 1 + erf(u) == erfc(-u): erfc keeps full relative precision in the negative tail.
  return 0.5f * x * std::erfc(-x * 0.70710678118654752f);
}

float gelu_tanh(float x) {
  // 0.5 * (1 + tanh(y)) == 1 / (1 + exp(-2y)); exp overflowing to inf gives the correct 0.
  float y = 0.7978845608028654f * (x + 0.044715f * x * x * x);
  return x / (1.0f + std::exp(-2.0f * y));
}

float activate(float v, int act) {
  switch (act) {
    case kGemmActGeluErf:
      return gelu_erf(v);
    case kGemmActGeluTanh:
      return gelu_tanh(v);
    default:
      return v;
  }
}

struct FreeDeleter {
  void operator()(float* p) const { std::free(p); }
};

// Per-thread packing buffer, reused across calls (a fresh 256 KiB allocation per task would be
// an mmap and page faults each time).
float* packing_scratch(std::size_t floats) {
  thread_local std::unique_ptr<float, FreeDeleter> buffer;
  thread_local std::size_t capacity = 0;
  if (floats > capacity) {
    std::size_t bytes = (floats * sizeof(float) + 63) / 64 * 64;
    buffer.reset(static_cast<float*>(std::aligned_alloc(64, bytes)));
    if (!buffer) {
      capacity = 0;
      throw std::bad_alloc();
    }
    capacity = floats;
  }
  return buffer.get();
}

struct Kernels {
  GemmBlockFn block;
  PackPanelFn pack;
};

Kernels kernels_for(CpuIsa isa) {
#if defined(__x86_64__) || defined(_M_X64)
  if (isa == CpuIsa::kAvx2) return {gemm_block_f32_avx2, pack_panel_f32_avx2};
#endif
  (void)isa;
  return {gemm_block_f32_scalar, pack_panel_f32_scalar};
}

std::int64_t ceil_div(std::int64_t a, std::int64_t b) { return (a + b - 1) / b; }

}  // namespace

void gemm_block_f32_scalar(const GemmBlock& b) {
  for (std::int64_t i0 = 0; i0 < b.m; i0 += kGemmMr) {
    const int mr = static_cast<int>(std::min<std::int64_t>(kGemmMr, b.m - i0));
    for (std::int64_t j0 = 0; j0 < b.n; j0 += kGemmNr) {
      const int nr = static_cast<int>(std::min<std::int64_t>(kGemmNr, b.n - j0));
      const float* panel = b.panels + (j0 / kGemmNr) * b.panel_stride;
      float* c = b.c + i0 * b.ldc + j0;
      float acc[kGemmMr][kGemmNr] = {};
      if (b.accumulate) {
        for (int i = 0; i < mr; ++i)
          for (int j = 0; j < nr; ++j) acc[i][j] = c[i * b.ldc + j];
      }
      for (std::int64_t k = 0; k < b.kc; ++k) {
        const float* bk = panel + k * kGemmNr;
        for (int i = 0; i < mr; ++i) {
          const float av = b.a[(i0 + i) * b.lda + k];
          for (int j = 0; j < kGemmNr; ++j) acc[i][j] += av * bk[j];
        }
      }
      for (int i = 0; i < mr; ++i) {
        for (int j = 0; j < nr; ++j) {
          float v = acc[i][j];
          if (b.finish) {
            if (b.bias != nullptr) v += b.bias[j0 + j];
            v = activate(v, b.act);
          }
          c[i * b.ldc + j] = v;
        }
      }
    }
  }
}

void pack_panel_f32_scalar(const float* w, std::int64_t ldw, std::int64_t nr, std::int64_t kc,
                           float* dst) {
  for (std::int64_t j = 0; j < kGemmNr; ++j) {
    if (j < nr) {
      const float* row = w + j * ldw;
      for (std::int64_t k = 0; k < kc; ++k) dst[k * kGemmNr + j] = row[k];
    } else {
      for (std::int64_t k = 0; k < kc; ++k) dst[k * kGemmNr + j] = 0.0f;
    }
  }
}

CpuIsa best_cpu_isa() {
#if defined(__x86_64__) || defined(_M_X64)
  static const CpuIsa isa = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? CpuIsa::kAvx2
                                                                           : CpuIsa::kScalar;
  }();
  return isa;
#else
  return CpuIsa::kScalar;
#endif
}

const char* cpu_isa_name(CpuIsa isa) { return isa == CpuIsa::kAvx2 ? "avx2" : "scalar"; }

void gemm_f32(const GemmF32Args& args, CpuIsa isa) {
  const std::int64_t m = args.m, n = args.n, k = args.k;
  if (m == 0 || n == 0) return;
  const Kernels kernels = kernels_for(isa);
  const std::int64_t threads = num_threads();
  const std::int64_t n_panels = ceil_div(n, kGemmNr);

  // Column slabs first (each packs its part of W once per row block); fewer panels per slab when
  // there are not enough slabs for the threads (decode-sized calls split N only).
  std::int64_t slab_panels = std::min(kMaxSlabPanels, n_panels);
  if (ceil_div(n_panels, slab_panels) < threads) {
    slab_panels = std::max<std::int64_t>(1, ceil_div(n_panels, threads));
  }
  const std::int64_t n_slabs = ceil_div(n_panels, slab_panels);
  // Then row blocks, enough for about two tasks per thread (load balance) when M allows.
  std::int64_t m_blocks = std::max<std::int64_t>(1, ceil_div(2 * threads, n_slabs));
  m_blocks = std::min(m_blocks, std::max<std::int64_t>(1, m / kMinRowBlock));
  m_blocks = std::max(m_blocks, ceil_div(m, kMaxRowBlock));
  const std::int64_t row_block = ceil_div(ceil_div(m, m_blocks), kGemmMr) * kGemmMr;
  m_blocks = ceil_div(m, row_block);

  const bool prepacked = args.packed_w != nullptr;
  const int act = static_cast<int>(args.act);

  parallel_run(n_slabs * m_blocks, [&](std::int64_t task) {
    const std::int64_t slab = task % n_slabs;
    const std::int64_t mb = task / n_slabs;
    const std::int64_t p0 = slab * slab_panels;
    const std::int64_t num_panels = std::min(slab_panels, n_panels - p0);
    const std::int64_t n0 = p0 * kGemmNr;
    const std::int64_t slab_n = std::min(num_panels * kGemmNr, n - n0);
    const std::int64_t m0 = mb * row_block;
    const std::int64_t rows = std::min(row_block, m - m0);
    float* scratch =
        prepacked ? nullptr
                  : packing_scratch(static_cast<std::size_t>(
                        std::min(kGemmKc, std::max<std::int64_t>(k, 1)) * num_panels * kGemmNr));

    // At least one chunk, so that K == 0 still writes act(bias).
    std::int64_t pc = 0;
    do {
      const std::int64_t kc = std::min(kGemmKc, k - pc);
      GemmBlock block{};
      block.a = args.a + m0 * args.lda + pc;
      block.lda = args.lda;
      if (prepacked) {
        block.panels = args.packed_w + p0 * k * kGemmNr + pc * kGemmNr;
        block.panel_stride = k * kGemmNr;
      } else {
        for (std::int64_t p = 0; p < num_panels; ++p) {
          const std::int64_t row0 = n0 + p * kGemmNr;
          kernels.pack(args.w + row0 * args.ldw + pc, args.ldw,
                       std::min<std::int64_t>(kGemmNr, n - row0), kc, scratch + p * kc * kGemmNr);
        }
        block.panels = scratch;
        block.panel_stride = kc * kGemmNr;
      }
      block.m = rows;
      block.n = slab_n;
      block.kc = kc;
      block.c = args.c + m0 * args.ldc + n0;
      block.ldc = args.ldc;
      block.bias = args.bias != nullptr ? args.bias + n0 : nullptr;
      block.accumulate = pc > 0;
      block.finish = pc + kc >= k;
      block.act = act;
      kernels.block(block);
      pc += kc;
    } while (pc < k);
  });
}

void pack_weight_f32(const float* w, std::int64_t ldw, std::int64_t n, std::int64_t k, float* dst,
                     CpuIsa isa) {
  const Kernels kernels = kernels_for(isa);
  const std::int64_t n_panels = ceil_div(n, kGemmNr);
  parallel_for(0, n_panels, 1, [&](std::int64_t begin, std::int64_t end) {
    for (std::int64_t p = begin; p < end; ++p) {
      kernels.pack(w + p * kGemmNr * ldw, ldw, std::min<std::int64_t>(kGemmNr, n - p * kGemmNr), k,
                   dst + p * k * kGemmNr);
    }
  });
}

}  // namespace aphrodite::detail
