"""Oracle tests of the LLaVA model runner against HF transformers, on tiny random checkpoints.

Each checkpoint shape exercises different config options the loader reads (see CHECKPOINTS);
the runner is driven with hand-built plans (llava_plans.Planner) whose chunk boundaries fall
inside images, and its greedy tokens and logprobs are compared with HF generate in float32.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from llava_plans import Planner, image_spans
from PIL import Image

from aphrodite.config import ModelConfig
from aphrodite.testing import build_tiny_llava
from aphrodite.testing.hf_reference import hf_greedy, hf_llava_model, hf_llava_processor
from aphrodite.worker.model_runner import ModelRunner

MAX_NEW_TOKENS = 18
PROMPT = "USER: <image>\nWhat is the content of this image? ASSISTANT:"

CHECKPOINTS = {
    # transformers-4 config layout, MHA, layer -2 of 3, quick_gelu CLIP, template in tokenizer.
    "base": dict(legacy_config=True, chat_template_location="tokenizer", rms_norm_eps=1e-6),
    # GQA, explicit head_dim, biases, last CLIP layer, gelu CLIP, sharded, custom mean/std,
    # a resize that differs from the crop.
    "gqa": dict(
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=24,
        attention_bias=True,
        mlp_bias=True,
        vision_feature_layer=-1,
        vision_hidden_act="gelu",
        vision_layer_norm_eps=1e-6,
        max_shard_size="40KB",
        chat_template_location="json",
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.25, 0.3, 0.35],
        shortest_edge=32,
        # Dynamic NTK rope: the default frequencies up to max_position_embeddings (HF).
        rope_scaling={"rope_type": "dynamic", "factor": 2.0},
        seed=1,
    ),
    # 'full' strategy (keeps CLS), tanh projector without bias, tied embeddings, linear rope,
    # two concatenated feature layers (one given as a positive index).
    "full": dict(
        vision_feature_select_strategy="full",
        projector_hidden_act="gelu_pytorch_tanh",
        multimodal_projector_bias=False,
        tie_word_embeddings=True,
        rope_scaling={"rope_type": "linear", "factor": 2.0},
        rope_theta=500.0,
        vision_feature_layer=[1, -1],
        seed=2,
    ),
    # A Mistral text model (bakLlava's layout): every token attends to its last 8 positions
    # only, so the window cuts through the image and the prompt; GQA.
    "mistral": dict(
        text_model_type="mistral",
        sliding_window=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        seed=4,
    ),
    # 336 px / patch 14 -> 576 image tokens, llama3 rope, legacy config with rope_scaling.
    "llava336": dict(
        image_size=336,
        vision_hidden_size=16,
        vision_intermediate_size=32,
        vision_num_hidden_layers=2,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=2,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
        legacy_config=True,
        seed=3,
    ),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_llava")
    return {name: build_tiny_llava(root / name, **opts) for name, opts in CHECKPOINTS.items()}


def _image(seed: int, size=(37, 45)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _runner(path, block_size: int = 16) -> ModelRunner:
    config = ModelConfig.load(path, dtype="float32", device="cpu")
    runner = ModelRunner(config)
    runner.allocate_kv_cache(num_blocks=64, block_size=block_size)
    return runner


def _run(runner, planner, images_of, steps):
    """Drives the runner like the engine loop: schedule -> execute -> logits -> argmax -> update.
    Returns {request_id: [logprobs per sampled token]}."""
    logprobs: dict[str, list[torch.Tensor]] = {}
    for _ in range(steps):
        plan = planner.schedule()
        hidden = runner.execute_model(plan, images_of)
        rows = hidden[torch.from_numpy(plan.logits_indices).long()]
        logits = runner.compute_logits(rows)
        assert logits.dtype == torch.float32
        sampled = logits.argmax(-1).tolist()
        for seq, row in zip(plan.sampled_seq_indices.tolist(), logits):
            logprobs.setdefault(plan.request_ids[seq], []).append(torch.log_softmax(row, -1))
        planner.update(plan, sampled)
    return logprobs


def _assert_matches(ours_ids, ours_logprobs, ref):
    assert ours_ids == ref.token_ids
    assert len(ours_logprobs) == len(ref.logprobs) >= 16
    for step, (mine, theirs) in enumerate(zip(ours_logprobs, ref.logprobs)):
        top = theirs.topk(5).indices
        err = (mine[top] - theirs[top]).abs().max().item()
        assert err < 1e-4, f"step {step}: top-5 logprobs differ by {err}"


@pytest.mark.parametrize("name", ["gqa", "full"])
def test_cpu_float32_linears_run_packed(checkpoints, name):
    """On CPU in float32 every projection of the decoder and the vision tower, and the LM head,
    runs on the core's GEMM with a packed weight (gate/up fused as SwiGLU), and the torch copies
    are gone, except the embedding matrix that a tied head shares ("full")."""
    model = _runner(checkpoints[name]).model
    linears = []
    for layer in model.language_model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        linears += [attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj]
        assert mlp.gate_up_proj.packed.gated and not mlp.down_proj.packed.gated
    for layer in model.vision_tower.encoder.layers:
        linears += [layer.self_attn.qkv_proj, layer.self_attn.out_proj, layer.mlp.fc1]
        linears += [layer.mlp.fc2]
    for linear in linears:
        assert linear.packed is not None and linear.weight is None
    assert model._lm_head_packed is not None
    if name == "full":
        assert model.lm_head is None and model.language_model.embed_tokens.weight is not None
    else:
        assert model.lm_head.weight is None


def _greedy_matches_hf(path, name: str, chunk: int | None = None) -> None:
    processor, model = hf_llava_processor(path), hf_llava_model(path)
    image = _image(seed=len(name))
    ref = hf_greedy(model, processor, PROMPT, [image], MAX_NEW_TOKENS)

    runner = _runner(path)
    cfg = runner.model_config
    spans = image_spans(ref.prompt_ids, cfg.image_token_id)
    assert spans == [(spans[0][0], cfg.num_image_tokens)]
    if chunk is None:
        # Chunks of 3 tokens put chunk boundaries inside the image (and, at 576 tokens, many).
        chunk = 3 if cfg.num_image_tokens < 100 else 250
    planner = Planner(block_size=16, blocks_per_request=48, chunk=chunk)
    planner.add("r0", ref.prompt_ids, spans)
    array = np.asarray(image)
    steps = -(-len(ref.prompt_ids) // chunk) + MAX_NEW_TOKENS - 1
    logprobs = _run(runner, planner, lambda rid, idx: array, steps)
    _assert_matches(planner.generated("r0"), logprobs["r0"], ref)
    assert runner.encoder_cache == {}  # freed once the image was fully merged


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_greedy_matches_hf(checkpoints, name):
    _greedy_matches_hf(checkpoints[name], name)


def test_greedy_matches_hf_with_whole_prompt_prefill(checkpoints):
    """The 576-image-token checkpoint's whole prompt (about 600 tokens) in one step: every
    projection of the prefill has hundreds of rows, which on CPUs with AMX-BF16 run on the AMX
    kernel set (float32 products from three bfloat16 parts per operand), the tower's too."""
    _greedy_matches_hf(checkpoints["llava336"], "llava336", chunk=1024)


def test_batch_of_requests_with_and_without_images(checkpoints):
    """Three requests in one batch (two images encoded together, one text-only), each matching
    its own HF run."""
    path = checkpoints["gqa"]
    processor, model = hf_llava_processor(path), hf_llava_model(path)
    prompts = {
        "a": (PROMPT, _image(10, (50, 20))),
        "b": ("USER: <image>\nDescribe the colors. ASSISTANT:", _image(11, (16, 64))),
        "c": ("USER: What is a cat? ASSISTANT:", None),
    }
    refs = {
        rid: hf_greedy(model, processor, text, [img] if img else None, MAX_NEW_TOKENS)
        for rid, (text, img) in prompts.items()
    }
    runner = _runner(path, block_size=8)
    image_token_id = runner.model_config.image_token_id
    planner = Planner(block_size=8, blocks_per_request=8, chunk=5)
    arrays = {}
    for rid, (_, img) in prompts.items():
        planner.add(rid, refs[rid].prompt_ids, image_spans(refs[rid].prompt_ids, image_token_id))
        if img is not None:
            arrays[rid] = np.asarray(img)
    encoded = []

    def images_of(rid, idx):
        encoded.append((rid, idx))
        return arrays[rid]

    longest = max(len(r.prompt_ids) for r in refs.values())
    logprobs = _run(runner, planner, images_of, -(-longest // 5) + MAX_NEW_TOKENS + 2)
    assert sorted(encoded) == [("a", 0), ("b", 0)]
    for rid, ref in refs.items():
        n = len(ref.token_ids)
        _assert_matches(planner.generated(rid)[:n], logprobs[rid][:n], ref)


def test_precomputed_image_embeddings(checkpoints):
    """An MMInput given as embeddings [num_image_tokens, hidden] skips the vision tower."""
    path = checkpoints["full"]
    processor, model = hf_llava_processor(path), hf_llava_model(path)
    ref = hf_greedy(model, processor, PROMPT, [_image(5)], MAX_NEW_TOKENS)
    runner = _runner(path)
    planner = Planner(block_size=16, blocks_per_request=8, chunk=64)
    spans = image_spans(ref.prompt_ids, runner.model_config.image_token_id)
    planner.add("r", ref.prompt_ids, spans)
    embeddings = ref.image_embeddings[0]
    logprobs = _run(runner, planner, lambda rid, idx: embeddings, MAX_NEW_TOKENS)
    _assert_matches(planner.generated("r"), logprobs["r"], ref)


def test_image_embeddings_match_hf(checkpoints):
    """The vision tower + projector alone, batched, against HF get_image_features."""
    for name in ("base", "full"):
        path = checkpoints[name]
        processor, model = hf_llava_processor(path), hf_llava_model(path)
        images = [_image(20), _image(21, (90, 31))]
        pixels = processor.image_processor(images, return_tensors="pt")["pixel_values"]
        with torch.inference_mode():
            expected = torch.stack(
                list(model.get_image_features(pixel_values=pixels, return_dict=True).pooler_output)
            )
        runner = _runner(path)
        cfg = runner.model_config
        ours_pixels = runner.preprocess([np.asarray(i) for i in images])
        torch.testing.assert_close(ours_pixels, pixels, rtol=0, atol=2e-5)
        with torch.inference_mode():
            got = runner.model.encode_images(pixels)
        assert got.shape == (2, cfg.num_image_tokens, cfg.hidden_size)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_encoder_cache_lifecycle(checkpoints):
    runner = _runner(checkpoints["base"])
    cfg = runner.model_config
    planner = Planner(block_size=16, blocks_per_request=4, chunk=2)
    prompt = [1, 5] + [cfg.image_token_id] * 4 + [7]
    planner.add("x", prompt, [(2, 4)])
    array = np.asarray(_image(0))
    runner.execute_model(planner.schedule(), lambda rid, idx: array)  # tokens 0-1: nothing yet
    assert runner.encoder_cache == {}
    runner.execute_model(planner.schedule(), lambda rid, idx: array)  # first half of the image
    assert list(runner.encoder_cache) == [("x", 0)]
    runner.drop_request("y")
    assert list(runner.encoder_cache) == [("x", 0)]
    runner.drop_request("x")
    assert runner.encoder_cache == {}
    with pytest.raises(RuntimeError, match="never encoded"):
        runner.execute_model(planner.schedule(), lambda rid, idx: array)

    # A preempted request's embeddings go too (the core re-encodes them when it recomputes).
    planner = Planner(block_size=16, blocks_per_request=4, chunk=3)
    planner.add("z", prompt, [(2, 4)])
    runner.execute_model(planner.schedule(), lambda rid, idx: array)
    assert list(runner.encoder_cache) == [("z", 0)]
    empty = SimpleNamespace(
        num_tokens=0,
        encoder_inputs=[],
        mm_embeds=[],
        freed_encoder_outputs=[],
        preempted_request_ids=["z"],
    )
    assert runner.execute_model(empty, lambda rid, idx: array).shape == (0, cfg.hidden_size)
    assert runner.encoder_cache == {}


def test_bad_inputs_are_rejected(checkpoints):
    runner = _runner(checkpoints["base"])
    cfg = runner.model_config
    planner = Planner(block_size=16, blocks_per_request=4, chunk=16)
    planner.add("x", [1, 5, 6] + [cfg.image_token_id] * 4, [(3, 4)])
    plan = planner.schedule()
    with pytest.raises(ValueError, match="RGB uint8"):
        runner.execute_model(plan, lambda rid, idx: np.zeros((8, 8, 4), np.uint8))
    with pytest.raises(ValueError, match="expected"):
        runner.execute_model(plan, lambda rid, idx: torch.zeros(3, cfg.hidden_size))
    fresh = ModelRunner(cfg)
    with pytest.raises(RuntimeError, match="allocate_kv_cache"):
        fresh.execute_model(plan, lambda rid, idx: None)


def test_kv_cache_shapes_and_bytes(checkpoints):
    runner = _runner(checkpoints["gqa"])
    cfg = runner.model_config
    runner.allocate_kv_cache(num_blocks=10, block_size=8)
    assert len(runner.kv_caches) == cfg.num_layers
    k, v = runner.kv_caches[0]
    assert k.shape == v.shape == (10, 8, 2, 24) and k.dtype == torch.float32
    total = sum(t.numel() * t.element_size() for pair in runner.kv_caches for t in pair)
    assert runner.kv_block_bytes(8) * 10 == total


def test_engine_core_loop_matches_hf(checkpoints):
    """The real scheduler drives the runner (the loop LLMEngine and a C++ host run): small token
    and encoder budgets force chunked prefill through images, and two requests with the same
    image and prompt prefix share cached blocks."""
    import hashlib

    from aphrodite import _C

    path = checkpoints["base"]
    processor, model = hf_llava_processor(path), hf_llava_model(path)
    prompts = {
        "a": (PROMPT, _image(30)),
        "b": (PROMPT.replace("content", "color"), _image(30)),
        "c": ("USER: <image>\nDescribe it. ASSISTANT:", _image(31, (64, 64))),
    }
    refs = {
        rid: hf_greedy(model, processor, text, [img], MAX_NEW_TOKENS)
        for rid, (text, img) in prompts.items()
    }
    runner = _runner(path, block_size=8)
    cfg = runner.model_config
    core = _C.EngineCore(
        _C.EngineConfig(
            num_blocks=64,
            block_size=8,
            max_num_seqs=2,
            max_num_batched_tokens=7,
            max_model_len=cfg.max_model_len,
            max_num_encoder_tokens=cfg.num_image_tokens,
            encoder_cache_size=2 * cfg.num_image_tokens,
        )
    )
    arrays = {rid: np.asarray(img) for rid, (_, img) in prompts.items()}
    for rid, ref in refs.items():
        items = [
            (offset, length, hashlib.sha256(arrays[rid].tobytes()).digest())
            for offset, length in image_spans(ref.prompt_ids, cfg.image_token_id)
        ]
        core.add_request(rid, ref.prompt_ids, items, max_tokens=MAX_NEW_TOKENS, ignore_eos=True)
    generated = {rid: [] for rid in refs}
    logprobs = {rid: [] for rid in refs}
    steps = 0
    while core.has_unfinished_requests():
        steps += 1
        assert steps < 500
        plan = core.schedule()
        hidden = runner.execute_model(plan, lambda rid, idx: arrays[rid])
        logits = runner.compute_logits(hidden[torch.tensor(plan.logits_indices).long()])
        for seq, row in zip(plan.sampled_seq_indices.tolist(), logits):
            logprobs[plan.request_ids[seq]].append(torch.log_softmax(row, -1))
        sampled = logits.argmax(-1).to(torch.int32).numpy()
        for rid, new_ids, finish_reason, _ in core.update(sampled):
            generated[rid].extend(new_ids)
            if finish_reason is not None:
                assert finish_reason == "length"
                runner.drop_request(rid)
    assert core.stats()["prefix_cache_hits"] > 0
    for rid, ref in refs.items():
        _assert_matches(generated[rid], logprobs[rid], ref)
    assert runner.encoder_cache == {}
