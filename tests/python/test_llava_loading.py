"""Checkpoint loading: config parsing (both transformers layouts, defaults, rejections), model
resolution, dtype/device choice, safetensors names and errors, KV-cache sizing, and a low
precision run on every device against HF on the same device."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from llava_plans import Planner, image_spans
from PIL import Image

from aphrodite.config import ModelConfig, parse_image_processor, parse_llava_config
from aphrodite.modeling.weights import canonical_name, iterate_weights, safetensors_files
from aphrodite.testing import build_tiny_llava
from aphrodite.testing.hf_reference import hf_greedy, hf_llava_model, hf_llava_processor
from aphrodite.worker.model_runner import ModelRunner, determine_num_kv_blocks

# config.json of llava-hf/llava-1.5-7b-hf: most fields are left to transformers' defaults.
LLAVA_15_7B = {
    "architectures": ["LlavaForConditionalGeneration"],
    "ignore_index": -100,
    "image_token_index": 32000,
    "model_type": "llava",
    "pad_token_id": 32001,
    "projector_hidden_act": "gelu",
    "text_config": {
        "_name_or_path": "lmsys/vicuna-7b-v1.5",
        "architectures": ["LlamaForCausalLM"],
        "max_position_embeddings": 4096,
        "model_type": "llama",
        "rms_norm_eps": 1e-05,
        "torch_dtype": "float16",
        "vocab_size": 32064,
    },
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
    "transformers_version": "4.36.0.dev0",
    "vision_config": {
        "hidden_size": 1024,
        "image_size": 336,
        "intermediate_size": 4096,
        "model_type": "clip_vision_model",
        "num_attention_heads": 16,
        "num_hidden_layers": 24,
        "patch_size": 14,
        "projection_dim": 768,
        "vocab_size": 32000,
    },
    "vision_feature_layer": -2,
    "vision_feature_select_strategy": "default",
    "vocab_size": 32064,
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_llava(tmp_path_factory.mktemp("tiny") / "ckpt", legacy_config=True)


def test_llava_15_config_defaults():
    cfg = parse_llava_config(LLAVA_15_7B)
    t, v = cfg.text, cfg.vision
    assert (t.hidden_size, t.intermediate_size, t.num_hidden_layers) == (4096, 11008, 32)
    assert (t.num_attention_heads, t.num_key_value_heads, t.head_dim) == (32, 32, 128)
    assert t.vocab_size == 32064 and t.rope.theta == 10000.0 and t.rope.rope_type == "default"
    assert (v.hidden_size, v.num_hidden_layers, v.hidden_act) == (1024, 24, "quick_gelu")
    assert cfg.num_image_tokens == 576 and cfg.vision_layers_needed == 23
    assert cfg.image_token_index == 32000 and cfg.torch_dtype == "float16"


def test_rope_layouts_agree():
    old = json.loads(json.dumps(LLAVA_15_7B))
    old["text_config"].update(rope_theta=5e5, rope_scaling={"type": "linear", "factor": 4.0})
    new = json.loads(json.dumps(LLAVA_15_7B))
    new["text_config"]["rope_parameters"] = {
        "rope_type": "linear",
        "factor": 4.0,
        "rope_theta": 5e5,
    }
    assert parse_llava_config(old).text.rope == parse_llava_config(new).text.rope
    llama3 = json.loads(json.dumps(LLAVA_15_7B))
    llama3["text_config"]["rope_scaling"] = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
    }
    # original_max_position_embeddings falls back to max_position_embeddings, as in HF.
    assert parse_llava_config(llama3).text.rope.original_max_position_embeddings == 4096
    # Dynamic NTK is the default rope within max_position_embeddings; pretraining_tp changes
    # nothing in inference (both as in transformers 5).
    dynamic = json.loads(json.dumps(LLAVA_15_7B))
    dynamic["text_config"].update(rope_scaling={"type": "dynamic", "factor": 2.0},
                                  pretraining_tp=2)
    assert parse_llava_config(dynamic).text.rope == parse_llava_config(LLAVA_15_7B).text.rope


def test_mistral_text_config():
    """A Mistral text model (bakLlava): MistralConfig's defaults where they differ from
    Llama's, its sliding window (a null one is none), and no biases."""
    cfg = json.loads(json.dumps(LLAVA_15_7B))
    cfg["text_config"] = {"model_type": "mistral", "vocab_size": 32064, "attention_bias": True}
    t = parse_llava_config(cfg).text
    assert (t.model_type, t.intermediate_size, t.num_key_value_heads) == ("mistral", 14336, 8)
    assert t.sliding_window == 4096 and t.max_position_embeddings == 131072
    assert not t.attention_bias and not t.mlp_bias
    cfg["text_config"].update(sliding_window=None, max_position_embeddings=32768)
    t = parse_llava_config(cfg).text
    assert t.sliding_window == 0 and t.max_position_embeddings == 32768
    assert parse_llava_config(LLAVA_15_7B).text.sliding_window == 0
    # HF fails on a window of 0; layers that mix full and sliding attention are Ministral's.
    for bad, message in [
        ({"sliding_window": 0}, "at least 1"),
        ({"sliding_window": 8, "layer_types": ["full_attention", "sliding_attention"]}, "mixed"),
        ({"sliding_window": None, "layer_types": ["sliding_attention"]}, "mixed"),
    ]:
        edited = json.loads(json.dumps(cfg))
        edited["text_config"].update(bad)
        with pytest.raises(ValueError, match=message):
            parse_llava_config(edited)
    cfg["text_config"].update(sliding_window=8, layer_types=["sliding_attention"] * 2)
    assert parse_llava_config(cfg).text.sliding_window == 8


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c["text_config"].update(rope_scaling={"type": "yarn", "factor": 2.0}), "yarn"),
        (lambda c: c["text_config"].update(model_type="qwen2"), "qwen2"),
        (lambda c: c["vision_config"].update(model_type="siglip_vision_model"), "siglip"),
        (lambda c: c.update(vision_feature_select_strategy="cls"), "cls"),
        (lambda c: c.update(projector_hidden_act="relu"), "relu"),
        (lambda c: c.update(vision_feature_layer=-30), "out of range"),
        (lambda c: c["text_config"].update(num_key_value_heads=5), "multiple"),
        (lambda c: c["text_config"].update(head_dim=12), "head_dim 12"),
        (lambda c: c.update(model_type="llama", architectures=["LlamaForCausalLM"]), "LLaVA"),
    ],
)
def test_unsupported_configs_are_rejected(edit, message):
    cfg = json.loads(json.dumps(LLAVA_15_7B))
    edit(cfg)
    with pytest.raises(ValueError, match=message):
        parse_llava_config(cfg)


def test_image_processor_int_sizes_and_switches():
    p = parse_image_processor(
        {"size": 336, "crop_size": 336, "do_normalize": False, "do_rescale": False}
    )
    assert p["shortest_edge"] == 336 and p["crop_size"] == (336, 336)
    assert p["mean"] == [0.0] * 3 and p["std"] == [1.0] * 3 and p["rescale_factor"] == 1.0
    with pytest.raises(ValueError, match="bicubic"):
        parse_image_processor({"resample": 2})


def test_model_config_load(tiny):
    cfg = ModelConfig.load(str(tiny), device="cpu")
    assert cfg.dtype == torch.float32 and cfg.device == torch.device("cpu")
    assert cfg.max_model_len == 1024 and cfg.eos_token_id == 2
    assert cfg.tokenizer.convert_tokens_to_ids("<image>") == cfg.image_token_id
    assert cfg.num_image_tokens == 4 and cfg.chat_template.startswith("{% for message")
    assert cfg.image_processor["crop_size"] == (28, 28)
    assert (
        ModelConfig.load(tiny, dtype="bfloat16", device="cpu", max_model_len=64).max_model_len == 64
    )
    with pytest.raises(ValueError, match="max_model_len"):
        ModelConfig.load(tiny, device="cpu", max_model_len=4096)
    with pytest.raises(ValueError, match="dtype"):
        ModelConfig.load(tiny, dtype="int8", device="cpu")
    with pytest.raises(ValueError, match="device"):
        ModelConfig.load(tiny, device="tpu")


def test_auto_dtype_float16_checkpoint_on_cpu(tiny, tmp_path):
    copy = shutil.copytree(tiny, tmp_path / "fp16")
    config = json.loads((copy / "config.json").read_text())
    config["torch_dtype"] = "float16"
    (copy / "config.json").write_text(json.dumps(config))
    assert ModelConfig.load(copy, device="cpu").dtype == torch.bfloat16
    assert ModelConfig.load(copy, device="cpu", dtype="float16").dtype == torch.float16


def test_hub_id_offline_names_the_id(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="no-such-org/no-such-llava"):
        ModelConfig.load("no-such-org/no-such-llava", device="cpu")
    with pytest.raises(ValueError, match="not a folder"):
        ModelConfig.load(str(tmp_path / "missing" / "dir" / "x"), device="cpu")


def test_hub_id_resolved_from_cache(tiny, tmp_path, monkeypatch):
    """A hub id whose snapshot is in the local HF cache loads without any network."""
    cache = tmp_path / "hub"
    repo = cache / "models--tiny-org--tiny-llava"
    commit = "0" * 40
    shutil.copytree(tiny, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = ModelConfig.load("tiny-org/tiny-llava", device="cpu")
    assert cfg.model == repo / "snapshots" / commit


def test_canonical_names_of_both_layouts():
    pairs = [
        (
            "language_model.model.layers.0.self_attn.q_proj.weight",
            "layers.0.self_attn.q_proj.weight",
        ),
        ("model.language_model.layers.0.mlp.up_proj.weight", "layers.0.mlp.up_proj.weight"),
        ("language_model.model.norm.weight", "norm.weight"),
    ]
    pairs = [(old, f"language_model.{new}") for old, new in pairs] + [
        ("language_model.lm_head.weight", "lm_head.weight"),
        ("lm_head.weight", "lm_head.weight"),
        ("vision_tower.vision_model.pre_layrnorm.bias", "vision_tower.pre_layrnorm.bias"),
        (
            "model.vision_tower.embeddings.class_embedding",
            "vision_tower.embeddings.class_embedding",
        ),
        ("model.multi_modal_projector.linear_1.weight", "multi_modal_projector.linear_1.weight"),
    ]
    for name, canonical in pairs:
        assert canonical_name(name) == canonical


def test_sharded_and_broken_checkpoints(tmp_path):
    sharded = build_tiny_llava(tmp_path / "sharded", max_shard_size="30KB", num_hidden_layers=1)
    files = safetensors_files(sharded)
    assert len(files) > 1
    names = [name for name, _ in iterate_weights(sharded)]
    assert len(names) == len(set(names)) and "lm_head.weight" in names

    files[0].unlink()
    with pytest.raises(FileNotFoundError, match="missing"):
        safetensors_files(sharded)

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="safetensors"):
        safetensors_files(pickled)


def test_missing_tensor_is_reported(tiny, tmp_path):
    from safetensors.torch import load_file, save_file

    copy = shutil.copytree(tiny, tmp_path / "broken")
    tensors = load_file(copy / "model.safetensors")
    del tensors["language_model.model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, copy / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing.*layers\.1\.self_attn\.qkv_proj"):
        ModelRunner(ModelConfig.load(copy, device="cpu"))


def test_cpu_kv_cache_sizing(tiny, monkeypatch):
    runner = ModelRunner(ModelConfig.load(tiny, device="cpu"))
    block_bytes = runner.kv_block_bytes(16)
    monkeypatch.setenv("APHRODITE_CPU_KVCACHE_SPACE", "0.5")
    assert determine_num_kv_blocks(runner, 16) == 2**29 // block_bytes
    assert determine_num_kv_blocks(runner, 16, cpu_kvcache_space_gib=0.25) == 2**28 // block_bytes
    with pytest.raises(ValueError, match="no room"):
        determine_num_kv_blocks(runner, 16, cpu_kvcache_space_gib=1e-9)


def test_bfloat16_matches_hf_on_device(tiny64, device):
    """bf16 on each device against HF in bf16 on the same device, teacher-forced on HF's greedy
    tokens (so that one bf16 near-tie cannot derail the rest): logprobs within bf16 tolerance."""
    processor = hf_llava_processor(tiny64)
    model = hf_llava_model(tiny64, dtype=torch.bfloat16, device=device)
    image = Image.fromarray(np.random.default_rng(3).integers(0, 256, (40, 52, 3), dtype=np.uint8))
    ref = hf_greedy(model, processor, "USER: <image>\nWhat is this? ASSISTANT:", [image], 16)

    runner = ModelRunner(ModelConfig.load(tiny64, dtype="bfloat16", device=device))
    runner.allocate_kv_cache(num_blocks=16, block_size=16)
    planner = Planner(block_size=16, blocks_per_request=4, chunk=64)
    planner.add(
        "r", ref.prompt_ids, image_spans(ref.prompt_ids, runner.model_config.image_token_id)
    )
    array = np.asarray(image)
    worst = 0.0
    for step in range(len(ref.token_ids)):
        plan = planner.schedule()
        hidden = runner.execute_model(plan, lambda rid, idx: array)
        assert hidden.dtype == torch.bfloat16 and hidden.device.type == device
        rows = hidden[torch.from_numpy(plan.logits_indices).long().to(hidden.device)]
        mine = torch.log_softmax(runner.compute_logits(rows)[0], -1).cpu()
        theirs = ref.logprobs[step].cpu()
        top = theirs.topk(5).indices
        worst = max(worst, (mine[top] - theirs[top]).abs().max().item())
        planner.update(plan, [ref.token_ids[step]])
    assert worst < 0.15, f"bf16 logprobs differ from HF's by up to {worst}"


@pytest.mark.parametrize("where", ["top", "text_config"])
def test_tie_flag_with_a_stored_head_uses_it_like_hf(tiny, tmp_path, where):
    """A config that ties the LM head to the embeddings while the checkpoint stores a different
    head: transformers uses the stored head (and warns), so do we; a stored head equal to the
    embeddings is tied (one matrix)."""
    from safetensors.torch import load_file, save_file

    folder = shutil.copytree(tiny, tmp_path / "tie_flag")
    cfg = json.loads((folder / "config.json").read_text())
    (cfg if where == "top" else cfg["text_config"])["tie_word_embeddings"] = True
    (folder / "config.json").write_text(json.dumps(cfg))
    processor = hf_llava_processor(folder)
    image = Image.fromarray(np.random.default_rng(7).integers(0, 256, (30, 41, 3), dtype=np.uint8))
    prompt = "USER: <image>\nWhat is this? ASSISTANT:"
    ref = hf_greedy(hf_llava_model(folder), processor, prompt, [image], 8)
    from aphrodite import LLM, SamplingParams

    llm = LLM(model=folder, device="cpu", dtype="float32", kv_cache_memory_gb=0.01)
    greedy = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    out = llm.generate({"prompt": prompt, "multi_modal_data": {"image": image}}, greedy,
                       use_tqdm=False)[0].outputs[0]
    assert out.token_ids == ref.token_ids[:8]
    model = llm.llm_engine.runner.model
    assert model.lm_head is not None
    # The stored head made equal to the embeddings: tied after all.
    tensors = load_file(folder / "model.safetensors")
    embed = next(k for k in tensors if k.endswith("embed_tokens.weight"))
    tensors["lm_head.weight"] = tensors[embed].clone()
    save_file(tensors, folder / "model.safetensors")
    runner = ModelRunner(ModelConfig.load(folder, device="cpu"))
    assert runner.model.lm_head is None


def test_the_processor_chat_template_comes_before_the_tokenizer_one(tmp_path):
    """A checkpoint with both (some llava-hf repos keep a text-only template in
    tokenizer_config.json): the processor's, as HF's LlavaProcessor and vLLM take it; its
    legacy chat_template.json before chat_template.jinja, as transformers 5 reads them."""
    folder = build_tiny_llava(tmp_path / "two_templates", chat_template_location="tokenizer")
    assert "ASSISTANT" in ModelConfig.load(folder, device="cpu").chat_template
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": "PROCESSOR {{ 1 }}"}))
    assert ModelConfig.load(folder, device="cpu").chat_template == "PROCESSOR {{ 1 }}"
