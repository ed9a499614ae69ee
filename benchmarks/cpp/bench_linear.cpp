// CPU linear throughput of aphrodite::linear (fused GELU epilogue) at the LLaVA projector's
// shapes and at decode-sized row counts, with the weight packed per call and prepacked once.
// Two figures per case: GFLOP/s by wall clock, and GFLOP/s per busy core by process CPU time
// (flops / CPU seconds of all threads), which stays meaningful on a machine shared with other
// work. Usage: bench_linear [repeats]   (threads: APHRODITE_NUM_THREADS)
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <functional>
#include <random>
#include <vector>

#include "aphrodite/aphrodite.h"

namespace {

double process_cpu_seconds() {
  timespec ts{};
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) + 1e-9 * static_cast<double>(ts.tv_nsec);
}

struct Timing {
  double wall = 1e30;
  double cpu = 1e30;
};

// Best wall time and best CPU time over `repeats` calls, after one warm-up call.
Timing best_of(int repeats, const std::function<void()>& fn) {
  fn();
  Timing best;
  for (int r = 0; r < repeats; ++r) {
    const double c0 = process_cpu_seconds();
    const auto t0 = std::chrono::steady_clock::now();
    fn();
    const auto t1 = std::chrono::steady_clock::now();
    const double c1 = process_cpu_seconds();
    best.wall = std::min(best.wall, std::chrono::duration<double>(t1 - t0).count());
    best.cpu = std::min(best.cpu, c1 - c0);
  }
  return best;
}

}  // namespace

int main(int argc, char** argv) {
  using namespace aphrodite;
  const int repeats = argc > 1 ? std::max(1, std::atoi(argv[1])) : 5;
  std::printf("threads %d; GFLOP/s (wall) and GFLOP/s per busy core (CPU time)\n", num_threads());
  std::printf("%-20s %12s %12s %12s %12s %10s\n", "M x N x K", "wall", "per core", "packed wall",
              "packed core", "pack ms");
  const std::int64_t shapes[][3] = {{576, 4096, 1024}, {576, 4096, 4096}, {64, 4096, 4096},
                                    {8, 4096, 4096},   {1, 4096, 4096},   {300, 97, 136}};
  std::mt19937 rng(0);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  for (const auto& s : shapes) {
    const std::int64_t m = s[0], n = s[1], k = s[2];
    std::vector<float> x(static_cast<std::size_t>(m * k)), w(static_cast<std::size_t>(n * k)),
        b(static_cast<std::size_t>(n)), out(static_cast<std::size_t>(m * n));
    for (float& v : x) v = dist(rng);
    for (float& v : w) v = dist(rng) * 0.03f;
    for (float& v : b) v = dist(rng);
    const TensorView xv(x.data(), DType::kFloat32, Device::cpu(), {m, k});
    const TensorView wv(w.data(), DType::kFloat32, Device::cpu(), {n, k});
    const TensorView bv(b.data(), DType::kFloat32, Device::cpu(), {n});
    const TensorView ov(out.data(), DType::kFloat32, Device::cpu(), {m, n});
    const double gflop = 2.0 * static_cast<double>(m * n * k) / 1e9;
    PackedWeight packed;
    const Timing pack = best_of(repeats, [&] { packed = pack_linear_weight(wv); });
    const Timing plain = best_of(repeats, [&] { linear(ov, xv, wv, bv, Activation::kGeluErf); });
    const Timing pre = best_of(repeats, [&] { linear(ov, xv, packed, bv, Activation::kGeluErf); });
    char shape[64];
    std::snprintf(shape, sizeof(shape), "%lld x %lld x %lld", static_cast<long long>(m),
                  static_cast<long long>(n), static_cast<long long>(k));
    std::printf("%-20s %12.1f %12.1f %12.1f %12.1f %10.2f\n", shape, gflop / plain.wall,
                gflop / plain.cpu, gflop / pre.wall, gflop / pre.cpu, pack.wall * 1e3);
  }
  return 0;
}
