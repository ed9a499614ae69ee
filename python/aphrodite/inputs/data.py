"""Prompt types accepted by ``LLM.generate`` and ``LLMEngine.add_request``."""

from __future__ import annotations

from typing import TypedDict, Union

from aphrodite.multimodal import MultiModalDataDict


class _TextPromptBase(TypedDict):
    prompt: str


class TextPrompt(_TextPromptBase, total=False):
    """A text prompt (tokenized by the model's tokenizer, with its BOS token), with optional
    multimodal data: ``{"prompt": "USER: <image>\\n...", "multi_modal_data": {"image": img}}``."""

    multi_modal_data: MultiModalDataDict


class _TokensPromptBase(TypedDict):
    prompt_token_ids: list[int]


class TokensPrompt(_TokensPromptBase, total=False):
    """A tokenized prompt. Image placeholders are single image tokens (expanded by the engine)
    or already expanded to the model's image-token count."""

    multi_modal_data: MultiModalDataDict


PromptInputs = Union[str, TextPrompt, TokensPrompt]
