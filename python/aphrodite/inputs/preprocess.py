"""Turning a prompt into what the engine core takes: token ids with each image placeholder
expanded to the model's image-token count, and one hashed item per image.

Every check that can fail runs here, before anything is scheduled."""

from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from aphrodite.multimodal import (
    MultiModalItem,
    hash_embeddings,
    hash_rgb_array,
    to_rgb_array,
)


@dataclass
class ProcessedPrompt:
    prompt: str | None
    prompt_token_ids: list[int]
    mm_items: list[MultiModalItem] = field(default_factory=list)


def parse_prompt(prompt: Any) -> tuple[str | None, list[int] | None, Mapping]:
    """(text, token ids, multimodal data) of a PromptInputs value; exactly one of text and
    token ids is set."""
    if isinstance(prompt, str):
        return prompt, None, {}
    if not isinstance(prompt, Mapping):
        raise TypeError(
            "a prompt must be a str, a TextPrompt {'prompt': ...} or a TokensPrompt "
            f"{{'prompt_token_ids': ...}}, got {type(prompt).__name__}"
        )
    unknown = set(prompt) - {"prompt", "prompt_token_ids", "multi_modal_data"}
    if unknown:
        raise ValueError(f"unknown prompt keys {sorted(unknown)}")
    has_text, has_ids = "prompt" in prompt, "prompt_token_ids" in prompt
    if has_text == has_ids:
        raise ValueError("a prompt dict needs exactly one of 'prompt' and 'prompt_token_ids'")
    mm_data = prompt.get("multi_modal_data") or {}
    if not isinstance(mm_data, Mapping):
        raise TypeError(f"multi_modal_data must be a dict, got {type(mm_data).__name__}")
    if has_text:
        if not isinstance(prompt["prompt"], str):
            raise TypeError(f"'prompt' must be a str, got {type(prompt['prompt']).__name__}")
        return prompt["prompt"], None, mm_data
    ids = prompt["prompt_token_ids"]
    if isinstance(ids, (np.ndarray, torch.Tensor)):
        ids = ids.tolist()
    ids = list(ids)
    if not all(isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in ids):
        raise TypeError("'prompt_token_ids' must be a sequence of ints")
    ids = [int(t) for t in ids]
    return None, ids, mm_data


# Tokens a cut through a text may merge or split at the cut (see InputPreprocessor._encode).
_CUT_MARGIN_TOKENS = 16


class InputPreprocessor:
    """Tokenizes prompts, validates and hashes their images, expands image placeholders.

    Args:
        tokenizer: the model's Hugging Face tokenizer.
        vocab_size: token ids must be below it.
        max_model_len: prompts must be shorter (at least one token has to fit after them).
        image_token_id: the placeholder token (None: the model takes no images).
        num_image_tokens: how many tokens one image occupies in the prompt.
        hidden_size: width of precomputed image embeddings.
        limit_mm_per_prompt: the most items of each modality per prompt ({"image": n}).
        check_image_size: raises ValueError for an image (height, width) the model's image
            preprocessing cannot take (an extreme aspect ratio), so that the request fails
            here instead of in the batch that would encode it.
    """

    def __init__(
        self,
        tokenizer: Any,
        vocab_size: int,
        max_model_len: int,
        image_token_id: int | None,
        num_image_tokens: int,
        hidden_size: int,
        limit_mm_per_prompt: Mapping[str, int],
        check_image_size: Callable[[int, int], None] | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.image_token_id = image_token_id
        self.num_image_tokens = num_image_tokens
        self.hidden_size = hidden_size
        self.limit_mm_per_prompt = dict(limit_mm_per_prompt)
        self.check_image_size = check_image_size
        self._prompt_chars_limit: int | None = None

    def process(self, prompt: Any, add_special_tokens: bool = True) -> ProcessedPrompt:
        text, token_ids, mm_data = parse_prompt(prompt)
        if token_ids is None:
            token_ids = self._encode(text, add_special_tokens)
        if not token_ids:
            raise ValueError("the prompt is empty")
        bad = [t for t in token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt token ids out of range [0, {self.vocab_size}): {bad[:5]}")

        unknown = set(mm_data) - {"image"}
        if unknown:
            raise ValueError(f"unsupported multimodal data {sorted(unknown)}: only 'image'")
        images = self._image_items(mm_data["image"]) if "image" in mm_data else []
        token_ids, offsets = self.expand_placeholders(token_ids, len(images))
        if len(token_ids) >= self.max_model_len:
            expanded = (
                f" (images expanded to {self.num_image_tokens} tokens each)" if images else ""
            )
            raise ValueError(
                f"the prompt is {len(token_ids)} tokens long{expanded} but max_model_len is "
                f"{self.max_model_len}: it must be shorter to leave room for output"
            )
        items = [
            MultiModalItem(offset=o, length=self.num_image_tokens, hash=h, data=d)
            for o, (h, d) in zip(offsets, images)
        ]
        return ProcessedPrompt(prompt=text, prompt_token_ids=token_ids, mm_items=items)

    def _encode(self, text: str, add_special_tokens: bool) -> list[int]:
        """Tokenizes `text`; a text far longer than any prompt that fits is refused after
        tokenizing only its beginning (a 10 MB prompt would otherwise take seconds of CPU
        before the length check refused it)."""
        limit = self._max_prompt_chars()
        if limit is not None and len(text) > limit:
            head = self.tokenizer.encode(text[:limit], add_special_tokens=add_special_tokens)
            # The margin covers tokens merging across the cut.
            if len(head) >= self.max_model_len + _CUT_MARGIN_TOKENS:
                raise ValueError(
                    f"the prompt is longer than max_model_len={self.max_model_len} tokens: its "
                    f"first {limit} of {len(text)} characters are already {len(head)} tokens"
                )
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def _max_prompt_chars(self) -> int | None:
        """Characters beyond which a text cannot fit in max_model_len tokens when no token
        covers more characters than its vocabulary entry has (None: unknown vocabulary)."""
        if self._prompt_chars_limit is None:
            get_vocab = getattr(self.tokenizer, "get_vocab", None)
            if get_vocab is None:
                return None
            longest = max((len(t) for t in get_vocab()), default=1)
            self._prompt_chars_limit = (self.max_model_len + _CUT_MARGIN_TOKENS) * max(longest, 1)
        return self._prompt_chars_limit

    def _image_items(self, image: Any) -> list[tuple[bytes, Any]]:
        """(hash, data) per image, in placeholder order."""
        if self.image_token_id is None:
            raise ValueError("this model does not take images")
        if isinstance(image, torch.Tensor):
            if image.dim() == 2:
                embeds = [image]
            elif image.dim() == 3:
                embeds = list(image.unbind(0))
            else:
                raise ValueError(
                    "image embeddings must be [num_image_tokens, hidden] or "
                    f"[num_images, num_image_tokens, hidden], got shape {tuple(image.shape)}"
                )
            items = [self._embedding_item(e) for e in embeds]
        elif isinstance(image, (list, tuple)):
            if not image:
                raise ValueError("multi_modal_data['image'] is an empty list")
            items = [self._single_image_item(x) for x in image]
        else:
            items = [self._single_image_item(image)]
        limit = self.limit_mm_per_prompt.get("image", 1)
        if len(items) > limit:
            raise ValueError(
                f"the prompt has {len(items)} images but limit_mm_per_prompt allows {limit} "
                "(raise it with LLM(..., limit_mm_per_prompt={'image': n}))"
            )
        return items

    def _single_image_item(self, image: Any) -> tuple[bytes, Any]:
        if isinstance(image, torch.Tensor):
            if image.dim() != 2:
                raise ValueError(
                    "image embeddings in a list must each be [num_image_tokens, hidden], "
                    f"got shape {tuple(image.shape)}"
                )
            return self._embedding_item(image)
        if isinstance(image, np.ndarray):
            # Pixels, as vLLM takes them: uint8 [H, W, 3] (or [H, W] / [H, W, 1] grayscale).
            if image.dtype != np.uint8:
                raise ValueError(
                    f"numpy images must hold uint8 pixels [H, W, 3], got dtype {image.dtype}"
                )
            if image.ndim in (2, 3) and (image.shape[0] < 1 or image.shape[1] < 1):
                raise ValueError(f"the image is empty (shape {image.shape})")
        elif not isinstance(image, Image.Image):
            raise ValueError(
                f"unsupported image type {type(image).__name__}: pass a PIL.Image.Image, a uint8 "
                "numpy array [H, W, 3], a list of them, or image embeddings as a torch.Tensor"
            )
        elif image.width < 1 or image.height < 1:
            raise ValueError(f"the image is empty ({image.width}x{image.height})")
        pixels = to_rgb_array(image)
        if self.check_image_size is not None:
            self.check_image_size(pixels.shape[0], pixels.shape[1])
        return hash_rgb_array(pixels), pixels

    def _embedding_item(self, embeds: torch.Tensor) -> tuple[bytes, Any]:
        expected = (self.num_image_tokens, self.hidden_size)
        if tuple(embeds.shape) != expected:
            raise ValueError(
                f"image embeddings must have shape {expected} per image "
                f"(num_image_tokens, hidden_size), got {tuple(embeds.shape)}"
            )
        if not embeds.is_floating_point():
            raise ValueError(f"image embeddings must be floating point, got {embeds.dtype}")
        return hash_embeddings(embeds), embeds

    def expand_placeholders(self, token_ids: list[int], num_images: int):
        """Expands each image token to num_image_tokens copies; returns (ids, offsets). A
        prompt whose image tokens are already expanded (num_images runs of num_image_tokens)
        is kept as is."""
        image_token, n = self.image_token_id, self.num_image_tokens
        positions = (
            [] if image_token is None else [i for i, t in enumerate(token_ids) if t == image_token]
        )
        if len(positions) == num_images * n and n > 1 and num_images > 0:
            starts = positions[::n]
            if all(positions[k * n + j] == s + j for k, s in enumerate(starts) for j in range(n)):
                return token_ids, starts
        if len(positions) != num_images:
            raise ValueError(
                f"the prompt has {len(positions)} image placeholder(s) (token {image_token}) "
                f"but {num_images} image(s) were given: each image needs its own placeholder"
            )
        expanded: list[int] = []
        offsets: list[int] = []
        previous = 0
        for p in positions:
            expanded += token_ids[previous:p]
            offsets.append(len(expanded))
            expanded += [image_token] * n
            previous = p + 1
        expanded += token_ids[previous:]
        return expanded, offsets
