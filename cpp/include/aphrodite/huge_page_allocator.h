// Memory for large host arrays: the engine core's bookkeeping (block records, the free-block ring,
// the prefix-cache index and keys, step buffers, request slabs) and the CPU GEMM's prepacked
// weights. Allocations of at least 1 MiB are aligned to 2 MiB and, on Linux, marked for
// transparent huge pages. The engine reads its arrays at random, and with 4 KiB pages every
// access at thousands of sequences would also miss the TLB; a decode step streams every weight
// once, and the hardware prefetchers stop at each 4 KiB page boundary. Smaller allocations are
// 64-byte aligned (a cache line, an AVX-512 vector).
#pragma once

#include <cstddef>
#include <cstdlib>
#include <new>

namespace aphrodite::detail {

constexpr std::size_t kHugePageBytes = std::size_t{2} << 20;
constexpr std::size_t kHugePageThreshold = std::size_t{1} << 20;

// Raw memory of `bytes` bytes: huge-page backed (2 MiB aligned) at or above the threshold, else
// 64-byte aligned. Throws std::bad_alloc. Free with huge_page_free.
void* huge_page_alloc(std::size_t bytes);
void huge_page_free(void* p) noexcept;

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
  void deallocate(T* p, std::size_t) noexcept { huge_page_free(p); }

  template <typename U>
  bool operator==(const HugePageAllocator<U>&) const noexcept {
    return true;
  }
  template <typename U>
  bool operator!=(const HugePageAllocator<U>&) const noexcept {
    return false;
  }
};

}  // namespace aphrodite::detail
