"""Builds a tiny random LLaVA-1.5 checkpoint offline, in the Hugging Face layout.

The checkpoint is what `llava-hf/llava-1.5-7b-hf` looks like, only small: `config.json`
(LlavaConfig with a Llama text config and a CLIP vision config), safetensors weights (single or
sharded), a BPE tokenizer trained with `tokenizers` on a synthetic corpus, a
`preprocessor_config.json` for the CLIP image processor, a `processor_config.json` for
`LlavaProcessor` and a LLaVA-1.5 chat template (USER:/ASSISTANT:). The tests use it as the
oracle's input (transformers loads it too); it is also a way to try the engine without
downloading a model.

The weights are drawn with a fixed seed and scaled so that the logits are spread out (random
models with the usual 0.02 initialisation produce near-ties that make greedy decoding fragile).
"""

from __future__ import annotations

import json
import math
import os
import random
from pathlib import Path
from typing import Any

LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}"
    "{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' ' }}{% endfor %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# CLIP's normalisation constants (what llava-1.5 ships).
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

_WORDS = (
    "the a an this that image picture photo shows contains is are of in on with and to what "
    "color red green blue yellow black white cat dog car tree house street sky sun person man "
    "woman child table chair book cup left right top bottom large small many one two three "
    "describe content question answer please detail scene background foreground light dark "
    "USER: ASSISTANT: ? . , ! 0 1 2 3 4 5 6 7 8 9"
).split()


def _train_tokenizer(vocab_size: int, seed: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    rng = random.Random(seed)
    corpus = []
    for _ in range(2000):
        n = rng.randint(3, 14)
        corpus.append(" ".join(rng.choice(_WORDS) for _ in range(n)))
    corpus.append("USER: <image>\nWhat is the content of this image? ASSISTANT:")

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=False))
    # Llama's SentencePiece convention: spaces become "▁", prepended to the first word.
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=sorted(set("".join(corpus)) | set("\n")),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    return tokenizer


def _randomize(model, seed: int, logit_scale: float) -> None:
    """Redraws every weight: unit-variance activations through the layers, spread-out logits."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if (
                name.endswith("class_embedding")
                or "embed_tokens" in name
                or "position_embedding" in name
            ):
                p.copy_(torch.randn(p.shape, generator=gen))
            elif p.ndim == 1 and ("norm" in name or "layrnorm" in name) and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif p.ndim == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            else:
                fan_in = math.prod(p.shape[1:])
                scale = logit_scale if name.endswith("lm_head.weight") else 1.0
                p.copy_(scale * torch.randn(p.shape, generator=gen) / math.sqrt(fan_in))


def build_tiny_llava(
    path: str | os.PathLike,
    *,
    seed: int = 0,
    # text (Llama, or Mistral: Llama's layers with a sliding attention window)
    text_model_type: str = "llama",
    sliding_window: int | None = None,
    vocab_size: int | None = None,
    tokenizer_vocab_size: int = 300,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int | None = None,
    head_dim: int | None = None,
    max_position_embeddings: int = 1024,
    rms_norm_eps: float = 1e-5,
    rope_theta: float = 10000.0,
    rope_scaling: dict[str, Any] | None = None,
    attention_bias: bool = False,
    mlp_bias: bool = False,
    tie_word_embeddings: bool = False,
    # vision (CLIP)
    image_size: int = 28,
    patch_size: int = 14,
    vision_hidden_size: int = 32,
    vision_intermediate_size: int = 64,
    vision_num_hidden_layers: int = 3,
    vision_num_attention_heads: int = 2,
    vision_hidden_act: str = "quick_gelu",
    vision_layer_norm_eps: float = 1e-5,
    # llava
    vision_feature_layer: int | list[int] = -2,
    vision_feature_select_strategy: str = "default",
    projector_hidden_act: str = "gelu",
    multimodal_projector_bias: bool = True,
    # image processor
    shortest_edge: int | None = None,
    crop_size: int | None = None,
    image_mean: list[float] | None = None,
    image_std: list[float] | None = None,
    # files
    torch_dtype: str = "float32",
    max_shard_size: int | str | None = None,
    legacy_config: bool = False,
    chat_template_location: str = "jinja",
    logit_scale: float = 4.0,
) -> Path:
    """Writes a random LLaVA checkpoint to ``path`` (created if needed) and returns the path.

    ``text_model_type`` "mistral" writes a MistralConfig text model (``sliding_window`` tokens of
    attention window, None for none; Mistral has no attention/MLP biases).
    ``rope_scaling`` is an HF rope-scaling dict such as ``{"rope_type": "linear", "factor": 2.0}``.
    ``max_shard_size`` (bytes or "10KB") splits the safetensors into shards with an index.
    ``legacy_config`` rewrites config.json the way transformers 4 wrote it (top-level
    ``rope_theta`` / ``rope_scaling`` in the text config, ``torch_dtype``), as most hub
    checkpoints still are. ``chat_template_location``: "jinja" (chat_template.jinja),
    "json" (chat_template.json, the processor's file in llava-hf repos), "tokenizer"
    (tokenizer_config.json) or "none".
    """
    import torch
    from tokenizers import AddedToken
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        MistralConfig,
        PreTrainedTokenizerFast,
    )

    if chat_template_location not in ("jinja", "json", "tokenizer", "none"):
        raise ValueError(f"unknown chat_template_location {chat_template_location!r}")
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)

    bpe = _train_tokenizer(tokenizer_vocab_size, seed)
    # As in llava-hf: <image> right after the trained vocabulary, then <pad>.
    image_token_index = bpe.get_vocab_size()
    pad_token_id = image_token_index + 1
    bpe.add_special_tokens([AddedToken("<image>", special=True), AddedToken("<pad>", special=True)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        additional_special_tokens=["<image>"],
        clean_up_tokenization_spaces=False,
    )
    ids = tokenizer.convert_tokens_to_ids(["<image>", "<pad>"])
    if ids != [image_token_index, pad_token_id]:
        raise RuntimeError(f"<image>/<pad> got ids {ids}, not the two after the trained vocabulary")
    if chat_template_location == "tokenizer":
        tokenizer.chat_template = LLAVA_CHAT_TEMPLATE
    tokenizer.save_pretrained(out)
    if vocab_size is None:
        # llava-hf pads the vocabulary past the tokenizer's (32064 vs 32002); so do we.
        vocab_size = (pad_token_id + 1 + 7) // 8 * 8 + 8
    if vocab_size <= pad_token_id:
        raise ValueError(f"vocab_size {vocab_size} must exceed the tokenizer's {pad_token_id + 1}")

    text_kwargs: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads or num_attention_heads,
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=rms_norm_eps,
        attention_bias=attention_bias,
        mlp_bias=mlp_bias,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=pad_token_id,
    )
    if head_dim is not None:
        text_kwargs["head_dim"] = head_dim
    rope = {"rope_type": "default", **(rope_scaling or {}), "rope_theta": rope_theta}
    text_kwargs["rope_parameters"] = rope
    if text_model_type == "llama":
        if sliding_window is not None:
            raise ValueError("sliding_window needs text_model_type='mistral'")
        text_config = LlamaConfig(**text_kwargs)
    elif text_model_type == "mistral":
        if attention_bias or mlp_bias:
            raise ValueError("Mistral has no attention or MLP biases")
        del text_kwargs["attention_bias"], text_kwargs["mlp_bias"]
        text_config = MistralConfig(**text_kwargs, sliding_window=sliding_window)
    else:
        raise ValueError(f"text_model_type must be 'llama' or 'mistral', got {text_model_type!r}")
    vision_config = CLIPVisionConfig(
        hidden_size=vision_hidden_size,
        intermediate_size=vision_intermediate_size,
        num_hidden_layers=vision_num_hidden_layers,
        num_attention_heads=vision_num_attention_heads,
        image_size=image_size,
        patch_size=patch_size,
        hidden_act=vision_hidden_act,
        layer_norm_eps=vision_layer_norm_eps,
        projection_dim=vision_hidden_size,
    )
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=image_token_index,
        vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy=vision_feature_select_strategy,
        projector_hidden_act=projector_hidden_act,
        multimodal_projector_bias=multimodal_projector_bias,
        tie_word_embeddings=tie_word_embeddings,
        image_seq_length=(image_size // patch_size) ** 2
        + (1 if vision_feature_select_strategy == "full" else 0),
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    _randomize(model, seed, logit_scale)
    model = model.to(getattr(torch, torch_dtype))
    save_kwargs: dict[str, Any] = {}
    if max_shard_size is not None:
        save_kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(out, **save_kwargs)
    if legacy_config:
        _rewrite_config_legacy(out / "config.json")

    edge = shortest_edge if shortest_edge is not None else image_size
    crop = crop_size if crop_size is not None else image_size
    preprocessor = {
        "crop_size": {"height": crop, "width": crop},
        "do_center_crop": True,
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": image_mean or CLIP_MEAN,
        "image_std": image_std or CLIP_STD,
        "image_processor_type": "CLIPImageProcessor",
        "processor_class": "LlavaProcessor",
        "resample": 3,
        "rescale_factor": 1 / 255,
        "size": {"shortest_edge": edge},
    }
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2) + "\n")
    processor = {
        "processor_class": "LlavaProcessor",
        "image_token": "<image>",
        "patch_size": patch_size,
        "vision_feature_select_strategy": vision_feature_select_strategy,
        "num_additional_image_tokens": 1,
    }
    (out / "processor_config.json").write_text(json.dumps(processor, indent=2) + "\n")
    if chat_template_location == "jinja":
        (out / "chat_template.jinja").write_text(LLAVA_CHAT_TEMPLATE)
    elif chat_template_location == "json":
        text = json.dumps({"chat_template": LLAVA_CHAT_TEMPLATE}, indent=2)
        (out / "chat_template.json").write_text(text + "\n")
    return out


def _rewrite_config_legacy(config_path: Path) -> None:
    cfg = json.loads(config_path.read_text())
    text = cfg["text_config"]
    rope = dict(text.pop("rope_parameters"))
    text["rope_theta"] = rope.pop("rope_theta")
    if rope.get("rope_type", "default") != "default":
        # transformers 4 wrote the scaling under "type" in older checkpoints.
        rope["type"] = rope.pop("rope_type")
        text["rope_scaling"] = rope
    else:
        text["rope_scaling"] = None
    cfg["torch_dtype"] = cfg.pop("dtype", "float32")
    config_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
