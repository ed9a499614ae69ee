"""Typed Python wrappers over the core's ops (``aphrodite._C.ops``).

Each op takes torch tensors (or anything with ``__dlpack__``), picks its backend from the
tensors' device and, on CUDA, runs on the caller's current torch stream.
"""

from aphrodite.ops.linear import (
    PackedLinearWeight,
    linear,
    llava_projector,
    pack_linear_weight,
)

__all__ = ["PackedLinearWeight", "linear", "llava_projector", "pack_linear_weight"]
