"""LLMEngine's loop on the real C++ EngineCore with a stand-in model whose logits are a
pseudo-random function of the whole context, read back through the KV-cache slots the core
assigns. Wrong block tables, slot mappings, prefix-cache hits or recomputation after preemption
change the tokens, so these tests check the engine's bookkeeping end to end without weights."""

from __future__ import annotations

import hashlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from aphrodite.engine import EngineArgs, LLMEngine
from aphrodite.multimodal import hash_rgb_array
from aphrodite.sampling_params import SamplingParams

NUM_IMAGE_TOKENS = 6
NUM_CONTEXTS = 257  # rows of the logit table; the context hash picks one


def _tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<s>", "</s>", "<image>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(["USER: what is in the picture? ASSISTANT: a cat"] * 20, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        additional_special_tokens=["<image>"],
    )


TOKENIZER = _tokenizer()
VOCAB = len(TOKENIZER)
IMAGE_TOKEN = TOKENIZER.convert_tokens_to_ids("<image>")
LOGIT_TABLE = torch.Generator().manual_seed(0)
LOGIT_TABLE = torch.randn(NUM_CONTEXTS, VOCAB, generator=LOGIT_TABLE) * 3


def _image_values(data) -> list[int]:
    digest = int.from_bytes(hash_rgb_array(data)[:8], "little")
    return [100_000 + (digest + 7919 * k) % 100_000 for k in range(NUM_IMAGE_TOKENS)]


def _context_row(values: list[int]) -> int:
    h = hashlib.sha256(np.asarray(values, dtype=np.int64).tobytes()).digest()
    return int.from_bytes(h[:8], "little") % NUM_CONTEXTS


class ContextHashRunner:
    """Stands in for ModelRunner (same methods). Token j's "hidden state" is the index of a
    logit-table row chosen by hashing every value in its context, read from the cache slots."""

    device = torch.device("cpu")

    def __init__(self) -> None:
        self.encoded: dict[tuple[str, int], list[int]] = {}
        self.dropped: list[str] = []
        self.encoder_calls = 0

    def kv_block_bytes(self, block_size: int) -> int:
        return block_size * 8

    def allocate_kv_cache(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self.cache = np.full(num_blocks * block_size, -1, dtype=np.int64)

    def execute_model(self, plan, mm_inputs):
        for request_id, index in plan.encoder_inputs:
            self.encoded[(request_id, index)] = _image_values(mm_inputs(request_id, index))
            self.encoder_calls += 1
        values = plan.input_ids.astype(np.int64).copy()
        for flat, request_id, index, start, length in plan.mm_embeds:
            values[flat : flat + length] = self.encoded[(request_id, index)][start : start + length]
        self.free_encoder_outputs(plan.freed_encoder_outputs)
        slots = plan.slot_mapping
        self.cache[slots[slots >= 0]] = values[slots >= 0]
        rows = np.empty(plan.num_tokens, dtype=np.int64)
        starts = plan.query_start_loc
        bs = self.block_size
        for i in range(plan.num_seqs):
            table = plan.block_tables[i]
            for j in range(starts[i], starts[i + 1]):
                pos = int(plan.positions[j])
                ctx_slots = [table[p // bs] * bs + p % bs for p in range(pos + 1)]
                ctx = self.cache[ctx_slots]
                assert (ctx >= 0).all(), "context read from a slot nobody wrote"
                rows[j] = _context_row(ctx.tolist())
        return torch.from_numpy(rows).view(-1, 1)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return LOGIT_TABLE[hidden.view(-1)].clone()

    def free_encoder_outputs(self, freed) -> None:
        for key in freed:
            self.encoded.pop(tuple(key), None)

    def drop_request(self, request_id: str) -> None:
        self.dropped.append(request_id)
        for key in [k for k in self.encoded if k[0] == request_id]:
            del self.encoded[key]


def _engine(**kwargs) -> LLMEngine:
    config = SimpleNamespace(
        tokenizer=TOKENIZER,
        device="cpu",
        max_model_len=kwargs.pop("max_model_len", 128),
        eos_token_id=TOKENIZER.eos_token_id,
        vocab_size=VOCAB,
        image_token_id=IMAGE_TOKEN,
        num_image_tokens=NUM_IMAGE_TOKENS,
        hidden_size=4,
        chat_template=None,
        check_image_size=lambda height, width: None,
    )
    args = dict(model="stand-in", block_size=8, max_num_seqs=8, max_num_batched_tokens=32)
    args.update(kwargs)
    return LLMEngine(EngineArgs(**args), model_config=config, runner=ContextHashRunner())


def _run(engine: LLMEngine, prompts, params) -> list:
    if isinstance(params, SamplingParams):
        params = [params] * len(prompts)
    ids = []
    for prompt, p in zip(prompts, params):
        ids.append(engine.next_request_id())
        engine.add_request(ids[-1], prompt, p)
    done = {}
    steps = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
        steps += 1
        assert steps < 10_000
    engine.core.check_consistency()
    return [done[i] for i in ids]


def _image(seed: int, size=(10, 7)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _reference_greedy(prompt_values: list[int], max_tokens: int) -> list[int]:
    ctx, out = list(prompt_values), []
    for _ in range(max_tokens):
        token = int(LOGIT_TABLE[_context_row(ctx)].argmax())
        out.append(token)
        ctx.append(token)
    return out


def _prompt_values(engine: LLMEngine, prompt) -> list[int]:
    processed = engine.process_prompt(prompt)
    values = list(processed.prompt_token_ids)
    for item in processed.mm_items:
        values[item.offset : item.offset + item.length] = _image_values(item.data)
    return values


PROMPTS = [
    "USER: what is in the picture?",
    {"prompt": "USER: <image>\nwhat is it? ASSISTANT:", "multi_modal_data": {"image": _image(1)}},
    {"prompt_token_ids": [1, 50, 60, 70, 80]},
    {
        "prompt": "<image> a <image> b",
        "multi_modal_data": {"image": [_image(2, (3, 30)), _image(3)]},
    },
]
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def test_greedy_batch_matches_reference():
    engine = _engine(limit_mm_per_prompt={"image": 2}, max_num_batched_tokens=16)
    outs = _run(engine, PROMPTS, GREEDY)
    for prompt, out in zip(PROMPTS, outs):
        expected = _reference_greedy(_prompt_values(engine, prompt), 12)
        assert out.outputs[0].token_ids == expected
        assert out.outputs[0].finish_reason == "length"
        assert out.outputs[0].text == TOKENIZER.decode(expected, skip_special_tokens=True)
        assert out.metrics.first_token_time >= out.metrics.arrival_time
        assert out.metrics.finished_time >= out.metrics.first_token_time
    assert outs[1].multi_modal_placeholders == [(outs[1].prompt_token_ids.index(IMAGE_TOKEN), 6)]
    assert not engine.runner.encoded, "finished requests must release their image encodings"


def test_finished_only_steps_return_the_same_final_outputs():
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    streamed = _run(_engine(limit_mm_per_prompt={"image": 2}), PROMPTS, params)
    engine = _engine(limit_mm_per_prompt={"image": 2})
    ids = []
    for prompt in PROMPTS:
        ids.append(engine.next_request_id())
        engine.add_request(ids[-1], prompt, params)
    done = {}
    steps = 0
    while engine.has_unfinished_requests():
        outs = engine.step(finished_only=True)
        assert all(out.finished for out in outs)
        done.update((out.request_id, out) for out in outs)
        steps += 1
        assert steps < 10_000
    assert [done[i].outputs[0].token_ids for i in ids] == [
        out.outputs[0].token_ids for out in streamed
    ]
    assert [done[i].outputs[0].text for i in ids] == [out.outputs[0].text for out in streamed]
    assert [done[i].prompt_token_ids for i in ids] == [out.prompt_token_ids for out in streamed]


def test_preemption_gives_the_unconstrained_outputs():
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    prompts = [
        p for p in PROMPTS if not isinstance(p, dict) or "<image> a" not in p.get("prompt", "")
    ]
    prompts = prompts * 2
    free = _run(_engine(), prompts, params)
    tight_engine = _engine(num_kv_blocks=30, enable_prefix_caching=False)
    tight = _run(tight_engine, prompts, params)
    assert tight_engine.stats()["num_preemptions"] > 0
    assert [o.outputs[0].token_ids for o in tight] == [o.outputs[0].token_ids for o in free]


def test_seeded_requests_reproduce_whatever_the_batch():
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=123, max_tokens=10, ignore_eos=True)
    alone = _run(_engine(), [PROMPTS[0]], seeded)[0].outputs[0].token_ids
    noise = SamplingParams(temperature=1.2, max_tokens=7, ignore_eos=True)
    batch = _run(_engine(seed=5), [PROMPTS[2], PROMPTS[0], PROMPTS[1]], [noise, seeded, noise])
    assert batch[1].outputs[0].token_ids == alone
    # n > 1 with a seed: n different but reproducible completions
    many = SamplingParams(n=3, temperature=1.0, seed=9, max_tokens=10, ignore_eos=True)
    first = _run(_engine(), [PROMPTS[0]], many)[0]
    again = _run(_engine(seed=77), [PROMPTS[0]], many)[0]
    assert [c.index for c in first.outputs] == [0, 1, 2]
    assert [c.token_ids for c in first.outputs] == [c.token_ids for c in again.outputs]
    assert len({tuple(c.token_ids) for c in first.outputs}) == 3


def test_stop_strings_and_stop_tokens_end_exactly():
    engine = _engine()
    base = _run(engine, [PROMPTS[0]], GREEDY)[0].outputs[0]
    tokens, text = base.token_ids, base.text
    # a 3-character stop string from the middle of the text (random tokens: skip U+FFFD)
    start = next(i for i in range(len(text) // 3, len(text) - 3) if "\ufffd" not in text[i : i + 3])
    stop = text[start : start + 3]
    start = text.index(stop)
    for include in (False, True):
        params = SamplingParams(
            temperature=0.0,
            max_tokens=12,
            ignore_eos=True,
            stop=[stop],
            include_stop_str_in_output=include,
        )
        out = _run(engine, [PROMPTS[0]], params)[0].outputs[0]
        assert out.finish_reason == "stop" and out.stop_reason == stop
        assert out.text == text[: start + (len(stop) if include else 0)]
        # generation ended at the first token whose text completed the stop string
        n = len(out.token_ids)
        assert stop in TOKENIZER.decode(tokens[:n]) and stop not in TOKENIZER.decode(
            tokens[: n - 1]
        )
        assert out.token_ids == tokens[:n]
    # a stop token: kept in token_ids, left out of the text
    stop_id = tokens[4]
    first = tokens.index(stop_id)
    params = SamplingParams(
        temperature=0.0, max_tokens=12, ignore_eos=True, stop_token_ids=[stop_id]
    )
    out = _run(engine, [PROMPTS[0]], params)[0].outputs[0]
    assert out.token_ids == tokens[: first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_id
    assert out.text == TOKENIZER.decode(tokens[:first])
    # min_tokens: the stop token cannot end the completion before it
    params = SamplingParams(
        temperature=0.0,
        max_tokens=12,
        ignore_eos=True,
        stop_token_ids=[stop_id],
        min_tokens=first + 2,
    )
    out = _run(engine, [PROMPTS[0]], params)[0].outputs[0]
    assert len(out.token_ids) >= first + 2


def test_prefix_cache_reuses_blocks_only_for_the_same_image():
    engine = _engine(block_size=8)
    question = "USER: <image>\nwhat is it? ASSISTANT:"
    prompt_a = {"prompt": question, "multi_modal_data": {"image": _image(11)}}
    first = _run(engine, [prompt_a], GREEDY)[0]
    hits0 = engine.stats()["prefix_cache_hits"]
    calls0 = engine.runner.encoder_calls
    second = _run(
        engine, [{"prompt": question, "multi_modal_data": {"image": _image(11)}}], GREEDY
    )[0]
    hits1 = engine.stats()["prefix_cache_hits"]
    assert second.outputs[0].token_ids == first.outputs[0].token_ids
    assert hits1 - hits0 >= (len(first.prompt_token_ids) - 1) // 8 * 8 - 8
    assert second.num_cached_tokens == hits1 - hits0 > 0
    other = _run(engine, [{"prompt": question, "multi_modal_data": {"image": _image(12)}}], GREEDY)[
        0
    ]
    image_start = other.multi_modal_placeholders[0][0]
    assert other.num_cached_tokens <= image_start // 8 * 8
    assert engine.runner.encoder_calls > calls0
    expected = _reference_greedy(
        _prompt_values(engine, {"prompt": question, "multi_modal_data": {"image": _image(12)}}), 12
    )
    assert other.outputs[0].token_ids == expected


def test_logprobs_and_prompt_logprobs():
    engine = _engine()
    params = SamplingParams(
        temperature=0.0, max_tokens=5, ignore_eos=True, logprobs=3, prompt_logprobs=2
    )
    out = _run(engine, [PROMPTS[1]], params)[0]
    values = _prompt_values(engine, PROMPTS[1])
    # prompt position p + 1 is predicted from the context values[: p + 1]
    assert out.prompt_logprobs[0] is None
    for p in range(len(values) - 1):
        ref = LOGIT_TABLE[_context_row(values[: p + 1])].double().log_softmax(-1)
        entry = out.prompt_logprobs[p + 1]
        target = out.prompt_token_ids[p + 1]
        assert entry[target].logprob == pytest.approx(float(ref[target]), abs=1e-5)
        assert entry[target].rank == int((ref > ref[target]).sum()) + 1
        assert len(entry) in (2, 3)
    completion = out.outputs[0]
    ctx = list(values)
    total = 0.0
    for token, entry in zip(completion.token_ids, completion.logprobs):
        ref = LOGIT_TABLE[_context_row(ctx)].double().log_softmax(-1)
        assert entry[token].rank == 1 and entry[token].logprob == pytest.approx(
            float(ref.max()), abs=1e-5
        )
        top = ref.topk(3).indices.tolist()
        assert set(entry) == set(top) | {token}
        total += float(ref[token])
        ctx.append(token)
    assert completion.cumulative_logprob == pytest.approx(total, abs=1e-4)


def test_add_request_errors_leave_nothing_behind():
    engine = _engine(max_model_len=32)
    with pytest.raises(ValueError, match="max_model_len"):
        engine.add_request("a", {"prompt_token_ids": list(range(3, 40))}, GREEDY)
    with pytest.raises(ValueError, match="max_logprobs"):
        engine.add_request("b", "hi", SamplingParams(logprobs=21))
    for bad, words in [
        (SamplingParams(stop_token_ids=[VOCAB]), "stop_token_ids: token ids must be below"),
        (SamplingParams(logit_bias={VOCAB + 5: 1.0}), "logit_bias: token ids must be below"),
        (SamplingParams(allowed_token_ids=[3, VOCAB]), "allowed_token_ids: token ids"),
        # Only stop tokens allowed, and min_tokens forbids them: nothing could be sampled.
        (SamplingParams(allowed_token_ids=[5], stop_token_ids=[5], min_tokens=2), "only stop"),
        (
            SamplingParams(allowed_token_ids=[TOKENIZER.eos_token_id], min_tokens=1),
            "only stop",
        ),
    ]:
        with pytest.raises(ValueError, match=words):
            engine.add_request("b", "hi", bad)
    assert not engine.has_unfinished_requests() and not engine.core.has_unfinished_requests()
    engine.add_request("c", "hi", GREEDY)
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("c", "hi", GREEDY)
    engine.abort_request("c")
    assert not engine.has_unfinished_requests()
    assert engine.step() == []
    # With ignore_eos the EOS token is an ordinary token, except that min_tokens still keeps it
    # from being sampled (as in vLLM): then nothing could be.
    with pytest.raises(ValueError, match="only stop"):
        engine.add_request("e", "hi", SamplingParams(
            allowed_token_ids=[TOKENIZER.eos_token_id], min_tokens=1, ignore_eos=True))
    engine.add_request(
        "e",
        "hi",
        SamplingParams(allowed_token_ids=[TOKENIZER.eos_token_id], ignore_eos=True, max_tokens=2),
    )
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    assert outputs[-1].outputs[0].token_ids == [TOKENIZER.eos_token_id] * 2


def test_async_engine_refuses_requests_once_shut_down():
    import asyncio

    from aphrodite.engine.async_llm_engine import AsyncLLMEngine, EngineDeadError

    async def main():
        engine = AsyncLLMEngine(_engine())
        engine.start()
        stream = await engine.add_request("a", "hi", GREEDY)
        outputs = [o async for o in stream]
        assert outputs[-1].finished
        await asyncio.to_thread(engine.shutdown)
        with pytest.raises(EngineDeadError, match="shutting down"):
            await engine.add_request("b", "hi", GREEDY)

    asyncio.run(main())


def test_async_engine_survives_a_failed_step_but_not_a_broken_device():
    import asyncio

    from aphrodite.engine.async_llm_engine import (
        MAX_CONSECUTIVE_STEP_FAILURES,
        AsyncLLMEngine,
        EngineDeadError,
        RequestFailedError,
    )

    sync_engine = _engine()
    runner = sync_engine.runner
    execute = runner.execute_model
    failing = {"steps": 0}

    def flaky(plan, mm_inputs):
        if failing["steps"] > 0:
            failing["steps"] -= 1
            raise RuntimeError("out of memory")
        return execute(plan, mm_inputs)

    runner.execute_model = flaky

    async def collect(engine, request_id):
        return [o async for o in await engine.add_request(request_id, "hi", GREEDY)]

    async def main():
        engine = AsyncLLMEngine(sync_engine)
        engine.start()
        reference = await collect(engine, "ref")
        # One failed step: its request fails, the next one runs as before.
        failing["steps"] = 1
        with pytest.raises(RequestFailedError, match="out of memory"):
            await collect(engine, "a")
        again = await collect(engine, "b")
        assert again[-1].outputs[0].token_ids == reference[-1].outputs[0].token_ids
        assert engine.is_running
        # Every step failing (a broken device): the engine stops after a few.
        failing["steps"] = 10**6
        for i in range(MAX_CONSECUTIVE_STEP_FAILURES):
            with pytest.raises((RequestFailedError, EngineDeadError)):
                await collect(engine, f"c{i}")
        assert not engine.is_running
        with pytest.raises(EngineDeadError):
            await collect(engine, "d")
        engine.shutdown()

    asyncio.run(main())


def test_async_engine_aborts_streams_closed_or_dropped_before_reading():
    """A stream closed before it was ever read, or dropped unread (a response that was never
    sent), aborts its request; a finished one aborts nothing; a refused duplicate id does not
    abort the request that holds it."""
    import asyncio
    import gc

    from aphrodite.engine.async_llm_engine import AsyncLLMEngine

    sync_engine = _engine()
    long = SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True)
    finished: list[tuple[str, int]] = []  # (reason, tokens generated) of each request

    async def wait_for(count: int) -> None:
        for _ in range(1000):
            if len(finished) >= count:
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"finished: {finished}, stats {sync_engine.stats()}")

    async def main():
        engine = AsyncLLMEngine(sync_engine)
        engine.on_finished = lambda reason, prompt, generated, *timing: finished.append(
            (reason, generated))
        engine.start()
        closed = await engine.add_request("closed", "hi", long)
        await closed.aclose()
        await wait_for(1)
        dropped = await engine.add_request("dropped", "hi", long)
        del dropped
        gc.collect()
        await wait_for(2)
        assert [reason for reason, _ in finished] == ["abort", "abort"]
        assert all(generated < 100 for _, generated in finished)
        kept = await engine.add_request("kept", "hi", GREEDY)
        with pytest.raises(ValueError, match="already in use"):
            await engine.add_request("kept", "hi", GREEDY)
        gc.collect()
        outputs = [o async for o in kept]
        assert outputs[-1].finished and len(outputs[-1].outputs[0].token_ids) == 12
        await kept.aclose()  # after the end: nothing to abort
        await wait_for(3)
        assert finished[2] == ("length", 12)
        assert sync_engine.stats()["num_running"] == 0
        await asyncio.to_thread(engine.shutdown)

    asyncio.run(main())


def test_default_max_tokens_fits_a_kv_cache_smaller_than_the_model_length():
    """Without max_tokens a request gets what both the model length and the KV cache allow
    (the cache held fewer tokens than max_model_len: every such request was refused)."""
    engine = _engine(max_model_len=128, num_kv_blocks=5, block_size=8)
    assert engine.max_cached_len == 4 * 8 + 1 < 128
    engine.add_request("a", "hi", SamplingParams(temperature=0.0, max_tokens=None,
                                                 ignore_eos=True))
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    final = outputs[-1]
    assert len(final.prompt_token_ids) + len(final.outputs[0].token_ids) == engine.max_cached_len
    with pytest.raises(ValueError, match="KV blocks"):
        engine.add_request("b", "hi", SamplingParams(max_tokens=100))
