// CPU GEMM driver (task split, packing, K chunks) and the portable scalar kernels.
#include "linear/gemm_cpu.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <memory>
#include <new>
#include <string>

#include "aphrodite/error.h"
#include "aphrodite/parallel.h"
#include "internal/cpu_features.h"

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
// Up to this many rows, prepacked weights take the decode path (see gemm_f32), in groups of
// kSkinnyPanels panels (even: a SwiGLU gate/up pair; the AVX-512 tile's width).
constexpr std::int64_t kSkinnyRows = 64;
constexpr std::int64_t kSkinnyPanels = 2;
// Multiply-adds below which a call runs on the calling thread (about 20 us on one core).
constexpr std::int64_t kMinParallelWork = std::int64_t{1} << 20;

float gelu_erf(float x) {
  // 1 + erf(u) == erfc(-u): erfc keeps full relative precision in the negative tail.
  return 0.5f * x * std::erfc(-x * 0.70710678118654752f);
}

float gelu_tanh(float x) {
  // 0.5 * (1 + tanh(y)) == 1 / (1 + exp(-2y)); exp overflowing to inf gives the correct 0.
  float y = 0.7978845608028654f * (x + 0.044715f * x * x * x);
  return x / (1.0f + std::exp(-2.0f * y));
}

// x * sigmoid(1.702 x) as x / (1 + exp(-1.702 x)); exp overflowing to inf gives the correct -0.
float quick_gelu(float x) { return x / (1.0f + std::exp(-1.702f * x)); }

float activate(float v, int act) {
  switch (act) {
    case kGemmActQuickGelu:
      return quick_gelu(v);
    case kGemmActGeluErf:
      return gelu_erf(v);
    case kGemmActGeluTanh:
      return gelu_tanh(v);
    default:
      return v;
  }
}

struct FreeDeleter {
  void operator()(void* p) const { std::free(p); }
};

// A per-thread buffer of T reused across calls (a fresh 256 KiB allocation per task would be an
// mmap and page faults each time), 64-byte aligned.
template <typename T>
class ScratchBuffer {
 public:
  T* get(std::size_t count) {
    if (count > capacity_) {
      buffer_.reset();
      const std::size_t bytes = (count * sizeof(T) + 63) / 64 * 64;
      buffer_.reset(static_cast<T*>(std::aligned_alloc(64, bytes)));
      if (!buffer_) {
        capacity_ = 0;
        throw std::bad_alloc();
      }
      capacity_ = count;
    }
    return buffer_.get();
  }

 private:
  std::unique_ptr<T, FreeDeleter> buffer_;
  std::size_t capacity_ = 0;
};

// Slabs of W packed per call.
float* packing_scratch(std::size_t floats) {
  thread_local ScratchBuffer<float> buffer;
  return buffer.get(floats);
}

// The tile a SwiGLU task computes gate and up into.
float* swiglu_scratch(std::size_t floats) {
  thread_local ScratchBuffer<float> buffer;
  return buffer.get(floats);
}

struct Kernels {
  GemmBlockFn block;
  PackPanelFn pack;
  SwigluFn swiglu;
};

// The kernels of `isa` (kAmx: AVX-512's; its AMX path is gemm_f32_amx below).
Kernels kernels_for(CpuIsa isa) {
#if defined(__x86_64__) || defined(_M_X64)
  if (isa >= CpuIsa::kAvx512) return {gemm_block_f32_avx512, pack_panel_f32_avx2, swiglu_f32_avx2};
  if (isa == CpuIsa::kAvx2) return {gemm_block_f32_avx2, pack_panel_f32_avx2, swiglu_f32_avx2};
#endif
  (void)isa;
  return {gemm_block_f32_scalar, pack_panel_f32_scalar, swiglu_f32_scalar};
}

std::int64_t ceil_div(std::int64_t a, std::int64_t b) { return (a + b - 1) / b; }

// Where packed panel p comes from in W: its first row and how many rows it holds (<= kGemmNr).
// Gated (SwiGLU, W = [gate; up] with `half` rows each): panels alternate gate and up.
struct PanelSource {
  std::int64_t row0;
  std::int64_t rows;
};

PanelSource panel_source(std::int64_t p, std::int64_t n, bool gated) {
  if (!gated) return {p * kGemmNr, std::min<std::int64_t>(kGemmNr, n - p * kGemmNr)};
  const std::int64_t half = n / 2;
  const std::int64_t base = (p / 2) * kGemmNr;
  return {(p % 2 == 1 ? half : 0) + base, std::min<std::int64_t>(kGemmNr, half - base)};
}

float silu(float v) { return v / (1.0f + std::exp(-v)); }

CpuIsa detect_cpu_isa() {
  const detail::CpuFeatures& f = detail::cpu_features();
#ifdef APHRODITE_HAVE_AMX_KERNELS
  if (f.amx_bf16) return CpuIsa::kAmx;
#endif
  if (f.avx512) return CpuIsa::kAvx512;
  return f.avx2_fma ? CpuIsa::kAvx2 : CpuIsa::kScalar;
}

// The override: -1 until the first call reads APHRODITE_CPU_ISA, then a CpuIsa value.
std::atomic<int> g_active_isa{-1};

// Task `task` of a split of C into column slabs of slab_panels panels (n_panels in all) times row
// blocks of row_block rows (m in all), slabs varying fastest: its first panel, panels, first row
// and rows.
struct TaskTile {
  std::int64_t p0, num_panels, m0, rows;
};

TaskTile task_tile(std::int64_t task, std::int64_t n_slabs, std::int64_t slab_panels,
                   std::int64_t n_panels, std::int64_t row_block, std::int64_t m) {
  const std::int64_t p0 = (task % n_slabs) * slab_panels;
  const std::int64_t m0 = (task / n_slabs) * row_block;
  return {p0, std::min(slab_panels, n_panels - p0), m0, std::min(row_block, m - m0)};
}

// SwiGLU's pass over a task's scratch tile c (rows x num_panels panels from panel p0, gate and up
// interleaved, row stride ldc): silu(gate + bg) * (up + bu) into C's rows from m0.
void swiglu_rows(const GemmF32Args& args, const Kernels& kernels, const float* c, std::int64_t ldc,
                 std::int64_t p0, std::int64_t num_panels, std::int64_t m0, std::int64_t rows) {
  const std::int64_t half = args.n / 2;
  for (std::int64_t q = 0; q < num_panels / 2; ++q) {
    const std::int64_t col0 = (p0 / 2 + q) * kGemmNr;
    const std::int64_t cols = std::min<std::int64_t>(kGemmNr, half - col0);
    const float* bias_gate = args.bias != nullptr ? args.bias + col0 : nullptr;
    const float* bias_up = args.bias != nullptr ? args.bias + half + col0 : nullptr;
    for (std::int64_t i = 0; i < rows; ++i) {
      const float* gate = c + i * ldc + 2 * q * kGemmNr;
      kernels.swiglu(gate, gate + kGemmNr, bias_gate, bias_up, args.c + (m0 + i) * args.ldc + col0,
                     cols);
    }
  }
}

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

void swiglu_f32_scalar(const float* gate, const float* up, const float* bias_gate,
                       const float* bias_up, float* out, std::int64_t n) {
  for (std::int64_t j = 0; j < n; ++j) {
    const float g = gate[j] + (bias_gate != nullptr ? bias_gate[j] : 0.0f);
    const float u = up[j] + (bias_up != nullptr ? bias_up[j] : 0.0f);
    out[j] = silu(g) * u;
  }
}

CpuIsa best_cpu_isa() {
  static const CpuIsa isa = detect_cpu_isa();
  return isa;
}

const char* cpu_isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::kAmx:
      return "amx";
    case CpuIsa::kAvx512:
      return "avx512";
    case CpuIsa::kAvx2:
      return "avx2";
    case CpuIsa::kScalar:
      break;
  }
  return "scalar";
}

CpuIsa parse_cpu_isa(const char* name) {
  const std::string s = name;
  if (s == "auto") return best_cpu_isa();
  for (CpuIsa isa : {CpuIsa::kScalar, CpuIsa::kAvx2, CpuIsa::kAvx512, CpuIsa::kAmx}) {
    if (s != cpu_isa_name(isa)) continue;
    if (isa > best_cpu_isa()) {
      throw ValueError("the CPU kernel set '" + s +
                       "' needs instructions this CPU lacks (it runs " + "up to '" +
                       cpu_isa_name(best_cpu_isa()) + "')");
    }
    return isa;
  }
  throw ValueError(
      "CPU kernel set must be one of 'amx', 'avx512', 'avx2', 'scalar', 'auto', got '" + s + "'");
}

CpuIsa active_cpu_isa() {
  int isa = g_active_isa.load(std::memory_order_relaxed);
  if (isa < 0) {
    const char* env = std::getenv("APHRODITE_CPU_ISA");
    isa = static_cast<int>(env != nullptr && *env != '\0' ? parse_cpu_isa(env) : best_cpu_isa());
    g_active_isa.store(isa, std::memory_order_relaxed);
  }
  return static_cast<CpuIsa>(isa);
}

void set_active_cpu_isa(CpuIsa isa) { g_active_isa.store(static_cast<int>(isa)); }

std::int64_t packed_panels(std::int64_t n, bool gated) {
  return gated ? 2 * ceil_div(n / 2, kGemmNr) : ceil_div(n, kGemmNr);
}

#ifdef APHRODITE_HAVE_AMX_KERNELS
namespace {

// An AMX task: up to 128 rows (whole 32-row blocks) by up to 16 panels (256 columns), found best
// among 128-512 rows and 8-32 panels on this machine's 2 MiB L2 (BENCHMARKS.md).
constexpr std::int64_t kAmxRowBlock = 128;
constexpr std::int64_t kAmxSlabPanels = 16;

// gemm_f32 on the AMX tiles, for a prepacked weight and at least kAmxMinRows rows: split x and W
// into their bfloat16 parts once (both across the pool), then tasks of row blocks x column slabs
// as in gemm_f32, chunk by chunk of K, with gemm_f32's SwiGLU pass for gated weights.
void gemm_f32_amx(const GemmF32Args& args, const Kernels& kernels) {
  const std::int64_t m = args.m, n = args.n, k = args.k;
  const bool gated = args.act == Activation::kSwiGlu;
  const std::int64_t n_panels = packed_panels(n, gated);
  const std::int64_t padded_panels = amx_padded_panels(n_panels);
  const std::int64_t groups = amx_groups(m);
  // The operands' bfloat16 parts for this call, on the calling thread (grown to the largest call
  // and reused: a 2,048-row prefill of a 1,024 x 2,816 layer takes 12 MiB for x, 17 MiB for W).
  thread_local ScratchBuffer<std::uint16_t> a_scratch, w_scratch;
  std::uint16_t* a_parts = a_scratch.get(static_cast<std::size_t>(amx_parts_elems(groups, k)));
  std::uint16_t* w_parts =
      w_scratch.get(static_cast<std::size_t>(amx_parts_elems(padded_panels, k)));
  // The split: tasks of 16 panels of W, then of 16 groups of rows of x.
  constexpr std::int64_t kSplitStep = 16;
  const std::int64_t w_tasks = ceil_div(padded_panels, kSplitStep);
  const std::int64_t a_tasks = ceil_div(groups, kSplitStep);
  parallel_run(w_tasks + a_tasks, [&](std::int64_t task) {
    if (task < w_tasks) {
      const std::int64_t p0 = task * kSplitStep;
      amx_split_w(args.packed_w, n_panels, k, padded_panels, p0,
                  std::min(padded_panels, p0 + kSplitStep), w_parts);
    } else {
      const std::int64_t g0 = (task - w_tasks) * kSplitStep;
      amx_split_a(args.a, args.lda, m, k, groups, g0, std::min(groups, g0 + kSplitStep), a_parts);
    }
  });

  // Column slabs of whole panel pairs (gated: whole gate/up pairs too), then row blocks of whole
  // 32-row blocks, at least two tasks per thread.
  const std::int64_t threads = num_threads();
  std::int64_t slab_panels = std::min(kAmxSlabPanels, padded_panels);
  if (ceil_div(padded_panels, slab_panels) < threads) {
    slab_panels = ceil_div(padded_panels, threads);
  }
  slab_panels = ceil_div(slab_panels, 2) * 2;
  const std::int64_t n_slabs = ceil_div(n_panels, slab_panels);
  std::int64_t m_blocks = std::max<std::int64_t>(1, ceil_div(2 * threads, n_slabs));
  m_blocks = std::max(m_blocks, ceil_div(m, kAmxRowBlock));
  const std::int64_t row_block = ceil_div(ceil_div(m, m_blocks), 32) * 32;
  m_blocks = ceil_div(m, row_block);
  const std::int64_t chunks = ceil_div(k, kAmxChunk);

  parallel_run(n_slabs * m_blocks, [&](std::int64_t task) {
    const auto [p0, num_panels, m0, rows] =
        task_tile(task, n_slabs, slab_panels, n_panels, row_block, m);
    AmxBlock block{};
    block.a_parts = a_parts;
    block.groups = groups;
    block.group0 = m0 / 16;
    block.rows = rows;
    block.w_parts = w_parts;
    block.padded_panels = padded_panels;
    block.panel0 = p0;
    block.panels = num_panels;
    block.k = k;
    block.c = args.c + m0 * args.ldc + p0 * kGemmNr;
    block.ldc = args.ldc;
    block.n = std::min(num_panels * kGemmNr, n - p0 * kGemmNr);
    block.bias = args.bias != nullptr && !gated ? args.bias + p0 * kGemmNr : nullptr;
    block.act = gated ? kGemmActNone : static_cast<int>(args.act);
    if (gated) {
      block.ldc = num_panels * kGemmNr;
      block.n = block.ldc;
      block.c = swiglu_scratch(static_cast<std::size_t>(rows * block.ldc));
    }
    for (std::int64_t c = 0; c < chunks; ++c) {
      block.chunk = c;
      block.accumulate = c > 0;
      block.finish = c + 1 == chunks;
      gemm_block_parts_amx(block);
    }
    if (gated) swiglu_rows(args, kernels, block.c, block.ldc, p0, num_panels, m0, rows);
  });
}

}  // namespace
#endif

void gemm_f32(const GemmF32Args& args, CpuIsa isa) {
  const std::int64_t m = args.m, n = args.n, k = args.k;
  const bool gated = args.act == Activation::kSwiGlu;
  if (m == 0 || n == 0) return;
  const Kernels kernels = kernels_for(isa);
#ifdef APHRODITE_HAVE_AMX_KERNELS
  if (isa == CpuIsa::kAmx && args.packed_w != nullptr && m >= kAmxMinRows && k > 0) {
    gemm_f32_amx(args, kernels);
    return;
  }
#endif
  // Small products run on the calling thread: waking the pool costs more than they take.
  const bool inline_run = m * n * k < kMinParallelWork;
  const std::int64_t threads = inline_run ? 1 : num_threads();
  const std::int64_t n_panels = packed_panels(n, gated);
  // Gated slabs hold whole gate/up pairs.
  const std::int64_t panel_step = gated ? 2 : 1;

  // Column slabs first (each packs its part of W once per row block); fewer panels per slab when
  // there are not enough slabs for the threads (decode-sized calls split N only).
  std::int64_t slab_panels = std::min(kMaxSlabPanels, n_panels);
  if (ceil_div(n_panels, slab_panels) < threads) {
    slab_panels = std::max<std::int64_t>(1, ceil_div(n_panels, threads));
  }
  slab_panels = ceil_div(slab_panels, panel_step) * panel_step;
  const std::int64_t n_slabs = ceil_div(n_panels, slab_panels);
  // Then row blocks, enough for about two tasks per thread (load balance) when M allows.
  std::int64_t m_blocks = std::max<std::int64_t>(1, ceil_div(2 * threads, n_slabs));
  m_blocks = std::min(m_blocks, std::max<std::int64_t>(1, m / kMinRowBlock));
  m_blocks = std::max(m_blocks, ceil_div(m, kMaxRowBlock));
  std::int64_t row_block = ceil_div(ceil_div(m, m_blocks), kGemmMr) * kGemmMr;
  m_blocks = ceil_div(m, row_block);

  const bool prepacked = args.packed_w != nullptr;
  // Few rows and a prepacked weight (decode): the task walks its slab two panels at a time, each
  // pair over the whole K for all rows, so every weight byte is read from memory once, as one
  // contiguous stream per panel, while the rows of x stay in L1/L2; threads split N only.
  const bool skinny = prepacked && m <= kSkinnyRows;
  const std::int64_t chunk = skinny ? std::max<std::int64_t>(k, 1) : kGemmKc;
  if (skinny) {
    m_blocks = 1;
    row_block = m;
  }
  const int act = gated ? kGemmActNone : static_cast<int>(args.act);

  const auto run_task = [&](std::int64_t task) {
    const auto [p0, num_panels, m0, rows] =
        task_tile(task, n_slabs, slab_panels, n_panels, row_block, m);
    float* scratch =
        prepacked ? nullptr
                  : packing_scratch(static_cast<std::size_t>(
                        std::min(chunk, std::max<std::int64_t>(k, 1)) * num_panels * kGemmNr));
    // Where the kernel writes: C itself, or (gated) a scratch tile of all the slab's panels.
    float* c = args.c + m0 * args.ldc + p0 * kGemmNr;
    std::int64_t ldc = args.ldc;
    std::int64_t slab_n = std::min(num_panels * kGemmNr, n - p0 * kGemmNr);
    if (gated) {
      ldc = num_panels * kGemmNr;
      slab_n = ldc;
      c = swiglu_scratch(static_cast<std::size_t>(rows * ldc));
    }

    // At least one chunk, so that K == 0 still writes act(bias).
    std::int64_t pc = 0;
    do {
      const std::int64_t kc = std::min(chunk, k - pc);
      GemmBlock block{};
      block.a = args.a + m0 * args.lda + pc;
      block.lda = args.lda;
      if (prepacked) {
        block.panels = args.packed_w + p0 * k * kGemmNr + pc * kGemmNr;
        block.panel_stride = k * kGemmNr;
      } else {
        for (std::int64_t p = 0; p < num_panels; ++p) {
          const PanelSource src = panel_source(p0 + p, n, gated);
          kernels.pack(args.w + src.row0 * args.ldw + pc, args.ldw, src.rows, kc,
                       scratch + p * kc * kGemmNr);
        }
        block.panels = scratch;
        block.panel_stride = kc * kGemmNr;
      }
      block.m = rows;
      block.n = slab_n;
      block.kc = kc;
      block.c = c;
      block.ldc = ldc;
      block.bias = args.bias != nullptr && !gated ? args.bias + p0 * kGemmNr : nullptr;
      block.accumulate = pc > 0;
      block.finish = pc + kc >= k;
      block.act = act;
      if (skinny) {
        for (std::int64_t p = 0; p < num_panels; p += kSkinnyPanels) {
          GemmBlock group = block;
          group.panels += p * block.panel_stride;
          group.n = std::min(kSkinnyPanels * kGemmNr, slab_n - p * kGemmNr);
          group.c += p * kGemmNr;
          if (group.bias != nullptr) group.bias += p * kGemmNr;
          kernels.block(group);
        }
      } else {
        kernels.block(block);
      }
      pc += kc;
    } while (pc < k);

    if (gated) swiglu_rows(args, kernels, c, ldc, p0, num_panels, m0, rows);
  };
  if (inline_run) {
    for (std::int64_t task = 0; task < n_slabs * m_blocks; ++task) run_task(task);
  } else {
    parallel_run(n_slabs * m_blocks, run_task);
  }
}

void pack_weight_f32(const float* w, std::int64_t ldw, std::int64_t n, std::int64_t k, bool gated,
                     float* dst, CpuIsa isa) {
  const Kernels kernels = kernels_for(isa);
  const std::int64_t n_panels = packed_panels(n, gated);
  parallel_for(0, n_panels, 1, [&](std::int64_t begin, std::int64_t end) {
    for (std::int64_t p = begin; p < end; ++p) {
      const PanelSource src = panel_source(p, n, gated);
      kernels.pack(w + src.row0 * ldw, ldw, src.rows, k, dst + p * k * kGemmNr);
    }
  });
}

}  // namespace aphrodite::detail
