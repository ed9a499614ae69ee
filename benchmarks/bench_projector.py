"""LLaVA projector throughput: aphrodite.ops.llava_projector against torch
(F.linear + F.gelu + F.linear) in the same process, on the CPU (float32) and, when present, on
CUDA (bfloat16). Also the single linear layers, with prepacked weights on the CPU. CUDA times are
device time per call, ours and torch's alike (calls queued behind a spinning kernel, so the
host's launch costs are hidden for both: see cuda_timing.py).

Usage: python benchmarks/bench_projector.py [--repeats N] [--device cpu|cuda|all] [--threads N]
       [--clock wall|cpu] [--tilings]
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Callable

import torch
import torch.nn.functional as F
from cuda_timing import device_seconds_per_call

from aphrodite import _C, ops

# (tokens, vision_hidden, hidden, text_hidden): LLaVA-1.5-7B (CLIP ViT-L/14-336, Vicuna-7B),
# LLaVA-1.5-13B's text side, one image tile at decode-like sizes, and small ones.
SHAPES = [
    (576, 1024, 4096, 4096),
    (576, 1024, 5120, 5120),
    (144, 1024, 4096, 4096),
    (576, 512, 1024, 1024),
    (64, 256, 512, 512),
]


# Wall clock by default; `--clock cpu` uses this process's CPU time instead, which on a machine
# shared with other work still measures the work done (meaningful with --threads 1, where no
# thread pool spins: then it is GFLOP/s per core).
CLOCK: Callable[[], float] = time.perf_counter


CALLS_PER_TURN = 3


def timed_pair(
    ours: Callable[[], object], theirs: Callable[[], object], repeats: int, device: str
) -> tuple[float, float]:
    """Best seconds per call of each, measured alternately after a warm-up, so that load from
    other processes on a shared machine hits both sides alike.

    Each turn runs CALLS_PER_TURN calls back to back: after a parallel region torch's OpenMP
    workers keep spinning for a while (OMP_WAIT_POLICY's default), and the first call made right
    after a torch call shares the cores with them (our 576 x 512 -> 1024 -> 1024 projector
    measured 0.71x torch one call per turn, 0.97x with the workers made passive). The best call
    of a turn is the steady state of each side."""
    fns = (ours, theirs)
    best = [float("inf"), float("inf")]
    for fn in fns:
        fn()
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            if device == "cuda":
                best[i] = min(best[i], device_seconds_per_call(fn))
                continue
            for _ in range(CALLS_PER_TURN):
                t0 = CLOCK()
                fn()
                best[i] = min(best[i], CLOCK() - t0)
    return best[0], best[1]


def bench_shape(
    device: str, dtype: torch.dtype, shape: tuple[int, int, int, int], repeats: int
) -> None:
    t, d_in, h, d_out = shape
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(t, d_in, generator=gen).to(device=device, dtype=dtype)
    w1 = (torch.randn(h, d_in, generator=gen) / d_in**0.5).to(device=device, dtype=dtype)
    b1 = torch.randn(h, generator=gen).to(device=device, dtype=dtype)
    w2 = (torch.randn(d_out, h, generator=gen) / h**0.5).to(device=device, dtype=dtype)
    b2 = torch.randn(d_out, generator=gen).to(device=device, dtype=dtype)
    # Both sides allocate their outputs per call, as the engine's layers do.
    rows: list[tuple[str, float, Callable[[], object], Callable[[], object]]] = [
        (
            "projector (gelu)",
            2.0 * t * (d_in * h + h * d_out),
            lambda: ops.llava_projector(x, w1, b1, w2, b2, "gelu"),
            lambda: F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2),
        ),
        (
            "linear1 + gelu",
            2.0 * t * d_in * h,
            lambda: ops.linear(x, w1, b1, "gelu"),
            lambda: F.gelu(F.linear(x, w1, b1)),
        ),
    ]
    if device == "cuda":
        # The second GEMM alone (K = hidden): the plain GEMM, where cuBLAS is the peer.
        hidden = F.gelu(F.linear(x, w1, b1))
        rows.append(
            (
                "linear2",
                2.0 * t * h * d_out,
                lambda: ops.linear(hidden, w2, b2),
                lambda: F.linear(hidden, w2, b2),
            )
        )
    if device == "cpu":
        packed = ops.pack_linear_weight(w1)
        rows.append(
            (
                "linear1 + gelu, packed",
                2.0 * t * d_in * h,
                lambda: ops.linear(x, packed, b1, "gelu"),
                lambda: F.gelu(F.linear(x, w1, b1)),
            )
        )
    label = f"{t}, {d_in} -> {h} -> {d_out}"
    for name, flops, ours, theirs in rows:
        ours_s, torch_s = timed_pair(ours, theirs, repeats, device)
        ours_gf, torch_gf = flops / ours_s / 1e9, flops / torch_s / 1e9
        print(f"{label:<28}{name:<24}{ours_gf:>9.1f}{torch_gf:>9.1f}{ours_gf / torch_gf:>8.2f}")
        label = ""


# Decode-sized linear layers (tokens, in -> out): LLaVA-1.5-7B's attention, MLP up/gate and down
# projections and the benchmark model's LM head, at one and at 16 tokens. Memory-bound: each call
# streams its weight once, so the figure is weight bytes per second.
DECODE_SHAPES = [
    (1, 4096, 4096),
    (16, 4096, 4096),
    (16, 4096, 22016),
    (16, 11008, 4096),
    (16, 1024, 32064),
]


def bench_decode_linear(device: str, dtype: torch.dtype, repeats: int) -> None:
    print(f"\n== {device} ({dtype}) decode-sized linear, best of {repeats}; weight GB/s")
    print(f"{'shape (T, Din -> D)':<28}{'op':<24}{'ours':>9}{'torch':>9}{'ratio':>8}")
    gen = torch.Generator().manual_seed(1)
    for t, d_in, d_out in DECODE_SHAPES:
        x = torch.randn(t, d_in, generator=gen).to(device=device, dtype=dtype)
        w = (torch.randn(d_out, d_in, generator=gen) / d_in**0.5).to(device=device, dtype=dtype)
        ours_s, torch_s = timed_pair(
            lambda x=x, w=w: ops.linear(x, w),
            lambda x=x, w=w: F.linear(x, w),
            repeats,
            device,
        )
        weight_bytes = w.numel() * w.element_size()
        ours_gb, torch_gb = weight_bytes / ours_s / 1e9, weight_bytes / torch_s / 1e9
        label = f"{t}, {d_in} -> {d_out}"
        print(f"{label:<28}{'linear':<24}{ours_gb:>9.1f}{torch_gb:>9.1f}{ours_gb / torch_gb:>8.2f}")


def bench_device(device: str, repeats: int) -> None:
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    print(f"\n== {device} ({dtype}), best of {repeats}, alternating; GFLOP/s; ratio = ours/torch")
    print(f"{'shape (T, Din -> H -> D)':<28}{'op':<24}{'ours':>9}{'torch':>9}{'ratio':>8}")
    for shape in SHAPES:
        bench_shape(device, dtype, shape, repeats)
    if device == "cuda":
        bench_decode_linear(device, dtype, repeats)


# The wgmma kernel's tilings (APHRODITE_CUDA_WGMMA_TILING), each forced in turn at the large
# projector shapes: the figures the tiling cost model's relative rates should come from.
WGMMA_TILINGS = [
    "auto",
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
]


def wgmma_runs_here() -> bool:
    """An sm_90 device and a build with sm_90a code (where the wgmma kernel runs)."""
    cuda = next(b for b in _C.backends_info() if b["name"] == "cuda")
    built = any(arch.startswith("90a") for arch in cuda["archs"])
    return built and torch.cuda.get_device_capability() == (9, 0)


def bench_tilings(repeats: int) -> None:
    if not wgmma_runs_here():
        print("\n(the wgmma kernel cannot run here: tiling sweep skipped)")
        return
    print(f"\n== cuda (torch.bfloat16) wgmma tilings, best of {repeats}; GFLOP/s; ours/torch")
    print(f"{'shape (T, Din -> H -> D)':<28}{'op':<24}{'ours':>9}{'torch':>9}{'ratio':>8}")
    saved = os.environ.get("APHRODITE_CUDA_WGMMA_TILING")
    try:
        for shape in SHAPES[:4]:
            for tiling in WGMMA_TILINGS:
                os.environ["APHRODITE_CUDA_WGMMA_TILING"] = tiling
                print(f"-- tiling {tiling}")
                bench_shape("cuda", torch.bfloat16, shape, repeats)
    finally:
        if saved is None:
            os.environ.pop("APHRODITE_CUDA_WGMMA_TILING", None)
        else:
            os.environ["APHRODITE_CUDA_WGMMA_TILING"] = saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for both (0: default)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    parser.add_argument(
        "--tilings",
        action="store_true",
        help="CUDA: instead of the usual table, each wgmma tiling forced at the large shapes",
    )
    args = parser.parse_args()
    global CLOCK
    if args.clock == "cpu":
        CLOCK = time.process_time
    if args.threads > 0:
        _C.set_num_threads(args.threads)
        torch.set_num_threads(args.threads)
    print(
        f"aphrodite {_C.__version__}; core threads {_C.num_threads()}, "
        f"torch threads {torch.get_num_threads()}; cpu isa {_C.backends_info()[0]['archs']}; "
        f"clock {args.clock}"
    )
    if args.device in ("cpu", "all"):
        bench_device("cpu", args.repeats)
    if args.device in ("cuda", "all"):
        if torch.cuda.is_available() and _C.cuda_compiled():
            print(f"cuda device: {torch.cuda.get_device_name()}")
            if args.tilings:
                bench_tilings(args.repeats)
            else:
                bench_device("cuda", args.repeats)
        elif args.device == "cuda":
            raise SystemExit("no usable CUDA device (or this build has no CUDA backend)")
        else:
            print("\n(no CUDA device or no CUDA backend: CUDA rows skipped)")


if __name__ == "__main__":
    main()
