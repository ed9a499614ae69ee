"""The Hugging Face transformers reference for LLaVA checkpoints (the tests' oracle).

Builds `LlavaProcessor` the way transformers 5 needs it for CLIP-based LLaVA without
torchvision (the PIL image processor, `patch_size`, `num_additional_image_tokens=1`), and runs
HF greedy decoding, returning the prompt ids it built and the per-step logprobs.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


def hf_llava_processor(path: str | os.PathLike) -> Any:
    from transformers import AutoTokenizer, CLIPImageProcessorPil, LlavaProcessor

    folder = Path(path)
    pp = json.loads((folder / "preprocessor_config.json").read_text())
    proc = json.loads((folder / "processor_config.json").read_text())
    image_processor = CLIPImageProcessorPil(
        size=pp["size"],
        crop_size=pp["crop_size"],
        image_mean=pp["image_mean"],
        image_std=pp["image_std"],
        rescale_factor=pp["rescale_factor"],
        do_resize=pp["do_resize"],
        do_center_crop=pp["do_center_crop"],
        do_normalize=pp["do_normalize"],
        do_rescale=pp["do_rescale"],
        do_convert_rgb=pp["do_convert_rgb"],
        resample=pp["resample"],
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=AutoTokenizer.from_pretrained(str(folder)),
        patch_size=proc["patch_size"],
        vision_feature_select_strategy=proc["vision_feature_select_strategy"],
        num_additional_image_tokens=proc["num_additional_image_tokens"],
    )


@dataclass
class HFGreedy:
    prompt_ids: list[int]  # with every <image> expanded to the image-token count
    token_ids: list[int]  # generated
    logprobs: list[torch.Tensor]  # per generated token: float32 log-softmax over the vocabulary
    pixel_values: torch.Tensor | None
    image_embeddings: torch.Tensor | None  # [num_images, num_image_tokens, hidden]


def hf_llava_model(path: str | os.PathLike, dtype: torch.dtype = torch.float32, device="cpu"):
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(str(path), dtype=dtype)
    return model.to(device).eval()


@torch.inference_mode()
def hf_greedy(
    model: Any,
    processor: Any,
    prompt: str,
    images: list[Any] | None,
    max_new_tokens: int,
) -> HFGreedy:
    """Greedy decoding with transformers; never stops at EOS (the tests compare fixed lengths)."""
    inputs = processor(images=images or None, text=prompt, return_tensors="pt")
    inputs = {k: v.to(model.device) for k, v in inputs.items()}
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    out = model.generate(
        **inputs,
        max_new_tokens=max_new_tokens,
        min_new_tokens=None,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=processor.tokenizer.pad_token_id,
        output_logits=True,
        return_dict_in_generate=True,
    )
    n = inputs["input_ids"].shape[1]
    pixel_values = inputs.get("pixel_values")
    embeddings = None
    if pixel_values is not None:
        features = model.get_image_features(pixel_values=pixel_values, return_dict=True)
        embeddings = torch.stack(list(features.pooler_output))
    return HFGreedy(
        prompt_ids=inputs["input_ids"][0].tolist(),
        token_ids=out.sequences[0, n:].tolist(),
        logprobs=[torch.log_softmax(step[0].float(), dim=-1) for step in out.logits],
        pixel_values=pixel_values,
        image_embeddings=embeddings,
    )
