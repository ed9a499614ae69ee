"""Typed Python wrappers over the core's ops (``aphrodite._C.ops``).

Each op takes torch tensors (or anything with ``__dlpack__``), picks its backend from the
tensors' device and, on CUDA, runs on the caller's current torch stream.
"""

from aphrodite.ops.attention import paged_attention, reshape_and_cache
from aphrodite.ops.image import clip_preprocess, convert_to_rgb, preprocess_images
from aphrodite.ops.linear import (
    PackedLinearWeight,
    linear,
    linear_cpu_isa,
    llava_projector,
    pack_linear_weight,
    set_linear_cpu_isa,
)

__all__ = [
    "PackedLinearWeight",
    "clip_preprocess",
    "convert_to_rgb",
    "linear",
    "linear_cpu_isa",
    "llava_projector",
    "pack_linear_weight",
    "paged_attention",
    "preprocess_images",
    "reshape_and_cache",
    "set_linear_cpu_isa",
]
