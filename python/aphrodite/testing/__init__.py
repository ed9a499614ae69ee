"""Helpers for tests and for trying the engine without downloading a model."""

from aphrodite.testing.tiny_llava import build_tiny_llava

__all__ = ["build_tiny_llava"]
