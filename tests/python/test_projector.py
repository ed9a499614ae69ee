"""aphrodite.ops.llava_projector (gelu(x @ w1^T + b1) @ w2^T + b2) against float64 torch."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import case_generator

from aphrodite import _C, ops

# (tokens, vision_hidden, projector hidden, text hidden); none of them tile-aligned except the
# last, a scaled-down LLaVA-1.5 (576 tokens, 1024 -> 4096 -> 4096 at full size).
SHAPES = [(1, 16, 32, 24), (7, 100, 130, 70), (300, 257, 129, 200), (576, 128, 256, 256)]


def dtypes_for(device: str) -> list[torch.dtype]:
    return [torch.float32] if device == "cpu" else [torch.bfloat16, torch.float16]


def tolerance(dtype: torch.dtype) -> float:
    return 1e-5 if dtype == torch.float32 else 1e-2


def make_inputs(
    shape: tuple[int, int, int, int], dtype: torch.dtype, device: str, seed: int
) -> list[torch.Tensor]:
    t, d_in, h, d_out = shape
    gen = case_generator(seed)
    tensors = [
        torch.randn(t, d_in, generator=gen),
        torch.randn(h, d_in, generator=gen) / math.sqrt(d_in),
        torch.randn(h, generator=gen),
        torch.randn(d_out, h, generator=gen) / math.sqrt(h),
        torch.randn(d_out, generator=gen),
    ]
    return [v.to(dtype=dtype, device=device) for v in tensors]


def reference(x, w1, b1, w2, b2, approximate: str) -> torch.Tensor:
    h = F.gelu(x.double() @ w1.double().T + b1.double(), approximate=approximate)
    return h @ w2.double().T + b2.double()


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double().cpu() - ref.cpu()).norm() / ref.norm()).item()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("activation,approximate", [("gelu", "none"), ("gelu_tanh", "tanh")])
def test_projector_matches_float64(
    device: str, shape: tuple[int, int, int, int], activation: str, approximate: str
) -> None:
    for dtype in dtypes_for(device):
        x, w1, b1, w2, b2 = make_inputs(shape, dtype, device, seed=sum(shape))
        y = ops.llava_projector(x, w1, b1, w2, b2, activation)
        assert y.shape == (shape[0], shape[3]) and y.dtype == dtype
        err = rel_err(y, reference(x, w1, b1, w2, b2, approximate))
        assert err < tolerance(dtype), (dtype, err)


def test_projector_without_workspace_and_into_out(device: str) -> None:
    # The core allocates the intermediate itself when no workspace is passed, and frees it.
    for dtype in dtypes_for(device):
        x, w1, b1, w2, b2 = make_inputs((9, 40, 72, 24), dtype, device, seed=1)
        out = torch.full((9, 24), float("nan"), dtype=dtype, device=device)
        start = _C.live_buffers()
        _C.ops.llava_projector(out, x, w1, b1, w2, b2, "gelu")
        assert _C.live_buffers() == start
        if device == "cuda":
            torch.cuda.synchronize()
        assert rel_err(out, reference(x, w1, b1, w2, b2, "none")) < tolerance(dtype)
        y = ops.llava_projector(x, w1, b1, w2, b2, out=out)
        assert y is out


def test_projector_rejects_bad_arguments(device: str) -> None:
    dtype = dtypes_for(device)[0]
    x, w1, b1, w2, b2 = make_inputs((4, 8, 12, 6), dtype, device, seed=2)
    with pytest.raises(ValueError, match="'gelu' or 'gelu_tanh'"):
        ops.llava_projector(x, w1, b1, w2, b2, "none")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="w2"):
        ops.llava_projector(x, w1, b1, w2[:, :10], b2)
    with pytest.raises(ValueError, match="b1"):
        ops.llava_projector(x, w1, b1[:5], w2, b2)
    with pytest.raises(ValueError, match="w1"):
        ops.llava_projector(x[:, :7], w1, b1, w2, b2)
    with pytest.raises(TypeError, match="b2"):
        ops.llava_projector(x, w1, b1, w2, b2.to(torch.float64))
    with pytest.raises(ValueError, match="workspace"):
        _C.ops.llava_projector(
            torch.empty(4, 6, dtype=dtype, device=device),
            x,
            w1,
            b1,
            w2,
            b2,
            "gelu",
            workspace=torch.empty(4, 11, dtype=dtype, device=device),
        )
