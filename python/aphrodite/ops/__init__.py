"""Typed Python wrappers over the core's ops (``aphrodite._C.ops``).

Each op takes torch tensors (or anything with ``__dlpack__``), picks its backend from the
tensors' device and, on CUDA, runs on the caller's current torch stream.
"""

from aphrodite.ops.attention import paged_attention, reshape_and_cache
from aphrodite.ops.image import (
    PilPassOrder,
    check_image_size,
    clip_preprocess,
    empty_pixels,
    pil_pass_order,
    preprocess_images,
)
from aphrodite.ops.layers import fused_add_rms_norm, rms_norm, rotary_embedding, silu_and_mul
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
    "PilPassOrder",
    "check_image_size",
    "clip_preprocess",
    "empty_pixels",
    "fused_add_rms_norm",
    "linear",
    "linear_cpu_isa",
    "llava_projector",
    "pack_linear_weight",
    "paged_attention",
    "pil_pass_order",
    "preprocess_images",
    "reshape_and_cache",
    "rms_norm",
    "rotary_embedding",
    "set_linear_cpu_isa",
    "silu_and_mul",
]
