#include "request_arena.h"

#include <new>

#include "aphrodite/huge_page_allocator.h"
#include "internal/asan.h"

namespace aphrodite::engine::detail {

using ::aphrodite::detail::huge_page_alloc;
using ::aphrodite::detail::huge_page_free;
using ::aphrodite::detail::kHugePageBytes;

RequestArena::~RequestArena() {
  for (void* chunk : chunks_) {
    APHRODITE_ASAN_UNPOISON(chunk, kHugePageBytes);
    huge_page_free(chunk);
  }
}

int RequestArena::size_class(std::size_t bytes, std::size_t* class_bytes) {
  if (bytes <= 256) {
    const std::size_t units = bytes <= 64 ? 1 : (bytes + 63) / 64;
    *class_bytes = units * 64;
    return static_cast<int>(units) - 1;
  }
  // bytes in (2^k, 2^(k+1)], k >= 8: classes 2^k * {1.25, 1.5, 1.75, 2}.
  const int k = 63 - __builtin_clzll(static_cast<unsigned long long>(bytes - 1));
  const std::size_t step = std::size_t{1} << (k - 2);
  const std::size_t steps = (bytes + step - 1) / step;  // 5..8
  *class_bytes = steps * step;
  return 4 + 4 * (k - 8) + static_cast<int>(steps) - 5;
}

void* RequestArena::allocate(std::size_t bytes) {
  if (bytes > kMaxBytes) return ::operator new(bytes);
  std::size_t size = 0;
  FreeNode*& head = free_[size_class(bytes, &size)];
  if (head != nullptr) {
    FreeNode* node = head;
    head = node->next;
    APHRODITE_ASAN_UNPOISON(node, bytes);
    return node;
  }
  if (bump_left_ < size) {
    // The rest of the current chunk (a multiple of 64 bytes) is left unused: less than one
    // largest class per 2 MiB chunk.
    chunks_.reserve(chunks_.size() + 1);
    bump_ = static_cast<char*>(huge_page_alloc(kHugePageBytes));
    chunks_.push_back(bump_);
    bump_left_ = kHugePageBytes;
    APHRODITE_ASAN_POISON(bump_, kHugePageBytes);
  }
  void* p = bump_;
  bump_ += size;
  bump_left_ -= size;
  APHRODITE_ASAN_UNPOISON(p, bytes);
  return p;
}

void RequestArena::deallocate(void* p, std::size_t bytes) noexcept {
  if (p == nullptr) return;
  if (bytes > kMaxBytes) {
    ::operator delete(p);
    return;
  }
  std::size_t size = 0;
  const int cls = size_class(bytes, &size);
  APHRODITE_ASAN_UNPOISON(p, sizeof(FreeNode));
  auto* node = static_cast<FreeNode*>(p);
  node->next = free_[cls];
  free_[cls] = node;
  // The link stays addressable (allocate() reads it); the rest of the block does not.
  APHRODITE_ASAN_POISON(static_cast<char*>(p) + sizeof(FreeNode), size - sizeof(FreeNode));
}

}  // namespace aphrodite::engine::detail
