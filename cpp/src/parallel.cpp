#include "aphrodite/parallel.h"

#include <sched.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <exception>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

#include "aphrodite/error.h"

namespace aphrodite {

namespace {

inline void cpu_relax() {
#if defined(__x86_64__) || defined(_M_X64)
  _mm_pause();
#else
  std::this_thread::yield();
#endif
}

// How long an idle worker spins before it sleeps. Decode steps issue many small parallel
// regions back to back; spinning briefly avoids a futex wake-up for each of them, while the cap
// keeps idle workers from stealing cores from other libraries' threads (torch's) for long.
constexpr auto kSpinTime = std::chrono::microseconds(50);

thread_local bool tls_in_region = false;

int default_num_threads() {
  if (const char* env = std::getenv("APHRODITE_NUM_THREADS")) {
    int n = std::atoi(env);
    if (n >= 1) return n;
  }
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) {
    int n = CPU_COUNT(&set);
    if (n >= 1) return n;
  }
  return static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
}

// A parallel region is published in one atomic word (region_): its generation, whether it is
// still open to workers, and how many workers have joined it. The caller runs tasks itself and
// then closes the region; it waits only for the workers that joined. A worker that wakes up after
// the close (a futex wake-up on a busy machine can take 100 us, longer than a small region)
// leaves the region alone instead of making the caller wait for it.
class ThreadPool {
 public:
  explicit ThreadPool(int num_threads) : num_threads_(num_threads) {
    for (int i = 1; i < num_threads; ++i) workers_.emplace_back([this] { worker_loop(); });
  }

  ~ThreadPool() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_.store(true, std::memory_order_relaxed);
      region_.store(next_generation(region_.load(std::memory_order_relaxed)),
                    std::memory_order_release);
    }
    cv_.notify_all();
    for (auto& t : workers_) t.join();
  }

  int num_threads() const { return num_threads_; }

  void run(std::int64_t num_tasks, const std::function<void(std::int64_t)>& fn) {
    std::lock_guard<std::mutex> region(region_mu_);
    fn_ = &fn;
    num_tasks_ = num_tasks;
    next_task_.store(0, std::memory_order_relaxed);
    error_ = nullptr;
    {
      // Under mu_: a worker about to sleep either sees the new generation or gets the notify.
      std::lock_guard<std::mutex> lock(mu_);
      region_.store(next_generation(region_.load(std::memory_order_relaxed)) | kOpen,
                    std::memory_order_release);
    }
    cv_.notify_all();
    execute();
    // Close the region to late workers, then wait for those inside to finish their tasks.
    const std::uint64_t closed = region_.fetch_and(~kOpen, std::memory_order_acq_rel) & ~kOpen;
    std::uint64_t state = closed;
    while ((state & kJoinedMask) != 0) {
      cpu_relax();
      state = region_.load(std::memory_order_acquire);
    }
    fn_ = nullptr;
    if (error_) std::rethrow_exception(error_);
  }

 private:
  static constexpr std::uint64_t kJoinedMask = 0xffffffffu;  // workers inside the region
  static constexpr std::uint64_t kOpen = std::uint64_t{1} << 32;
  static constexpr int kGenerationShift = 33;

  static std::uint64_t generation(std::uint64_t state) { return state >> kGenerationShift; }
  // The next region's word: generation + 1, closed, nobody joined.
  static std::uint64_t next_generation(std::uint64_t state) {
    return (generation(state) + 1) << kGenerationShift;
  }

  void execute() {
    tls_in_region = true;
    for (;;) {
      std::int64_t task = next_task_.fetch_add(1, std::memory_order_relaxed);
      if (task >= num_tasks_) break;
      try {
        (*fn_)(task);
      } catch (...) {
        std::lock_guard<std::mutex> lock(error_mu_);
        if (!error_) error_ = std::current_exception();
        next_task_.store(num_tasks_, std::memory_order_relaxed);  // stop handing out work
      }
    }
    tls_in_region = false;
  }

  void worker_loop() {
    std::uint64_t seen = 0;  // the last generation this worker looked at
    for (;;) {
      std::uint64_t state = region_.load(std::memory_order_acquire);
      auto spin_start = std::chrono::steady_clock::now();
      int spins = 0;
      while (generation(state) == seen) {
        cpu_relax();
        if ((++spins & 63) == 0 && std::chrono::steady_clock::now() - spin_start > kSpinTime) {
          std::unique_lock<std::mutex> lock(mu_);
          cv_.wait(lock,
                   [&] { return generation(region_.load(std::memory_order_acquire)) != seen; });
        }
        state = region_.load(std::memory_order_acquire);
      }
      seen = generation(state);
      if (stop_.load(std::memory_order_relaxed)) return;
      // Join while the region is open; the acquire pairs with run()'s release of its fields.
      bool joined = false;
      while ((state & kOpen) != 0 && generation(state) == seen) {
        if (region_.compare_exchange_weak(state, state + 1, std::memory_order_acq_rel,
                                          std::memory_order_acquire)) {
          joined = true;
          break;
        }
      }
      if (!joined) continue;  // closed already: the caller ran every task
      execute();
      region_.fetch_sub(1, std::memory_order_acq_rel);
    }
  }

  const int num_threads_;
  std::vector<std::thread> workers_;
  std::mutex region_mu_;  // one parallel region at a time
  std::mutex mu_;         // guards sleeping workers' wake-up
  std::condition_variable cv_;
  std::atomic<std::uint64_t> region_{0};  // generation << 33 | open << 32 | joined workers
  std::atomic<bool> stop_{false};

  const std::function<void(std::int64_t)>* fn_ = nullptr;
  std::int64_t num_tasks_ = 0;
  std::atomic<std::int64_t> next_task_{0};
  std::mutex error_mu_;
  std::exception_ptr error_;
};

// The pool is shared: a region holds its own reference, so set_num_threads() on another thread
// swaps in a new pool without destroying the one that region runs on (the last holder joins
// its workers).
std::mutex g_pool_mu;
std::shared_ptr<ThreadPool> g_pool;

std::shared_ptr<ThreadPool> pool() {
  std::lock_guard<std::mutex> lock(g_pool_mu);
  if (!g_pool) g_pool = std::make_shared<ThreadPool>(default_num_threads());
  return g_pool;
}

}  // namespace

int num_threads() { return pool()->num_threads(); }

void set_num_threads(int n) {
  if (n < 1) throw ValueError("number of threads must be >= 1, got " + std::to_string(n));
  auto fresh = std::make_shared<ThreadPool>(n);
  std::shared_ptr<ThreadPool> old;
  {
    std::lock_guard<std::mutex> lock(g_pool_mu);
    old = std::exchange(g_pool, std::move(fresh));
  }
  // `old` is released here, outside the lock: if it was the last reference, its workers join.
}

void parallel_run(std::int64_t num_tasks, const std::function<void(std::int64_t)>& fn) {
  if (num_tasks <= 0) return;
  if (num_tasks == 1 || tls_in_region) {
    for (std::int64_t t = 0; t < num_tasks; ++t) fn(t);
    return;
  }
  std::shared_ptr<ThreadPool> p = pool();
  if (p->num_threads() == 1) {
    for (std::int64_t t = 0; t < num_tasks; ++t) fn(t);
    return;
  }
  p->run(num_tasks, fn);
}

void parallel_for(std::int64_t begin, std::int64_t end, std::int64_t grain,
                  const std::function<void(std::int64_t, std::int64_t)>& fn) {
  std::int64_t n = end - begin;
  if (n <= 0) return;
  grain = std::max<std::int64_t>(grain, 1);
  std::int64_t max_chunks = (n + grain - 1) / grain;
  std::int64_t chunks = std::min<std::int64_t>(max_chunks, tls_in_region ? 1 : num_threads());
  if (chunks <= 1) {
    fn(begin, end);
    return;
  }
  parallel_run(chunks, [&](std::int64_t c) {
    std::int64_t lo = begin + n * c / chunks;
    std::int64_t hi = begin + n * (c + 1) / chunks;
    if (lo < hi) fn(lo, hi);
  });
}

}  // namespace aphrodite
