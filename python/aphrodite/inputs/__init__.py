"""Prompt inputs: ``PromptInputs = str | TextPrompt | TokensPrompt``."""

from aphrodite.inputs.data import PromptInputs, TextPrompt, TokensPrompt
from aphrodite.inputs.preprocess import InputPreprocessor, ProcessedPrompt, parse_prompt

__all__ = [
    "InputPreprocessor",
    "ProcessedPrompt",
    "PromptInputs",
    "TextPrompt",
    "TokensPrompt",
    "parse_prompt",
]
