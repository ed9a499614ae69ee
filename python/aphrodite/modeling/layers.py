"""Small building blocks shared by the CLIP tower and the Llama decoder.

Parameters are created uninitialised on the target device and dtype (the checkpoint overwrites
every one of them), so building a model costs no random initialisation and no second copy.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from aphrodite import ops


def own_cuda_gemm() -> bool:
    """Whether CUDA layers run on aphrodite's GEMMs (``ops.linear``) instead of torch's (cuBLAS).
    Only when APHRODITE_CUDA_GEMM names a kernel choice (``auto``: a decode-sized kernel for up
    to 16 rows, wgmma on H100/H200; ``wgmma``; ``mma``): cuBLAS is faster at the decoder's
    widest decode shapes (BENCHMARKS.md), so by default the layers keep it and only the fused
    projector runs on aphrodite's kernels."""
    return os.environ.get("APHRODITE_CUDA_GEMM", "") in ("auto", "wgmma", "mma")


def empty_param(*shape: int, dtype: torch.dtype, device: torch.device) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)


class Linear(nn.Module):
    """y = x W^T + b. ``shards`` names the checkpoint tensors stacked along the output dim
    (e.g. q/k/v into one qkv projection) with their row counts, for the weight loader.

    On CPU in float32, :meth:`pack` (after loading) moves the weight into the core GEMM's packed
    layout and drops the torch tensor; from then on :meth:`forward` runs ``ops.linear``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        dtype: torch.dtype,
        device: torch.device,
        shards: dict[str, int] | None = None,
    ) -> None:
        super().__init__()
        self.weight = empty_param(out_features, in_features, dtype=dtype, device=device)
        self.bias = empty_param(out_features, dtype=dtype, device=device) if bias else None
        if shards is not None and sum(shards.values()) != out_features:
            raise ValueError(f"shards {shards} do not add up to {out_features} rows")
        self.shards = shards
        self.packed: ops.PackedLinearWeight | None = None

    def pack(self, gated: bool = False) -> None:
        """Packs the loaded weight for ``ops.linear`` and frees the torch copy. ``gated``: the
        weight stacks SwiGLU's gate over its up rows; call :meth:`swiglu` instead of forward."""
        self.packed = ops.pack_linear_weight(self.weight, gated=gated)
        self.weight = None

    def forward(self, x: torch.Tensor, activation: str = "none") -> torch.Tensor:
        """``act(x W^T + b)``; ``activation``: "none", "gelu" (erf), "gelu_tanh" or "quick_gelu"
        (CLIP's ``x * sigmoid(1.702 x)``), fused into the GEMM's epilogue when the weight is
        packed or aphrodite's CUDA GEMMs are chosen, else applied after torch's ``F.linear`` as HF
        applies it."""
        if self.packed is not None:
            return ops.linear(x, self.packed, self.bias, activation)
        if x.is_cuda and own_cuda_gemm():
            return ops.linear(x, self.weight, self.bias, activation)  # type: ignore[arg-type]
        y = F.linear(x, self.weight, self.bias)
        if activation == "gelu":
            return F.gelu(y)
        if activation == "gelu_tanh":
            return F.gelu(y, approximate="tanh")
        if activation == "quick_gelu":
            return y * torch.sigmoid(1.702 * y)
        if activation != "none":
            raise ValueError(f"unknown activation {activation!r}")
        return y

    def swiglu(self, x: torch.Tensor) -> torch.Tensor:
        """``silu(gate) * up`` of the gate/up halves of ``forward(x)``: fused into the GEMM when
        the weight is packed, else one ``ops.silu_and_mul`` after it."""
        if self.packed is not None:
            return ops.linear(x, self.packed, self.bias, activation="swiglu")
        if x.is_cuda and own_cuda_gemm():
            return ops.silu_and_mul(ops.linear(x, self.weight, self.bias))
        return ops.silu_and_mul(F.linear(x, self.weight, self.bias))


class LayerNorm(nn.Module):
    def __init__(self, size: int, eps: float, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.weight = empty_param(size, dtype=dtype, device=device)
        self.bias = empty_param(size, dtype=dtype, device=device)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)


class RMSNorm(nn.Module):
    """Llama's RMSNorm, computed in float32 and cast back before the weight, as HF does (the
    order matters for bf16/fp16 agreement), in one op (``ops.rms_norm``)."""

    def __init__(self, size: int, eps: float, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.weight = empty_param(size, dtype=dtype, device=device)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps)

    def add_and_norm(
        self, x: torch.Tensor, residual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``residual = x + residual``, then this norm of it, both in place and in one op:
        returns ``(normed, residual)`` (HF's residual add followed by the next norm)."""
        return ops.fused_add_rms_norm(x, residual, self.weight, self.eps)
