"""aphrodite.ops.linear against a float64 torch reference: shapes that are not multiples of the
tiles, with and without bias, every activation (SwiGLU included), prepacked weights, strided
rows, every CPU kernel set this machine runs (AVX-512, AVX2, scalar), and every rejection
path."""

from __future__ import annotations

import gc
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import CUDA_USABLE, case_generator

from aphrodite import _C, ops

ACTIVATIONS = ["none", "gelu", "gelu_tanh", "quick_gelu"]
# (rows, out_features, in_features): rows 1..300; N and K off the 16-wide panels, the 6-row
# register tiles, the 256-deep K chunks (CPU) and the tiles of every CUDA kernel.
SHAPES = [
    (1, 1, 8),
    (1, 4096, 64),
    (2, 17, 24),
    (5, 130, 40),
    (6, 16, 256),
    (7, 33, 520),
    (64, 129, 72),
    (129, 200, 264),
    (300, 97, 136),
    # 9-16 rows: two token groups of the CUDA decode-sized kernel (APHRODITE_CUDA_GEMM=auto),
    # K over many of its 32-element chunks with a partial last one, N off its 16 features.
    (12, 70, 1000),
    (16, 4100, 264),
    (3, 40, 2056),  # 65 chunks: each warp goes round its loop more than once
    # K not a multiple of 8: on CUDA these take the kernel without 16-byte copies.
    (4, 21, 13),
    (37, 150, 301),
]


def dtypes_for(device: str) -> list[torch.dtype]:
    return [torch.float32] if device == "cpu" else [torch.bfloat16, torch.float16]


def tolerance(dtype: torch.dtype) -> float:
    return 1e-5 if dtype == torch.float32 else 1e-2


def reference(
    x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, activation: str
) -> torch.Tensor:
    y = x.double() @ w.double().T
    if b is not None:
        y = y + b.double()
    if activation == "gelu":
        y = F.gelu(y)
    elif activation == "gelu_tanh":
        y = F.gelu(y, approximate="tanh")
    elif activation == "quick_gelu":
        y = y * torch.sigmoid(1.702 * y)
    return y


def swiglu_reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    gate, up = reference(x, w, b, "none").chunk(2, dim=-1)
    return F.silu(gate) * up


def cpu_isas() -> list[str]:
    """The CPU kernel sets this machine runs, best first."""
    isas = []
    for isa in ("amx", "avx512", "avx2", "scalar"):
        try:
            ops.set_linear_cpu_isa(isa)
        except ValueError:
            continue
        isas.append(isa)
    ops.set_linear_cpu_isa("auto")
    return isas


@pytest.fixture(params=cpu_isas())
def cpu_isa(request):
    """Forces one CPU kernel set for the test, then restores the automatic choice."""
    ops.set_linear_cpu_isa(request.param)
    assert ops.linear_cpu_isa() == request.param
    yield request.param
    ops.set_linear_cpu_isa("auto")


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double().cpu() - ref.cpu()).norm() / ref.norm().clamp_min(1e-30)).item()


def make(
    shape: tuple[int, ...], dtype: torch.dtype, device: str, gen: torch.Generator
) -> torch.Tensor:
    return torch.randn(*shape, generator=gen).to(dtype=dtype, device=device)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_matches_float64(
    device: str, shape: tuple[int, int, int], activation: str, with_bias: bool
) -> None:
    m, n, k = shape
    gen = case_generator(m * 1000003 + n * 1009 + k)
    for dtype in dtypes_for(device):
        x = make((m, k), dtype, device, gen)
        w = make((n, k), dtype, device, gen) / math.sqrt(k)
        b = make((n,), dtype, device, gen) if with_bias else None
        y = ops.linear(x, w, b, activation)
        assert y.shape == (m, n) and y.dtype == dtype and y.device == x.device
        err = rel_err(y, reference(x, w, b, activation))
        assert err < tolerance(dtype), (dtype, err)


# Shapes large enough that the CUDA kernels pick each of their tilings (mma.sync: 128 x 256,
# 192 x 128, 128 x 128 and 64 x 128; wgmma: 128 x 256, 192 x 128, 192 x 96 and 128 x 128; chosen
# from the tile count and the SM count, so which shape meets which tiling depends on the GPU:
# 192 x 96 needs about 132 SMs, an H100 PCIe's 114 never picks it): rows, odd and even features
# and K off every tile edge, K from fewer tiles than pipeline stages (72) to many (520).
TILING_SHAPES = [
    (385, 5633, 72),
    (560, 4001, 200),
    (577, 4099, 72),
    (1000, 2050, 136),
    (1030, 2056, 264),
    (1100, 1500, 264),
    (257, 4100, 40),
    (144, 4096, 520),
    (65, 1031, 96),
]


@pytest.mark.parametrize("index", range(len(TILING_SHAPES)))
def test_linear_every_tiling(device: str, index: int) -> None:
    m, n, k = TILING_SHAPES[index]
    activation = ACTIVATIONS[index % len(ACTIVATIONS)]  # the epilogue is shared by all tilings
    gen = case_generator(m * 7919 + n * 31 + k)
    for dtype in dtypes_for(device):
        x = make((m, k), dtype, device, gen)
        w = make((n, k), dtype, device, gen) / math.sqrt(k)
        b = make((n,), dtype, device, gen)
        y = ops.linear(x, w, b, activation)
        ref = reference(x, w, b, activation).cpu()
        err = rel_err(y, ref)
        assert err < tolerance(dtype), (dtype, err)
        # Elementwise too: a tile-edge bug that leaves one block of zeros or garbage could hide
        # in the norm of a large output. |y| stays below about 8 here, so 0.1 is many roundings.
        worst = (y.double().cpu() - ref).abs().max().item()
        assert worst < 0.1, (dtype, worst)


def test_linear_random_shapes(device: str) -> None:
    gen = case_generator(5)
    for _ in range(12):
        m, n, k = (int(v) for v in torch.randint(1, 301, (3,), generator=gen))
        activation = ACTIVATIONS[int(torch.randint(0, 3, (1,), generator=gen))]
        for dtype in dtypes_for(device):
            x = make((m, k), dtype, device, gen)
            w = make((n, k), dtype, device, gen) / math.sqrt(k)
            b = make((n,), dtype, device, gen)
            err = rel_err(ops.linear(x, w, b, activation), reference(x, w, b, activation))
            assert err < tolerance(dtype), (m, n, k, activation, dtype, err)


def test_linear_empty_k_gives_activated_bias(device: str) -> None:
    for dtype in dtypes_for(device):
        x = torch.empty(3, 0, dtype=dtype, device=device)
        w = torch.empty(20, 0, dtype=dtype, device=device)
        b = torch.randn(20).to(dtype=dtype, device=device)
        y = ops.linear(x, w, b, "gelu")
        ref = F.gelu(b.double()).expand(3, 20)
        assert rel_err(y, ref) < tolerance(dtype)


def test_linear_zero_rows(device: str) -> None:
    for dtype in dtypes_for(device):
        x = torch.empty(0, 8, dtype=dtype, device=device)
        w = torch.randn(5, 8).to(dtype=dtype, device=device)
        assert ops.linear(x, w).shape == (0, 5)


def test_gelu_epilogue_is_elementwise_accurate() -> None:
    # Identity weight: the output is the activation itself, so every element is checked,
    # including the negative tail where 1 + erf(x) cancels. torch's float64 GELU cancels there
    # too (it returns 0 below about -8.3), so the references use the cancellation-free forms.
    x = torch.linspace(-9.0, 9.0, 2 * 16 * 37).reshape(2 * 37, 16)
    xd = x.double()
    y_tanh = math.sqrt(2.0 / math.pi) * (xd + 0.044715 * xd**3)
    refs = {
        "gelu": 0.5 * xd * torch.special.erfc(-xd / math.sqrt(2.0)),
        "gelu_tanh": xd * torch.sigmoid(2.0 * y_tanh),
    }
    for activation, ref in refs.items():
        y = ops.linear(x, torch.eye(16), None, activation).double()
        rel = ((y - ref).abs() / ref.abs().clamp_min(1e-37)).max().item()
        assert rel < 2e-5, (activation, rel)


def test_linear_leading_dims_out_and_strided_rows(device: str) -> None:
    gen = case_generator(11)
    for dtype in dtypes_for(device):
        wide = make((2, 3, 80), dtype, device, gen)
        x = wide[..., :40]  # rows strided by 80, innermost dense
        w = make((24, 40), dtype, device, gen) / math.sqrt(40)
        b = make((24,), dtype, device, gen)
        out = torch.full((2, 3, 24), float("nan"), dtype=dtype, device=device)
        y = ops.linear(x, w, b, "gelu_tanh", out=out)
        assert y is out
        ref = reference(x.reshape(6, 40), w, b, "gelu_tanh").reshape(2, 3, 24)
        assert rel_err(y, ref) < tolerance(dtype)

        # A strided 2-D view as `out`: only the addressed elements are written.
        big = torch.zeros(6, 50, dtype=dtype, device=device)
        _C.ops.linear(big[:, 5:29], x.reshape(6, 40), w, b, "none")
        assert rel_err(big[:, 5:29], reference(x.reshape(6, 40), w, b, "none")) < tolerance(dtype)
        assert torch.count_nonzero(big[:, :5]) == 0 and torch.count_nonzero(big[:, 29:]) == 0


def test_linear_unaligned_inputs(device: str) -> None:
    # x and weight starting one element into their storage: no 16-byte alignment (on CUDA the
    # tiled kernel's precondition), still correct.
    gen = case_generator(13)
    for dtype in dtypes_for(device):
        x = make((70, 65), dtype, device, gen)[:, 1:]
        w = make((90, 65), dtype, device, gen)[:, 1:] / 8.0
        b = make((90,), dtype, device, gen)
        err = rel_err(ops.linear(x, w, b, "gelu"), reference(x, w, b, "gelu"))
        assert err < tolerance(dtype), (dtype, err)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_packed_weight_matches_reference(activation: str) -> None:
    gen = case_generator(3)
    for m, n, k in [(1, 37, 300), (13, 64, 17), (200, 250, 520)]:
        x = torch.randn(m, k, generator=gen)
        w = torch.randn(n, k, generator=gen) / math.sqrt(k)
        b = torch.randn(n, generator=gen)
        ref = reference(x, w, b, activation)
        packed = ops.pack_linear_weight(w)
        assert (packed.out_features, packed.in_features) == (n, k)
        w.fill_(float("nan"))  # the packed copy must not refer to the original
        y = ops.linear(x, packed, b, activation)
        assert y.shape == (m, n)
        assert rel_err(y, ref) < 1e-5


def test_packed_weight_owns_one_buffer_until_dropped() -> None:
    start = _C.live_buffers()
    packed = ops.pack_linear_weight(torch.randn(40, 24))
    assert _C.live_buffers() == start + 1
    del packed
    gc.collect()
    assert _C.live_buffers() == start


def test_packed_weight_rejects_mismatched_input() -> None:
    packed = ops.pack_linear_weight(torch.randn(8, 12))
    with pytest.raises(ValueError, match="x must have 12 columns"):
        ops.linear(torch.randn(3, 10), packed)
    with pytest.raises(TypeError, match="weight"):
        ops.pack_linear_weight(torch.randn(8, 12, dtype=torch.float64))


def test_linear_rejects_bad_arguments(device: str) -> None:
    dtype = dtypes_for(device)[0]
    x = torch.randn(4, 8).to(dtype=dtype, device=device)
    w = torch.randn(5, 8).to(dtype=dtype, device=device)
    with pytest.raises(ValueError, match="x must have 8 columns"):
        ops.linear(torch.randn(4, 7).to(dtype=dtype, device=device), w)
    with pytest.raises(ValueError, match="bias"):
        ops.linear(x, w, torch.randn(6).to(dtype=dtype, device=device))
    with pytest.raises(ValueError, match="out"):
        ops.linear(x, w, out=torch.empty(4, 6, dtype=dtype, device=device))
    with pytest.raises(ValueError, match="activation must be one of"):
        ops.linear(x, w, activation="relu")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="weight"):
        ops.linear(x, w.to(torch.float64))
    with pytest.raises(ValueError, match="innermost|stride|contiguous"):
        ops.linear(x, w.T.contiguous().T)
    with pytest.raises(ValueError, match="overlap"):
        buf = torch.randn(8, 8).to(dtype=dtype, device=device)
        _C.ops.linear(buf[:4, :8], buf[:4], torch.eye(8).to(dtype=dtype, device=device))
    if device == "cpu":
        with pytest.raises(TypeError, match="x"):
            ops.linear(x.to(torch.bfloat16), w)
    else:
        with pytest.raises(TypeError, match="x"):
            ops.linear(x.float(), w.float())
        with pytest.raises(ValueError, match="device"):
            ops.linear(x, w.cpu())


def wgmma_runs_here() -> bool:
    cuda_archs = next(b["archs"] for b in _C.backends_info() if b["name"] == "cuda")
    return torch.cuda.get_device_capability() == (9, 0) and any("90a" in a for a in cuda_archs)


@pytest.mark.skipif(not CUDA_USABLE, reason="no usable CUDA device")
def test_cuda_gemm_choice_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    """APHRODITE_CUDA_GEMM: an unknown value is refused, and asking for wgmma where it cannot
    run (not sm_90a) is an error rather than a silent fallback to another kernel."""
    x = torch.randn(4, 64, dtype=torch.bfloat16, device="cuda")
    w = torch.randn(32, 64, dtype=torch.bfloat16, device="cuda")
    monkeypatch.setenv("APHRODITE_CUDA_GEMM", "fastest")
    with pytest.raises(ValueError, match="APHRODITE_CUDA_GEMM must be"):
        ops.linear(x, w)
    monkeypatch.setenv("APHRODITE_CUDA_GEMM", "wgmma")
    if not wgmma_runs_here():
        with pytest.raises(RuntimeError, match="cannot run here"):
            ops.linear(x, w)
    else:
        ref = reference(x, w, None, "none")
        assert rel_err(ops.linear(x, w), ref) < tolerance(torch.bfloat16)


@pytest.mark.skipif(not CUDA_USABLE, reason="no usable CUDA device")
@pytest.mark.parametrize(
    "tiling",
    [
        "128x256",
        "192x128",
        "192x96",
        "128x128",
        "64x96",
        "64x128",
        "192x96c2n",
        "192x128c2n",
        "128x256c2m",
        "64x128c2m",
        "192x96s2",
        "192x96s2c2n",
        "64x96k2",
        "64x128k2",
    ],
)
def test_cuda_wgmma_forced_tiling(monkeypatch: pytest.MonkeyPatch, tiling: str) -> None:
    """APHRODITE_CUDA_WGMMA_TILING forces one wgmma tiling (for measuring them): each is exact
    on shapes off its tile edges, whatever the cost model would pick; an unknown one is
    refused. The clustered ones (c2n / c2m: pairs of blocks sharing a multicast tile) meet an
    odd number of column / row tiles (the pair's extra block reads past every edge), K in fewer
    tiles than pipeline stages and in many more (each buffer reused across barrier phases); the
    column-split ones (s2) rows that end inside each warpgroup's second and third m64 block; the
    K-split ones (k2) an odd number of k tiles (one warpgroup takes one more) and a single one
    (the other warpgroup adds zeros)."""
    if not wgmma_runs_here():
        pytest.skip("the wgmma kernel needs an sm_90 device and an sm_90a build")
    monkeypatch.setenv("APHRODITE_CUDA_GEMM", "wgmma")
    monkeypatch.setenv("APHRODITE_CUDA_WGMMA_TILING", tiling)
    gen = case_generator(sum(map(ord, tiling)))
    shapes = [
        (17, 200, 72),
        (577, 1031, 264),
        (200, 4100, 136),
        (130, 700, 1000),
        (100, 300, 200),
        (70, 90, 40),
    ]
    for index, (m, n, k) in enumerate(shapes):
        dtype = torch.float16 if index % 2 else torch.bfloat16  # each has its own instructions
        x = make((m, k), dtype, "cuda", gen)
        w = make((n, k), dtype, "cuda", gen) / math.sqrt(k)
        b = make((n,), dtype, "cuda", gen)
        y = torch.full((m, n), float("nan"), dtype=dtype, device="cuda")
        ops.linear(x, w, b, "gelu", out=y)
        assert rel_err(y, reference(x, w, b, "gelu")) < tolerance(dtype), (m, n, k, dtype)
    monkeypatch.setenv("APHRODITE_CUDA_WGMMA_TILING", "256x256")
    with pytest.raises(ValueError, match="APHRODITE_CUDA_WGMMA_TILING must be"):
        ops.linear(x, w)


@pytest.mark.parametrize("rows", [8, 300])  # the AVX/scalar kernels; from 256 rows AMX's too
def test_activations_over_a_wide_range_match_torch(cpu_isa: str, rows: int) -> None:
    """Each epilogue activation on pre-activations from -60 to 60 (an identity weight makes the
    product exact): far tails included, where GELU's erfc is below float32's normal range. The
    GELU references are 0.5 x erfc(-x / sqrt 2) and x sigmoid(2y) in float64 (torch's 1 + erf
    and 1 + tanh forms cancel to 0 from x = -8.7 and -7.7 on, even in float64); far in the tail
    float32's rounding of x / sqrt 2 alone moves erfc by up to 2 u^2 ulp (about 1e-5 relative at
    x = -10), hence the tolerance."""
    k = 32
    x = torch.linspace(-60.0, 60.0, rows * k).reshape(rows, k)
    eye = ops.pack_linear_weight(torch.eye(k))
    x64 = x.double()
    for activation in ACTIVATIONS:
        y = ops.linear(x, eye, None, activation)
        if activation == "gelu":
            ref = 0.5 * x64 * torch.special.erfc(-x64 / math.sqrt(2.0))
        elif activation == "gelu_tanh":  # 0.5 x (1 + tanh y) without the cancellation
            ref = x64 * torch.sigmoid(2.0 * math.sqrt(2.0 / math.pi) * (x64 + 0.044715 * x64**3))
        else:
            ref = reference(x, torch.eye(k), None, activation)
        torch.testing.assert_close(y.double(), ref, rtol=5e-5, atol=1e-30, msg=activation)


def test_every_kernel_set_on_random_shapes(cpu_isa: str) -> None:
    """Rows 1..300 (the decode path up to 64 rows with packed weights, the blocked one above),
    odd K and N, with and without bias, every activation, packed and unpacked weights."""
    gen = case_generator(11)
    activations = [*ACTIVATIONS, "swiglu"]
    for case in range(16):
        m = int(torch.randint(1, 301 if case % 2 else 65, (1,), generator=gen))
        n, k = (int(v) | 1 for v in torch.randint(1, 300, (2,), generator=gen))
        activation = activations[case % len(activations)]
        if activation == "swiglu":
            n += 1  # gate over up: an even number of rows, halves odd
        x = make((m, k), torch.float32, "cpu", gen)
        w = make((n, k), torch.float32, "cpu", gen) / math.sqrt(k)
        b = make((n,), torch.float32, "cpu", gen) if case % 3 else None
        if activation == "swiglu":
            ref = swiglu_reference(x, w, b)
        else:
            ref = reference(x, w, b, activation)
        packed = ops.pack_linear_weight(w, gated=activation == "swiglu")
        for weight in (w, packed):
            y = ops.linear(x, weight, b, activation)
            assert y.shape == ref.shape
            err = rel_err(y, ref)
            assert err < 1e-5, (cpu_isa, m, n, k, activation, b is not None, err)


@pytest.mark.parametrize("rows", [1, 4, 13, 64, 65, 200])
def test_swiglu_matches_float64(cpu_isa: str, rows: int) -> None:
    """The fused gate/up op against silu(x Wg^T + bg) * (x Wu^T + bu), with a leading batch
    dimension and `out`; halves of 300 (not a multiple of 16) split across the thread pool."""
    gen = case_generator(rows)
    k, half = 96, 150
    x = make((1, rows, k), torch.float32, "cpu", gen)
    w = make((2 * half, k), torch.float32, "cpu", gen) / math.sqrt(k)
    b = make((2 * half,), torch.float32, "cpu", gen)
    ref = swiglu_reference(x[0], w, b)
    out = torch.empty(1, rows, half)
    packed = ops.pack_linear_weight(w, gated=True)
    assert packed.gated and packed.out_features == 2 * half
    assert ops.linear(x, packed, b, "swiglu", out=out) is out
    assert rel_err(out[0], ref) < 1e-5
    assert rel_err(ops.linear(x, w, b, "swiglu")[0], ref) < 1e-5


def test_swiglu_and_kernel_set_rejections() -> None:
    x = torch.randn(3, 8)
    w = torch.randn(6, 8)
    with pytest.raises(ValueError, match="even number of rows"):
        ops.linear(x, w[:5], activation="swiglu")
    with pytest.raises(ValueError, match="even number of rows"):
        ops.pack_linear_weight(w[:5], gated=True)
    with pytest.raises(ValueError, match="gated=True"):
        ops.linear(x, ops.pack_linear_weight(w), activation="swiglu")
    with pytest.raises(ValueError, match="packed gated"):
        ops.linear(x, ops.pack_linear_weight(w, gated=True))
    with pytest.raises(ValueError, match="kernel set"):
        ops.set_linear_cpu_isa("neon")
    assert ops.linear_cpu_isa() == cpu_isas()[0]


def test_cpu_isa_environment_variable_is_read() -> None:
    """APHRODITE_CPU_ISA chooses the kernel set in a fresh process (read at the first call)."""
    script = (
        "import torch; from aphrodite import ops; "
        "y = ops.linear(torch.ones(2, 3), torch.ones(4, 3)); "
        "print(ops.linear_cpu_isa(), float(y.sum()))"
    )
    env = {**os.environ, "APHRODITE_CPU_ISA": "scalar"}
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["scalar", "24.0"]
