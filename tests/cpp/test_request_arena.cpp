// The engine core's request arena: size classes, recycling, heap fallback, vectors on top of it.
#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <set>
#include <vector>

#include "aphrodite/huge_page_allocator.h"
#include "engine/request_arena.h"

namespace {

using aphrodite::engine::detail::ArenaAllocator;
using aphrodite::engine::detail::ArenaVector;
using aphrodite::engine::detail::RequestArena;

TEST(RequestArena, BlocksAreDisjointAlignedAndKeepTheirContents) {
  RequestArena arena;
  std::vector<std::pair<unsigned char*, std::size_t>> live;
  // Sizes across every class, several chunks' worth in all.
  for (std::size_t i = 0; i < 600; ++i) {
    const std::size_t bytes = 1 + (i * 7919) % 70000;
    auto* p = static_cast<unsigned char*>(arena.allocate(bytes));
    ASSERT_EQ(reinterpret_cast<std::uintptr_t>(p) % 64, 0u);
    std::memset(p, static_cast<int>(i & 0xff), bytes);
    live.emplace_back(p, bytes);
  }
  for (std::size_t i = 0; i < live.size(); ++i) {
    for (std::size_t j = 0; j < live[i].second; ++j) {
      ASSERT_EQ(live[i].first[j], static_cast<unsigned char>(i & 0xff)) << "block " << i;
    }
  }
  for (auto& [p, bytes] : live) arena.deallocate(p, bytes);
}

TEST(RequestArena, FreedBlocksAreReusedWithinTheirClass) {
  RequestArena arena;
  void* a = arena.allocate(100);  // class 128
  void* b = arena.allocate(128);
  arena.deallocate(a, 100);
  arena.deallocate(b, 128);
  // Most recently freed first, and only for the same class.
  void* c = arena.allocate(65);
  EXPECT_EQ(c, b);
  void* d = arena.allocate(64);  // class 64: fresh memory
  EXPECT_NE(d, a);
  void* e = arena.allocate(120);
  EXPECT_EQ(e, a);
  arena.deallocate(c, 65);
  arena.deallocate(d, 64);
  arena.deallocate(e, 120);
}

TEST(RequestArena, LargeBlocksComeFromTheHeap) {
  RequestArena arena;
  const std::size_t big = std::size_t{1} << 20;
  auto* p = static_cast<unsigned char*>(arena.allocate(big));
  std::memset(p, 7, big);
  EXPECT_EQ(p[big - 1], 7);
  arena.deallocate(p, big);
}

TEST(RequestArena, VectorsGrowCopyAndMoveAcrossArenas) {
  RequestArena arena, other;
  ArenaVector<std::int32_t> v{ArenaAllocator<std::int32_t>(&arena)};
  for (std::int32_t i = 0; i < 10000; ++i) v.push_back(i);
  ArenaVector<std::int32_t> w{ArenaAllocator<std::int32_t>(&other)};
  w = v;  // copy: propagates the allocator
  EXPECT_EQ(w.get_allocator().arena, &arena);
  ArenaVector<std::int32_t> heap;  // default: the heap
  heap.assign(v.begin(), v.end());
  EXPECT_EQ(heap.get_allocator().arena, nullptr);
  ArenaVector<std::int32_t> moved = std::move(v);
  ASSERT_EQ(moved.size(), 10000u);
  for (std::int32_t i = 0; i < 10000; ++i) {
    ASSERT_EQ(moved[static_cast<std::size_t>(i)], i);
    ASSERT_EQ(w[static_cast<std::size_t>(i)], i);
    ASSERT_EQ(heap[static_cast<std::size_t>(i)], i);
  }
}

TEST(HugePageAllocator, SmallAndLargeArrays) {
  std::vector<std::int64_t, aphrodite::detail::HugePageAllocator<std::int64_t>> small(10, 3);
  std::vector<std::int64_t, aphrodite::detail::HugePageAllocator<std::int64_t>> large(
      std::size_t{1} << 18, 5);  // 2 MiB: huge-page path
  EXPECT_EQ(reinterpret_cast<std::uintptr_t>(large.data()) % aphrodite::detail::kHugePageBytes, 0u);
  EXPECT_EQ(small[9] + large.back(), 8);
}

}  // namespace
