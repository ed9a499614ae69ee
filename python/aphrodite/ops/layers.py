"""The small ops of a decoder layer around its GEMMs and attention (``aphrodite._C.ops``), each one
pass over its rows: RMSNorm (alone or fused with the residual add), the rotary embedding in place,
and SiLU-and-multiply. They round where HF transformers' eager code rounds, so float16/bfloat16
results agree with it (see ``cpp/include/aphrodite/layer_ops.h``); on CUDA each is one kernel
instead of the several a chain of torch ops launches.
"""

from __future__ import annotations

import math

import torch

from aphrodite import _C
from aphrodite.ops._stream import capsule, stream_of


def _rows(t: torch.Tensor, name: str) -> torch.Tensor:
    """An input ``[..., n]`` as ``[rows, n]`` (a copy where no view exists)."""
    _check_has_rows(t, name)
    return t if t.dim() == 2 else t.reshape(math.prod(t.shape[:-1]), t.shape[-1])


def _row_view(t: torch.Tensor, name: str) -> torch.Tensor:
    """An output (or in-place argument) ``[..., n]`` as a ``[rows, n]`` view: ``view`` fails
    instead of writing into a copy. Explicit sizes, so that n = 0 works too."""
    _check_has_rows(t, name)
    return t.view(math.prod(t.shape[:-1]), t.shape[-1])


def _check_has_rows(t: torch.Tensor, name: str) -> None:
    if t.dim() < 1:
        raise ValueError(f"{name} must have at least one dimension, got a 0-d tensor")


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``weight * (x * rsqrt(mean(x^2, -1) + eps)).to(x.dtype)`` over the last dimension of
    ``x`` (Llama's RMSNorm, float32 inside); ``out`` may be ``x``."""
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _C.ops.rms_norm(
        capsule(_row_view(out, "out")),
        capsule(_rows(x, "x")),
        capsule(weight),
        float(eps),
        stream=stream_of(x),
    )
    return out


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """In place: ``residual += x`` (rounded to the dtype), then ``x = rms_norm(residual)``;
    returns ``(x, residual)``. Both ``[..., hidden]`` with views as ``[rows, hidden]``."""
    _C.ops.fused_add_rms_norm(
        capsule(_row_view(x, "x")),
        capsule(_row_view(residual, "residual")),
        capsule(weight),
        float(eps),
        stream=stream_of(x),
    )
    return x, residual


def rotary_embedding(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
) -> None:
    """In place on ``query`` ``[tokens, heads, head_size]`` and ``key`` ``[tokens, kv_heads,
    head_size]`` (token-strided slices of a QKV output are fine): ``x * cos + rotate_half(x) *
    sin`` with float32 ``cos``/``sin`` ``[max_positions, head_size]`` looked up at ``positions``
    and rounded to the dtype first, as HF's Llama does."""
    _C.ops.rotary_embedding(
        capsule(positions),
        capsule(query),
        capsule(key),
        capsule(cos),
        capsule(sin),
        stream=stream_of(query),
    )


def silu_and_mul(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``silu(x[..., :n]) * x[..., n:]`` for ``x`` ``[..., 2n]``; returns ``[..., n]``."""
    _check_has_rows(x, "x")
    if x.shape[-1] % 2:
        raise ValueError(
            f"silu_and_mul needs x with an even last dimension (gate and up halves), got "
            f"{tuple(x.shape)}"
        )
    n = x.shape[-1] // 2
    if out is None:
        out = torch.empty(*x.shape[:-1], n, dtype=x.dtype, device=x.device)
    _C.ops.silu_and_mul(capsule(_row_view(out, "out")), capsule(_rows(x, "x")), stream=stream_of(x))
    return out
