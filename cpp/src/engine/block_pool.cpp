#include "aphrodite/engine/block_pool.h"

#include <algorithm>
#include <cstring>
#include <string>

#include "aphrodite/error.h"

namespace aphrodite::engine {

BlockPool::BlockPool(std::int32_t num_blocks, bool enable_caching)
    : num_blocks_(num_blocks),
      enable_caching_(enable_caching),
      meta_(static_cast<std::size_t>(std::max(num_blocks, 0))) {
  if (num_blocks < 2) throw ValueError("num_blocks must be >= 2 (block 0 is the null block)");
  meta_[kNullBlock].ref = 1;  // permanently owned, never in the free queue
  for (std::int32_t b = 1; b < num_blocks; ++b) push_back(b);
  if (enable_caching_) {
    key_.resize(static_cast<std::size_t>(num_blocks));
    std::size_t size = 16;
    while (size < 2 * static_cast<std::size_t>(num_blocks)) size *= 2;
    index_.assign(size, Slot{});
    index_mask_ = size - 1;
  }
}

namespace {
// SHA-256 output is uniform, so its first bytes are a good hash.
std::uint32_t key_tag(const BlockKey& key) {
  std::uint32_t h;
  std::memcpy(&h, key.data(), sizeof(h));
  return h & 0x7fffffffu;
}
}  // namespace

void BlockPool::push_back(std::int32_t block) {
  BlockMeta& m = meta_[block];
  m.prev = tail_;
  m.next = -1;
  if (tail_ >= 0) {
    meta_[tail_].next = block;
  } else {
    head_ = block;
  }
  tail_ = block;
  ++num_free_;
}

void BlockPool::unlink(std::int32_t block) {
  BlockMeta& m = meta_[block];
  const std::int32_t p = m.prev, n = m.next;
  if (p >= 0) {
    meta_[p].next = n;
  } else {
    head_ = n;
  }
  if (n >= 0) {
    meta_[n].prev = p;
  } else {
    tail_ = p;
  }
  m.prev = m.next = -1;
  --num_free_;
}

void BlockPool::evict(std::int32_t block) {
  BlockMeta& m = meta_[block];
  if ((m.tag & kCachedBit) == 0) return;
  std::size_t i = (m.tag & kTagMask) & index_mask_;
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
  m.tag = 0;
  --num_cached_;
}

std::int32_t BlockPool::allocate() {
  if (head_ < 0) throw Error("BlockPool::allocate: no free KV-cache block");
  const std::int32_t block = head_;
  unlink(block);
  evict(block);
  meta_[block].ref = 1;
  // The next allocation takes the new head: start loading its record and the line after it in
  // the queue while the caller works (the queue order is unrelated to memory order).
  if (head_ >= 0) {
    const BlockMeta& next = meta_[head_];
    if (next.tag & kCachedBit) __builtin_prefetch(&index_[(next.tag & kTagMask) & index_mask_]);
    if (next.next >= 0) __builtin_prefetch(&meta_[next.next]);
  }
  return block;
}

void BlockPool::release(std::int32_t block) {
  if (block <= kNullBlock || block >= num_blocks_ || meta_[block].ref <= 0) {
    throw Error("BlockPool::release: block " + std::to_string(block) + " is not owned");
  }
  if (--meta_[block].ref == 0) push_back(block);
}

void BlockPool::acquire(std::int32_t block) {
  if (meta_[block].ref++ == 0) unlink(block);
}

std::int32_t BlockPool::lookup(const BlockKey& key) const {
  if (!enable_caching_) return -1;
  const std::uint32_t tag = key_tag(key);
  for (std::size_t i = tag & index_mask_;; i = (i + 1) & index_mask_) {
    const Slot& slot = index_[i];
    if (slot.block < 0) return -1;
    if (slot.tag == tag && key_[slot.block] == key) return slot.block;
  }
}

void BlockPool::prefetch_publish(std::int32_t block, const BlockKey& key) const {
  if (!enable_caching_) return;
  __builtin_prefetch(&meta_[block]);
  __builtin_prefetch(&index_[key_tag(key) & index_mask_]);
}

bool BlockPool::publish(std::int32_t block, const BlockKey& key) {
  if (!enable_caching_ || (meta_[block].tag & kCachedBit) != 0) return false;
  const std::uint32_t tag = key_tag(key);
  std::size_t i = tag & index_mask_;
  for (; index_[i].block >= 0; i = (i + 1) & index_mask_) {
    if (index_[i].tag == tag && key_[index_[i].block] == key) return false;
  }
  index_[i] = Slot{block, tag};
  key_[block] = key;
  meta_[block].tag = tag | kCachedBit;
  ++num_cached_;
  return true;
}

bool BlockPool::reset_prefix_cache() {
  if (num_free_ != num_blocks_ - 1) return false;
  std::fill(index_.begin(), index_.end(), Slot{});
  for (BlockMeta& m : meta_) m.tag = 0;
  num_cached_ = 0;
  return true;
}

}  // namespace aphrodite::engine
