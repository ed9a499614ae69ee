"""Linear layers with a fused bias + activation epilogue, and the LLaVA multimodal projector.

CPU: float32 (blocked GEMM with AVX-512 / AVX2 / scalar kernels chosen at run time, and on CPUs
with AMX-BF16 products of 256 rows or more on the AMX tiles, each float32 operand split into three
bfloat16 parts for float32 accuracy; force one set with ``APHRODITE_CPU_ISA`` or
:func:`set_linear_cpu_isa`). CUDA: float16/bfloat16 on the tensor
cores with float32 accumulation. Weights are in torch's layout ``[out_features, in_features]``.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from aphrodite import _C
from aphrodite.ops._stream import capsule, optional_capsule, stream_of

Activation = Literal["none", "gelu", "gelu_tanh", "quick_gelu", "swiglu"]
PackedLinearWeight = _C.ops.PackedLinearWeight


def pack_linear_weight(weight: torch.Tensor, gated: bool = False) -> PackedLinearWeight:
    """Packs a float32 CPU weight ``[N, K]`` once (at load time) into the CPU GEMM's layout.

    The result can replace the weight in :func:`linear`; it holds its own copy. ``gated``: the
    weight stacks SwiGLU's gate rows over its up rows, for ``activation="swiglu"``.
    """
    return _C.ops.pack_linear_weight(weight, gated)


def set_linear_cpu_isa(name: Literal["amx", "avx512", "avx2", "scalar", "auto"]) -> None:
    """Forces the CPU kernel set (tests, benchmarks); ``"auto"``: the best this CPU runs.

    Raises ``ValueError`` for a set this CPU cannot run.
    """
    _C.ops.set_linear_cpu_isa(name)


def linear_cpu_isa() -> str:
    """The CPU kernel set :func:`linear` uses now: ``"amx"``, ``"avx512"``, ``"avx2"`` or
    ``"scalar"``."""
    return _C.ops.linear_cpu_isa()


def linear(
    x: torch.Tensor,
    weight: torch.Tensor | PackedLinearWeight,
    bias: torch.Tensor | None = None,
    activation: Activation = "none",
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``act(x @ weight.T + bias)`` for ``x`` of shape ``[..., K]``; returns ``[..., N]``.

    ``activation``: ``"none"``, ``"gelu"`` (exact erf), ``"gelu_tanh"``, ``"quick_gelu"``
    (CLIP's ``x * sigmoid(1.702 x)``), or ``"swiglu"`` (CPU):
    ``weight`` stacks gate over up rows (packed with ``gated=True`` if packed) and the result
    ``silu(x @ Wg.T + bg) * (x @ Wu.T + bu)`` is ``[..., N / 2]``. ``out``, when given, receives
    the result (innermost dimension dense).
    """
    n = weight.out_features if isinstance(weight, PackedLinearWeight) else weight.shape[0]
    if activation == "swiglu":
        n //= 2
    lead = x.shape[:-1]
    rows = math.prod(lead)
    x2 = x if x.dim() == 2 else x.reshape(rows, x.shape[-1])
    if out is None:
        out = torch.empty(*lead, n, dtype=x.dtype, device=x.device)
    out2 = out if out.dim() == 2 else out.view(rows, n)
    # Decode runs ~100 small linears per step: the tensors go over as DLPack capsules made in C.
    _C.ops.linear(
        capsule(out2),
        capsule(x2),
        weight if isinstance(weight, PackedLinearWeight) else capsule(weight),
        optional_capsule(bias),
        activation,
        stream=stream_of(x),
    )
    return out


def llava_projector(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    activation: Literal["gelu", "gelu_tanh"] = "gelu",
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``gelu(x @ w1.T + b1) @ w2.T + b2`` for image features ``x`` ``[tokens, vision_hidden]``.

    Returns ``[tokens, text_hidden]``. The intermediate activations live in a torch-allocated
    workspace, so on CUDA the call allocates through torch's caching allocator only.
    """
    tokens = x.shape[0]
    workspace = torch.empty(tokens, w1.shape[0], dtype=x.dtype, device=x.device)
    if out is None:
        out = torch.empty(tokens, w2.shape[0], dtype=x.dtype, device=x.device)
    _C.ops.llava_projector(
        capsule(out),
        capsule(x),
        capsule(w1),
        capsule(b1),
        capsule(w2),
        capsule(b2),
        activation,
        workspace=capsule(workspace),
        stream=stream_of(x),
    )
    return out
