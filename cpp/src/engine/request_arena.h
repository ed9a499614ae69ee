// Memory for the per-request arrays of the engine core (token ids, block ids, prefix keys).
//
// At thousands of running sequences every step appends a token to each request's token array
// and, every block_size steps, touches its block ids and keys. Taken from the general heap these
// arrays lie on as many distinct 4 KiB pages, more than the TLB holds, and the page walks made a
// step's cost per sequence grow with the number of sequences. The arena carves them from 2 MiB
// huge-page-backed chunks instead, and recycles freed ones through per-class free lists
// (intrusive, so freeing never allocates). The size classes are multiples of 64 bytes, four per
// doubling above 256 bytes (at most 25 % rounding where power-of-two classes waste up to half),
// so the arrays of thousands of requests span fewer huge pages (1-2 % of a step at 4,096
// sequences). Chunks go back to the system only when the arena dies; allocations above the
// largest class use the heap.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <type_traits>
#include <vector>

#include "internal/asan.h"

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
  static constexpr std::size_t kMaxBytes = std::size_t{1} << 18;  // 256 KiB: largest class
  static constexpr int kNumClasses = 4 + 4 * (18 - 8);  // 64..256 by 64, then 4 per doubling
  // The class of an allocation of `bytes` (<= kMaxBytes) and its size in bytes.
  static int size_class(std::size_t bytes, std::size_t* class_bytes);

  struct FreeNode {
    FreeNode* next;
  };
  FreeNode* free_[kNumClasses] = {};
  std::vector<void*> chunks_;
  char* bump_ = nullptr;
  std::size_t bump_left_ = 0;
};

// A fixed-capacity array of trivially copyable elements in arena memory, 16 bytes in itself
// (pointer, size, capacity), so that a request's token, block and key arrays fit its hot cache
// lines next to the per-step fields (three std::vectors with their allocators took 96 bytes and
// pushed the keys' pointers onto a third line that every block_size-th step missed on). The
// capacity is fixed when the request is added (the most it can ever hold), so appending never
// reallocates; going past it is a logic error and throws. The arena is passed in rather than
// stored. In AddressSanitizer builds the slots past size() are unaddressable.
template <typename T>
class ArenaArray {
  static_assert(std::is_trivially_copyable_v<T>, "ArenaArray holds trivially copyable elements");

 public:
  ArenaArray() = default;
  ArenaArray(const ArenaArray&) = delete;
  ArenaArray& operator=(const ArenaArray&) = delete;
  ~ArenaArray() = default;  // the owner calls release(): the array does not know its arena

  // Storage for `capacity` elements; only on an array without storage.
  void allocate(RequestArena& arena, std::size_t capacity) {
    if (data_ != nullptr) throw std::logic_error("ArenaArray: storage allocated twice");
    if (capacity > UINT32_MAX) throw std::length_error("ArenaArray: capacity too large");
    if (capacity == 0) return;
    data_ = static_cast<T*>(arena.allocate(capacity * sizeof(T)));
    capacity_ = static_cast<std::uint32_t>(capacity);
    size_ = 0;
    annotate(capacity_, 0);
  }
  void release(RequestArena& arena) noexcept {
    if (data_ == nullptr) return;
    annotate(size_, capacity_);
    arena.deallocate(data_, std::size_t{capacity_} * sizeof(T));
    data_ = nullptr;
    size_ = capacity_ = 0;
  }

  std::size_t size() const { return size_; }
  std::size_t capacity() const { return capacity_; }
  bool empty() const { return size_ == 0; }
  T* data() { return data_; }
  const T* data() const { return data_; }
  T* begin() { return data_; }
  T* end() { return data_ + size_; }
  const T* begin() const { return data_; }
  const T* end() const { return data_ + size_; }
  T& operator[](std::size_t i) { return data_[i]; }
  const T& operator[](std::size_t i) const { return data_[i]; }
  T& back() { return data_[size_ - 1]; }
  const T& back() const { return data_[size_ - 1]; }

  void push_back(const T& value) {
    if (size_ == capacity_) overflow();
    annotate(size_, size_ + 1);
    data_[size_++] = value;
  }
  // Appends n elements left for the caller to write; returns the first.
  T* extend(std::size_t n) {
    if (n > capacity_ - size_) overflow();
    const auto new_size = static_cast<std::uint32_t>(size_ + n);
    annotate(size_, new_size);
    T* first = data_ + size_;
    size_ = new_size;
    return first;
  }
  void assign(const T* first, const T* last) {
    const auto n = static_cast<std::size_t>(last - first);
    clear();
    if (n == 0) return;
    std::memcpy(extend(n), first, n * sizeof(T));
  }
  void clear() {
    annotate(size_, 0);
    size_ = 0;
  }

 private:
  [[noreturn]] static void overflow() { throw std::length_error("ArenaArray: capacity exceeded"); }
  // Tells AddressSanitizer that the used part of [data, data + capacity) moved from old_size to
  // new_size elements.
  void annotate(std::uint32_t old_size, std::uint32_t new_size) const {
#if defined(APHRODITE_HAS_ASAN)
    if (data_ == nullptr) return;
    __sanitizer_annotate_contiguous_container(data_, data_ + capacity_, data_ + old_size,
                                              data_ + new_size);
#else
    (void)old_size;
    (void)new_size;
#endif
  }

  T* data_ = nullptr;
  std::uint32_t size_ = 0;
  std::uint32_t capacity_ = 0;
};

}  // namespace aphrodite::engine::detail
