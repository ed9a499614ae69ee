"""End-to-end decode time per step on the CPU (float32): the LLaVA runtime with its dense layers
on the core's GEMM (weights packed at load, the default) against the same runtime with torch's
F.linear everywhere (the packing step skipped), in one process on the benchmark checkpoint
(benchmark_dataset.py: CLIP ViT-B/16 + a 350M Llama, hidden 1,024, MLP 2,816, vocabulary
32,064).

Each round generates --output-len greedy tokens (ignore_eos) for --batch text-only requests with
both engines, alternating which goes first. Decode time per step = (last token time - first
token time) / (tokens - 1) of the slowest request, so prefill is excluded; CPU time per step is
the process CPU time (all threads) of the whole generate call divided by its steps. Best of
--rounds for each.

Usage: python benchmarks/bench_decode_step.py [--batch 1] [--output-len 32] [--rounds 3]
       [--model PATH] [--model-cache DIR]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from benchmark_dataset import build_benchmark_checkpoint

from aphrodite import _C, LLM, SamplingParams
from aphrodite.modeling.llava import LlavaForConditionalGeneration

REPO_ROOT = Path(__file__).resolve().parent.parent
PROMPT = "USER: Write a long story about a lighthouse keeper and the sea. ASSISTANT:"


def load(model: str, packed: bool) -> LLM:
    """An LLM whose linear layers run on ops.linear (packed) or on torch's F.linear."""
    original = LlavaForConditionalGeneration.pack_cpu_linears
    if not packed:
        LlavaForConditionalGeneration.pack_cpu_linears = lambda self: None
    try:
        return LLM(model=model, device="cpu", dtype="float32", kv_cache_memory_gb=1.0)
    finally:
        LlavaForConditionalGeneration.pack_cpu_linears = original


def decode_step(llm: LLM, batch: int, output_len: int) -> tuple[float, float]:
    """(wall seconds per decode step, CPU seconds per step) of one greedy generate call."""
    if not llm.llm_engine.reset_prefix_cache():
        raise RuntimeError("could not reset the prefix cache")
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    cpu0 = time.process_time()
    outputs = llm.generate([PROMPT] * batch, params, use_tqdm=False)
    cpu = time.process_time() - cpu0
    first = min(o.metrics.first_token_time for o in outputs)
    last = max(o.metrics.last_token_time for o in outputs)
    return (last - first) / (output_len - 1), cpu / output_len


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", default=None)
    parser.add_argument("--model-cache", default=str(REPO_ROOT / "build" / "bench-model"))
    args = parser.parse_args()
    model = args.model or str(build_benchmark_checkpoint(args.model_cache))
    torch.set_grad_enabled(False)
    engines = {"torch F.linear": load(model, packed=False), "ops.linear": load(model, packed=True)}
    for llm in engines.values():
        llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=2), use_tqdm=False)
    best = {name: (float("inf"), float("inf")) for name in engines}
    names = list(engines)
    for r in range(args.rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            wall, cpu = decode_step(engines[name], args.batch, args.output_len)
            best[name] = (min(best[name][0], wall), min(best[name][1], cpu))
    print(
        f"core threads {_C.num_threads()}, torch threads {torch.get_num_threads()}; batch "
        f"{args.batch}, {args.output_len} tokens, best of {args.rounds} rounds"
    )
    print(f"{'dense layers':<16}{'ms/step (wall)':>16}{'ms/step (CPU)':>16}")
    for name, (wall, cpu) in best.items():
        print(f"{name:<16}{wall * 1e3:>16.1f}{cpu * 1e3:>16.1f}")
    base = best["torch F.linear"][0]
    print(f"speed-up (wall): {base / best['ops.linear'][0]:.2f}x")


if __name__ == "__main__":
    main()
