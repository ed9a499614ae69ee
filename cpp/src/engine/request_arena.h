// Memory for the per-request vectors of the engine core (token ids, block ids, prefix keys).
//
// At thousands of running sequences every step appends a token to each request's token vector
// and, every block_size steps, touches its block ids and keys. Taken from the general heap these
// vectors lie on as many distinct 4 KiB pages, more than the TLB holds, and the page walks made a
// step's cost per sequence grow with the number of sequences. The arena carves them from 2 MiB
// huge-page-backed chunks instead, in power-of-two size classes from 64 bytes, and recycles freed
// ones through per-class free lists (intrusive, so freeing never allocates). Chunks go back to the
// system only when the arena dies; allocations above the largest class use the heap.
#pragma once

#include <cstddef>
#include <memory>
#include <type_traits>
#include <vector>

namespace aphrodite::engine::detail {

class RequestArena {
 public:
  RequestArena() = default;
  RequestArena(const RequestArena&) = delete;
  RequestArena& operator=(const RequestArena&) = delete;
  ~RequestArena();

  void* allocate(std::size_t bytes);
  void deallocate(void* p, std::size_t bytes) noexcept;

 private:
  static constexpr int kMinShift = 6;   // 64 bytes
  static constexpr int kMaxShift = 18;  // 256 KiB
  static int size_class(std::size_t bytes);

  struct FreeNode {
    FreeNode* next;
  };
  FreeNode* free_[kMaxShift - kMinShift + 1] = {};
  std::vector<void*> chunks_;
  char* bump_ = nullptr;
  std::size_t bump_left_ = 0;
};

// A std::vector allocator drawing from a RequestArena (the heap when default-constructed).
template <typename T>
struct ArenaAllocator {
  using value_type = T;
  using propagate_on_container_copy_assignment = std::true_type;
  using propagate_on_container_move_assignment = std::true_type;
  using propagate_on_container_swap = std::true_type;

  RequestArena* arena = nullptr;

  ArenaAllocator() noexcept = default;
  explicit ArenaAllocator(RequestArena* a) noexcept : arena(a) {}
  template <typename U>
  ArenaAllocator(const ArenaAllocator<U>& other) noexcept  // NOLINT(google-explicit-constructor)
      : arena(other.arena) {}

  T* allocate(std::size_t n) {
    if (arena == nullptr) return std::allocator<T>().allocate(n);
    if (n > static_cast<std::size_t>(-1) / sizeof(T)) throw std::bad_alloc();
    return static_cast<T*>(arena->allocate(n * sizeof(T)));
  }
  void deallocate(T* p, std::size_t n) noexcept {
    if (arena == nullptr) {
      std::allocator<T>().deallocate(p, n);
    } else {
      arena->deallocate(p, n * sizeof(T));
    }
  }

  template <typename U>
  bool operator==(const ArenaAllocator<U>& other) const noexcept {
    return arena == other.arena;
  }
  template <typename U>
  bool operator!=(const ArenaAllocator<U>& other) const noexcept {
    return arena != other.arena;
  }
};

template <typename T>
using ArenaVector = std::vector<T, ArenaAllocator<T>>;

}  // namespace aphrodite::engine::detail
