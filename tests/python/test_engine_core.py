"""The C++ engine core through aphrodite._C: SHA-256, scheduling, prefix cache, randomized loads.

A simulated model executor writes a content id per KV slot (token id, or the image hash and the
index inside the image for image tokens) and checks, for every sequence that samples, that its
whole context reads back the right contents through its block table. That catches wrong slot
mappings, wrong block tables and blocks wrongly shared through the prefix cache.
"""

from __future__ import annotations

import hashlib
import random

import numpy as np
import pytest

from aphrodite import _C


def test_sha256_matches_hashlib():
    rng = random.Random(0)
    for n in list(range(0, 200)) + [1000, 4096, 100_000]:
        data = bytes(rng.getrandbits(8) for _ in range(n))
        assert _C.sha256(data) == hashlib.sha256(data).digest(), n


def _image_hash(tag: str) -> bytes:
    return hashlib.sha256(tag.encode()).digest()


class Request:
    def __init__(self, rid, prompt, mm, max_tokens, min_tokens, ignore_eos, eos, stop_ids):
        self.rid = rid
        self.prompt = list(prompt)
        self.mm = mm
        self.max_tokens = max_tokens
        self.min_tokens = min_tokens
        self.ignore_eos = ignore_eos
        self.eos = eos
        self.stop_ids = stop_ids
        self.sampled: list[int] = []  # what the simulated sampler produced
        self.event_tokens: list[int] = []
        self.finish_reason = None
        self.aborted = False
        self.encoded: set[int] = set()  # images encoded in the current admission
        self.freed: set[int] = set()
        # content id per position: the token id, or a value derived from the image hash
        content = np.array(self.prompt, dtype=np.int64)
        for off, length, h in mm:
            base = (int.from_bytes(h[:5], "little") << 16) + (1 << 60)
            content[off : off + length] = base + np.arange(length)
        self.content = content

    def tokens(self):
        return self.prompt + self.sampled

    def content_upto(self, n):
        extra = n - len(self.content)
        if extra > 0:
            out = np.array(self.sampled[len(self.sampled) - extra :], dtype=np.int64)
            return np.concatenate([self.content, out])
        return self.content[:n]


class Driver:
    """Drives a core like a model runner would, checking every plan."""

    def __init__(self, cfg, seed):
        self.cfg = cfg
        self.core = _C.EngineCore(cfg)
        self.kv = np.full(cfg.num_blocks * cfg.block_size, -1, dtype=np.int64)
        self.reqs: dict[str, Request] = {}
        self.rng = random.Random(seed)
        self.steps = 0

    def add(self, req: Request, **kw):
        self.core.add_request(
            req.rid,
            req.prompt,
            req.mm,
            max_tokens=req.max_tokens,
            min_tokens=req.min_tokens,
            ignore_eos=req.ignore_eos,
            eos_token_id=req.eos,
            stop_token_ids=req.stop_ids,
            **kw,
        )
        self.reqs[req.rid] = req

    def step(self, sample=None, abort_between=()):
        cfg, core = self.cfg, self.core
        plan = core.schedule()
        self.steps += 1
        assert plan.num_tokens <= cfg.max_num_batched_tokens
        assert plan.num_seqs <= cfg.max_num_seqs
        for rid, j in plan.freed_encoder_outputs:
            if rid in self.reqs and not self.reqs[rid].aborted:
                assert j in self.reqs[rid].encoded
                self.reqs[rid].freed.add(j)
        for rid in plan.preempted_request_ids:
            self.reqs[rid].encoded.clear()
            self.reqs[rid].freed.clear()
        for rid, j in plan.encoder_inputs:
            r = self.reqs[rid]
            assert j not in r.encoded, f"image {j} of {rid} encoded twice in one admission"
            r.encoded.add(j)
            r.freed.discard(j)
        qsl = plan.query_start_loc
        assert qsl[0] == 0 and len(qsl) == plan.num_seqs + 1 and qsl[-1] == plan.num_tokens
        assert len(set(plan.request_ids)) == plan.num_seqs
        slots = plan.slot_mapping
        assert len(np.unique(slots)) == plan.num_tokens, "two tokens write the same KV slot"
        bs = cfg.block_size
        covered = {}
        for tok, rid, j, start, length in plan.mm_embeds:
            r = self.reqs[rid]
            assert j in r.encoded and j not in r.freed
            off, ln, _ = r.mm[j]
            assert 0 <= start and start + length <= ln
            for i in range(length):
                assert (tok + i) not in covered
                covered[tok + i] = (rid, off + start + i)
        for s, rid in enumerate(plan.request_ids):
            r = self.reqs[rid]
            a, b = qsl[s], qsl[s + 1]
            c = plan.num_computed_tokens[s]
            assert plan.seq_lens[s] == c + (b - a)
            toks = r.tokens()
            assert list(plan.input_ids[a:b]) == toks[c : c + b - a]
            assert list(plan.positions[a:b]) == list(range(c, c + b - a))
            nblocks = -(-plan.seq_lens[s] // bs)
            table = plan.block_tables[s]
            assert (table[:nblocks] > 0).all() and (table[nblocks:] == 0).all()
            pos = np.arange(c, c + b - a)
            assert (slots[a:b] == table[pos // bs] * bs + pos % bs).all()
            for p in range(c, c + b - a):
                in_image = any(off <= p < off + ln for off, ln, _ in r.mm)
                if in_image:
                    assert covered.pop(a + p - c) == (rid, p)
            self.kv[slots[a:b]] = r.content_upto(c + b - a)[c:]
        assert not covered, "image embeddings copied to a non-image token"
        for s, rid in enumerate(plan.request_ids):
            r = self.reqs[rid]
            if s in set(plan.sampled_seq_indices.tolist()):
                n = plan.seq_lens[s]
                assert n == len(r.tokens())
                pos = np.arange(n)
                ctx_slots = plan.block_tables[s][pos // bs] * bs + pos % bs
                assert (self.kv[ctx_slots] == r.content_upto(n)).all(), f"KV of {rid} is wrong"
        assert list(plan.logits_indices) == [qsl[s + 1] - 1 for s in plan.sampled_seq_indices]
        sampled = []
        for s in plan.sampled_seq_indices:
            tok = sample(self.reqs[plan.request_ids[s]]) if sample else 1
            sampled.append(tok)
        for rid in abort_between:
            assert core.abort_request(rid)
            self.reqs[rid].aborted = True
        for s, tok in zip(plan.sampled_seq_indices, sampled):
            r = self.reqs[plan.request_ids[s]]
            if not r.aborted:
                r.sampled.append(tok)
        events = core.update(np.array(sampled, dtype=np.int32))
        for rid, new, reason, stop in events:
            r = self.reqs[rid]
            assert r.finish_reason is None
            r.event_tokens += new
            if reason is not None:
                r.finish_reason = reason
                if reason == "stop" and not r.aborted:
                    assert stop == r.sampled[-1]
        core.check_consistency()
        return plan, events

    def check_finished(self):
        core = self.core
        assert not core.has_unfinished_requests()
        st = core.stats()
        assert st["num_free_blocks"] == st["num_total_blocks"] == self.cfg.num_blocks - 1
        assert st["encoder_cache_usage"] == 0.0
        for r in self.reqs.values():
            assert r.finish_reason is not None, r.rid
            if r.aborted:
                assert r.finish_reason == "abort"
                continue
            assert r.event_tokens == r.sampled
            out = r.sampled
            stops = set(r.stop_ids) | ({r.eos} if not r.ignore_eos and r.eos >= 0 else set())
            first_stop = next(
                (i + 1 for i, t in enumerate(out) if i + 1 >= r.min_tokens and t in stops), None
            )
            if first_stop is not None and first_stop <= r.max_tokens:
                assert r.finish_reason == "stop" and len(out) == first_stop
            else:
                assert r.finish_reason == "length" and len(out) == r.max_tokens


def _random_request(rng, i, cfg, vocab, images):
    max_len = cfg.max_model_len
    plen = rng.randint(1, max_len // 2)
    max_tokens = rng.randint(1, max(1, min(24, max_len - plen)))
    mm = []
    pos = 0
    # Without chunked prefill a prompt's images are all encoded in one step.
    image_budget = min(cfg.max_num_encoder_tokens, cfg.encoder_cache_size)
    while images and image_budget > 0 and rng.random() < 0.5:
        length = rng.randint(1, image_budget)
        off = pos + rng.randint(0, 6)
        if off + length > plen or length > image_budget:
            break
        if not cfg.enable_chunked_prefill:
            image_budget -= length
        mm.append((off, length, _image_hash(rng.choice(images))))
        pos = off + length
    # A shared prefix makes the prefix cache matter.
    prefix = [7, 8, 9, 10, 11, 12, 13, 14, 15, 16] if rng.random() < 0.5 else []
    prompt = (prefix + [rng.randrange(vocab) for _ in range(plen)])[:plen]
    return Request(
        f"r{i}",
        prompt,
        mm,
        max_tokens,
        rng.randint(0, max_tokens),
        rng.random() < 0.5,
        rng.choice([-1, 3]),
        rng.sample(range(vocab), rng.randint(0, 2)),
    )


@pytest.mark.parametrize(
    "seed,num_blocks,block_size,chunked,caching",
    [
        (0, 12, 4, True, True),
        (1, 40, 8, True, True),
        (2, 30, 4, False, True),
        (3, 20, 16, True, False),
        (4, 9, 2, True, True),
    ],
)
def test_randomized_workload(seed, num_blocks, block_size, chunked, caching):
    rng = random.Random(seed)
    max_model_len = min(64, (num_blocks - 1) * block_size)
    cfg = _C.EngineConfig(
        num_blocks=num_blocks,
        block_size=block_size,
        max_num_seqs=rng.choice([3, 8, 16]),
        max_num_batched_tokens=max_model_len if not chunked else rng.choice([16, 24, 64]),
        max_model_len=max_model_len,
        max_num_encoder_tokens=12,
        encoder_cache_size=20,
        enable_prefix_caching=caching,
        enable_chunked_prefill=chunked,
    )
    d = Driver(cfg, seed)
    vocab = 12  # small, so that EOS and stop tokens happen
    images = ["cat", "dog", "car"]
    n_requests = 600
    added = 0
    live = lambda: [r for r in d.reqs.values() if r.finish_reason is None and not r.aborted]  # noqa: E731
    while added < n_requests or d.core.has_unfinished_requests():
        for _ in range(rng.randint(0, 3)):
            if added < n_requests:
                d.add(
                    _random_request(rng, added, cfg, vocab, images), priority=rng.choice([0, 0, 1])
                )
                added += 1
        if rng.random() < 0.05 and live():
            r = rng.choice(live())
            assert d.core.abort_request(r.rid)
            r.aborted = True
        between = []
        if rng.random() < 0.05 and live():
            between = [rng.choice(live()).rid]
        d.step(sample=lambda r: rng.randrange(vocab), abort_between=between)
        assert d.steps < 100_000
    d.check_finished()
    if num_blocks <= 12:
        assert d.core.stats()["num_preemptions"] > 0


def _cfg(**kw):
    base = dict(
        num_blocks=64,
        block_size=4,
        max_num_seqs=8,
        max_num_batched_tokens=64,
        max_model_len=128,
        max_num_encoder_tokens=16,
        encoder_cache_size=32,
    )
    base.update(kw)
    return _C.EngineConfig(**base)


def _run_alone(d, req, **kw):
    before = d.core.stats()
    d.add(req, **kw)
    plan, _ = d.step()
    table = list(plan.block_tables[0])
    while d.core.has_unfinished_requests():
        d.step()
    after = d.core.stats()
    return after["prefix_cache_hits"] - before["prefix_cache_hits"], table


def _req(rid, prompt, mm=(), max_tokens=2):
    return Request(rid, prompt, list(mm), max_tokens, 0, True, -1, [])


def test_prefix_cache_shared_system_prompt():
    d = Driver(_cfg(), 0)
    system = list(range(100, 122))  # 22 tokens: 5 full blocks of 4
    hits, table_a = _run_alone(d, _req("a", system + [1, 2, 3]))
    assert hits == 0
    hits, table_b = _run_alone(d, _req("b", system + [4, 5, 6, 7]))
    assert hits == 20
    assert table_b[:5] == table_a[:5]
    st = d.core.stats()
    assert st["prefix_cache_queries"] == 25 + 26 and st["prefix_cache_hits"] == 20
    # A different salt shares nothing.
    hits, _ = _run_alone(d, _req("c", system + [4, 5, 6, 7]), cache_salt="tenant-2")
    assert hits == 0
    d.check_finished()


def test_prefix_cache_same_text_different_images():
    d = Driver(_cfg(), 0)
    text = list(range(200, 230))
    # The image occupies tokens 9..16: blocks 0 and 1 come before it.
    img_a = [(9, 8, _image_hash("a"))]
    img_b = [(9, 8, _image_hash("b"))]
    _run_alone(d, _req("a", text, img_a))
    hits, _ = _run_alone(d, _req("b", text, img_b))
    assert hits == 8
    # The same image twice: reuse runs across it (7 full blocks of 30 tokens).
    hits, _ = _run_alone(d, _req("c", text, img_a))
    assert hits == 28
    # The same image at another offset is a different block content.
    hits, _ = _run_alone(d, _req("d", text, [(10, 8, _image_hash("a"))]))
    assert hits == 8
    d.check_finished()


def test_prefix_cache_evicts_least_recently_freed_first():
    # 24 usable blocks of 4 tokens.
    d = Driver(_cfg(num_blocks=25, max_model_len=96, max_num_batched_tokens=96), 0)
    a = list(range(300, 332))  # 8 blocks
    b = list(range(400, 432))
    c = list(range(500, 564))  # 16 blocks: all never-used blocks plus the 8 freed first
    _run_alone(d, _req("a", a + [1], max_tokens=1))
    _run_alone(d, _req("b", b + [1], max_tokens=1))
    _run_alone(d, _req("c", c, max_tokens=1))
    hits_b, _ = _run_alone(d, _req("b2", b + [2], max_tokens=1))
    hits_a, _ = _run_alone(d, _req("a2", a + [2], max_tokens=1))
    assert hits_b == 32
    assert hits_a == 0
    assert d.core.reset_prefix_cache()
    hits_b, _ = _run_alone(d, _req("b3", b + [3], max_tokens=1))
    assert hits_b == 0
    d.check_finished()


def test_chunk_may_end_inside_an_image_and_encodes_it_once():
    d = Driver(_cfg(max_num_batched_tokens=8, max_num_seqs=8), 0)
    d.add(_req("a", list(range(40)), [(3, 14, _image_hash("x"))], max_tokens=3))
    plans = []
    while d.core.has_unfinished_requests():
        plan, _ = d.step()
        plans.append((plan.encoder_inputs, plan.mm_embeds, plan.freed_encoder_outputs))
    assert plans[0][0] == [("a", 0)]
    assert plans[0][1] == [(3, "a", 0, 0, 5)]
    assert plans[1][0] == [] and plans[1][1] == [(0, "a", 0, 5, 8)]
    assert plans[2][1] == [(0, "a", 0, 13, 1)]
    assert plans[3][2] == [("a", 0)]
    d.check_finished()


def test_preemption_recomputes_and_resumes():
    # 6 usable blocks of 4 tokens; two requests that each grow to 5 blocks.
    d = Driver(_cfg(num_blocks=7, max_model_len=24), 0)
    d.add(_req("a", list(range(10)), max_tokens=10))
    d.add(_req("b", list(range(50, 60)), max_tokens=10))
    preempted = []
    while d.core.has_unfinished_requests():
        plan, _ = d.step(sample=lambda r: 5)
        preempted += plan.preempted_request_ids
    assert preempted and preempted[0] == "b"
    assert d.core.stats()["num_preemptions"] == len(preempted)
    d.check_finished()


def test_add_request_rejects_what_can_never_fit():
    core = _C.EngineCore(_cfg(num_blocks=5, max_model_len=64))
    with pytest.raises(ValueError, match="max_model_len"):
        core.add_request("a", list(range(60)), max_tokens=5)
    with pytest.raises(ValueError, match="KV blocks"):
        core.add_request("a", list(range(20)), max_tokens=5)
    with pytest.raises(ValueError, match="max_num_encoder_tokens"):
        small = _C.EngineCore(_cfg(max_num_encoder_tokens=4))
        small.add_request("a", list(range(10)), [(0, 5, _image_hash("x"))], max_tokens=1)
    with pytest.raises(ValueError, match="overlaps"):
        core.add_request(
            "a",
            list(range(10)),
            [(0, 4, _image_hash("x")), (3, 2, _image_hash("y"))],
            max_tokens=1,
        )
    with pytest.raises(ValueError, match="32 bytes"):
        core.add_request("a", list(range(10)), [(0, 4, b"short")], max_tokens=1)
    core.add_request("a", list(range(4)), max_tokens=1)
    with pytest.raises(ValueError, match="already in use"):
        core.add_request("a", list(range(4)), max_tokens=1)
    with pytest.raises(ValueError, match="sampled tokens"):
        core.schedule()
        core.update(np.zeros(3, dtype=np.int32))


def test_abort_and_finish_request_events():
    d = Driver(_cfg(), 0)
    d.add(_req("a", list(range(8)), max_tokens=50))
    d.add(_req("b", list(range(8)), max_tokens=50))
    d.step()
    assert d.core.finish_request("a", "stop")
    assert d.core.abort_request("b")
    assert not d.core.abort_request("b")
    assert d.core.has_unfinished_requests()
    plan = d.core.schedule()
    assert plan.num_seqs == 0
    events = d.core.update(np.zeros(0, dtype=np.int32))
    assert sorted(events) == [("a", [], "stop", None), ("b", [], "abort", None)]
    assert not d.core.has_unfinished_requests()
    assert d.core.stats()["num_free_blocks"] == 63


def test_views_survive_the_core_and_later_steps():
    core = _C.EngineCore(_cfg())
    core.add_request("a", list(range(6)), max_tokens=2)
    plan = core.schedule()
    ids = plan.input_ids
    assert ids.base is not None and not ids.flags.owndata
    del core, plan
    assert list(ids) == list(range(6))  # the view keeps the core alive
