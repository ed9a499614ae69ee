// The engine core: requests, continuous-batching scheduler, KV-block and encoder-cache
// accounting, and input preparation for one model step at a time. No Python and no model here:
// the caller runs the model between schedule() and update().
//
// The loop (the Python runtime does exactly this; tests/cpp/test_engine_core.cpp shows it in C++):
//
//   aphrodite::engine::EngineCore core(config);
//   core.add_request("r0", params);                       // any time between steps
//   while (core.has_unfinished_requests()) {
//     const SchedulerOutput& plan = core.schedule();
//     // 1. encode plan.encoder_inputs (image -> embeddings), keep them by (request, mm_index);
//     //    drop plan.freed_encoder_outputs.
//     // 2. run the model on plan.num_tokens tokens: input_ids, positions, slot_mapping (where to
//     //    write K/V: block_id * block_size + offset), block_tables, seq_lens, query_start_loc;
//     //    copy image embeddings into the input embeddings as plan.mm_embeds says.
//     // 3. sample one token per entry of plan.logits_indices (rows of the flat token batch).
//     const auto& events = core.update(sampled.data(), sampled.size());
//     // 4. events: per sampled sequence its new token and finish reason, plus every request
//     //    finished from outside (abort_request/finish_request) since the last update.
//   }
//
// schedule() and update() alternate; schedule() may be called again without update() only when
// the previous plan scheduled nothing. The plan (its arrays and string views) and the events stay
// valid until the next schedule(). Not thread-safe: callers serialize every call.
//
// Scheduling policy, per step, under max_num_batched_tokens tokens, max_num_seqs sequences and
// max_num_encoder_tokens image tokens to encode:
//   1. Running requests: first every decode (one token each), then the next prefill chunk of
//      those still prefilling. When KV blocks run out, the running request with the lowest
//      priority (largest value), most recently admitted among equals, is preempted: its blocks
//      and encoder entries are freed and it goes back to the waiting queue to be recomputed
//      (prompt + tokens generated so far). A lone request always fits (checked at add time), so
//      this never deadlocks.
//   2. Waiting requests, by (priority, arrival), while nothing was preempted this step: the
//      longest cached prefix is reused, then a chunk as large as the budgets allow. Admission stops
//      at the first request that does not fit (no overtaking).
//   A chunk that reaches an image not yet encoded includes it only if the image fits this step's
//   encoder budget and the encoder cache; otherwise the chunk ends just before the image. An
//   image is encoded once per admission and its embeddings stay cached until all of its tokens
//   have been scheduled.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "aphrodite/engine/sha256.h"

namespace aphrodite::engine {

struct EngineConfig {
  std::int32_t num_blocks = 0;  // KV blocks, block 0 included (reserved as the null block)
  // Any size in [1, kMaxBlockSize] for the core; the attention kernels (attention.h) take 8,
  // 16 or 32, so a model executor built on them needs one of those.
  std::int32_t block_size = 16;
  std::int32_t max_num_seqs = 256;
  std::int32_t max_num_batched_tokens = 2048;
  std::int32_t max_model_len = 4096;
  std::int32_t max_num_encoder_tokens = 2048;  // image tokens encoded per step
  std::int32_t encoder_cache_size = 4096;      // image tokens whose embeddings are held at once
  bool enable_prefix_caching = true;
  bool enable_chunked_prefill = true;

  // Throws ValueError naming the first bad field.
  // Largest accepted block_size and max_model_len (validate()).
  static constexpr std::int32_t kMaxBlockSize = 1 << 16;
  static constexpr std::int32_t kMaxModelLen = 1 << 30;

  void validate() const;
  std::int32_t max_blocks_per_seq() const {
    return static_cast<std::int32_t>((static_cast<std::int64_t>(max_model_len) + block_size - 1) /
                                     block_size);
  }
};

// An image in a prompt: its tokens are prompt[offset, offset + length); `hash` is the SHA-256 of
// its content (pixels), so two different images never share a cache key.
struct MultiModalItem {
  std::int32_t offset = 0;
  std::int32_t length = 0;
  Sha256Digest hash{};
};

struct RequestParams {
  std::vector<std::int32_t> prompt_token_ids;
  std::vector<MultiModalItem> mm_items;  // sorted, non-overlapping, inside the prompt
  std::int32_t max_tokens = 16;
  std::int32_t min_tokens = 0;  // no stop token is honoured before this many outputs
  bool ignore_eos = false;
  std::int32_t eos_token_id = -1;  // -1: none
  std::vector<std::int32_t> stop_token_ids;
  std::int32_t priority = 0;              // smaller is scheduled first
  std::optional<std::string> cache_salt;  // requests share cached blocks only with equal salts
};

enum class FinishReason : std::uint8_t { kNone, kStop, kLength, kAbort };
// "stop", "length", "abort" ("" for kNone).
const char* finish_reason_name(FinishReason reason);

struct EncoderInput {
  std::string_view request_id;
  std::int32_t mm_index;
};

struct FreedEncoderOutput {
  std::string request_id;
  std::int32_t mm_index;
};

// Copy embeddings[start, start + length) of image (request_id, mm_index) into the flat token
// batch at rows [token_index, token_index + length).
struct MultiModalEmbedSlice {
  std::int32_t token_index;
  std::string_view request_id;
  std::int32_t mm_index;
  std::int32_t start;
  std::int32_t length;
};

// One step's plan. The arrays point into buffers the core allocates once (sized for the worst
// case) and overwrites on every schedule(). Sequences appear in a stable order across steps
// (a sequence keeps its row until a request before it leaves), which lets block-table rows be
// updated incrementally.
struct SchedulerOutput {
  std::int32_t num_seqs = 0;
  std::int32_t num_tokens = 0;
  std::int32_t num_sampled = 0;
  std::int32_t max_blocks_per_seq = 0;
  std::vector<std::string_view> request_ids;          // [num_seqs]
  const std::int32_t* input_ids = nullptr;            // [num_tokens]
  const std::int64_t* positions = nullptr;            // [num_tokens]
  const std::int64_t* slot_mapping = nullptr;         // [num_tokens]; never -1 from the core
  const std::int32_t* block_tables = nullptr;         // [num_seqs, max_blocks_per_seq], 0-padded
  const std::int32_t* seq_lens = nullptr;             // [num_seqs] context length after the step
  const std::int32_t* query_start_loc = nullptr;      // [num_seqs + 1]
  const std::int32_t* num_computed_tokens = nullptr;  // [num_seqs] in the cache before the step
  const std::int32_t* logits_indices = nullptr;       // [num_sampled] flat token rows to sample
  const std::int32_t* sampled_seq_indices = nullptr;  // [num_sampled] their sequence indices
  std::vector<EncoderInput> encoder_inputs;
  std::vector<MultiModalEmbedSlice> mm_embeds;
  std::vector<FreedEncoderOutput> freed_encoder_outputs;
  std::vector<std::string> preempted_request_ids;
};

struct RequestEvent {
  std::string_view request_id;
  bool has_token = false;  // false for requests finished from outside
  std::int32_t token = -1;
  FinishReason finish_reason = FinishReason::kNone;
  std::int32_t stop_token = -1;  // the EOS or stop token that finished it, else -1
};

struct EngineStats {
  std::int32_t num_running = 0;
  std::int32_t num_waiting = 0;
  std::int32_t num_free_blocks = 0;
  std::int32_t num_total_blocks = 0;      // usable blocks (the null block excluded)
  double kv_cache_usage = 0.0;            // owned blocks / usable blocks
  std::int64_t prefix_cache_queries = 0;  // prompt tokens looked up at admission
  std::int64_t prefix_cache_hits = 0;     // of those, tokens found cached
  std::int64_t num_preemptions = 0;
  double encoder_cache_usage = 0.0;  // cached image tokens / encoder_cache_size
};

class EngineCore {
 public:
  explicit EngineCore(const EngineConfig& config);
  ~EngineCore();
  EngineCore(const EngineCore&) = delete;
  EngineCore& operator=(const EngineCore&) = delete;

  // Throws ValueError when the id is in use, the parameters are invalid, or the request can
  // never fit (prompt + max_tokens > max_model_len, more KV blocks than the cache holds, an image
  // larger than the encoder budget or cache).
  void add_request(const std::string& request_id, RequestParams params);
  // Finishes a waiting or running request now: frees its blocks and encoder entries; the next
  // update() reports it with reason kAbort. Returns false for an unknown or finished id.
  bool abort_request(const std::string& request_id);
  // Same as abort_request with the given reason (the runtime uses kStop for stop strings).
  bool finish_request(const std::string& request_id, FinishReason reason);

  // True while any request is unfinished, and after that until the loop has been told
  // everything about finished ones: their events (update()) and the image embeddings they
  // leave to free (schedule()'s freed_encoder_outputs), e.g. after an abort mid-prefill.
  bool has_unfinished_requests() const;
  std::int32_t num_waiting() const;
  std::int32_t num_running() const;

  const SchedulerOutput& schedule();
  // `sampled` holds one token per plan.logits_indices entry. Throws ValueError on a length
  // mismatch (nothing changes then).
  const std::vector<RequestEvent>& update(const std::int32_t* sampled, std::size_t num_sampled);

  EngineStats stats() const;
  // Drops every prefix-cache key; only while no block is owned. Returns whether it was done.
  bool reset_prefix_cache();
  const EngineConfig& config() const;

  // Verifies the core's bookkeeping (block reference counts equal the owners' block tables, the
  // free queue holds exactly the unowned blocks, encoder-cache usage matches the cached images);
  // throws aphrodite::Error describing the first violation. O(blocks + tokens): for tests.
  void check_consistency() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace aphrodite::engine
