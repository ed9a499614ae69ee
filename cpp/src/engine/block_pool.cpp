#include "aphrodite/engine/block_pool.h"

#include <algorithm>
#include <cstring>
#include <string>

#include "aphrodite/error.h"

namespace aphrodite::engine {

BlockPool::BlockPool(std::int32_t num_blocks, bool enable_caching)
    : num_blocks_(num_blocks),
      enable_caching_(enable_caching),
      ref_(static_cast<std::size_t>(num_blocks), 0),
      prev_(static_cast<std::size_t>(num_blocks), -1),
      next_(static_cast<std::size_t>(num_blocks), -1),
      key_(static_cast<std::size_t>(num_blocks)),
      has_key_(static_cast<std::size_t>(num_blocks), 0) {
  if (num_blocks < 2) throw ValueError("num_blocks must be >= 2 (block 0 is the null block)");
  ref_[kNullBlock] = 1;  // permanently owned, never in the free queue
  for (std::int32_t b = 1; b < num_blocks; ++b) push_back(b);
  if (enable_caching_) {
    std::size_t size = 16;
    while (size < 2 * static_cast<std::size_t>(num_blocks)) size *= 2;
    index_.assign(size, Slot{});
    index_mask_ = size - 1;
  }
}

namespace {
// SHA-256 output is uniform, so its first 8 bytes are a good hash.
std::uint64_t key_hash(const BlockKey& key) {
  std::uint64_t h;
  std::memcpy(&h, key.data(), sizeof(h));
  return h;
}
}  // namespace

std::size_t BlockPool::home_slot(const BlockKey& key) const {
  return static_cast<std::size_t>(key_hash(key)) & index_mask_;
}

void BlockPool::push_back(std::int32_t block) {
  prev_[block] = tail_;
  next_[block] = -1;
  if (tail_ >= 0) {
    next_[tail_] = block;
  } else {
    head_ = block;
  }
  tail_ = block;
  ++num_free_;
}

void BlockPool::unlink(std::int32_t block) {
  const std::int32_t p = prev_[block], n = next_[block];
  if (p >= 0) {
    next_[p] = n;
  } else {
    head_ = n;
  }
  if (n >= 0) {
    prev_[n] = p;
  } else {
    tail_ = p;
  }
  prev_[block] = next_[block] = -1;
  --num_free_;
}

void BlockPool::evict(std::int32_t block) {
  if (!has_key_[block]) return;
  std::size_t i = home_slot(key_[block]);
  while (index_[i].block != block) i = (i + 1) & index_mask_;
  // Backward-shift deletion: move later entries of the probe run into the hole when their home
  // slot does not lie cyclically after the hole.
  std::size_t j = i;
  for (;;) {
    j = (j + 1) & index_mask_;
    if (index_[j].block < 0) break;
    const std::size_t home = index_[j].tag & index_mask_;
    if (((j - home) & index_mask_) >= ((j - i) & index_mask_)) {
      index_[i] = index_[j];
      i = j;
    }
  }
  index_[i] = Slot{};
  has_key_[block] = 0;
  --num_cached_;
}

std::int32_t BlockPool::allocate() {
  if (head_ < 0) throw Error("BlockPool::allocate: no free KV-cache block");
  const std::int32_t block = head_;
  unlink(block);
  evict(block);
  ref_[block] = 1;
  return block;
}

void BlockPool::release(std::int32_t block) {
  if (block <= kNullBlock || block >= num_blocks_ || ref_[block] <= 0) {
    throw Error("BlockPool::release: block " + std::to_string(block) + " is not owned");
  }
  if (--ref_[block] == 0) push_back(block);
}

void BlockPool::acquire(std::int32_t block) {
  if (ref_[block]++ == 0) unlink(block);
}

std::int32_t BlockPool::lookup(const BlockKey& key) const {
  if (!enable_caching_) return -1;
  const auto tag = static_cast<std::uint32_t>(key_hash(key));
  for (std::size_t i = tag & index_mask_;; i = (i + 1) & index_mask_) {
    const Slot& slot = index_[i];
    if (slot.block < 0) return -1;
    if (slot.tag == tag && key_[slot.block] == key) return slot.block;
  }
}

bool BlockPool::publish(std::int32_t block, const BlockKey& key) {
  if (!enable_caching_ || has_key_[block]) return false;
  const auto tag = static_cast<std::uint32_t>(key_hash(key));
  std::size_t i = tag & index_mask_;
  for (; index_[i].block >= 0; i = (i + 1) & index_mask_) {
    if (index_[i].tag == tag && key_[index_[i].block] == key) return false;
  }
  index_[i] = Slot{block, tag};
  key_[block] = key;
  has_key_[block] = 1;
  ++num_cached_;
  return true;
}

bool BlockPool::reset_prefix_cache() {
  if (num_free_ != num_blocks_ - 1) return false;
  std::fill(index_.begin(), index_.end(), Slot{});
  std::fill(has_key_.begin(), has_key_.end(), 0);
  num_cached_ = 0;
  return true;
}

}  // namespace aphrodite::engine
