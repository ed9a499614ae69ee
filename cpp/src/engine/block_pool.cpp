#include "aphrodite/engine/block_pool.h"

#include <algorithm>
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
  if (enable_caching_) cached_.reserve(static_cast<std::size_t>(num_blocks));
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
  cached_.erase(key_[block]);
  has_key_[block] = 0;
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
  const auto it = cached_.find(key);
  return it == cached_.end() ? -1 : it->second;
}

bool BlockPool::publish(std::int32_t block, const BlockKey& key) {
  if (!enable_caching_ || has_key_[block]) return false;
  if (!cached_.emplace(key, block).second) return false;
  key_[block] = key;
  has_key_[block] = 1;
  return true;
}

bool BlockPool::reset_prefix_cache() {
  if (num_free_ != num_blocks_ - 1) return false;
  cached_.clear();
  std::fill(has_key_.begin(), has_key_.end(), 0);
  return true;
}

}  // namespace aphrodite::engine
