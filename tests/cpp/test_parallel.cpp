#include <gtest/gtest.h>

#include <atomic>
#include <numeric>
#include <stdexcept>
#include <thread>
#include <vector>

#include "aphrodite/parallel.h"

namespace aphrodite {
namespace {

TEST(Parallel, ForCoversEveryIndexOnce) {
  for (std::int64_t n : {0, 1, 2, 3, 17, 1000, 100003}) {
    std::vector<std::atomic<int>> hits(static_cast<std::size_t>(n));
    parallel_for(0, n, 7, [&](std::int64_t lo, std::int64_t hi) {
      for (std::int64_t i = lo; i < hi; ++i) hits[static_cast<std::size_t>(i)]++;
    });
    for (auto& h : hits) ASSERT_EQ(h.load(), 1);
  }
}

TEST(Parallel, ManySmallRegionsBackToBack) {
  std::atomic<std::int64_t> sum{0};
  for (int r = 0; r < 20000; ++r) {
    parallel_run(4, [&](std::int64_t t) { sum += t; });
  }
  EXPECT_EQ(sum.load(), 20000 * 6);
}

TEST(Parallel, NestedRegionsRunSerially) {
  std::atomic<int> count{0};
  parallel_run(8, [&](std::int64_t) {
    parallel_for(0, 10, 1,
                 [&](std::int64_t lo, std::int64_t hi) { count += static_cast<int>(hi - lo); });
  });
  EXPECT_EQ(count.load(), 80);
}

TEST(Parallel, ExceptionsPropagate) {
  EXPECT_THROW(parallel_run(64,
                            [](std::int64_t t) {
                              if (t == 13) throw std::runtime_error("task 13 failed");
                            }),
               std::runtime_error);
  // The pool keeps working afterwards.
  std::atomic<int> count{0};
  parallel_run(16, [&](std::int64_t) { count++; });
  EXPECT_EQ(count.load(), 16);
}

TEST(Parallel, ResizePool) {
  int n = num_threads();
  set_num_threads(3);
  EXPECT_EQ(num_threads(), 3);
  std::atomic<int> count{0};
  parallel_run(100, [&](std::int64_t) { count++; });
  EXPECT_EQ(count.load(), 100);
  set_num_threads(n);
}

// Resizing from one thread while another runs regions: each region finishes on the pool it
// started on (before, the old pool was destroyed under it; ASan/TSan builds catch that).
TEST(Parallel, ResizeWhileRegionsRun) {
  int n = num_threads();
  std::atomic<bool> stop{false};
  std::atomic<std::int64_t> regions{0};
  std::atomic<std::int64_t> sum{0};
  std::thread runner([&] {
    while (!stop) {
      parallel_run(6, [&](std::int64_t t) { sum += t; });
      ++regions;
    }
  });
  for (int i = 0; i < 300; ++i) set_num_threads(1 + i % 3);
  stop = true;
  runner.join();
  EXPECT_EQ(sum.load(), regions.load() * 15);
  set_num_threads(n);
}

}  // namespace
}  // namespace aphrodite
