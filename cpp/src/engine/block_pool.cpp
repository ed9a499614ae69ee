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
  // At least twice the blocks: a compaction then always frees at least half of the ring.
  std::size_t ring = 16;
  while (ring < 2 * static_cast<std::size_t>(num_blocks)) ring *= 2;
  queue_.assign(ring, kNullBlock);
  queue_mask_ = static_cast<std::uint32_t>(ring - 1);
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
  if (tail_ - head_ == queue_mask_ + 1) compact_queue();
  queue_[tail_ & queue_mask_] = block;
  BlockMeta& m = meta_[block];
  m.queue_pos = tail_;
  m.queued = 1;
  ++tail_;
  ++num_free_;
}

// Moves the live entries to the front of the ring, in order, dropping the stale ones.
void BlockPool::compact_queue() {
  std::uint32_t write = head_;
  for (std::uint32_t pos = head_; pos != tail_; ++pos) {
    const std::int32_t block = queue_[pos & queue_mask_];
    BlockMeta& m = meta_[block];
    if (m.queued == 0 || m.queue_pos != pos) continue;
    queue_[write & queue_mask_] = block;
    m.queue_pos = write;
    ++write;
  }
  tail_ = write;
}

// The least recently freed block, taken out of the queue (num_free_ > 0 is the caller's check).
std::int32_t BlockPool::pop_front() {
  for (;;) {
    // The ring is read in order: start loading the records (and, for cached blocks, the index
    // slots) of the blocks a few entries ahead. Entries past the tail hold old block ids, so the
    // hints stay in bounds.
    __builtin_prefetch(&meta_[queue_[(head_ + 16) & queue_mask_]]);
    const BlockMeta& ahead = meta_[queue_[(head_ + 8) & queue_mask_]];
    if (ahead.tag & kCachedBit) __builtin_prefetch(&index_[(ahead.tag & kTagMask) & index_mask_]);
    const std::uint32_t pos = head_++;
    const std::int32_t block = queue_[pos & queue_mask_];
    BlockMeta& m = meta_[block];
    if (m.queued != 0 && m.queue_pos == pos) {
      m.queued = 0;
      --num_free_;
      return block;
    }
  }
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
  if (num_free_ == 0) throw Error("BlockPool::allocate: no free KV-cache block");
  const std::int32_t block = pop_front();
  evict(block);
  meta_[block].ref = 1;
  return block;
}

void BlockPool::allocate_many(std::int32_t n, std::int32_t* out) {
  if (n > num_free_) throw Error("BlockPool::allocate_many: not enough free KV-cache blocks");
  for (std::int32_t i = 0; i < n; ++i) out[i] = allocate();
}

void BlockPool::release(std::int32_t block) {
  if (block <= kNullBlock || block >= num_blocks_ || meta_[block].ref <= 0) {
    throw Error("BlockPool::release: block " + std::to_string(block) + " is not owned");
  }
  if (--meta_[block].ref == 0) push_back(block);
}

void BlockPool::acquire(std::int32_t block) {
  BlockMeta& m = meta_[block];
  if (m.ref++ == 0) {
    m.queued = 0;  // its ring entry goes stale
    --num_free_;
  }
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
  __builtin_prefetch(&meta_[block], 1);
  __builtin_prefetch(&index_[key_tag(key) & index_mask_], 1);
  __builtin_prefetch(&key_[block], 1);
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
