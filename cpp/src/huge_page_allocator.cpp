#include "aphrodite/huge_page_allocator.h"

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace aphrodite::detail {

void* huge_page_alloc(std::size_t bytes) {
  const bool huge = bytes >= kHugePageThreshold;
  const std::size_t align = huge ? kHugePageBytes : 64;
  const std::size_t rounded = bytes == 0 ? align : (bytes + align - 1) / align * align;
  void* p = std::aligned_alloc(align, rounded);
  if (p == nullptr) throw std::bad_alloc();
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  // A hint: without transparent huge pages (or with them disabled) the memory stays usable.
  if (huge) (void)::madvise(p, rounded, MADV_HUGEPAGE);
#endif
  return p;
}

void huge_page_free(void* p) noexcept { std::free(p); }

}  // namespace aphrodite::detail
