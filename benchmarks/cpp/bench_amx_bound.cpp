// How much faster could the CPU's float32 GEMMs get from Intel AMX? AMX multiplies bfloat16 tiles
// only; a float32 product of float32-grade accuracy needs each operand split into three bfloat16
// parts (a = a0 + a1 + a2 exactly, each part 8 significant bits) and six bfloat16 products
// (a0b0, a0b1, a1b0, a0b2, a1b1, a2b0; the dropped ones are below float32's rounding), i.e. a
// bfloat16 GEMM of 6K. This measures, in one run and on one core each:
//  - the AMX bfloat16 rate with operands held in tile registers (the instruction's peak),
//  - a cache-blocked AMX bfloat16 GEMM with both operands prepacked (no splitting counted), at
//    the prefill shapes of the offline benchmark's model (LLaVA-shaped: CLIP ViT-B/16 tower,
//    Llama with hidden 1,024 and MLP 2,816),
//  - the core's float32 linear (aphrodite::linear, prepacked weight, best kernel set),
// and reports the upper bound on the emulated float32 rate (the blocked bfloat16 rate / 6)
// against ours. It is an upper bound: the splitting of x at each call, the fused epilogues and
// edge tiles are not counted. Prints "no AMX" and exits 0 on a CPU or kernel without it.
// Usage: bench_amx_bound [repeats]   (runs on one thread)
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <functional>
#include <new>
#include <random>
#include <vector>

#include "aphrodite/aphrodite.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#define APHRODITE_BENCH_AMX 1
#endif

namespace {

double process_cpu_seconds() {
  timespec ts{};
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) + 1e-9 * static_cast<double>(ts.tv_nsec);
}

// Best process CPU time of `repeats` calls after a warm-up call (one thread: CPU time is the
// core's time, and stays meaningful on a machine shared with other work).
double best_cpu_seconds(int repeats, const std::function<void()>& fn) {
  fn();
  double best = 1e30;
  for (int r = 0; r < repeats; ++r) {
    const double c0 = process_cpu_seconds();
    fn();
    best = std::min(best, process_cpu_seconds() - c0);
  }
  return best;
}

#ifdef APHRODITE_BENCH_AMX

// The tile configuration: palette 1, eight tiles of 16 rows x 64 bytes (16 x 16 float32 or
// 16 x 32 bfloat16).
struct alignas(64) TileConfig {
  std::uint8_t palette_id = 1;
  std::uint8_t start_row = 0;
  std::uint8_t reserved[14] = {};
  std::uint16_t colsb[16] = {};
  std::uint8_t rows[16] = {};
};

// Asks the kernel for the AMX tile state (Linux keeps it off until a process requests it).
bool amx_available() {
  if (!__builtin_cpu_supports("amx-bf16")) return false;
  constexpr long kArchReqXcompPerm = 0x1023;
  constexpr long kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
}

__attribute__((target("amx-tile,amx-bf16"))) void configure_tiles() {
  TileConfig config;
  for (int t = 0; t < 8; ++t) {
    config.colsb[t] = 64;
    config.rows[t] = 16;
  }
  // ldtilecfg through an asm statement that names the memory it reads: with GCC 12's intrinsic the
  // stores above were dropped as dead.
  asm volatile("ldtilecfg %0" ::"m"(config));
}

__attribute__((target("amx-tile,amx-bf16"))) void release_tiles() { _tile_release(); }

// n rounds of four 16 x 16 x 32 products on tiles that stay in registers.
__attribute__((target("amx-tile,amx-bf16"))) void register_products(const std::uint16_t* a,
                                                                    const std::uint16_t* b,
                                                                    float* c, long n) {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  _tile_loadd(4, a, 64);
  _tile_loadd(5, a + 512, 64);
  _tile_loadd(6, b, 64);
  _tile_loadd(7, b + 512, 64);
  for (long i = 0; i < n; ++i) {
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
  _tile_stored(0, c, 64);
}

// Blocking of the bfloat16 GEMM (from a sweep on this machine's cores: 48 KiB L1d, 2 MiB L2): K
// in chunks of 256, so a 32-row strip of x's chunk (16 KiB) stays in L1 while it meets every
// 32-column strip of a 512-column block of the weight's chunk (256 KiB, in L2); the float32
// accumulators of a 256 x 512 block of outputs (512 KiB) stay in L2 across the chunks.
constexpr int kChunkK = 256;
constexpr int kBlockCols = 512;
constexpr int kBlockRows = 256;

// c[m, n] (float32, row-major, rows ldc floats apart) = a . b^T for bfloat16 operands prepacked per
// K chunk: a as [k / 256][m / 16][256 / 32][16 rows][32], b as [k / 256][n / 16][256 / 32][16
// pairs][32] (the pair-interleaved layout the instruction takes). m, n multiples of 32 and k of
// 256. Each 32 x 32 block of c is four accumulator tiles, fed by two tiles of a and two of b per 32
// of K.
__attribute__((target("amx-tile,amx-bf16"))) void blocked_gemm(const std::uint16_t* a,
                                                               const std::uint16_t* b, float* c,
                                                               long ldc, int m, int n, int k) {
  constexpr int kSteps = kChunkK / 32;
  constexpr int kTileElems = 16 * 32;
  for (int n0 = 0; n0 < n; n0 += kBlockCols) {
    for (int m0 = 0; m0 < m; m0 += kBlockRows) {
      for (int kc = 0; kc < k; kc += kChunkK) {
        for (int i = m0; i < std::min(m, m0 + kBlockRows); i += 32) {
          const std::uint16_t* a0 =
              a + static_cast<long>(kc) * m + static_cast<long>(i / 16) * kSteps * kTileElems;
          const std::uint16_t* a1 = a0 + kSteps * kTileElems;
          for (int j = n0; j < std::min(n, n0 + kBlockCols); j += 32) {
            const std::uint16_t* b0 =
                b + static_cast<long>(kc) * n + static_cast<long>(j / 16) * kSteps * kTileElems;
            const std::uint16_t* b1 = b0 + kSteps * kTileElems;
            float* c00 = c + i * ldc + j;
            float* c10 = c00 + 16 * ldc;
            if (kc == 0) {
              _tile_zero(0);
              _tile_zero(1);
              _tile_zero(2);
              _tile_zero(3);
            } else {
              _tile_loadd(0, c00, ldc * 4);
              _tile_loadd(1, c00 + 16, ldc * 4);
              _tile_loadd(2, c10, ldc * 4);
              _tile_loadd(3, c10 + 16, ldc * 4);
            }
            for (int s = 0; s < kSteps; ++s) {
              _tile_loadd(4, a0 + s * kTileElems, 64);
              _tile_loadd(6, b0 + s * kTileElems, 64);
              _tile_dpbf16ps(0, 4, 6);
              _tile_loadd(7, b1 + s * kTileElems, 64);
              _tile_dpbf16ps(1, 4, 7);
              _tile_loadd(5, a1 + s * kTileElems, 64);
              _tile_dpbf16ps(2, 5, 6);
              _tile_dpbf16ps(3, 5, 7);
            }
            _tile_stored(0, c00, ldc * 4);
            _tile_stored(1, c00 + 16, ldc * 4);
            _tile_stored(2, c10, ldc * 4);
            _tile_stored(3, c10 + 16, ldc * 4);
          }
        }
      }
    }
  }
}

// A 64-byte aligned array (tile rows are 64 bytes: unaligned ones split across cache lines).
template <typename T>
struct AlignedArray {
  explicit AlignedArray(std::size_t count, T value)
      : data(static_cast<T*>(std::aligned_alloc(64, (count * sizeof(T) + 63) / 64 * 64))) {
    if (data == nullptr) throw std::bad_alloc();
    std::fill(data, data + count, value);
  }
  ~AlignedArray() { std::free(data); }
  AlignedArray(const AlignedArray&) = delete;
  AlignedArray& operator=(const AlignedArray&) = delete;
  T* data;
};

#endif  // APHRODITE_BENCH_AMX

}  // namespace

int main(int argc, char** argv) {
  using namespace aphrodite;
  const int repeats = argc > 1 ? std::max(1, std::atoi(argv[1])) : 3;
#ifndef APHRODITE_BENCH_AMX
  (void)repeats;
  std::printf("no AMX: not an x86-64 GCC/Clang build\n");
  return 0;
#else
  if (!amx_available()) {
    std::printf("no AMX: this CPU or kernel does not offer AMX-BF16\n");
    return 0;
  }
  set_num_threads(1);
  configure_tiles();

  // The instruction's rate: 2 x 16 x 16 x 32 flops per product.
  const AlignedArray<std::uint16_t> tiles(2048, 0x3f80);  // bfloat16 1.0
  AlignedArray<float> sink(256, 0.0f);
  constexpr long kRounds = 5'000'000;
  const double peak_s = best_cpu_seconds(
      repeats, [&] { register_products(tiles.data, tiles.data + 1024, sink.data, kRounds); });
  const double peak = 4.0 * kRounds * 2 * 16 * 16 * 32 / peak_s / 1e9;
  std::printf("one core; AMX bf16 with operands in tile registers: %.0f GFLOP/s\n", peak);
  std::printf("%-22s %10s %10s %14s %10s %8s\n", "prefill GEMM (MxK->N)", "AMX bf16", "/ peak",
              "fp32 bound /6", "ours fp32", "bound/ours");

  // Rows: the offline benchmark's 16 prompts (3,884 tokens) and 16 images (196 patches each) in
  // chunks the engine's 2,048-token step budget makes; the decoder's MLP and output projections and
  // the tower's MLP.
  const int shapes[][3] = {{2048, 1024, 2816},
                           {2048, 2816, 1024},
                           {2048, 1024, 2048},
                           {3136, 768, 3072},
                           {3136, 3072, 768}};
  std::mt19937 rng(0);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  for (const auto& s : shapes) {
    const int m = s[0], k = s[1], n = s[2];
    // Packed bfloat16 operands (values do not change AMX's speed: ones, as above).
    const AlignedArray<std::uint16_t> a(static_cast<std::size_t>(m) * k, 0x3f80);
    const AlignedArray<std::uint16_t> b(static_cast<std::size_t>(n) * k, 0x3f80);
    // Rows of c padded by one cache line: at 4 KiB apart (n = 1024) a tile's 16 rows fall in
    // one L1 set.
    const long ldc = n + 16;
    const AlignedArray<float> c(static_cast<std::size_t>(m) * ldc, 0.0f);
    const double amx_s =
        best_cpu_seconds(repeats, [&] { blocked_gemm(a.data, b.data, c.data, ldc, m, n, k); });
    const float last = c.data[(m - 1) * ldc + n - 1];
    if (last != static_cast<float>(k)) {
      std::printf("AMX GEMM gave %g, expected %d\n", static_cast<double>(last), k);
      return 1;
    }
    // The core's float32 linear on the same shape.
    std::vector<float> w(static_cast<std::size_t>(n) * k), x(static_cast<std::size_t>(m) * k);
    for (float& v : w) v = dist(rng) * 0.03f;
    for (float& v : x) v = dist(rng);
    std::vector<float> out(static_cast<std::size_t>(m) * n);
    const PackedWeight packed =
        pack_linear_weight(TensorView(w.data(), DType::kFloat32, Device::cpu(), {n, k}));
    const TensorView xv(x.data(), DType::kFloat32, Device::cpu(), {m, k});
    const TensorView ov(out.data(), DType::kFloat32, Device::cpu(), {m, n});
    const double ours_s = best_cpu_seconds(repeats, [&] { linear(ov, xv, packed, std::nullopt); });
    const double gflop = 2.0 * m * n * static_cast<double>(k) / 1e9;
    const double amx = gflop / amx_s, ours = gflop / ours_s;
    char shape[64];
    std::snprintf(shape, sizeof(shape), "%dx%d->%d", m, k, n);
    std::printf("%-22s %10.0f %9.0f%% %14.0f %10.0f %7.2fx\n", shape, amx, 100.0 * amx / peak,
                amx / 6.0, ours, amx / 6.0 / ours);
  }
  release_tiles();
  return 0;
#endif
}
