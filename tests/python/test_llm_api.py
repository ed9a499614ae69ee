"""The whole API path (LLM.generate / LLM.chat -> LLMEngine -> EngineCore -> ModelRunner ->
sampler -> detokenizer) on a tiny random LLaVA checkpoint, against HF transformers.

Oracle: greedy token ids identical (16+ tokens) and the top-5 logprobs within 1e-4, for
single prompts, a batch mixing image sizes, image modes and text-only prompts, and a prompt
with two images. Also: prefix caching with the same and another image, preemption, seeds,
chat, and the errors raised before anything is scheduled."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from aphrodite import LLM, SamplingParams
from aphrodite.testing import build_tiny_llava
from aphrodite.testing.hf_reference import hf_greedy, hf_llava_model, hf_llava_processor

MAX_TOKENS = 16
QUESTION = "USER: <image>\nWhat is the content of this image? ASSISTANT:"
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=5)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    # 56 px / 14 px patches -> 16 image tokens, so an image spans several 8-token blocks.
    return build_tiny_llava(tmp_path_factory.mktemp("llm_api") / "tiny", image_size=56, seed=5)


@pytest.fixture(scope="module")
def hf(checkpoint):
    return hf_llava_model(checkpoint), hf_llava_processor(checkpoint)


# Small blocks and a small token budget: prompts are prefilled in chunks that start and end
# inside images, and prefix-cache hits are visible at block granularity.
SMALL_STEPS = dict(
    device="cpu",
    dtype="float32",
    max_model_len=256,
    block_size=8,
    max_num_batched_tokens=20,
    max_num_seqs=8,
)


@pytest.fixture(scope="module")
def llm(checkpoint):
    return LLM(
        model=checkpoint, **SMALL_STEPS, limit_mm_per_prompt={"image": 2}, kv_cache_memory_gb=0.01
    )


def _image(seed: int, size=(37, 45), mode="RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    rgba = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 4), dtype=np.uint8), "RGBA")
    if mode == "P":
        return rgba.convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    return rgba if mode == "RGBA" else rgba.convert(mode)


def _assert_matches_hf(out, ref):
    completion = out.outputs[0]
    assert out.prompt_token_ids == ref.prompt_ids
    assert completion.token_ids == ref.token_ids[:MAX_TOKENS]
    assert len(completion.token_ids) == MAX_TOKENS
    for step, (entries, theirs) in enumerate(zip(completion.logprobs, ref.logprobs)):
        top = theirs.topk(5).indices.tolist()
        assert set(top) <= set(entries), f"step {step}: top-5 tokens differ"
        err = max(abs(entries[t].logprob - float(theirs[t])) for t in top)
        assert err < 1e-4, f"step {step}: top-5 logprobs differ by {err}"


def _hf(hf, prompt, images):
    model, processor = hf
    return hf_greedy(model, processor, prompt, images, MAX_TOKENS)


def test_single_prompt_matches_hf(llm, hf):
    image = _image(0)
    out = llm.generate({"prompt": QUESTION, "multi_modal_data": {"image": image}}, GREEDY)
    assert len(out) == 1 and out[0].finished
    _assert_matches_hf(out[0], _hf(hf, QUESTION, [image]))
    completion = out[0].outputs[0]
    assert completion.finish_reason == "length" and completion.stop_reason is None
    tokenizer = llm.get_tokenizer()
    assert completion.text == tokenizer.decode(completion.token_ids, skip_special_tokens=True)


def test_batch_of_sizes_modes_and_text_only_matches_hf(llm, hf):
    cases = [
        (QUESTION, [_image(1, (90, 20))]),
        ("USER: Describe a red car. ASSISTANT:", None),
        (QUESTION, [_image(2, (17, 60), mode="L")]),
        ("USER: <image>\nWhat color? ASSISTANT:", [_image(3, (50, 50), mode="RGBA")]),
        (QUESTION, [_image(4, (64, 33), mode="P")]),
        ("USER: one two three ASSISTANT:", None),
    ]
    prompts = [
        p if images is None else {"prompt": p, "multi_modal_data": {"image": images[0]}}
        for p, images in cases
    ]
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert [o.prompt for o in outs] == [p for p, _ in cases]  # input order kept
    for out, (prompt, images) in zip(outs, cases):
        _assert_matches_hf(out, _hf(hf, prompt, images))


def test_two_images_in_one_prompt_match_hf(llm, hf):
    prompt = "USER: <image>\nand <image>\nWhat differs? ASSISTANT:"
    images = [_image(5, (40, 70)), _image(6, (80, 30), mode="L")]
    out = llm.generate({"prompt": prompt, "multi_modal_data": {"image": images}}, GREEDY)[0]
    assert len(out.multi_modal_placeholders) == 2
    _assert_matches_hf(out, _hf(hf, prompt, images))


def test_prefix_cache_hits_only_for_the_same_image(llm):
    engine = llm.llm_engine
    engine.reset_prefix_cache()
    image = _image(7)
    first = llm.generate({"prompt": QUESTION, "multi_modal_data": {"image": image}}, GREEDY)[0]
    before = engine.stats()["prefix_cache_hits"]
    same = _image(7)  # another object with the same pixels
    second = llm.generate({"prompt": QUESTION, "multi_modal_data": {"image": same}}, GREEDY)[0]
    hits = engine.stats()["prefix_cache_hits"] - before
    prompt_len = len(first.prompt_token_ids)
    assert second.num_cached_tokens == hits >= (prompt_len - 1) // 8 * 8 - 8 > 0
    assert second.outputs[0].token_ids == first.outputs[0].token_ids
    other = llm.generate({"prompt": QUESTION, "multi_modal_data": {"image": _image(8)}}, GREEDY)[0]
    image_offset = other.multi_modal_placeholders[0][0]
    assert other.num_cached_tokens <= image_offset // 8 * 8
    assert other.outputs[0].token_ids != first.outputs[0].token_ids


def test_preemption_gives_the_unconstrained_outputs(checkpoint, llm):
    prompts = [
        {"prompt": QUESTION, "multi_modal_data": {"image": _image(10 + i, (30 + 9 * i, 40))}}
        for i in range(3)
    ] + ["USER: the cat and the dog ASSISTANT:"]
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    free = llm.generate(prompts, params, use_tqdm=False)
    tight = LLM(model=checkpoint, **SMALL_STEPS, num_kv_blocks=24, enable_prefix_caching=False)
    constrained = tight.generate(prompts, params, use_tqdm=False)
    assert tight.llm_engine.stats()["num_preemptions"] > 0
    assert [o.outputs[0].token_ids for o in constrained] == [o.outputs[0].token_ids for o in free]


def test_seeded_sampling_reproduces_through_llm(llm):
    seeded = SamplingParams(temperature=0.8, top_k=20, seed=31, max_tokens=12, ignore_eos=True)
    prompt = {"prompt": QUESTION, "multi_modal_data": {"image": _image(20)}}
    alone = llm.generate(prompt, seeded, use_tqdm=False)[0].outputs[0].token_ids
    noisy = SamplingParams(temperature=1.0, max_tokens=5, ignore_eos=True)
    batch = llm.generate(["USER: hi ASSISTANT:", prompt], [noisy, seeded], use_tqdm=False)
    assert batch[1].outputs[0].token_ids == alone


def test_chat_renders_the_template_and_matches_generate(llm):
    image = _image(21)
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": image},
                {"type": "text", "text": "What is the content of this image?"},
            ],
        }
    ]
    out = llm.chat(messages, GREEDY, use_tqdm=False)[0]
    # the checkpoint's LLaVA-1.5 template: images first, then the text
    hf_prompt = "USER: <image>\nWhat is the content of this image? ASSISTANT:"
    assert out.prompt == hf_prompt
    direct = llm.generate({"prompt": hf_prompt, "multi_modal_data": {"image": image}}, GREEDY)[0]
    assert out.prompt_token_ids == direct.prompt_token_ids
    assert out.outputs[0].token_ids == direct.outputs[0].token_ids


def test_errors_before_anything_is_scheduled(llm):
    engine = llm.llm_engine
    image = _image(22)
    good = {"prompt": QUESTION, "multi_modal_data": {"image": image}}
    cases = [
        ({"prompt": QUESTION, "multi_modal_data": {"image": [image, image]}}, "placeholder"),
        ({"prompt": "USER: hi", "multi_modal_data": {"image": image}}, "placeholder"),
        ("word " * 300, "max_model_len"),
        ({"prompt": QUESTION, "multi_modal_data": {"image": np.zeros((8, 8, 3))}}, "uint8"),
        ({"prompt": QUESTION, "multi_modal_data": {"image": "cat.jpg"}}, "image type"),
        (
            {"prompt": QUESTION * 3, "multi_modal_data": {"image": [image] * 3}},
            "limit_mm_per_prompt",
        ),
        # 1 x 10,000,000 resized to the 56 px shortest edge: 560,000,000 px wide, over the
        # preprocessing's 2^29 limit; refused before anything is scheduled.
        (
            {"prompt": QUESTION, "multi_modal_data": {"image": np.zeros((1, 10**7, 3), np.uint8)}},
            "aspect ratio",
        ),
    ]
    for bad, message in cases:
        with pytest.raises(ValueError, match=message):
            llm.generate([good, bad], GREEDY, use_tqdm=False)
        assert not engine.has_unfinished_requests()
        assert not engine.core.has_unfinished_requests()


def test_numpy_pixels_are_taken_like_pil_images(llm):
    image = _image(23)
    prompt = {"prompt": QUESTION, "multi_modal_data": {"image": image}}
    from_pil = llm.generate(prompt, GREEDY, use_tqdm=False)[0]
    pixels = np.asarray(image.convert("RGB"))
    for item in (pixels, [pixels], np.ascontiguousarray(pixels[::-1, :, :][::-1])):
        out = llm.generate(
            {"prompt": QUESTION, "multi_modal_data": {"image": item}}, GREEDY, use_tqdm=False
        )[0]
        assert out.outputs[0].token_ids == from_pil.outputs[0].token_ids
    gray = np.asarray(image.convert("L"))
    from_l = llm.generate(
        {"prompt": QUESTION, "multi_modal_data": {"image": image.convert("L")}}, GREEDY
    )[0]
    out = llm.generate({"prompt": QUESTION, "multi_modal_data": {"image": gray}}, GREEDY)[0]
    assert out.outputs[0].token_ids == from_l.outputs[0].token_ids
    for bad, message in [
        (pixels.astype(np.float32), "uint8"),
        (np.zeros((0, 5, 3), np.uint8), "empty"),
        (np.zeros((4, 5, 2), np.uint8), r"\[H, W\]"),
    ]:
        with pytest.raises(ValueError, match=message):
            llm.generate({"prompt": QUESTION, "multi_modal_data": {"image": bad}}, GREEDY)


class _FailOnCall:
    """Wraps ModelRunner.execute_model to raise on its n-th call (counting from 1)."""

    def __init__(self, runner, n: int, error: BaseException) -> None:
        self.execute, self.n, self.error, self.calls = runner.execute_model, n, error, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.n:
            raise self.error
        return self.execute(*args, **kwargs)


@pytest.mark.parametrize("error", [RuntimeError("device lost"), KeyboardInterrupt()])
def test_a_failed_step_aborts_its_requests_and_the_engine_goes_on(llm, monkeypatch, error):
    engine = llm.llm_engine
    prompts = [
        {"prompt": QUESTION, "multi_modal_data": {"image": _image(30 + i, (30 + 7 * i, 40))}}
        for i in range(3)
    ]
    expected = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]
    # Fail mid-way: some requests are decoding, others still prefilling (20-token steps).
    failing = _FailOnCall(engine.runner, 6, error)
    monkeypatch.setattr(engine.runner, "execute_model", failing)
    with pytest.raises(type(error)):
        llm.generate(prompts, GREEDY, use_tqdm=False)
    assert failing.calls == 6
    assert not engine.has_unfinished_requests()
    assert not engine.core.has_unfinished_requests()
    engine.core.check_consistency()
    monkeypatch.undo()
    again = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in again] == expected


def test_eos_listed_in_stop_token_ids_has_no_stop_reason(llm, monkeypatch):
    engine = llm.llm_engine
    prompt = {"prompt": QUESTION, "multi_modal_data": {"image": _image(40)}}
    first = llm.generate(prompt, GREEDY, use_tqdm=False)[0].outputs[0].token_ids[0]
    # Make the first greedy token the end-of-sequence token (the random model rarely emits its
    # real one), then list it in stop_token_ids as well.
    monkeypatch.setattr(engine, "eos_token_id", first)
    params = SamplingParams(temperature=0.0, max_tokens=8, stop_token_ids=[first])
    out = llm.generate(prompt, params, use_tqdm=False)[0].outputs[0]
    assert out.token_ids == [first] and out.finish_reason == "stop" and out.stop_reason is None
    # With ignore_eos the same token ends the completion as a stop token.
    params = SamplingParams(temperature=0.0, max_tokens=8, stop_token_ids=[first], ignore_eos=True)
    out = llm.generate(prompt, params, use_tqdm=False)[0].outputs[0]
    assert out.token_ids == [first] and out.finish_reason == "stop" and out.stop_reason == first


def test_batch_errors_name_the_prompt_and_use_tqdm_takes_a_factory(llm):
    good = {"prompt": QUESTION, "multi_modal_data": {"image": _image(50)}}
    with pytest.raises(ValueError, match="placeholder") as info:
        llm.generate([good, good, "USER: <image> no image ASSISTANT:"], GREEDY)
    assert "(prompt 2 of the 3 given)" in getattr(info.value, "__notes__", [])
    bars = []

    def factory(**kwargs):
        from tqdm import tqdm

        bars.append(kwargs["total"])
        return tqdm(**kwargs)

    out = llm.generate([good, good], GREEDY, use_tqdm=factory)
    assert len(out) == 2 and bars == [2]


def test_an_interrupted_recovery_is_finished_by_the_next_step(llm, monkeypatch):
    """Ctrl-C twice: once in the step (here while it notes the plan) and again while the step
    abandons its plan. The next call finishes the recovery and runs normally."""
    engine = llm.llm_engine
    prompt = {"prompt": QUESTION, "multi_modal_data": {"image": _image(60)}}
    expected = llm.generate(prompt, GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    monkeypatch.setattr(engine, "_note_scheduled", _raise(KeyboardInterrupt()))
    abort = engine.abort_request
    calls = []

    def abort_once_interrupted(ids):
        calls.append(ids)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return abort(ids)

    monkeypatch.setattr(engine, "abort_request", abort_once_interrupted)
    with pytest.raises(KeyboardInterrupt):
        llm.generate(prompt, GREEDY, use_tqdm=False)
    monkeypatch.undo()
    again = llm.generate(prompt, GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    assert again == expected
    assert not engine.has_unfinished_requests()
    engine.core.check_consistency()


def _raise(error: BaseException):
    def fail(*args, **kwargs):
        raise error

    return fail


def test_numpy_pixels_are_copied_when_the_request_is_added(llm):
    """The caller may reuse its buffer (a video frame) before the image is encoded."""
    engine = llm.llm_engine
    pixels = np.asarray(_image(70).convert("RGB")).copy()
    expected = (
        llm.generate(
            {"prompt": QUESTION, "multi_modal_data": {"image": pixels.copy()}},
            GREEDY,
            use_tqdm=False,
        )[0]
        .outputs[0]
        .token_ids
    )
    engine.add_request(
        "reused", {"prompt": QUESTION, "multi_modal_data": {"image": pixels}}, GREEDY
    )
    pixels[:] = 0
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    assert outputs[-1].outputs[0].token_ids == expected


def test_the_completions_of_one_prompt_encode_its_image_once(checkpoint, monkeypatch):
    # The default token budget schedules the three completions in the same step.
    llm = LLM(
        model=checkpoint, device="cpu", dtype="float32", max_model_len=256, kv_cache_memory_gb=0.01
    )
    runner = llm.llm_engine.runner
    encode = runner.model.encode_images
    batches = []

    def counting(pixel_values):
        batches.append(pixel_values.shape[0])
        return encode(pixel_values)

    monkeypatch.setattr(runner.model, "encode_images", counting)
    prompt = {"prompt": QUESTION, "multi_modal_data": {"image": _image(80)}}
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, n=3)
    out = llm.generate(prompt, params, use_tqdm=False)[0]
    assert batches == [1]  # one image through the vision tower, not three
    llm.llm_engine.reset_prefix_cache()
    single = llm.generate(prompt, GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    assert [c.token_ids for c in out.outputs] == [single] * 3


def test_mistral_text_model_with_sliding_window_matches_hf(tmp_path):
    """A Mistral text model (bakLlava's layout) through the whole engine: its 12-position
    sliding window cuts through the 16 image tokens and the prompt, across chunked prefill and
    the prefix cache (the same prompt twice: the second run reuses the first one's blocks)."""
    path = build_tiny_llava(
        tmp_path / "mistral",
        text_model_type="mistral",
        sliding_window=12,
        num_attention_heads=4,
        num_key_value_heads=2,
        image_size=56,
        seed=6,
    )
    llm = LLM(model=path, **SMALL_STEPS, kv_cache_memory_gb=0.01)
    image = _image(9)
    ref = _hf((hf_llava_model(path), hf_llava_processor(path)), QUESTION, [image])
    cached = []
    for _ in range(2):
        out = llm.generate({"prompt": QUESTION, "multi_modal_data": {"image": image}}, GREEDY)
        _assert_matches_hf(out[0], ref)
        cached.append(out[0].num_cached_tokens)
    assert cached[0] == 0 and cached[1] >= 16
    assert llm.llm_engine.model_config.hf_config.text.sliding_window == 12


def test_every_eos_id_of_the_generation_config_stops_like_hf(checkpoint, tmp_path):
    """A generation config listing several EOS ids (Llama 3's end_of_text, eom, eot): each one
    ends a completion, as in HF generate (vLLM: the extra ids act as stop_token_ids, reported as
    stop_reason), none is sampled before min_tokens (even with ignore_eos, as vLLM)."""
    import json
    import shutil

    folder = tmp_path / "eos_list"
    shutil.copytree(checkpoint, folder)
    prompt = {"prompt": QUESTION, "multi_modal_data": {"image": _image(41)}}
    plain = LLM(model=checkpoint, **SMALL_STEPS, kv_cache_memory_gb=0.01)
    greedy = plain.generate(prompt, GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    second = greedy[1]
    assert second not in greedy[:1]
    gen_path = folder / "generation_config.json"
    gen = json.loads(gen_path.read_text())
    primary = gen["eos_token_id"]
    gen["eos_token_id"] = [primary, second]
    gen_path.write_text(json.dumps(gen))

    llm = LLM(model=folder, **SMALL_STEPS, kv_cache_memory_gb=0.01)
    out = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=8), use_tqdm=False)
    completion = out[0].outputs[0]
    assert completion.token_ids == greedy[:2]
    assert completion.finish_reason == "stop" and completion.stop_reason == second

    model, processor = hf_llava_model(folder), hf_llava_processor(folder)
    inputs = processor(images=[prompt["multi_modal_data"]["image"]], text=QUESTION,
                       return_tensors="pt")
    with torch.inference_mode():
        theirs = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert theirs[0, inputs["input_ids"].shape[1]:].tolist() == greedy[:2]

    ignoring = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    assert llm.generate(prompt, ignoring, use_tqdm=False)[0].outputs[0].token_ids == greedy[:8]
    # The extra EOS id strongly favoured: never before min_tokens, then it stops (or, ignoring
    # EOS, goes on).
    for ignore_eos in (False, True):
        params = SamplingParams(temperature=0.0, max_tokens=5, min_tokens=3,
                                logit_bias={second: 100.0}, ignore_eos=ignore_eos)
        ids = llm.generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids
        assert second not in ids[:3] and ids[3] == second
        assert len(ids) == (5 if ignore_eos else 4)


def test_generation_config_sampling_defaults_apply_without_sampling_params(checkpoint, tmp_path):
    """A checkpoint's generation config sets the defaults (vLLM and HF generate do): top_k=1
    makes the default sampling greedy, max_new_tokens the default length; explicit
    SamplingParams are left alone; a value of the wrong type is an error at load."""
    import json
    import shutil

    folder = tmp_path / "gen_defaults"
    shutil.copytree(checkpoint, folder)
    gen_path = folder / "generation_config.json"
    gen = json.loads(gen_path.read_text())
    gen.update({"do_sample": True, "top_k": 1, "temperature": 0.7, "max_new_tokens": 5})
    gen_path.write_text(json.dumps(gen))
    llm = LLM(model=folder, **SMALL_STEPS, kv_cache_memory_gb=0.01)
    defaults = llm.get_default_sampling_params()
    assert (defaults.top_k, defaults.temperature, defaults.max_tokens) == (1, 0.7, 5)
    prompt = {"prompt": QUESTION, "multi_modal_data": {"image": _image(42)}}
    greedy = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True),
                          use_tqdm=False)[0].outputs[0].token_ids
    for _ in range(2):
        out = llm.generate(prompt, use_tqdm=False)[0].outputs[0]
        assert out.token_ids == greedy[: len(out.token_ids)] and len(out.token_ids) <= 5
    explicit = llm.generate(prompt, SamplingParams(max_tokens=7, ignore_eos=True),
                            use_tqdm=False)[0].outputs[0]
    assert len(explicit.token_ids) == 7
    gen["top_k"] = "one"
    gen_path.write_text(json.dumps(gen))
    with pytest.raises(ValueError, match="top_k must be an integer"):
        LLM(model=folder, **SMALL_STEPS, kv_cache_memory_gb=0.01)


def test_chat_bos_is_decided_per_conversation_and_kwargs_reach_the_template(llm):
    """A template that writes the BOS token for some conversations only: each one gets one BOS
    (the batch used to decide for all); chat_template_kwargs are template variables."""
    template = ("{% if messages[0]['role'] == 'system' %}{{ bos_token }}{% endif %}"
                "{% for m in messages %}{{ m['content'] }} {% endfor %}{{ greeting }}")
    with_system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    plain = [{"role": "user", "content": "hi"}]
    params = SamplingParams(temperature=0.0, max_tokens=1)
    outs = llm.chat([with_system, plain], params, use_tqdm=False, chat_template=template,
                    chat_template_kwargs={"greeting": "hello"})
    bos = llm.get_tokenizer().bos_token_id
    for out in outs:
        ids = out.prompt_token_ids
        assert ids[0] == bos and ids[1] != bos
    tokenizer = llm.get_tokenizer()
    assert tokenizer.decode(outs[1].prompt_token_ids, skip_special_tokens=True).endswith("hello")


def test_llava_example_template_refuses_what_it_would_drop(llm):
    """examples/llava.jinja: a developer prompt is the system prompt; a system (or any other
    role) message later in the conversation is an error instead of vanishing."""
    from pathlib import Path

    template = str(Path(__file__).resolve().parents[2] / "examples" / "llava.jinja")
    params = SamplingParams(temperature=0.0, max_tokens=1)
    as_developer = llm.chat([{"role": "developer", "content": "Be brief."},
                             {"role": "user", "content": "hi"}], params, use_tqdm=False,
                            chat_template=template)[0]
    as_system = llm.chat([{"role": "system", "content": "Be brief."},
                          {"role": "user", "content": "hi"}], params, use_tqdm=False,
                         chat_template=template)[0]
    assert as_developer.prompt_token_ids == as_system.prompt_token_ids
    with pytest.raises(ValueError, match="only user and assistant"):
        llm.chat([{"role": "user", "content": "hi"}, {"role": "system", "content": "x"}],
                 params, use_tqdm=False, chat_template=template)


def test_constructor_and_generate_arguments_of_the_wrong_type_are_named(checkpoint, llm):
    """Wrong types fail at once with the argument's name (not deep in loading, or as another
    argument's error); seed=None means no seed, as in vLLM."""
    from aphrodite.engine.args import EngineArgs

    for kwargs, words in [
        ({"max_model_len": 100.0}, "max_model_len must be an int"),
        ({"max_num_seqs": "8"}, "max_num_seqs must be an int"),
        ({"limit_mm_per_prompt": {"image": True}}, "limit_mm_per_prompt"),
        ({"seed": "1"}, "seed must be an int"),
    ]:
        with pytest.raises((TypeError, ValueError), match=words):
            EngineArgs(model=str(checkpoint), **kwargs)
    with pytest.raises(ValueError, match="max_logprobs must be >= 0"):
        EngineArgs(model=str(checkpoint), max_logprobs=-1)
    with pytest.raises(ValueError, match="tokenizer path"):
        LLM(model=checkpoint, tokenizer="/nonexistent/tokenizer", device="cpu")
    unseeded = LLM(model=checkpoint, **SMALL_STEPS, kv_cache_memory_gb=0.01, seed=None)
    out = unseeded.generate("hi", SamplingParams(max_tokens=2), use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 2
    with pytest.raises(TypeError, match="sampling_params must be a SamplingParams"):
        llm.generate("hi", {"max_tokens": 2}, use_tqdm=False)
    with pytest.raises(TypeError, match="prompts must be"):
        llm.generate(None, use_tqdm=False)
    assert llm.generate("hi", SamplingParams(max_tokens=1), use_tqdm=False)[0].finished
