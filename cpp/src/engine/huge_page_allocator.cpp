#include "aphrodite/engine/huge_page_allocator.h"

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace aphrodite::engine::detail {

void* huge_page_alloc(std::size_t bytes) {
  if (bytes < kHugePageThreshold) return ::operator new(bytes);
  const std::size_t rounded = (bytes + kHugePageBytes - 1) / kHugePageBytes * kHugePageBytes;
  void* p = std::aligned_alloc(kHugePageBytes, rounded);
  if (p == nullptr) throw std::bad_alloc();
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  // A hint: without transparent huge pages (or with them disabled) the memory stays usable.
  (void)::madvise(p, rounded, MADV_HUGEPAGE);
#endif
  return p;
}

void huge_page_free(void* p, std::size_t bytes) noexcept {
  if (p == nullptr) return;
  if (bytes < kHugePageThreshold) {
    ::operator delete(p);
  } else {
    std::free(p);
  }
}

}  // namespace aphrodite::engine::detail
