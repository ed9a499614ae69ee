"""rms_norm, fused_add_rms_norm, rotary_embedding and silu_and_mul against the code HF
transformers' Llama runs (LlamaRMSNorm, apply_rotary_pos_emb, silu(gate) * up), written out here
in torch ops on the same device and dtype. rotary_embedding must match bit for bit; the norm and
SiLU within a rounding step of the dtype (their float32 sum and exp are computed in another order
or by another exp than torch's)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import case_generator

from aphrodite import ops

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Allowed difference, relative to the reference's magnitude: one or two units in the last place
# of the dtype after a product rounded twice.
ULP = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def hf_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.to(torch.float32)
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def hf_rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def hf_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # cos/sin [tokens, head_size] cast to the activations' dtype, unsqueezed over heads.
    cos = cos.to(x.dtype).unsqueeze(1)
    sin = sin.to(x.dtype).unsqueeze(1)
    return (x * cos) + (hf_rotate_half(x) * sin)


def rope_tables(max_positions: int, head_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_size, 2).float() / head_size))
    freqs = torch.arange(max_positions).float()[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    out64, ref64 = out.double().cpu(), ref.double().cpu()
    assert torch.isfinite(out64).all()
    tol = ULP[dtype] * (ref64.abs() + 1e-3 * ref64.abs().max())
    worst = ((out64 - ref64).abs() / tol).max().item()
    assert worst <= 1.0, f"max error {(out64 - ref64).abs().max().item():.3g} (ratio {worst:.3g})"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,hidden", [(1, 8), (7, 1000), (33, 4096)])
def test_rms_norm_matches_hf(device: str, dtype: torch.dtype, rows: int, hidden: int) -> None:
    gen = case_generator(rows * hidden)
    x = (torch.randn(rows, hidden, generator=gen) * 3).to(dtype).to(device)
    weight = (1 + 0.1 * torch.randn(hidden, generator=gen)).to(dtype).to(device)
    out = ops.rms_norm(x, weight, 1e-5)
    assert_close(out, hf_rms_norm(x, weight, 1e-5), dtype)
    # Leading dimensions.
    assert_close(ops.rms_norm(x.unsqueeze(0), weight, 1e-5)[0], hf_rms_norm(x, weight, 1e-5), dtype)
    # In place on a row-strided slice: the columns past it stay as they were.
    wide = torch.randn(rows, hidden + 5, generator=gen).to(dtype).to(device)
    sliced = wide[:, :hidden]
    tail = wide[:, hidden:].clone()
    ref = hf_rms_norm(sliced, weight, 1e-6)
    ops.rms_norm(sliced, weight, 1e-6, out=sliced)
    assert_close(sliced, ref, dtype)
    assert torch.equal(wide[:, hidden:], tail)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_add_rms_norm_matches_hf(device: str, dtype: torch.dtype) -> None:
    """HF's decoder layer: hidden = residual + hidden, then the next RMSNorm of it."""
    gen = case_generator(1)
    x = torch.randn(5, 3, 384, generator=gen).to(dtype).to(device)
    residual = torch.randn(5, 3, 384, generator=gen).to(dtype).to(device)
    weight = (1 + 0.1 * torch.randn(384, generator=gen)).to(dtype).to(device)
    expected_sum = residual + x
    expected = hf_rms_norm(expected_sum, weight, 1e-5)
    out, res = ops.fused_add_rms_norm(x, residual, weight, 1e-5)
    assert out is x and res is residual
    assert torch.equal(residual, expected_sum)  # the same single rounding as torch's add
    assert_close(x, expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads,head_size", [(4, 4, 64), (16, 8, 128), (8, 2, 80)])
def test_rotary_embedding_matches_hf_exactly(
    device: str, dtype: torch.dtype, heads: int, kv_heads: int, head_size: int
) -> None:
    """In place on q and k sliced out of one fused QKV output (token-strided views), at random
    positions including 0 and the table's last one."""
    gen = case_generator(heads * head_size)
    tokens, max_positions = 37, 2048
    cos, sin = rope_tables(max_positions, head_size)
    positions = torch.randint(0, max_positions, (tokens,), generator=gen)
    positions[0], positions[-1] = 0, max_positions - 1
    q_size, kv_size = heads * head_size, kv_heads * head_size
    qkv = (torch.randn(tokens, q_size + 2 * kv_size, generator=gen) * 2).to(dtype).to(device)
    q = qkv[:, :q_size].view(tokens, heads, head_size)
    k = qkv[:, q_size : q_size + kv_size].view(tokens, kv_heads, head_size)
    v_before = qkv[:, q_size + kv_size :].clone()
    pos_cos, pos_sin = cos[positions].to(device), sin[positions].to(device)
    q_ref, k_ref = hf_rotary(q, pos_cos, pos_sin), hf_rotary(k, pos_cos, pos_sin)
    ops.rotary_embedding(positions.to(device), q, k, cos.to(device), sin.to(device))
    assert torch.equal(q, q_ref)
    assert torch.equal(k, k_ref)
    assert torch.equal(qkv[:, q_size + kv_size :], v_before)  # v untouched
    # int32 positions give the same result.
    q2 = qkv[:, :q_size].clone().view(tokens, heads, head_size)
    k2 = k.clone()
    ops.rotary_embedding(positions.int().to(device), q2, k2, cos.to(device), sin.to(device))
    assert torch.equal(q2, hf_rotary(q, pos_cos, pos_sin))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,n", [(1, 8), (9, 2816), (40, 1000)])
def test_silu_and_mul_matches_hf(device: str, dtype: torch.dtype, rows: int, n: int) -> None:
    gen = case_generator(rows + n)
    x = (torch.randn(rows, 2 * n, generator=gen) * 4).to(dtype).to(device)
    gate, up = x.chunk(2, dim=-1)
    assert_close(ops.silu_and_mul(x), F.silu(gate) * up, dtype)
    # Leading dimensions and a preallocated out.
    out = torch.empty(1, rows, n, dtype=dtype, device=device)
    ops.silu_and_mul(x.unsqueeze(0), out=out)
    assert_close(out[0], F.silu(gate) * up, dtype)


def test_layer_ops_reject_bad_arguments(device: str) -> None:
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    x = torch.randn(4, 16).to(dtype).to(device)
    w = torch.ones(16, dtype=dtype, device=device)
    with pytest.raises(ValueError, match="weight"):
        ops.rms_norm(x, w[:8], 1e-5)
    with pytest.raises(TypeError, match="weight"):
        ops.rms_norm(x, w.double(), 1e-5)
    with pytest.raises(ValueError, match="eps"):
        ops.rms_norm(x, w, -1.0)
    with pytest.raises(TypeError, match="x"):
        ops.rms_norm(x.int(), w.int(), 1e-5)
    with pytest.raises(ValueError, match="different tensors"):
        ops.fused_add_rms_norm(x, x, w, 1e-5)
    with pytest.raises(ValueError, match="even last dimension"):
        ops.silu_and_mul(torch.randn(2, 5).to(dtype).to(device))
    cos, sin = rope_tables(8, 16)
    q = torch.randn(3, 2, 16).to(dtype).to(device)
    with pytest.raises(TypeError, match="cos"):
        ops.rotary_embedding(
            torch.zeros(3, dtype=torch.long, device=device),
            q,
            q.clone(),
            cos.double().to(device),
            sin.to(device),
        )
    with pytest.raises(ValueError, match="positions"):
        ops.rotary_embedding(
            torch.zeros(2, dtype=torch.long, device=device),
            q,
            q.clone(),
            cos.to(device),
            sin.to(device),
        )


def test_rotary_embedding_cpu_rejects_positions_outside_the_tables() -> None:
    cos, sin = rope_tables(8, 16)
    q = torch.randn(3, 2, 16)
    before = q.clone()
    with pytest.raises(ValueError, match=r"positions\[2\] = 8 is outside"):
        ops.rotary_embedding(torch.tensor([0, 7, 8]), q, q.clone(), cos, sin)
    assert torch.equal(q, before)  # nothing written
