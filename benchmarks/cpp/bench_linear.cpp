// CPU linear throughput of the core alone (a C++ binary cannot call torch: the side-by-side with
// torch's F.linear is benchmarks/bench_linear.py). For the shapes of the benchmark model (hidden
// 1,024, MLP 2,816, vocabulary 32,064) and of LLaVA-1.5-7B (4,096 / 11,008 / 32,000), at decode
// and prefill row counts, with the weight prepacked once (as the runtime does), for every CPU
// kernel set this machine runs. Two figures per case: GFLOP/s by wall clock, and GFLOP/s per busy
// core by process CPU time (flops / CPU seconds of all threads), which stays meaningful on a
// machine shared with other work; plus the weight bytes streamed per second (wall).
// Usage: bench_linear [repeats] [max_rows]   (threads: APHRODITE_NUM_THREADS)
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <functional>
#include <random>
#include <string>
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

// Best wall time and best CPU time over `repeats` calls (fewer past ~2 s), after a warm-up call.
Timing best_of(int repeats, const std::function<void()>& fn) {
  fn();
  Timing best;
  const auto start = std::chrono::steady_clock::now();
  for (int r = 0; r < repeats; ++r) {
    const double c0 = process_cpu_seconds();
    const auto t0 = std::chrono::steady_clock::now();
    fn();
    const auto t1 = std::chrono::steady_clock::now();
    const double c1 = process_cpu_seconds();
    best.wall = std::min(best.wall, std::chrono::duration<double>(t1 - t0).count());
    best.cpu = std::min(best.cpu, c1 - c0);
    if (r >= 1 && std::chrono::duration<double>(t1 - start).count() > 2.0) break;
  }
  return best;
}

// The kernel sets this CPU runs, best first.
std::vector<const char*> supported_isas() {
  std::vector<const char*> isas;
  for (const char* isa : {"avx512", "avx2", "scalar"}) {
    try {
      aphrodite::set_linear_cpu_isa(isa);
      isas.push_back(isa);
    } catch (const aphrodite::ValueError&) {
    }
  }
  aphrodite::set_linear_cpu_isa("auto");
  return isas;
}

}  // namespace

int main(int argc, char** argv) {
  using namespace aphrodite;
  const int repeats = argc > 1 ? std::max(1, std::atoi(argv[1])) : 5;
  const std::int64_t max_rows = argc > 2 ? std::atoll(argv[2]) : 256;
  std::printf(
      "threads %d; prepacked weights; GFLOP/s (wall), GFLOP/s per busy core (CPU time), "
      "weight GB/s (wall)\n",
      num_threads());
  std::printf("%-18s %6s %-7s %10s %10s %10s\n", "K -> N", "rows", "isa", "wall", "per core",
              "weight");
  const std::int64_t shapes[][2] = {
      {1024, 2816}, {2816, 1024}, {1024, 32064}, {4096, 11008}, {4096, 32000}};
  const std::int64_t row_counts[] = {1, 4, 16, 64, 256, 3456};
  const std::vector<const char*> isas = supported_isas();
  std::mt19937 rng(0);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  for (const auto& s : shapes) {
    const std::int64_t k = s[0], n = s[1];
    std::vector<float> w(static_cast<std::size_t>(n * k));
    for (float& v : w) v = dist(rng) * 0.03f;
    const TensorView wv(w.data(), DType::kFloat32, Device::cpu(), {n, k});
    const PackedWeight packed = pack_linear_weight(wv);
    for (const std::int64_t m : row_counts) {
      if (m > max_rows) continue;
      std::vector<float> x(static_cast<std::size_t>(m * k)), out(static_cast<std::size_t>(m * n));
      for (float& v : x) v = dist(rng);
      const TensorView xv(x.data(), DType::kFloat32, Device::cpu(), {m, k});
      const TensorView ov(out.data(), DType::kFloat32, Device::cpu(), {m, n});
      const double gflop = 2.0 * static_cast<double>(m * n * k) / 1e9;
      const double weight_gb = 4.0 * static_cast<double>(n * k) / 1e9;
      char shape[64];
      std::snprintf(shape, sizeof(shape), "%lld -> %lld", static_cast<long long>(k),
                    static_cast<long long>(n));
      for (const char* isa : isas) {
        // The scalar kernels are for correctness on old CPUs: time them at decode sizes only.
        if (std::string(isa) == "scalar" && m > 4) continue;
        set_linear_cpu_isa(isa);
        const Timing t = best_of(repeats, [&] { linear(ov, xv, packed, std::nullopt); });
        std::printf("%-18s %6lld %-7s %10.1f %10.1f %10.1f\n", shape, static_cast<long long>(m),
                    isa, gflop / t.wall, gflop / t.cpu, weight_gb / t.wall);
      }
    }
  }
  set_linear_cpu_isa("auto");
  return 0;
}
