// The engine core's request arena: size classes, recycling, heap fallback, arrays on top of it.
#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <set>
#include <stdexcept>
#include <vector>

#include "aphrodite/huge_page_allocator.h"
#include "engine/request_arena.h"
#include "internal/asan.h"

namespace {

using aphrodite::engine::detail::ArenaArray;
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

TEST(RequestArena, SizeClassesRoundUpByAtMostAQuarter) {
  RequestArena arena;
  // Same class: the most recently freed block comes back; the next class up gets fresh memory.
  void* a = arena.allocate(1200);  // class 1280 (1024 * 1.25)
  arena.deallocate(a, 1200);
  EXPECT_EQ(arena.allocate(1025), a);
  void* b = arena.allocate(1281);  // class 1536
  EXPECT_NE(b, a);
  arena.deallocate(a, 1025);
  arena.deallocate(b, 1281);
  // Consecutive fresh blocks are laid out back to back: their distance is the class size.
  for (std::size_t bytes : {64, 65, 256, 257, 3000, 4096, 4097, 100000}) {
    auto* p = static_cast<char*>(arena.allocate(bytes));
    auto* q = static_cast<char*>(arena.allocate(bytes));
    const auto class_bytes = static_cast<std::size_t>(q - p);
    EXPECT_GE(class_bytes, bytes) << bytes;
    EXPECT_EQ(class_bytes % 64, 0u) << bytes;
    if (bytes > 256) {
      EXPECT_LE(class_bytes, bytes + bytes / 4) << bytes;
    }
    arena.deallocate(p, bytes);
    arena.deallocate(q, bytes);
  }
}

TEST(ArenaArray, AppendsWithinItsCapacityAndReleasesItsStorage) {
  RequestArena arena;
  ArenaArray<std::int32_t> a;
  EXPECT_EQ(sizeof(a), 16u);
  a.allocate(arena, 1000);
  EXPECT_TRUE(a.empty());
  EXPECT_EQ(a.capacity(), 1000u);
  const std::vector<std::int32_t> prompt{5, 6, 7};
  a.assign(prompt.data(), prompt.data() + prompt.size());
  for (std::int32_t i = 0; i < 500; ++i) a.push_back(i);
  std::int32_t* more = a.extend(497);
  for (std::int32_t i = 0; i < 497; ++i) more[i] = -i;
  ASSERT_EQ(a.size(), 1000u);
  EXPECT_EQ(a[0], 5);
  EXPECT_EQ(a[502], 499);
  EXPECT_EQ(a.back(), -496);
  // Full: appending is a logic error, not a reallocation.
  EXPECT_THROW(a.push_back(1), std::length_error);
  EXPECT_THROW(a.extend(1), std::length_error);
  EXPECT_EQ(a.size(), 1000u);
  EXPECT_THROW(a.allocate(arena, 10), std::logic_error);
  a.clear();
  EXPECT_TRUE(a.empty());
  a.push_back(42);
  EXPECT_EQ(a.back(), 42);
  std::int32_t* storage = a.data();
  a.release(arena);
  EXPECT_EQ(a.data(), nullptr);
  EXPECT_EQ(a.capacity(), 0u);
  // The storage goes back to the arena: the next array of that class gets it.
  ArenaArray<std::int32_t> b;
  b.allocate(arena, 1000);
  EXPECT_EQ(b.data(), storage);
  b.release(arena);
  ArenaArray<std::int32_t> none;
  none.allocate(arena, 0);
  EXPECT_THROW(none.push_back(1), std::length_error);
  none.release(arena);
}

#if defined(APHRODITE_HAS_ASAN)
TEST(ArenaArrayDeathTest, SlotsPastTheSizeAreUnaddressable) {
  RequestArena arena;
  ArenaArray<std::int32_t> a;
  a.allocate(arena, 64);
  a.push_back(1);
  volatile std::int32_t* p = a.data();
  EXPECT_EQ(p[0], 1);
  EXPECT_DEATH(p[1] = 2, "container-overflow");
  a.release(arena);
}
#endif

TEST(HugePageAllocator, SmallAndLargeArrays) {
  std::vector<std::int64_t, aphrodite::detail::HugePageAllocator<std::int64_t>> small(10, 3);
  std::vector<std::int64_t, aphrodite::detail::HugePageAllocator<std::int64_t>> large(
      std::size_t{1} << 18, 5);  // 2 MiB: huge-page path
  EXPECT_EQ(reinterpret_cast<std::uintptr_t>(large.data()) % aphrodite::detail::kHugePageBytes, 0u);
  EXPECT_EQ(small[9] + large.back(), 8);
}

}  // namespace
