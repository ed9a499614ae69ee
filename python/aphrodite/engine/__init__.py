"""The engine: LLMEngine drives the C++ EngineCore and the ModelRunner step by step."""

from aphrodite.engine.args import EngineArgs
from aphrodite.engine.llm_engine import LLMEngine

__all__ = ["EngineArgs", "LLMEngine"]
