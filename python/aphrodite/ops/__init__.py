"""Typed Python wrappers over the core's ops (``aphrodite._C.ops``).

Each op takes torch tensors (or anything with ``__dlpack__``), picks its backend from the
tensors' device and, on CUDA, runs on the caller's current torch stream.
"""

from aphrodite.ops.attention import paged_attention, reshape_and_cache

__all__ = ["paged_attention", "reshape_and_cache"]
