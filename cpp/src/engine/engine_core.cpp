#include "aphrodite/engine/engine_core.h"

#include <algorithm>
#include <cstring>
#include <memory>
#include <new>
#include <set>
#include <string>
#include <unordered_map>

#include "aphrodite/engine/block_pool.h"
#include "aphrodite/error.h"
#include "aphrodite/huge_page_allocator.h"
#include "internal/asan.h"
#include "request_arena.h"

namespace aphrodite::engine {

const char* finish_reason_name(FinishReason reason) {
  switch (reason) {
    case FinishReason::kStop:
      return "stop";
    case FinishReason::kLength:
      return "length";
    case FinishReason::kAbort:
      return "abort";
    case FinishReason::kNone:
      break;
  }
  return "";
}

void EngineConfig::validate() const {
  auto require = [](bool ok, const std::string& msg) {
    if (!ok) throw ValueError("EngineConfig: " + msg);
  };
  require(num_blocks >= 2,
          "num_blocks must be >= 2 (block 0 is the null block), got " + std::to_string(num_blocks));
  // Upper bounds keep token and slot arithmetic (positions + a block, blocks * block_size) far
  // from int32 overflow.
  require(block_size >= 1 && block_size <= kMaxBlockSize,
          "block_size must be in [1, " + std::to_string(kMaxBlockSize) + "], got " +
              std::to_string(block_size));
  require(max_num_seqs >= 1, "max_num_seqs must be >= 1");
  require(max_model_len >= 1 && max_model_len <= kMaxModelLen,
          "max_model_len must be in [1, " + std::to_string(kMaxModelLen) + "], got " +
              std::to_string(max_model_len));
  require(max_num_batched_tokens >= max_num_seqs,
          "max_num_batched_tokens must be >= max_num_seqs (every running sequence decodes one "
          "token per step)");
  require(enable_chunked_prefill || max_num_batched_tokens >= max_model_len,
          "without chunked prefill max_num_batched_tokens must be >= max_model_len");
  require(max_num_encoder_tokens >= 0, "max_num_encoder_tokens must be >= 0");
  require(encoder_cache_size >= 0, "encoder_cache_size must be >= 0");
}

namespace {

enum class Status : std::uint8_t { kWaiting, kRunning, kPreempted, kFinished };

// Per-image encoder state within one admission.
enum class MMState : std::uint8_t {
  kNone,       // not encoded (or its embeddings were dropped by a preemption)
  kEncodeNow,  // chosen for encoding in the step being planned
  kCached,     // embeddings in the encoder cache; some of its tokens still to be computed
  kDone,       // every token computed; embeddings released
};

// Fields in the order a step touches them: a running request's per-step work (schedule, input
// preparation, update) reads the first two cache lines only (plus its last token and, every
// block_size-th step, its last block and key), which keeps the step's working set small at
// thousands of running sequences. With the 16-byte arena arrays and libstdc++'s 32-byte string
// everything up to `id` (whose pointer and length a plan refers to) lies in those two lines.
struct alignas(64) Request {
  Status status = Status::kWaiting;
  bool samples_now = false;
  bool ignore_eos = false;
  bool has_mm = false;
  bool has_stop_ids = false;
  std::int32_t num_computed = 0;   // tokens whose KV is in the cache
  std::int32_t num_scheduled = 0;  // tokens in the step being planned / awaiting update
  std::int32_t num_published = 0;  // leading blocks already offered to the prefix cache
  std::int32_t min_total = 0;      // prompt + min_tokens: stop tokens count from this length on
  std::int32_t length_limit = 0;   // min(prompt + max_tokens, max_model_len)
  std::int32_t eos = -1;
  // tokens.back() and blocks.back() (0 without blocks), kept here so that a decode step reads
  // neither array's memory.
  std::int32_t last_token = 0;
  std::int32_t tail_block = 0;
  std::uint64_t blocks_generation = 0;  // changes whenever `blocks` is rebuilt from scratch
  // Sized for the most the request can reach when it is added (no reallocation afterwards).
  detail::ArenaArray<std::int32_t> tokens;  // prompt followed by the outputs
  detail::ArenaArray<std::int32_t> blocks;
  detail::ArenaArray<BlockKey> keys;  // of every full block of `tokens`
  std::string id;

  std::vector<MultiModalItem> mm;
  std::vector<MMState> mm_state;
  std::vector<std::int32_t> stop_ids;
  std::int32_t priority = 0;
  std::int32_t running_index = -1;
  std::int32_t enc_tokens_now = 0;  // encoder budget taken in the step being planned
  std::uint64_t arrival = 0;
  std::uint64_t admit_seq = 0;
  FinishReason finish_reason = FinishReason::kNone;
  bool finish_reported = false;
  bool has_salt = false;
  std::int32_t stop_token = -1;
  std::string salt;
  detail::RequestArena* arena;  // of the three arrays

  explicit Request(detail::RequestArena* a) : arena(a) {}
  Request(const Request&) = delete;
  Request& operator=(const Request&) = delete;
  ~Request() {
    tokens.release(*arena);
    blocks.release(*arena);
    keys.release(*arena);
  }

  std::int32_t num_tokens() const { return static_cast<std::int32_t>(tokens.size()); }
};

// Requests live in slabs of contiguous slots (huge-page backed), reused most recently freed
// first: the running requests' hot lines stay packed in few pages instead of scattered over the
// heap between their token vectors, which keeps the per-request loops of a step off the TLB's
// slow path at thousands of sequences.
class RequestSlab {
 public:
  RequestSlab() = default;
  RequestSlab(const RequestSlab&) = delete;
  RequestSlab& operator=(const RequestSlab&) = delete;
  ~RequestSlab() {
    for (void* chunk : chunks_) {
      APHRODITE_ASAN_UNPOISON(chunk, kChunkBytes);
      aphrodite::detail::huge_page_free(chunk);
    }
  }

  Request* create(detail::RequestArena* arena) {
    if (free_.empty()) grow();
    void* slot = free_.back();
    APHRODITE_ASAN_UNPOISON(slot, sizeof(Request));
    Request* r = new (slot) Request(arena);
    free_.pop_back();
    return r;
  }
  void destroy(Request* r) noexcept {
    r->~Request();
    APHRODITE_ASAN_POISON(r, sizeof(Request));
    free_.push_back(r);  // capacity reserved in grow(): never throws
  }

 private:
  static constexpr std::size_t kChunkBytes = aphrodite::detail::kHugePageBytes;
  static constexpr std::size_t kPerChunk = kChunkBytes / sizeof(Request);

  void grow() {
    chunks_.reserve(chunks_.size() + 1);
    auto* chunk = static_cast<Request*>(aphrodite::detail::huge_page_alloc(kChunkBytes));
    chunks_.push_back(chunk);
    APHRODITE_ASAN_POISON(chunk, kChunkBytes);
    free_.reserve(chunks_.size() * kPerChunk);
    // Pushed in reverse so that create() hands out the chunk's slots in address order.
    for (std::size_t i = kPerChunk; i-- > 0;) free_.push_back(chunk + i);
  }

  std::vector<void*> chunks_;
  std::vector<Request*> free_;
};

struct RequestDeleter {
  RequestSlab* slab;
  void operator()(Request* r) const noexcept { slab->destroy(r); }
};
using RequestPtr = std::unique_ptr<Request, RequestDeleter>;

struct WaitingOrder {
  bool operator()(const Request* a, const Request* b) const {
    if (a->priority != b->priority) return a->priority < b->priority;
    return a->arrival < b->arrival;
  }
};

std::int32_t ceil_div(std::int32_t a, std::int32_t b) { return (a + b - 1) / b; }

// The per-request loops of a step (schedule, input preparation, update) walk thousands of
// requests scattered over the heap; loading the hot lines of the requests a few places ahead
// overlaps their cache misses, so a step's cost stays proportional to the number of sequences
// when their state no longer fits the core's L2.
constexpr std::size_t kPrefetchAhead = 24;

void prefetch_request(const std::vector<Request*>& list, std::size_t i) {
  if (i + kPrefetchAhead < list.size()) {
    const auto* p = reinterpret_cast<const char*>(list[i + kPrefetchAhead]);
    __builtin_prefetch(p, 1);
    __builtin_prefetch(p + 64, 1);
  }
}

}  // namespace

struct EngineCore::Impl {
  explicit Impl(const EngineConfig& c);

  EngineConfig cfg;
  std::int32_t bs;
  // log2(bs) when bs is a power of two (the usual case), else -1: positions map to blocks with a
  // shift and a mask instead of a division on the per-token paths.
  std::int32_t bs_shift;
  std::int32_t max_blocks;
  BlockPool pool;

  // Declared before the owners of the requests, so both outlive them.
  detail::RequestArena arena;
  RequestSlab slab;
  std::unordered_map<std::string, RequestPtr> requests;  // unfinished ones
  std::vector<RequestPtr> finished;                      // kept until their event has been reported
  std::set<Request*, WaitingOrder> waiting;
  std::vector<Request*> running;     // row order of the plan
  std::vector<Request*> scheduled;   // the plan's sequences, awaiting update()
  std::vector<Request*> prefilling;  // schedule()'s second pass
  // Newly full blocks of one update(); the key is read at publish time because compute_keys may
  // grow the request's key vector in between.
  struct PendingPublish {
    std::int32_t block;
    std::int32_t key_index;
    const Request* request;
  };
  std::vector<PendingPublish> to_publish;
  std::vector<Request*> externally_finished;  // events for the next update()
  std::vector<FreedEncoderOutput> pending_freed;
  bool awaiting_update = false;

  std::uint64_t next_arrival = 0;
  std::uint64_t next_admit = 0;
  std::uint64_t next_generation = 0;
  std::int32_t encoder_cache_used = 0;
  std::int64_t prefix_queries = 0;
  std::int64_t prefix_hits = 0;
  std::int64_t num_preemptions = 0;

  // Step buffers, sized once for the worst case.
  std::vector<std::int32_t> input_ids;
  std::vector<std::int64_t> positions;
  std::vector<std::int64_t> slot_mapping;
  std::vector<std::int32_t, aphrodite::detail::HugePageAllocator<std::int32_t>> block_tables;
  std::vector<std::int32_t> seq_lens;
  std::vector<std::int32_t> query_start_loc;
  std::vector<std::int32_t> num_computed_tokens;
  std::vector<std::int32_t> logits_indices;
  std::vector<std::int32_t> sampled_seq_indices;
  // Who each block-table row was last written for, so a row is extended instead of rewritten.
  std::vector<const Request*> row_owner;
  std::vector<std::uint64_t> row_generation;
  std::vector<std::int32_t> row_filled;

  SchedulerOutput out;
  std::vector<RequestEvent> events;

  // Planning state of the current schedule().
  std::int32_t token_budget = 0;
  std::int32_t encoder_budget = 0;
  bool preempted_this_step = false;

  std::int32_t block_of(std::int32_t pos) const {
    return bs_shift >= 0 ? pos >> bs_shift : pos / bs;
  }
  std::int32_t offset_in_block(std::int32_t pos) const {
    return bs_shift >= 0 ? pos & (bs - 1) : pos % bs;
  }
  void compute_keys(Request& r);
  void prefetch_update(const Request& r) const;
  std::uint8_t key_message[32 + 64 * sizeof(std::int32_t)];  // compute_keys' scratch
  std::int32_t limit_by_encoder(Request& r, std::int32_t start, std::int32_t n);
  void undo_encoder_choices(Request& r);
  void release_encoder_entries(Request& r, std::vector<FreedEncoderOutput>& report_to);
  void release_blocks(Request& r);
  void append_new_blocks(Request& r, std::int32_t n);
  void remove_from_running(Request& r);
  void preempt(Request& r);
  bool fit_blocks(Request& r, std::int32_t new_total_tokens);
  void schedule_running(Request& r);
  bool try_admit(Request& r);
  void fill_inputs();
  void finish(Request& r, FinishReason reason);
};

EngineCore::Impl::Impl(const EngineConfig& c)
    : cfg((c.validate(), c)),
      bs(c.block_size),
      bs_shift((c.block_size & (c.block_size - 1)) == 0 ? __builtin_ctz(c.block_size) : -1),
      max_blocks(c.max_blocks_per_seq()),
      pool(c.num_blocks, c.enable_prefix_caching) {
  const auto tokens = static_cast<std::size_t>(cfg.max_num_batched_tokens);
  const auto seqs = static_cast<std::size_t>(cfg.max_num_seqs);
  input_ids.assign(tokens, 0);
  positions.assign(tokens, 0);
  slot_mapping.assign(tokens, 0);
  block_tables.assign(seqs * static_cast<std::size_t>(max_blocks), BlockPool::kNullBlock);
  seq_lens.assign(seqs, 0);
  query_start_loc.assign(seqs + 1, 0);
  num_computed_tokens.assign(seqs, 0);
  logits_indices.assign(seqs, 0);
  sampled_seq_indices.assign(seqs, 0);
  row_owner.assign(seqs, nullptr);
  row_generation.assign(seqs, 0);
  row_filled.assign(seqs, 0);
  running.reserve(seqs);
  scheduled.reserve(seqs);
  prefilling.reserve(seqs);
  to_publish.reserve(tokens / static_cast<std::size_t>(bs) + seqs);
  events.reserve(seqs);
  out.request_ids.reserve(seqs);
  out.max_blocks_per_seq = max_blocks;
  out.input_ids = input_ids.data();
  out.positions = positions.data();
  out.slot_mapping = slot_mapping.data();
  out.block_tables = block_tables.data();
  out.seq_lens = seq_lens.data();
  out.query_start_loc = query_start_loc.data();
  out.num_computed_tokens = num_computed_tokens.data();
  out.logits_indices = logits_indices.data();
  out.sampled_seq_indices = sampled_seq_indices.data();
}

// Key of block i = SHA-256(key of block i-1 (zeros for i = 0) || the block's token ids (int32,
// little endian) || for every image overlapping the block: 'I', its content hash, its offset
// relative to the block start (int64, negative when it began in an earlier block) and its length
// in tokens (int64; which of the block's tokens are image tokens depends on it) || for block 0
// with a salt: 'S', the salt's length (uint64) and bytes). Chaining makes a key identify the whole
// prefix, and the image fields make different images (or the same image at another position)
// give different keys from the first block that holds one of its tokens.
void EngineCore::Impl::compute_keys(Request& r) {
  if (!cfg.enable_prefix_caching) return;
  const std::int32_t full = r.num_tokens() / bs;
  std::size_t item = 0;
  for (std::int32_t i = static_cast<std::int32_t>(r.keys.size()); i < full; ++i) {
    const std::int64_t begin = static_cast<std::int64_t>(i) * bs;
    const std::int64_t end = begin + bs;
    static const BlockKey kRoot{};
    const std::uint8_t* parent =
        i == 0 ? kRoot.data() : r.keys[static_cast<std::size_t>(i) - 1].data();
    const std::size_t token_bytes = static_cast<std::size_t>(bs) * sizeof(std::int32_t);
    // (has_mm first: the image list lies outside the request's hot lines.)
    while (r.has_mm && item < r.mm.size() && r.mm[item].offset + r.mm[item].length <= begin) {
      ++item;
    }
    const bool plain =
        (!r.has_mm || item == r.mm.size() || r.mm[item].offset >= end) && !(i == 0 && r.has_salt);
    if (plain && 32 + token_bytes <= sizeof(key_message)) {
      // The common case (no image, no salt): one contiguous message, hashed in one shot.
      std::memcpy(key_message, parent, 32);
      std::memcpy(key_message + 32, r.tokens.data() + begin, token_bytes);
      r.keys.push_back(Sha256::hash(key_message, 32 + token_bytes));
      continue;
    }
    Sha256 h;
    h.update(parent, 32);
    h.update(r.tokens.data() + begin, token_bytes);
    for (std::size_t j = item; j < r.mm.size() && r.mm[j].offset < end; ++j) {
      const std::uint8_t tag = 'I';
      const std::int64_t place[2] = {r.mm[j].offset - begin, r.mm[j].length};
      h.update(&tag, 1);
      h.update(r.mm[j].hash.data(), r.mm[j].hash.size());
      h.update(place, sizeof(place));
    }
    if (i == 0 && r.has_salt) {
      const std::uint8_t tag = 'S';
      const std::uint64_t len = r.salt.size();
      h.update(&tag, 1);
      h.update(&len, sizeof(len));
      h.update(r.salt.data(), r.salt.size());
    }
    r.keys.push_back(h.finish());
  }
}

// Starts loading what update() will touch for r beyond its own lines (which the caller prefetched
// earlier): the line its next token goes to and, when the step completes a block, the block id
// and key to publish and the tokens and parent key of the next key to compute.
void EngineCore::Impl::prefetch_update(const Request& r) const {
  const std::int32_t size = r.num_tokens();
  __builtin_prefetch(r.tokens.data() + size, 1);
  if (!cfg.enable_prefix_caching) return;
  const std::int32_t published = r.num_published;
  if (block_of(r.num_computed + r.num_scheduled) > published) {
    __builtin_prefetch(r.blocks.data() + published);
    __builtin_prefetch(r.keys.data() + published);
  }
  if (offset_in_block(size + 1) == 0 && size + 1 >= bs) {
    __builtin_prefetch(r.tokens.data() + size + 1 - bs);
    if (!r.keys.empty()) __builtin_prefetch(&r.keys.back());
    __builtin_prefetch(r.keys.data() + r.keys.size(), 1);
  }
}

// Shrinks a chunk [start, start + n) so that every image it touches is either cached or chosen
// for encoding now (within the step's encoder budget and the encoder cache). Returns the new n.
std::int32_t EngineCore::Impl::limit_by_encoder(Request& r, std::int32_t start, std::int32_t n) {
  if (!r.has_mm) return n;
  const std::int32_t end = start + n;
  for (std::size_t j = 0; j < r.mm.size(); ++j) {
    const MultiModalItem& m = r.mm[j];
    if (m.offset >= end) break;
    if (m.offset + m.length <= start) continue;
    if (r.mm_state[j] == MMState::kCached || r.mm_state[j] == MMState::kEncodeNow) continue;
    if (m.length <= encoder_budget && encoder_cache_used + m.length <= cfg.encoder_cache_size) {
      encoder_budget -= m.length;
      encoder_cache_used += m.length;
      r.enc_tokens_now += m.length;
      r.mm_state[j] = MMState::kEncodeNow;
      continue;
    }
    return std::max(0, m.offset - start);
  }
  return n;
}

void EngineCore::Impl::undo_encoder_choices(Request& r) {
  for (std::size_t j = 0; j < r.mm.size(); ++j) {
    if (r.mm_state[j] != MMState::kEncodeNow) continue;
    r.mm_state[j] = MMState::kNone;
    encoder_cache_used -= r.mm[j].length;
  }
  encoder_budget += r.enc_tokens_now;
  r.enc_tokens_now = 0;
}

// Drops every embedding the request holds; those the runtime has are listed in `report_to`.
void EngineCore::Impl::release_encoder_entries(Request& r,
                                               std::vector<FreedEncoderOutput>& report_to) {
  for (std::size_t j = 0; j < r.mm.size(); ++j) {
    const MMState s = r.mm_state[j];
    if (s == MMState::kCached || s == MMState::kEncodeNow) {
      encoder_cache_used -= r.mm[j].length;
      if (s == MMState::kCached) report_to.push_back({r.id, static_cast<std::int32_t>(j)});
    }
    r.mm_state[j] = MMState::kNone;
  }
}

void EngineCore::Impl::release_blocks(Request& r) {
  // Reverse order: a sequence's last blocks are the least likely to be shared, so they reach the
  // head of the free queue (evicted first) before its first ones.
  const auto nb = static_cast<std::ptrdiff_t>(r.blocks.size());
  constexpr std::ptrdiff_t kAhead = 8;
  for (std::ptrdiff_t i = nb - 1; i >= 0; --i) {
    if (i >= kAhead) pool.prefetch(r.blocks[static_cast<std::size_t>(i - kAhead)]);
    pool.release(r.blocks[static_cast<std::size_t>(i)]);
  }
  r.blocks.clear();
  r.tail_block = 0;
  r.blocks_generation = ++next_generation;
  r.num_computed = 0;
  r.num_published = 0;
}

// `n` freshly allocated blocks at the end of r's block table (callers made sure they are free).
void EngineCore::Impl::append_new_blocks(Request& r, std::int32_t n) {
  if (n <= 0) return;
  if (n > pool.num_free_blocks()) throw Error("EngineCore: KV-cache blocks short while allocating");
  pool.allocate_many(n, r.blocks.extend(static_cast<std::size_t>(n)));
  r.tail_block = r.blocks.back();
}

void EngineCore::Impl::remove_from_running(Request& r) {
  const std::int32_t i = r.running_index;
  Request* last = running.back();
  running[static_cast<std::size_t>(i)] = last;
  last->running_index = i;
  running.pop_back();
  r.running_index = -1;
}

void EngineCore::Impl::preempt(Request& r) {
  if (r.num_scheduled > 0) token_budget += r.num_scheduled;
  encoder_budget += r.enc_tokens_now;
  r.enc_tokens_now = 0;
  r.num_scheduled = 0;
  // Reported in this very plan: the runtime needs them neither now nor later.
  release_encoder_entries(r, out.freed_encoder_outputs);
  release_blocks(r);
  r.status = Status::kPreempted;
  waiting.insert(&r);
  out.preempted_request_ids.push_back(r.id);
  ++num_preemptions;
  preempted_this_step = true;
  // Removal from `running` happens after the running pass, which indexes it.
}

// Grows r's block table to hold `new_total_tokens`, preempting other running requests (lowest
// priority, most recently admitted first) while blocks are short. Returns false when r itself
// was the one preempted.
bool EngineCore::Impl::fit_blocks(Request& r, std::int32_t new_total_tokens) {
  const auto have = static_cast<std::int32_t>(r.blocks.size());
  if (new_total_tokens <= have * bs) return true;  // most decode steps
  const std::int32_t need = block_of(new_total_tokens - 1) + 1 - have;
  while (need > pool.num_free_blocks()) {
    Request* victim = nullptr;
    for (Request* c : running) {
      if (c->status != Status::kRunning) continue;
      if (victim == nullptr || c->priority > victim->priority ||
          (c->priority == victim->priority && c->admit_seq > victim->admit_seq)) {
        victim = c;
      }
    }
    preempt(*victim);
    if (victim == &r) return false;
  }
  append_new_blocks(r, need);
  return true;
}

void EngineCore::Impl::schedule_running(Request& r) {
  const std::int32_t remaining = r.num_tokens() - r.num_computed;
  std::int32_t n = std::min(remaining, token_budget);
  if (n <= 0) return;
  n = limit_by_encoder(r, r.num_computed, n);
  if (n == 0) {
    undo_encoder_choices(r);
    return;
  }
  if (!fit_blocks(r, r.num_computed + n)) return;
  token_budget -= n;
  r.num_scheduled = n;
}

bool EngineCore::Impl::try_admit(Request& r) {
  // Longest cached prefix; at least one token is recomputed so that the step yields logits.
  std::int32_t hits = 0;
  const std::int32_t max_hits =
      std::min<std::int32_t>(static_cast<std::int32_t>(r.keys.size()), (r.num_tokens() - 1) / bs);
  std::int32_t free_hits = 0;  // hit blocks now in the free queue: acquiring them uses it up
  for (; hits < max_hits; ++hits) {
    const std::int32_t b = pool.lookup(r.keys[static_cast<std::size_t>(hits)]);
    if (b < 0) break;
    if (pool.ref_count(b) == 0) ++free_hits;
  }
  const std::int32_t computed = hits * bs;
  const std::int32_t remaining = r.num_tokens() - computed;
  std::int32_t n = std::min(remaining, token_budget);
  if (n <= 0 || (!cfg.enable_chunked_prefill && n < remaining)) return false;
  n = limit_by_encoder(r, computed, n);
  if (n == 0 || (!cfg.enable_chunked_prefill && n < remaining)) {
    undo_encoder_choices(r);
    return false;
  }
  const std::int32_t need = ceil_div(computed + n, bs) - hits;
  if (need + free_hits > pool.num_free_blocks()) {
    undo_encoder_choices(r);
    return false;
  }
  r.blocks.clear();
  for (std::int32_t i = 0; i < hits; ++i) {
    const std::int32_t b = pool.lookup(r.keys[static_cast<std::size_t>(i)]);
    pool.acquire(b);
    r.blocks.push_back(b);
  }
  append_new_blocks(r, need);
  r.blocks_generation = ++next_generation;
  r.num_computed = computed;
  r.num_published = hits;
  prefix_queries += r.num_tokens();
  prefix_hits += computed;
  r.status = Status::kRunning;
  r.admit_seq = ++next_admit;
  r.running_index = static_cast<std::int32_t>(running.size());
  running.push_back(&r);
  token_budget -= n;
  r.num_scheduled = n;
  return true;
}

void EngineCore::Impl::fill_inputs() {
  std::int32_t t = 0;
  std::int32_t s = 0;
  std::int32_t k = 0;
  query_start_loc[0] = 0;
  for (std::size_t idx = 0; idx < running.size(); ++idx) {
    prefetch_request(running, idx);
    Request& r = *running[idx];
    const std::int32_t n = r.num_scheduled;
    if (n == 0) continue;
    const std::int32_t c = r.num_computed;
    const std::int32_t e = c + n;
    scheduled.push_back(&r);
    out.request_ids.emplace_back(r.id);
    const std::int32_t* blocks = r.blocks.data();
    const auto ti = static_cast<std::size_t>(t);
    const auto nb = static_cast<std::int32_t>(r.blocks.size());
    if (n == 1 && e == r.num_tokens() && block_of(c) == nb - 1) {
      // A decode: its token and block are at hand in the request (no vector reads, no memcpy).
      input_ids[ti] = r.last_token;
      positions[ti] = c;
      slot_mapping[ti] = static_cast<std::int64_t>(r.tail_block) * bs + offset_in_block(c);
    } else {
      std::memcpy(&input_ids[ti], r.tokens.data() + c,
                  static_cast<std::size_t>(n) * sizeof(std::int32_t));
      std::int64_t* pos = &positions[ti];
      std::int64_t* slot = &slot_mapping[ti];
      for (std::int32_t p = c; p < e; ++p) {
        *pos++ = p;
        *slot++ = static_cast<std::int64_t>(blocks[block_of(p)]) * bs + offset_in_block(p);
      }
    }
    // Block-table row: extend it when it still belongs to this block table, else rewrite it.
    const auto row = static_cast<std::size_t>(s);
    std::int32_t* table = &block_tables[row * static_cast<std::size_t>(max_blocks)];
    std::int32_t from = 0;
    const std::int32_t filled = row_filled[row];
    if (row_owner[row] == &r && row_generation[row] == r.blocks_generation) {
      from = std::min(filled, nb);
    } else {
      row_owner[row] = &r;
      row_generation[row] = r.blocks_generation;
    }
    for (std::int32_t i = from; i < nb; ++i) table[i] = blocks[i];
    for (std::int32_t i = nb; i < filled; ++i) table[i] = BlockPool::kNullBlock;
    row_filled[row] = nb;

    seq_lens[row] = e;
    num_computed_tokens[row] = c;
    query_start_loc[row + 1] = t + n;
    r.samples_now = e == r.num_tokens();
    if (r.samples_now) {
      logits_indices[static_cast<std::size_t>(k)] = t + n - 1;
      sampled_seq_indices[static_cast<std::size_t>(k)] = s;
      ++k;
    }
    for (std::size_t j = 0; r.has_mm && j < r.mm.size(); ++j) {
      const MultiModalItem& m = r.mm[j];
      if (m.offset >= e) break;
      if (m.offset + m.length <= c) continue;
      if (r.mm_state[j] == MMState::kEncodeNow) {
        out.encoder_inputs.push_back({r.id, static_cast<std::int32_t>(j)});
        r.mm_state[j] = MMState::kCached;
      }
      const std::int32_t begin = std::max(c, m.offset);
      const std::int32_t end = std::min(e, m.offset + m.length);
      out.mm_embeds.push_back(
          {t + (begin - c), r.id, static_cast<std::int32_t>(j), begin - m.offset, end - begin});
      if (m.offset + m.length <= e) {
        // Its last tokens run in this step: the embeddings may go once the step has run.
        r.mm_state[j] = MMState::kDone;
        encoder_cache_used -= m.length;
        pending_freed.push_back({r.id, static_cast<std::int32_t>(j)});
      }
    }
    if (r.has_mm) r.enc_tokens_now = 0;
    t += n;
    ++s;
  }
  out.num_seqs = s;
  out.num_tokens = t;
  out.num_sampled = k;
}

void EngineCore::Impl::finish(Request& r, FinishReason reason) {
  r.finish_reason = reason;
  if (r.status == Status::kRunning) {
    remove_from_running(r);
  } else if (r.status == Status::kWaiting || r.status == Status::kPreempted) {
    waiting.erase(&r);
  }
  r.status = Status::kFinished;
  release_encoder_entries(r, pending_freed);
  release_blocks(r);
  auto it = requests.find(r.id);
  finished.push_back(std::move(it->second));
  requests.erase(it);
}

EngineCore::EngineCore(const EngineConfig& config) : impl_(std::make_unique<Impl>(config)) {}
EngineCore::~EngineCore() = default;

const EngineConfig& EngineCore::config() const { return impl_->cfg; }

void EngineCore::add_request(const std::string& request_id, RequestParams params) {
  Impl& s = *impl_;
  const EngineConfig& cfg = s.cfg;
  auto fail = [&](const std::string& msg) {
    throw ValueError("add_request('" + request_id + "'): " + msg);
  };
  if (s.requests.count(request_id) != 0) fail("request id already in use");
  const auto prompt_len = static_cast<std::int64_t>(params.prompt_token_ids.size());
  if (prompt_len == 0) fail("prompt_token_ids is empty");
  if (params.max_tokens < 1) fail("max_tokens must be >= 1");
  if (params.min_tokens < 0 || params.min_tokens > params.max_tokens) {
    fail("min_tokens must be in [0, max_tokens]");
  }
  if (prompt_len + params.max_tokens > cfg.max_model_len) {
    fail("prompt (" + std::to_string(prompt_len) + " tokens) + max_tokens (" +
         std::to_string(params.max_tokens) + ") exceeds max_model_len (" +
         std::to_string(cfg.max_model_len) + ")");
  }
  // KV is needed for every token but the last sampled one.
  const std::int64_t kv_tokens = prompt_len + params.max_tokens - 1;
  const std::int64_t blocks_needed = (kv_tokens + cfg.block_size - 1) / cfg.block_size;
  if (blocks_needed > s.pool.num_usable_blocks()) {
    fail("needs " + std::to_string(blocks_needed) + " KV blocks but the cache has only " +
         std::to_string(s.pool.num_usable_blocks()));
  }
  std::int64_t prev_end = 0;
  std::int64_t image_tokens = 0;
  for (std::size_t j = 0; j < params.mm_items.size(); ++j) {
    const MultiModalItem& m = params.mm_items[j];
    const std::string which = "mm_items[" + std::to_string(j) + "]";
    if (m.length < 1) fail(which + " has length < 1");
    if (m.offset < prev_end) fail(which + " overlaps the previous item or is out of order");
    if (static_cast<std::int64_t>(m.offset) + m.length > prompt_len) {
      fail(which + " extends past the end of the prompt");
    }
    if (m.length > cfg.max_num_encoder_tokens || m.length > cfg.encoder_cache_size) {
      fail(which + " has " + std::to_string(m.length) +
           " tokens, more than max_num_encoder_tokens (" +
           std::to_string(cfg.max_num_encoder_tokens) + ") or encoder_cache_size (" +
           std::to_string(cfg.encoder_cache_size) + ")");
    }
    prev_end = static_cast<std::int64_t>(m.offset) + m.length;
    image_tokens += m.length;
  }
  if (!cfg.enable_chunked_prefill &&
      (image_tokens > cfg.max_num_encoder_tokens || image_tokens > cfg.encoder_cache_size)) {
    fail("without chunked prefill all images of a prompt must fit the encoder budget and cache");
  }

  RequestPtr r(s.slab.create(&s.arena), RequestDeleter{&s.slab});
  r->id = request_id;
  r->min_total = static_cast<std::int32_t>(prompt_len) + params.min_tokens;
  r->length_limit =
      std::min(static_cast<std::int32_t>(prompt_len) + params.max_tokens, cfg.max_model_len);
  // Capacity for every token the request can reach: no reallocation while decoding.
  r->tokens.allocate(s.arena, static_cast<std::size_t>(prompt_len + params.max_tokens));
  r->tokens.assign(params.prompt_token_ids.data(),
                   params.prompt_token_ids.data() + params.prompt_token_ids.size());
  r->last_token = r->tokens.back();
  r->mm = std::move(params.mm_items);
  r->mm_state.assign(r->mm.size(), MMState::kNone);
  r->has_mm = !r->mm.empty();
  r->ignore_eos = params.ignore_eos;
  r->eos = params.eos_token_id;
  r->stop_ids = std::move(params.stop_token_ids);
  r->has_stop_ids = !r->stop_ids.empty();
  r->priority = params.priority;
  r->has_salt = params.cache_salt.has_value();
  if (r->has_salt) r->salt = *params.cache_salt;
  r->arrival = ++s.next_arrival;
  r->blocks.allocate(s.arena, static_cast<std::size_t>(blocks_needed));
  // A key per full block of prompt + outputs: no reallocation while decoding.
  if (cfg.enable_prefix_caching) {
    r->keys.allocate(s.arena,
                     static_cast<std::size_t>((prompt_len + params.max_tokens) / cfg.block_size));
  }
  r->blocks_generation = ++s.next_generation;
  s.compute_keys(*r);
  Request* raw = r.get();
  s.requests.emplace(request_id, std::move(r));
  s.waiting.insert(raw);
}

bool EngineCore::abort_request(const std::string& request_id) {
  return finish_request(request_id, FinishReason::kAbort);
}

bool EngineCore::finish_request(const std::string& request_id, FinishReason reason) {
  if (reason == FinishReason::kNone) throw ValueError("finish_request: reason must not be none");
  Impl& s = *impl_;
  auto it = s.requests.find(request_id);
  if (it == s.requests.end()) return false;
  Request& r = *it->second;
  s.finish(r, reason);
  s.externally_finished.push_back(&r);
  return true;
}

bool EngineCore::has_unfinished_requests() const {
  // Finished requests count until the loop has heard of them: their events (next update())
  // and the image embeddings they leave to free (next schedule()).
  return !impl_->requests.empty() || !impl_->externally_finished.empty() ||
         !impl_->pending_freed.empty();
}
std::int32_t EngineCore::num_waiting() const {
  return static_cast<std::int32_t>(impl_->waiting.size());
}
std::int32_t EngineCore::num_running() const {
  return static_cast<std::int32_t>(impl_->running.size());
}

const SchedulerOutput& EngineCore::schedule() {
  Impl& s = *impl_;
  if (s.awaiting_update) {
    throw Error("EngineCore::schedule: update() must be called after a plan that scheduled work");
  }
  SchedulerOutput& out = s.out;
  // Finished requests whose event went out can go now: no plan or event refers to them any more.
  s.finished.erase(std::remove_if(s.finished.begin(), s.finished.end(),
                                  [](const RequestPtr& r) { return r->finish_reported; }),
                   s.finished.end());
  s.scheduled.clear();
  out.request_ids.clear();
  out.encoder_inputs.clear();
  out.mm_embeds.clear();
  out.preempted_request_ids.clear();
  out.freed_encoder_outputs.swap(s.pending_freed);
  s.pending_freed.clear();
  s.token_budget = s.cfg.max_num_batched_tokens;
  s.encoder_budget = s.cfg.max_num_encoder_tokens;
  s.preempted_this_step = false;

  // Running requests: decodes first so that long prefill chunks cannot starve them. The
  // prefilling ones are noted on the way (in row order) so the second pass visits only them: a
  // preemption never turns a prefill into a decode, and the conditions are checked again.
  s.prefilling.clear();
  for (std::size_t row = 0; row < s.running.size(); ++row) {
    prefetch_request(s.running, row);
    Request* rp = s.running[row];
    Request& r = *rp;
    if (r.status != Status::kRunning || r.num_scheduled > 0) continue;
    if (r.num_tokens() - r.num_computed == 1) {
      s.schedule_running(r);
    } else {
      s.prefilling.push_back(rp);
    }
  }
  for (Request* rp : s.prefilling) {
    Request& r = *rp;
    if (r.status != Status::kRunning || r.num_scheduled > 0) continue;
    s.schedule_running(r);
  }
  if (s.preempted_this_step) {
    for (std::size_t i = 0; i < s.running.size();) {
      Request& r = *s.running[i];
      if (r.status == Status::kPreempted) {
        s.remove_from_running(r);
      } else {
        ++i;
      }
    }
  } else {
    while (!s.waiting.empty() && s.token_budget > 0 &&
           static_cast<std::int32_t>(s.running.size()) < s.cfg.max_num_seqs) {
      Request& r = **s.waiting.begin();
      if (!s.try_admit(r)) break;
      s.waiting.erase(s.waiting.begin());
    }
  }
  s.fill_inputs();
  s.awaiting_update = out.num_seqs > 0;
  return out;
}

const std::vector<RequestEvent>& EngineCore::update(const std::int32_t* sampled,
                                                    std::size_t num_sampled) {
  Impl& s = *impl_;
  if (num_sampled != static_cast<std::size_t>(s.out.num_sampled)) {
    throw ValueError("update: expected " + std::to_string(s.out.num_sampled) +
                     " sampled tokens (one per plan.logits_indices entry), got " +
                     std::to_string(num_sampled));
  }
  s.awaiting_update = false;
  s.events.clear();
  std::size_t k = 0;
  const bool caching = s.cfg.enable_prefix_caching;
  for (std::size_t row = 0; row < s.scheduled.size(); ++row) {
    prefetch_request(s.scheduled, row);
    if (row + kPrefetchAhead / 2 < s.scheduled.size()) {
      s.prefetch_update(*s.scheduled[row + kPrefetchAhead / 2]);
    }
    Request& r = *s.scheduled[row];
    const bool samples = r.samples_now;
    const std::int32_t token = samples ? sampled[k++] : -1;
    r.samples_now = false;
    if (r.status != Status::kRunning) continue;  // finished from outside after schedule()
    r.num_computed += r.num_scheduled;
    r.num_scheduled = 0;
    if (caching) {
      const std::int32_t full = s.block_of(r.num_computed);
      for (std::int32_t i = r.num_published; i < full; ++i) {
        const auto block = r.blocks[static_cast<std::size_t>(i)];
        s.pool.prefetch_publish(block, r.keys[static_cast<std::size_t>(i)]);
        s.to_publish.push_back({block, i, &r});
      }
      r.num_published = std::max(r.num_published, full);
    }
    if (!samples) continue;
    r.tokens.push_back(token);
    r.last_token = token;
    if (caching && s.offset_in_block(r.num_tokens()) == 0) s.compute_keys(r);
    // Built in place: the events vector keeps its capacity from step to step.
    RequestEvent& ev = s.events.emplace_back();
    ev.request_id = r.id;
    ev.has_token = true;
    ev.token = token;
    const std::int32_t total = r.num_tokens();
    if (total >= r.min_total) {
      if ((!r.ignore_eos && r.eos >= 0 && token == r.eos) ||
          (r.has_stop_ids &&
           std::find(r.stop_ids.begin(), r.stop_ids.end(), token) != r.stop_ids.end())) {
        ev.finish_reason = FinishReason::kStop;
        ev.stop_token = token;
      }
    }
    if (ev.finish_reason == FinishReason::kNone && total >= r.length_limit) {
      ev.finish_reason = FinishReason::kLength;
    }
    if (ev.finish_reason != FinishReason::kNone) {
      r.stop_token = ev.stop_token;
      s.finish(r, ev.finish_reason);
      r.finish_reported = true;
    }
  }
  // Publishing after the loop, in the same order, gives the same pool state (nothing in the loop
  // allocates or looks up blocks; a block released by a finish stays publishable) while the
  // prefetches issued in the loop hide the cache misses of the index and block records.
  for (const auto& p : s.to_publish) {
    s.pool.publish(p.block, p.request->keys[static_cast<std::size_t>(p.key_index)]);
  }
  s.to_publish.clear();
  for (Request* rp : s.externally_finished) {
    RequestEvent ev;
    ev.request_id = rp->id;
    ev.finish_reason = rp->finish_reason;
    rp->finish_reported = true;
    s.events.push_back(ev);
  }
  s.externally_finished.clear();
  return s.events;
}

EngineStats EngineCore::stats() const {
  const Impl& s = *impl_;
  EngineStats st;
  st.num_running = static_cast<std::int32_t>(s.running.size());
  st.num_waiting = static_cast<std::int32_t>(s.waiting.size());
  st.num_free_blocks = s.pool.num_free_blocks();
  st.num_total_blocks = s.pool.num_usable_blocks();
  st.kv_cache_usage =
      1.0 - static_cast<double>(st.num_free_blocks) / static_cast<double>(st.num_total_blocks);
  st.prefix_cache_queries = s.prefix_queries;
  st.prefix_cache_hits = s.prefix_hits;
  st.num_preemptions = s.num_preemptions;
  st.encoder_cache_usage = s.cfg.encoder_cache_size > 0
                               ? static_cast<double>(s.encoder_cache_used) /
                                     static_cast<double>(s.cfg.encoder_cache_size)
                               : 0.0;
  return st;
}

bool EngineCore::reset_prefix_cache() { return impl_->pool.reset_prefix_cache(); }

void EngineCore::check_consistency() const {
  const Impl& s = *impl_;
  auto fail = [](const std::string& msg) { throw Error("EngineCore inconsistency: " + msg); };
  std::vector<std::int32_t> owners(static_cast<std::size_t>(s.pool.num_blocks()), 0);
  owners[BlockPool::kNullBlock] = 1;
  std::int32_t encoder_used = 0;
  for (const auto& kv : s.requests) {
    const Request& r = *kv.second;
    if (r.status == Status::kRunning) {
      if (s.running[static_cast<std::size_t>(r.running_index)] != &r)
        fail(r.id + ": running index");
      if (static_cast<std::int32_t>(r.blocks.size()) < ceil_div(r.num_computed, s.bs)) {
        fail(r.id + ": fewer blocks than computed tokens");
      }
    } else if (!r.blocks.empty()) {
      fail(r.id + ": holds blocks while not running");
    }
    for (std::int32_t b : r.blocks) {
      if (b <= 0 || b >= s.pool.num_blocks()) fail(r.id + ": bad block id");
      ++owners[static_cast<std::size_t>(b)];
    }
    for (std::size_t j = 0; j < r.mm.size(); ++j) {
      if (r.mm_state[j] == MMState::kCached || r.mm_state[j] == MMState::kEncodeNow) {
        encoder_used += r.mm[j].length;
      }
    }
  }
  for (const auto& r : s.finished) {
    if (!r->blocks.empty()) fail(r->id + ": finished but holds blocks");
  }
  std::int32_t free_count = 0;
  for (std::int32_t b = 0; b < s.pool.num_blocks(); ++b) {
    if (s.pool.ref_count(b) != owners[static_cast<std::size_t>(b)]) {
      fail("block " + std::to_string(b) + " has reference count " +
           std::to_string(s.pool.ref_count(b)) + " but " +
           std::to_string(owners[static_cast<std::size_t>(b)]) + " owners");
    }
    if (owners[static_cast<std::size_t>(b)] == 0) ++free_count;
  }
  if (free_count != s.pool.num_free_blocks()) fail("free queue length");
  if (encoder_used != s.encoder_cache_used) fail("encoder cache usage");
  if (s.encoder_cache_used > s.cfg.encoder_cache_size) fail("encoder cache over capacity");
  if (static_cast<std::int32_t>(s.running.size()) > s.cfg.max_num_seqs) fail("max_num_seqs");
  if (s.waiting.size() + s.running.size() != s.requests.size()) fail("queue membership");
}

}  // namespace aphrodite::engine
