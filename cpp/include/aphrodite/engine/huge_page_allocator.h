// An allocator for the engine's large bookkeeping arrays (block records, the free-block ring, the
// prefix-cache index and keys, step buffers, request slabs). Allocations of at least 1 MiB are
// aligned to 2 MiB and, on Linux, marked for transparent huge pages: the engine reads these
// arrays at random, and with 4 KiB pages every access at thousands of sequences would also miss
// the TLB (a page walk per access). Smaller allocations use operator new.
#pragma once

#include <cstddef>
#include <cstdlib>
#include <new>

namespace aphrodite::engine::detail {

constexpr std::size_t kHugePageBytes = std::size_t{2} << 20;
constexpr std::size_t kHugePageThreshold = std::size_t{1} << 20;

// Raw memory of `bytes` bytes: huge-page backed (2 MiB aligned) at or above the threshold.
// Throws std::bad_alloc. Free with huge_page_free(p, bytes).
void* huge_page_alloc(std::size_t bytes);
void huge_page_free(void* p, std::size_t bytes) noexcept;

template <typename T>
struct HugePageAllocator {
  using value_type = T;
  HugePageAllocator() noexcept = default;
  template <typename U>
  HugePageAllocator(const HugePageAllocator<U>&) noexcept {}  // NOLINT(google-explicit-constructor)

  T* allocate(std::size_t n) {
    if (n > static_cast<std::size_t>(-1) / sizeof(T)) throw std::bad_alloc();
    return static_cast<T*>(huge_page_alloc(n * sizeof(T)));
  }
  void deallocate(T* p, std::size_t n) noexcept { huge_page_free(p, n * sizeof(T)); }

  template <typename U>
  bool operator==(const HugePageAllocator<U>&) const noexcept {
    return true;
  }
  template <typename U>
  bool operator!=(const HugePageAllocator<U>&) const noexcept {
    return false;
  }
};

}  // namespace aphrodite::engine::detail
