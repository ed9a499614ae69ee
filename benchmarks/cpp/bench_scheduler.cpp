// Microseconds per engine step (schedule + input preparation + update, block allocation and
// prefix-cache publishing included) for steady decode loads and a mixed prefill/decode load.
// Usage: bench_scheduler [steps per run, default 1000] [runs per load, default 3]
// BENCH_ONLY=N: only the decode load with N sequences. BENCH_COLD=1: between schedule() and
// update(), untimed, sweep 16 MiB of memory (8x the L2), as a forward pass on the same CPU
// would, so that update() and the next schedule() start from cold caches at every batch size.
#include <time.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "aphrodite/engine/engine_core.h"

namespace {

using namespace aphrodite::engine;
using Clock = std::chrono::steady_clock;

struct Timing {
  double wall_us;
  double cpu_us;  // this thread's CPU time: what the step costs when it is not descheduled
};

double thread_cpu_us() {
  timespec ts{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) * 1e6 + static_cast<double>(ts.tv_nsec) * 1e-3;
}

// Keeps `num_seqs` requests alive: each finished request is replaced at once, so the step count
// stays near num_seqs. Prompts are 128..640 tokens; outputs 64..512 tokens (ignore_eos).
// Evicts the core's L1 and L2 (and part of the L3) by writing a buffer much larger than them.
class CacheSweeper {
 public:
  explicit CacheSweeper(bool enabled) : buffer_(enabled ? std::size_t{16} << 20 : 0) {}
  void sweep() {
    for (std::size_t i = 0; i < buffer_.size(); i += 64) buffer_[i] += 1;
  }

 private:
  std::vector<unsigned char> buffer_;
};

Timing run(std::int32_t num_seqs, bool mixed, int steps, bool cold) {
  EngineConfig cfg;
  cfg.block_size = 16;
  cfg.max_num_seqs = num_seqs;
  cfg.max_model_len = 2048;
  cfg.max_num_batched_tokens = mixed ? num_seqs + 2048 : num_seqs;
  // Enough KV blocks for every sequence at its longest.
  cfg.num_blocks = num_seqs * (1152 / 16 + 1) + 1;
  EngineCore core(cfg);
  std::mt19937 rng(1234);
  auto uni = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); };
  int next_id = 0;
  auto add = [&] {
    RequestParams p;
    p.prompt_token_ids.resize(static_cast<std::size_t>(uni(128, 640)));
    for (auto& t : p.prompt_token_ids) t = uni(0, 32000);
    p.max_tokens = uni(64, 512);
    p.ignore_eos = true;
    core.add_request("request-" + std::to_string(next_id++), std::move(p));
  };
  for (std::int32_t i = 0; i < num_seqs; ++i) add();
  std::vector<std::int32_t> sampled;
  sampled.reserve(static_cast<std::size_t>(num_seqs));
  CacheSweeper sweeper(cold);
  double sweep_cpu_us = 0, sweep_wall_us = 0;  // the sweeps' time, taken out of the step's
  bool sweeping = false;                       // in the measured steps only
  auto step = [&] {
    const SchedulerOutput& plan = core.schedule();
    sampled.assign(static_cast<std::size_t>(plan.num_sampled), 17);
    if (sweeping) {
      const auto t0 = Clock::now();
      const double c0 = thread_cpu_us();
      sweeper.sweep();
      sweep_cpu_us += thread_cpu_us() - c0;
      sweep_wall_us += std::chrono::duration<double, std::micro>(Clock::now() - t0).count();
    }
    const auto& events = core.update(sampled.data(), sampled.size());
    int finished = 0;
    for (const auto& e : events) finished += e.finish_reason != FinishReason::kNone;
    return finished;
  };
  // Pure decode: warm up until every prompt has been prefilled and admitted (finished requests are
  // replaced throughout, so a few replacement prefill chunks stay part of the measured steps).
  if (!mixed) {
    int warm = 0;
    do {
      const int finished = step();
      for (int j = 0; j < finished; ++j) add();
    } while ((core.num_waiting() > 0 || core.num_running() < num_seqs) && ++warm < 100000);
  }
  double wall_us = 0, cpu_us = 0;
  sweep_cpu_us = sweep_wall_us = 0;
  sweeping = cold;
  for (int i = 0; i < steps; ++i) {
    const auto t0 = Clock::now();
    const double c0 = thread_cpu_us();
    const int finished = step();
    cpu_us += thread_cpu_us() - c0;
    wall_us += std::chrono::duration<double, std::micro>(Clock::now() - t0).count();
    // In the mixed load new prompts keep arriving (their prefill chunks share the step).
    if (mixed) {
      for (int j = 0; j < finished; ++j) add();
      if (i % 4 == 0) add();
    } else {
      for (int j = 0; j < finished; ++j) add();
    }
  }
  return {(wall_us - sweep_wall_us) / steps, (cpu_us - sweep_cpu_us) / steps};
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  const int steps = argc > 1 ? std::atoi(argv[1]) : 1000;
  const int repeats = argc > 2 ? std::max(1, std::atoi(argv[2])) : 3;
  const char* only = std::getenv("BENCH_ONLY");
  const char* cold_env = std::getenv("BENCH_COLD");
  const bool cold = cold_env != nullptr && std::atoi(cold_env) != 0;
  std::printf("%d steps per run, median of %d runs (each on a fresh core)%s\n", steps, repeats,
              cold ? "; caches swept between schedule() and update()" : "");
  std::printf("%-38s %12s %12s %16s\n", "load", "wall us/step", "cpu us/step", "cpu ns/seq/step");
  auto measure = [&](std::int32_t n, bool mixed) {
    std::vector<double> wall, cpu;
    for (int r = 0; r < repeats; ++r) {
      const Timing t = run(n, mixed, steps, cold);
      wall.push_back(t.wall_us);
      cpu.push_back(t.cpu_us);
    }
    return Timing{median(wall), median(cpu)};
  };
  double cpu_1024 = 0, cpu_4096 = 0;
  for (std::int32_t n : {256, 1024, 2048, 4096, 8192}) {
    if (only != nullptr && std::atoi(only) != n) continue;
    const Timing t = measure(n, false);
    if (n == 1024) cpu_1024 = t.cpu_us;
    if (n == 4096) cpu_4096 = t.cpu_us;
    std::printf("decode, %5d running sequences         %12.2f %12.2f %16.1f\n", n, t.wall_us,
                t.cpu_us, t.cpu_us * 1e3 / n);
  }
  if (only == nullptr) {
    const Timing t = measure(1024, true);
    std::printf("mixed prefill/decode, 1024 seqs       %12.2f %12.2f\n", t.wall_us, t.cpu_us);
  }
  if (cpu_1024 > 0 && cpu_4096 > 0) {
    std::printf("4,096 vs 1,024 sequences: %.2fx the CPU time per step for 4x the sequences\n",
                cpu_4096 / cpu_1024);
  }
  return 0;
}
