// The engine core driven from C++: SHA-256 vectors, the block pool, and a seeded fuzz loop that
// runs the documented schedule/update loop with a fake model executor.
#include <gtest/gtest.h>

#include <cstdio>
#include <list>
#include <map>
#include <random>
#include <set>
#include <string>

#include "aphrodite/engine/block_pool.h"
#include "aphrodite/engine/engine_core.h"
#include "aphrodite/engine/sha256.h"
#include "aphrodite/error.h"

namespace {

using namespace aphrodite::engine;

std::string hex(const Sha256Digest& d) {
  std::string s;
  char buf[3];
  for (std::uint8_t b : d) {
    std::snprintf(buf, sizeof(buf), "%02x", b);
    s += buf;
  }
  return s;
}

TEST(Sha256, KnownVectors) {
  EXPECT_EQ(hex(Sha256::hash("", 0)),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  EXPECT_EQ(hex(Sha256::hash("abc", 3)),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  const std::string two_blocks = "abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq";
  EXPECT_EQ(hex(Sha256::hash(two_blocks.data(), two_blocks.size())),
            "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
  // One million 'a', fed in uneven pieces to exercise the buffering.
  Sha256 h;
  const std::string chunk(997, 'a');
  std::size_t left = 1000000;
  while (left > 0) {
    const std::size_t n = std::min(left, chunk.size());
    h.update(chunk.data(), n);
    left -= n;
  }
  EXPECT_EQ(hex(h.finish()), "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
}

// The one-shot hash pads short messages itself; it must agree with update()/finish() at every
// length, across the one-, two-, three- and four-block cases and past them.
TEST(Sha256, OneShotMatchesIncremental) {
  std::string message;
  for (std::size_t len = 0; len <= 300; ++len) {
    Sha256 h;
    for (std::size_t i = 0; i < len; i += 7)
      h.update(message.data() + i, std::min<std::size_t>(7, len - i));
    EXPECT_EQ(hex(Sha256::hash(message.data(), len)), hex(h.finish())) << "length " << len;
    message.push_back(static_cast<char>('a' + (len * 31 + 7) % 26));
  }
}

// The free queue against a plain list model under random allocate/release/acquire: a small pool
// makes stale ring entries (acquire from the middle) and ring compactions frequent.
TEST(BlockPool, FreeQueueMatchesListModel) {
  constexpr std::int32_t kBlocks = 9;
  BlockPool pool(kBlocks, /*enable_caching=*/false);
  std::list<std::int32_t> free_list;
  for (std::int32_t b = 1; b < kBlocks; ++b) free_list.push_back(b);
  std::vector<std::int32_t> refs(kBlocks, 0);
  std::mt19937 rng(7);
  for (int step = 0; step < 20000; ++step) {
    const int op = static_cast<int>(rng() % 3);
    const auto block = static_cast<std::int32_t>(1 + rng() % (kBlocks - 1));
    if (op == 0 && !free_list.empty()) {
      const std::int32_t expected = free_list.front();
      free_list.pop_front();
      ASSERT_EQ(pool.allocate(), expected) << "step " << step;
      refs[static_cast<std::size_t>(expected)] = 1;
    } else if (op == 1 && refs[static_cast<std::size_t>(block)] > 0) {
      pool.release(block);
      if (--refs[static_cast<std::size_t>(block)] == 0) free_list.push_back(block);
    } else if (op == 2) {
      pool.acquire(block);
      if (refs[static_cast<std::size_t>(block)]++ == 0) free_list.remove(block);
    }
    ASSERT_EQ(pool.num_free_blocks(), static_cast<std::int32_t>(free_list.size()));
    ASSERT_EQ(pool.ref_count(block), refs[static_cast<std::size_t>(block)]);
  }
}

TEST(BlockPool, LruFreeQueueAndCache) {
  BlockPool pool(5, /*enable_caching=*/true);
  EXPECT_EQ(pool.num_free_blocks(), 4);
  const std::int32_t a = pool.allocate(), b = pool.allocate();
  EXPECT_EQ(a, 1);
  EXPECT_EQ(b, 2);
  BlockKey ka{}, kb{};
  ka[0] = 1;
  kb[0] = 2;
  EXPECT_TRUE(pool.publish(a, ka));
  EXPECT_FALSE(pool.publish(b, ka));  // key already taken
  EXPECT_TRUE(pool.publish(b, kb));
  pool.release(a);
  pool.release(b);
  EXPECT_EQ(pool.lookup(ka), a);
  pool.acquire(a);  // a cache hit takes a back out of the free queue
  EXPECT_EQ(pool.num_free_blocks(), 3);
  // Free queue now: 3, 4, b. Two allocations use the never-cached blocks, the third evicts b.
  EXPECT_EQ(pool.allocate(), 3);
  EXPECT_EQ(pool.allocate(), 4);
  EXPECT_EQ(pool.allocate(), b);
  EXPECT_EQ(pool.lookup(kb), -1);
  EXPECT_EQ(pool.lookup(ka), a);
  EXPECT_THROW(pool.allocate(), aphrodite::Error);
  EXPECT_THROW(pool.release(0), aphrodite::Error);
  EXPECT_FALSE(pool.reset_prefix_cache());
}

// A fuzz loop over the public API with tiny caches that force preemption: every non-aborted
// request ends with exactly the tokens the loop sampled for it, the plan never exceeds its
// budgets, every image is encoded at most once per admission, and the pool returns to full.
void fuzz(std::uint32_t seed, EngineConfig cfg, int num_requests) {
  std::mt19937 rng(seed);
  auto uni = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); };
  EngineCore core(cfg);
  struct Expect {
    std::vector<std::int32_t> sampled, received;
    std::int32_t max_tokens = 0;
    bool aborted = false, finished = false;
    std::set<std::int32_t> encoded;
  };
  std::map<std::string, Expect> reqs;
  const std::int32_t eos = 3;
  int added = 0;
  std::int64_t preemptions = 0;
  std::vector<std::int32_t> sampled;
  while (added < num_requests || core.has_unfinished_requests()) {
    for (int i = uni(0, 2); i > 0 && added < num_requests; --i) {
      RequestParams p;
      const int plen = uni(1, cfg.max_model_len / 2);
      for (int t = 0; t < plen; ++t) p.prompt_token_ids.push_back(uni(4, 20));
      if (plen > 8 && uni(0, 1) == 1) {
        MultiModalItem m;
        m.offset = uni(0, 3);
        m.length = uni(1, std::min(plen - m.offset, cfg.max_num_encoder_tokens));
        m.hash[0] = static_cast<std::uint8_t>(uni(0, 2));
        p.mm_items.push_back(m);
      }
      p.max_tokens = uni(1, std::min(20, cfg.max_model_len - plen));
      p.eos_token_id = eos;
      p.ignore_eos = true;
      const std::string id = "r" + std::to_string(added++);
      reqs[id].max_tokens = p.max_tokens;
      core.add_request(id, std::move(p));
    }
    const SchedulerOutput& plan = core.schedule();
    ASSERT_LE(plan.num_tokens, cfg.max_num_batched_tokens);
    ASSERT_LE(plan.num_seqs, cfg.max_num_seqs);
    preemptions += static_cast<std::int64_t>(plan.preempted_request_ids.size());
    for (const auto& id : plan.preempted_request_ids) reqs[id].encoded.clear();
    for (const auto& e : plan.encoder_inputs) {
      ASSERT_TRUE(reqs[std::string(e.request_id)].encoded.insert(e.mm_index).second);
    }
    for (std::int32_t s = 0; s < plan.num_seqs; ++s) {
      ASSERT_EQ(plan.seq_lens[s] - plan.num_computed_tokens[s],
                plan.query_start_loc[s + 1] - plan.query_start_loc[s]);
    }
    sampled.clear();
    for (std::int32_t k = 0; k < plan.num_sampled; ++k) {
      const std::string id(plan.request_ids[plan.sampled_seq_indices[k]]);
      const std::int32_t tok = uni(0, 30);
      sampled.push_back(tok);
      reqs[id].sampled.push_back(tok);
    }
    if (uni(0, 30) == 0 && plan.num_seqs > 0) {
      const std::string victim(plan.request_ids[0]);
      Expect& e = reqs[victim];
      if (!e.finished) {
        ASSERT_TRUE(core.abort_request(victim));
        e.aborted = true;
      }
    }
    const auto& events = core.update(sampled.data(), sampled.size());
    for (const RequestEvent& ev : events) {
      Expect& e = reqs[std::string(ev.request_id)];
      ASSERT_FALSE(e.finished);
      if (ev.has_token) e.received.push_back(ev.token);
      if (ev.finish_reason != FinishReason::kNone) {
        e.finished = true;
        ASSERT_EQ(ev.finish_reason == FinishReason::kAbort, e.aborted);
      }
    }
    core.check_consistency();
  }
  for (auto& [id, e] : reqs) {
    ASSERT_TRUE(e.finished) << id;
    if (e.aborted) continue;
    ASSERT_EQ(static_cast<std::int32_t>(e.received.size()), e.max_tokens) << id;
    ASSERT_EQ(e.received, e.sampled) << id;
  }
  const EngineStats st = core.stats();
  EXPECT_EQ(st.num_free_blocks, cfg.num_blocks - 1);
  EXPECT_EQ(st.encoder_cache_usage, 0.0);
  if (cfg.num_blocks <= 12) {
    EXPECT_GT(preemptions, 0);
  }
}

TEST(EngineCore, FuzzTinyCacheForcesPreemption) {
  EngineConfig cfg;
  cfg.num_blocks = 10;
  cfg.block_size = 4;
  cfg.max_num_seqs = 6;
  cfg.max_num_batched_tokens = 16;
  cfg.max_model_len = 36;
  cfg.max_num_encoder_tokens = 8;
  cfg.encoder_cache_size = 12;
  fuzz(1, cfg, 1500);
}

TEST(EngineCore, FuzzLargerCacheNoPrefixCaching) {
  EngineConfig cfg;
  cfg.num_blocks = 64;
  cfg.block_size = 8;
  cfg.max_num_seqs = 16;
  cfg.max_num_batched_tokens = 48;
  cfg.max_model_len = 80;
  cfg.max_num_encoder_tokens = 16;
  cfg.encoder_cache_size = 24;
  cfg.enable_prefix_caching = false;
  fuzz(2, cfg, 1500);
}

TEST(EngineCore, RejectsRequestsThatCanNeverFit) {
  EngineConfig cfg;
  cfg.num_blocks = 4;
  cfg.block_size = 4;
  cfg.max_model_len = 64;
  cfg.max_num_seqs = 4;
  cfg.max_num_batched_tokens = 64;
  EngineCore core(cfg);
  RequestParams p;
  p.prompt_token_ids.assign(20, 1);
  p.max_tokens = 4;
  EXPECT_THROW(core.add_request("a", p), aphrodite::ValueError);  // 6 blocks > 3
  p.prompt_token_ids.assign(62, 1);
  EXPECT_THROW(core.add_request("a", p), aphrodite::ValueError);  // > max_model_len
  EngineConfig bad = cfg;
  bad.max_num_batched_tokens = 2;
  EXPECT_THROW(EngineCore{bad}, aphrodite::ValueError);
}

TEST(EngineCore, DocumentedLoopFreesTheImagesOfARequestAbortedMidPrefill) {
  // The loop of engine_core.h runs until the core has reported everything: a request aborted
  // while its image is cached leaves that image to free on one more schedule().
  EngineConfig cfg;
  cfg.num_blocks = 32;
  cfg.block_size = 4;
  cfg.max_model_len = 64;
  cfg.max_num_seqs = 4;
  cfg.max_num_batched_tokens = 8;
  EngineCore core(cfg);
  RequestParams p;
  p.prompt_token_ids.assign(30, 1);
  MultiModalItem image;
  image.offset = 4;
  image.length = 12;
  p.mm_items.push_back(image);
  p.max_tokens = 4;
  core.add_request("img", p);
  std::set<std::string> held;  // embeddings the caller keeps, by request
  int steps = 0;
  while (core.has_unfinished_requests()) {
    const SchedulerOutput& plan = core.schedule();
    for (const auto& e : plan.encoder_inputs) held.insert(std::string(e.request_id));
    for (const auto& f : plan.freed_encoder_outputs) held.erase(f.request_id);
    std::vector<std::int32_t> sampled(static_cast<std::size_t>(plan.num_sampled), 7);
    core.update(sampled.data(), sampled.size());
    if (++steps == 1) {
      ASSERT_EQ(held.size(), 1u);  // encoded in the first chunk, still needed by the next
      ASSERT_TRUE(core.abort_request("img"));
    }
    ASSERT_LT(steps, 10);
  }
  EXPECT_TRUE(held.empty());
  EXPECT_EQ(core.stats().encoder_cache_usage, 0.0);
  core.check_consistency();
}

}  // namespace
