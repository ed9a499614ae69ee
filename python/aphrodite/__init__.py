"""Aphrodite: an inference engine for vision-language models.

The C++ core is exposed as :mod:`aphrodite._C`; this package holds the Python API around it.
The API classes are imported on first use, so that ``import aphrodite`` (and
``python -m aphrodite.env``) stays fast and does not load torch or transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

from aphrodite._C import __version__
from aphrodite._envinfo import env_info

_LAZY_EXPORTS = {
    "LLM": "aphrodite.endpoints.llm",
    "LLMEngine": "aphrodite.engine.llm_engine",
    "EngineArgs": "aphrodite.engine.args",
    "SamplingParams": "aphrodite.sampling_params",
    "RequestOutput": "aphrodite.outputs",
    "CompletionOutput": "aphrodite.outputs",
    "Logprob": "aphrodite.outputs",
    "PromptInputs": "aphrodite.inputs",
    "TextPrompt": "aphrodite.inputs",
    "TokensPrompt": "aphrodite.inputs",
}

__all__ = ["__version__", "env_info", *_LAZY_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _LAZY_EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'aphrodite' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY_EXPORTS))
