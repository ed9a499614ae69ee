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

int RequestArena::size_class(std::size_t bytes) {
  int shift = kMinShift;
  while ((std::size_t{1} << shift) < bytes) ++shift;
  return shift;
}

void* RequestArena::allocate(std::size_t bytes) {
  const int shift = size_class(bytes);
  if (shift > kMaxShift) return ::operator new(bytes);
  FreeNode*& head = free_[shift - kMinShift];
  if (head != nullptr) {
    FreeNode* node = head;
    head = node->next;
    APHRODITE_ASAN_UNPOISON(node, bytes);
    return node;
  }
  const std::size_t size = std::size_t{1} << shift;
  if (bump_left_ < size) {
    // The rest of the current chunk (a multiple of 64 bytes) is left unused: at most one largest
    // class per 2 MiB chunk.
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
  const int shift = size_class(bytes);
  if (shift > kMaxShift) {
    ::operator delete(p);
    return;
  }
  const std::size_t size = std::size_t{1} << shift;
  APHRODITE_ASAN_UNPOISON(p, sizeof(FreeNode));
  auto* node = static_cast<FreeNode*>(p);
  node->next = free_[shift - kMinShift];
  free_[shift - kMinShift] = node;
  // The link stays addressable (allocate() reads it); the rest of the block does not.
  APHRODITE_ASAN_POISON(static_cast<char*>(p) + sizeof(FreeNode), size - sizeof(FreeNode));
}

}  // namespace aphrodite::engine::detail
