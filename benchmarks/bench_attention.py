"""paged_attention against torch on the same shapes, printed as one table per device.

CPU (float32): prefill against torch's scaled_dot_product_attention (causal, contiguous K/V),
decode against SDPA over contiguous K/V. CUDA (bfloat16, when a GPU is usable): decode at batch
64, context 2048 against the device's copy bandwidth (torch copy_, read + write bytes), and prefill
against torch's flash SDPA. K/V for torch are contiguous and GQA-expanded outside the timed region,
so torch reads no block table and does no gather. CUDA times are device time per call (ours and
the peer alike; see time_cuda).

Usage: python benchmarks/bench_attention.py [--iterations N] [--device all|cpu|cuda]
The last line is a one-line summary of the ratios.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
import torch.nn.functional as F
from cuda_timing import device_seconds_per_call

from aphrodite import _C, ops

HEADS, KV_HEADS, HEAD_SIZE, BLOCK = 32, 8, 128, 16
# The offline benchmark model's decoder (benchmark_dataset.py): heads 16/8, head 64.
SMALL_HEADS = (16, 8, 64)


def time_cpu(fn, iterations: int) -> float:
    """Best of `iterations` runs: on a shared machine the minimum is the least disturbed one."""
    fn()
    times = []
    for _ in range(iterations):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def time_cuda(fn, iterations: int) -> float:
    """Median over `iterations` samples of the device time per call (cuda_timing.py: calls
    queued behind a spinning kernel, so neither side's host-side launch cost is counted)."""
    fn()
    return statistics.median(device_seconds_per_call(fn) for _ in range(iterations))


class Case:
    """A batch of `batch` sequences of `context` tokens, the last `q_len` of them queried, with
    the paged cache and the same K/V laid out contiguously for torch."""

    def __init__(
        self,
        batch: int,
        context: int,
        q_len: int,
        dtype: torch.dtype,
        device: str,
        heads: tuple[int, int, int] = (HEADS, KV_HEADS, HEAD_SIZE),
    ):
        num_heads, kv_heads, head_size = heads
        self.kv_heads = kv_heads
        gen = torch.Generator().manual_seed(0)
        blocks_per_seq = math.ceil(context / BLOCK)
        num_blocks = batch * blocks_per_seq
        perm = torch.randperm(num_blocks, generator=gen)
        self.block_tables = perm.view(batch, blocks_per_seq).to(torch.int32).to(device)
        k = torch.randn(batch, context, kv_heads, head_size, generator=gen).to(dtype)
        v = torch.randn(batch, context, kv_heads, head_size, generator=gen).to(dtype)
        self.key_cache = torch.zeros(num_blocks, BLOCK, kv_heads, head_size, dtype=dtype)
        self.value_cache = torch.zeros_like(self.key_cache)
        pos = torch.arange(context)
        for s in range(batch):
            slot = perm.view(batch, -1)[s, pos // BLOCK] * BLOCK + pos % BLOCK
            self.key_cache.view(-1, kv_heads, head_size)[slot] = k[s]
            self.value_cache.view(-1, kv_heads, head_size)[slot] = v[s]
        self.key_cache = self.key_cache.to(device)
        self.value_cache = self.value_cache.to(device)
        self.query = torch.randn(batch * q_len, num_heads, head_size, generator=gen)
        self.query = self.query.to(dtype).to(device)
        self.out = torch.empty_like(self.query)
        self.seq_lens = torch.full((batch,), context, dtype=torch.int32, device=device)
        self.qsl = torch.arange(0, batch * q_len + 1, q_len, dtype=torch.int32, device=device)
        self.group = num_heads // kv_heads
        # torch's layout: [batch, heads, tokens, head_size]; K/V keep their KV heads (torch
        # reads each once: GQA, not K/V copied out to every query head, which would make it
        # read 4x the bytes ours does).
        self.t_q = self.query.view(batch, q_len, num_heads, head_size).transpose(1, 2).contiguous()
        self.t_k = k.transpose(1, 2).contiguous().to(device)
        self.t_v = v.transpose(1, 2).contiguous().to(device)
        self.scale = 1.0 / math.sqrt(head_size)
        self.kv_bytes = 2 * batch * context * kv_heads * head_size * k.element_size()
        self.q_len = q_len

    def ours(self) -> None:
        ops.paged_attention(
            self.out,
            self.query,
            self.key_cache,
            self.value_cache,
            self.block_tables,
            self.seq_lens,
            self.qsl,
            self.scale,
            max_query_len=self.q_len,  # known to the scheduler, passed by the engine too
        )

    def torch_sdpa(self) -> torch.Tensor:
        """[batch, heads, q_len, head_size]. A decode token sees the whole context (no mask):
        its query heads of one KV head go in as that head's query rows, torch's fastest form
        of GQA decode. A full prefill is causal, with SDPA's own GQA."""
        if self.q_len == 1:
            batch, heads, _, head_size = self.t_q.shape
            q = self.t_q.view(batch, self.kv_heads, self.group, head_size)
            out = F.scaled_dot_product_attention(q, self.t_k, self.t_v, scale=self.scale)
            return out.reshape(batch, heads, 1, head_size)
        return F.scaled_dot_product_attention(
            self.t_q, self.t_k, self.t_v, is_causal=True, scale=self.scale, enable_gqa=True
        )

    def check(self) -> float:
        self.ours()
        ref = self.torch_sdpa().transpose(1, 2).reshape(self.out.shape)
        return ((self.out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def row(name: str, ours_s: float, peer_s: float, extra: str = "") -> None:
    print(f"{name:<44} {ours_s * 1e3:10.3f} {peer_s * 1e3:10.3f} {peer_s / ours_s:8.2f}  {extra}")


def header(title: str) -> None:
    print(title)
    print(f"{'':<44} {'ours ms':>10} {'peer ms':>10} {'speedup':>8}")


def bench_cpu(iterations: int) -> list[str]:
    header(
        f"CPU float32, {_C.num_threads()} threads (torch {torch.get_num_threads()} threads); "
        f"heads {HEADS}/{KV_HEADS}, head {HEAD_SIZE}, block {BLOCK}; peer: torch SDPA"
    )
    summary = []
    for batch, context in ((1, 1024), (4, 512)):
        case = Case(batch, context, context, torch.float32, "cpu")
        err = case.check()
        ours, peer = time_cpu(case.ours, iterations), time_cpu(case.torch_sdpa, iterations)
        row(f"prefill {batch} x {context} tokens (causal)", ours, peer, f"max rel diff {err:.1e}")
        summary.append(f"cpu prefill {batch}x{context} {peer / ours:.2f}x sdpa")
    # Decode at this table's heads, and at the offline benchmark model's (16 sequences of a
    # few hundred tokens: short context, small heads, so per-block costs weigh more).
    for batch, context, heads in ((32, 1024, None), (16, 320, SMALL_HEADS)):
        case = Case(batch, context, 1, torch.float32, "cpu", *([heads] if heads else []))
        err = case.check()
        ours = time_cpu(case.ours, iterations)
        peer = time_cpu(case.torch_sdpa, iterations)
        name = f"decode {batch} x 1 token, context {context}"
        if heads:
            name = f"decode {batch} x 1, context {context}, heads {heads[0]}/{heads[1]}"
            name += f" x {heads[2]}"
        gbs = case.kv_bytes / ours / 1e9
        row(name, ours, peer, f"max rel diff {err:.1e}, K/V read {gbs:.2f} GB/s")
        summary.append(f"cpu decode {batch}x{context} {peer / ours:.2f}x sdpa ({gbs:.1f} GB/s)")
    return summary


def device_copy_bandwidth(iterations: int) -> float:
    """Read + write bytes per second of a 1 GiB device-to-device copy."""
    size = 1 << 30
    src = torch.empty(size, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * size / time_cuda(lambda: dst.copy_(src), iterations)


def bench_cuda(iterations: int) -> list[str]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    name = torch.cuda.get_device_name()
    copy_bw = device_copy_bandwidth(iterations)
    print(f"CUDA bfloat16 on {name}; heads {HEADS}/{KV_HEADS}, head {HEAD_SIZE}, block {BLOCK}")
    print(f"device copy bandwidth (read + write): {copy_bw / 1e9:.1f} GB/s")
    case = Case(64, 2048, 1, torch.bfloat16, "cuda")
    err = case.check()
    ours = time_cuda(case.ours, iterations)
    bw = case.kv_bytes / ours
    print(
        f"decode 64 x 1 token, context 2048: {ours * 1e3:.3f} ms, K/V read {bw / 1e9:.1f} GB/s "
        f"= {bw / copy_bw:.2f} of copy bandwidth (target >= 0.80), max rel diff {err:.1e}"
    )
    summary = [f"cuda decode {bw / copy_bw:.2f} of copy bw"]
    header("prefill; peer: torch flash SDPA")
    for batch, context in ((1, 4096), (4, 2048)):
        case = Case(batch, context, context, torch.bfloat16, "cuda")
        err = case.check()
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            peer = time_cuda(case.torch_sdpa, iterations)
        ours = time_cuda(case.ours, iterations)
        row(
            f"prefill {batch} x {context} tokens (causal)",
            ours,
            peer,
            f"max rel diff {err:.1e} (target speedup >= 0.8)",
        )
        summary.append(f"cuda prefill {batch}x{context} {peer / ours:.2f}x flash")
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--device", choices=("all", "cpu", "cuda"), default="all")
    args = parser.parse_args()
    summary = []
    if args.device in ("all", "cpu"):
        summary += bench_cpu(args.iterations)
    if args.device in ("all", "cuda"):
        if _C.cuda_compiled() and torch.cuda.is_available():
            summary += bench_cuda(args.iterations)
        else:
            summary.append("cuda not benchmarked (no CUDA build or no usable GPU)")
    print("summary: " + "; ".join(summary))


if __name__ == "__main__":
    main()
