"""CPU linear layers: aphrodite.ops.linear (weight prepacked once, as the runtime does) against
torch's F.linear in the same process, float32, at decode and prefill row counts for the shapes of
the benchmark model (hidden 1,024, intermediate 2,816, vocabulary 32,064) and of LLaVA-1.5-7B
(4,096 / 11,008 / 32,000). Also the fused SwiGLU gate/up projection against F.linear + silu * up.

Prints GFLOP/s for both, their ratio, and for ours the weight bytes streamed per second as a
fraction of the machine's copy bandwidth, measured in the same run (torch copy of 512 MiB;
bytes read + written per second, as STREAM's "copy" counts them).

Usage: python benchmarks/bench_linear.py [--rows 1,4,16,64,256,3456] [--repeats N]
       [--budget SECONDS] [--threads N] [--clock wall|cpu] [--isa auto|avx512|avx2|scalar]
       [--models small,7b]
"""

from __future__ import annotations

import argparse
import time
from typing import Callable

import torch
import torch.nn.functional as F

from aphrodite import _C, ops

# name -> [(label, in_features K, out_features N, swiglu)]
MODELS = {
    "small": [
        ("up 1024->2816", 1024, 2816, False),
        ("down 2816->1024", 2816, 1024, False),
        ("head 1024->32064", 1024, 32064, False),
        ("gate_up swiglu 1024->2x2816", 1024, 2 * 2816, True),
    ],
    "7b": [
        ("up 4096->11008", 4096, 11008, False),
        ("head 4096->32000", 4096, 32000, False),
    ],
}

# Wall clock by default; `--clock cpu` uses this process's CPU time (all threads), which on a
# shared machine still measures the work done.
CLOCK: Callable[[], float] = time.perf_counter


CALLS_PER_TURN = 3


def timed_pair(
    ours: Callable[[], object], theirs: Callable[[], object], repeats: int, budget: float
) -> tuple[float, float]:
    """Best seconds per call of each, measured alternately after a warm-up, so that load from
    other processes hits both sides alike; stops early once `budget` seconds are spent (at
    least two rounds).

    Each turn runs CALLS_PER_TURN calls back to back: after a parallel region torch's OpenMP
    workers keep spinning for a while (OMP_WAIT_POLICY's default), so a call made right after
    a torch call shares the cores with them. The best call of a turn is each side's steady
    state."""
    fns = (ours, theirs)
    best = [float("inf"), float("inf")]
    for fn in fns:
        fn()
    start = time.perf_counter()
    for r in range(repeats):
        for i, fn in enumerate(fns):
            for _ in range(CALLS_PER_TURN):
                t0 = CLOCK()
                fn()
                best[i] = min(best[i], CLOCK() - t0)
        if r >= 1 and time.perf_counter() - start > budget:
            break
    return best[0], best[1]


def copy_bandwidth(repeats: int) -> float:
    """Bytes read + written per second by torch's copy of a 512 MiB float32 tensor (best of)."""
    src = torch.ones(128 * 1024 * 1024)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(max(3, repeats)):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.numel() * 4 / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,4,16,64,256,3456")
    parser.add_argument("--models", default="small,7b")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--budget", type=float, default=2.0, help="seconds per case, about")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for both (0: default)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    parser.add_argument("--isa", default="auto", help="our kernel set (auto: the best)")
    args = parser.parse_args()
    global CLOCK
    if args.clock == "cpu":
        CLOCK = time.process_time
    if args.threads > 0:
        _C.set_num_threads(args.threads)
        torch.set_num_threads(args.threads)
    ops.set_linear_cpu_isa(args.isa)
    torch.set_grad_enabled(False)
    bandwidth = copy_bandwidth(args.repeats)
    print(
        f"aphrodite {_C.__version__}; core threads {_C.num_threads()}, torch threads "
        f"{torch.get_num_threads()}; our kernels {ops.linear_cpu_isa()}; clock {args.clock}; "
        f"copy bandwidth {bandwidth / 1e9:.1f} GB/s (read + write)"
    )
    print("GFLOP/s, best of alternating runs; ratio = ours/torch; weight GB/s = our weight bytes")
    print("streamed per second (prepacked), % of the copy bandwidth")
    print(
        f"{'layer (K -> N)':<28}{'rows':>6}{'ours':>9}{'torch':>9}{'ratio':>7}"
        f"{'weight GB/s':>13}{'% copy':>8}"
    )
    rows_list = [int(r) for r in args.rows.split(",")]
    gen = torch.Generator().manual_seed(0)
    for model in args.models.split(","):
        for label, k, n, swiglu in MODELS[model]:
            w = torch.randn(n, k, generator=gen) / k**0.5
            packed = ops.pack_linear_weight(w, gated=swiglu)
            weight_bytes = packed.out_features * packed.in_features * 4
            for m in rows_list:
                x = torch.randn(m, k, generator=gen)
                # Both sides allocate their output per call, as the engine's layers do.
                if swiglu:

                    def ours(x=x, packed=packed):
                        return ops.linear(x, packed, activation="swiglu")

                    def theirs(x=x, w=w):
                        gate, up = F.linear(x, w).chunk(2, dim=-1)
                        return F.silu(gate) * up

                else:

                    def ours(x=x, packed=packed):
                        return ops.linear(x, packed)

                    def theirs(x=x, w=w):
                        return F.linear(x, w)

                ours_s, torch_s = timed_pair(ours, theirs, args.repeats, args.budget)
                flops = 2.0 * m * n * k
                ours_gf, torch_gf = flops / ours_s / 1e9, flops / torch_s / 1e9
                streamed = weight_bytes / ours_s
                print(
                    f"{label:<28}{m:>6}{ours_gf:>9.1f}{torch_gf:>9.1f}{ours_gf / torch_gf:>7.2f}"
                    f"{streamed / 1e9:>13.1f}{100 * streamed / bandwidth:>7.0f}%"
                )
                label = ""


if __name__ == "__main__":
    main()
