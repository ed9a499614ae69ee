// The KV-cache block pool and the prefix cache over it.
//
// The pool tracks block ids only; the KV memory itself is allocated by the model executor as
// [num_blocks, block_size, ...] per layer. Block 0 is the null block: never handed out, used to
// pad block tables. Every other block is either owned (reference count > 0) or free. Free blocks
// wait in a queue in LRU order: allocate() takes the head, release() appends at the tail. A free
// block may still be cached (published under a key); it stays reusable through lookup() until
// allocate() evicts it, so eviction is least-recently-freed first.
//
// The queue is a ring of block ids rather than a linked list: allocation reads it sequentially,
// so the records of the next blocks to hand out can be prefetched (a list would be a chain of
// cache misses over cold records). acquire() takes a block out of the middle by leaving its ring
// entry behind as stale (an entry is live iff its block is still queued and was last queued at
// that position); allocate() skips stale entries, and a full ring is compacted, which is amortized
// O(1) because the ring holds at least twice as many entries as there are blocks.
//
// Invariants: a block is in the free queue iff its reference count is 0; a key maps to at most one
// block and a block carries at most one key. All operations are O(1) (hash-map average).
#pragma once

#include <cstdint>
#include <cstring>
#include <vector>

#include "aphrodite/engine/sha256.h"
#include "aphrodite/huge_page_allocator.h"

namespace aphrodite::engine {

// A prefix-cache key: SHA-256 over (parent key, the block's token ids, extra keys). The index
// hashes its first bytes and compares all 32.
using BlockKey = Sha256Digest;

class BlockPool {
 public:
  static constexpr std::int32_t kNullBlock = 0;

  // `num_blocks` includes the null block (must be >= 2).
  BlockPool(std::int32_t num_blocks, bool enable_caching);

  std::int32_t num_blocks() const { return num_blocks_; }
  // Blocks that can be handed out now (free, cached or not); excludes the null block.
  std::int32_t num_free_blocks() const { return num_free_; }
  std::int32_t num_usable_blocks() const { return num_blocks_ - 1; }
  std::int32_t ref_count(std::int32_t block) const { return meta_[block].ref; }
  bool is_cached(std::int32_t block) const { return (meta_[block].tag & kCachedBit) != 0; }
  std::size_t num_cached_blocks() const { return num_cached_; }

  // Takes the least recently freed block (evicting its key); reference count 1. Throws
  // aphrodite::Error when no block is free (callers check num_free_blocks() first).
  std::int32_t allocate();
  // allocate() `n` times into out[0..n). Throws aphrodite::Error (allocating nothing) when fewer
  // than `n` blocks are free.
  void allocate_many(std::int32_t n, std::int32_t* out);
  // Starts loading a block's record (a hint: no effect on the state), e.g. ahead of release().
  void prefetch(std::int32_t block) const { __builtin_prefetch(&meta_[block]); }
  // Drops one reference; at 0 the block joins the tail of the free queue.
  void release(std::int32_t block);
  // Adds a reference to a block found by lookup(); a free one leaves the free queue.
  void acquire(std::int32_t block);

  // The block cached under `key`, or -1.
  std::int32_t lookup(const BlockKey& key) const;
  // Publishes an owned, fully written block under `key`. Returns false (and leaves the block
  // unpublished) when another block already holds that key or the block already has one.
  bool publish(std::int32_t block, const BlockKey& key);
  // Starts loading what publish(block, key) will touch (a hint: no effect on the state). Callers
  // with many publishes issue the hints first so that the cache misses overlap.
  void prefetch_publish(std::int32_t block, const BlockKey& key) const;
  // Forgets every key. Only possible while no block is owned; returns whether it was done.
  bool reset_prefix_cache();

 private:
  // Per-block bookkeeping in one 16-byte record, so that allocating, freeing or evicting a block
  // touches one cache line of it (at hundreds of thousands of blocks these lines are cold).
  struct BlockMeta {
    std::int32_t ref = 0;
    // kCachedBit | the 31-bit index tag of its key while the block has one, else 0. Eviction
    // finds the block's index slot from it without reading the 32-byte key.
    std::uint32_t tag = 0;
    // Ring position (modulo 2^32) where the block was last queued, and whether that entry is
    // still live (cleared when allocate() or acquire() takes the block).
    std::uint32_t queue_pos = 0;
    std::uint32_t queued = 0;
  };
  static constexpr std::uint32_t kCachedBit = 0x80000000u;
  static constexpr std::uint32_t kTagMask = 0x7fffffffu;

  void push_back(std::int32_t block);
  void compact_queue();
  std::int32_t pop_front();
  void evict(std::int32_t block);

  std::int32_t num_blocks_;
  bool enable_caching_;
  std::int32_t num_free_ = 0;
  template <typename T>
  using Array = std::vector<T, aphrodite::detail::HugePageAllocator<T>>;
  Array<BlockMeta> meta_;
  // The free queue: entries [head_, tail_) of the ring (positions modulo 2^32, indices masked).
  Array<std::int32_t> queue_;
  std::uint32_t queue_mask_ = 0;
  std::uint32_t head_ = 0, tail_ = 0;
  Array<BlockKey> key_;
  // The key -> block index: open addressing with linear probing over block ids (keys are read
  // from key_), with a 31-bit tag of the key's hash (its home slot and a filter that skips most
  // full compares); deletion shifts entries back so probes never need tombstones. At most half
  // full. A flat table keeps a publish or an eviction to about one cache miss, which matters at
  // tens of thousands of cached blocks and ~100 publishes and evictions per step.
  struct Slot {
    std::int32_t block = -1;
    std::uint32_t tag = 0;
  };
  Array<Slot> index_;
  std::size_t index_mask_ = 0;
  std::size_t num_cached_ = 0;
};

}  // namespace aphrodite::engine
