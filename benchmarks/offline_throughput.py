"""Offline throughput: aphrodite's ``LLM.generate`` against HF transformers, in one run.

    python benchmarks/offline_throughput.py                       # 16 requests x 64 tokens, CPU
    python benchmarks/offline_throughput.py --device cuda --dtype bfloat16
    python benchmarks/offline_throughput.py --model PATH          # any local LLaVA checkpoint
    python benchmarks/offline_throughput.py --quick               # 4 requests x 16 tokens

The same synthetic requests (benchmark_dataset.py: one image each, varied image sizes and
prompt lengths, fixed seed) go through both engines with greedy decoding and exactly
--output-len new tokens each (aphrodite: ``ignore_eos``; HF: ``min_new_tokens`` =
``max_new_tokens``). Without --model the benchmark checkpoint (a random CLIP ViT-B/16 + 350M
Llama LLaVA, see benchmark_dataset.py) is built once into --model-cache.

What is timed, for both, from the moment the requests are handed over until every output is
back: tokenization, image preprocessing, the vision tower and the decoding.
- aphrodite: one ``LLM.generate`` call with all requests (continuous batching; the engine's
  default limits). Time to first token: each request's ``metrics.first_token_time``.
- HF: ``LlavaProcessor`` (CLIPImageProcessorPil) and ``LlavaForConditionalGeneration.generate``
  on left-padded batches of --hf-batch-size (default: every request in one batch; HF's
  continuous batching takes text only). Time to first token: a streamer records when the first
  generated tokens of a batch reach it (the second ``put``); every request of a batch gets that
  time, later batches include the wait for earlier ones.
Both engines first run one short warm-up request (a different image) that is not timed.
The greedy outputs of the two are compared as a cross-check that both did the same work
(float32 on the CPU should agree on nearly every token; bfloat16 drifts after a few tokens).
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from benchmark_dataset import BenchmarkRequest, build_benchmark_checkpoint, synthetic_requests

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass
class RunResult:
    engine: str
    elapsed_s: float
    cpu_s: float  # CPU time of the process (every thread) during the run
    prompt_tokens: int
    output_tokens: int
    ttft_s: list[float]  # per request
    token_ids: list[list[int]]  # per request, generated

    @property
    def num_requests(self) -> int:
        return len(self.token_ids)

    @property
    def requests_per_s(self) -> float:
        return self.num_requests / self.elapsed_s

    @property
    def output_tokens_per_s(self) -> float:
        return self.output_tokens / self.elapsed_s

    @property
    def total_tokens_per_s(self) -> float:
        return (self.prompt_tokens + self.output_tokens) / self.elapsed_s

    @property
    def median_ttft_s(self) -> float:
        return statistics.median(self.ttft_s)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class AphroditeRunner:
    engine = "aphrodite"

    def __init__(self, model: str, args: argparse.Namespace) -> None:
        from aphrodite import LLM, SamplingParams

        self.device = args.device
        memory = (
            {"kv_cache_memory_gb": args.kv_cache_gb}
            if args.device == "cpu"
            else {"gpu_memory_utilization": args.gpu_memory_utilization}
        )
        self.llm = LLM(model=model, device=args.device, dtype=args.dtype, **memory)
        self.params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
        self.warmup_params = SamplingParams(temperature=0.0, max_tokens=2)

    @staticmethod
    def _prompts(requests: list[BenchmarkRequest]) -> list[dict]:
        return [{"prompt": r.prompt, "multi_modal_data": {"image": r.image}} for r in requests]

    def warm_up(self, request: BenchmarkRequest) -> None:
        self.llm.generate(self._prompts([request]), self.warmup_params, use_tqdm=False)
        _sync(self.device)

    def run(self, requests: list[BenchmarkRequest]) -> RunResult:
        # Repeated runs must not reuse the previous run's KV blocks.
        if not self.llm.llm_engine.reset_prefix_cache():
            raise RuntimeError("could not reset the prefix cache")
        start_wall = time.time()
        start = time.perf_counter()
        start_cpu = time.process_time()
        outputs = self.llm.generate(self._prompts(requests), self.params, use_tqdm=False)
        _sync(self.device)
        elapsed = time.perf_counter() - start
        return RunResult(
            engine=self.engine,
            elapsed_s=elapsed,
            cpu_s=time.process_time() - start_cpu,
            prompt_tokens=sum(len(o.prompt_token_ids) for o in outputs),
            output_tokens=sum(len(o.outputs[0].token_ids) for o in outputs),
            ttft_s=[o.metrics.first_token_time - start_wall for o in outputs],
            token_ids=[list(o.outputs[0].token_ids) for o in outputs],
        )


class _FirstTokenClock:
    """A generate() streamer that notes when the first generated tokens arrive: generate puts
    the prompt first, then the tokens of each step."""

    def __init__(self) -> None:
        self.puts = 0
        self.first_token_time: float | None = None

    def put(self, value: torch.Tensor) -> None:
        self.puts += 1
        if self.puts == 2:
            self.first_token_time = time.perf_counter()

    def end(self) -> None:
        pass


class HFRunner:
    engine = "HF transformers"

    def __init__(self, model: str, args: argparse.Namespace) -> None:
        from aphrodite.testing.hf_reference import hf_llava_model, hf_llava_processor

        self.device = args.device
        self.dtype = getattr(torch, args.dtype)
        self.output_len = args.output_len
        self.batch_size = args.hf_batch_size
        self.model = hf_llava_model(model, dtype=self.dtype, device=args.device)
        self.processor = hf_llava_processor(model)
        self.processor.tokenizer.padding_side = "left"
        self.pad_token_id = self.processor.tokenizer.pad_token_id
        if self.pad_token_id is None:
            self.pad_token_id = self.processor.tokenizer.eos_token_id

    @torch.inference_mode()
    def _generate(
        self, batch: list[BenchmarkRequest], new_tokens: int, clock: _FirstTokenClock | None
    ) -> tuple[int, list[list[int]]]:
        inputs = self.processor(
            images=[r.image for r in batch],
            text=[r.prompt for r in batch],
            padding=True,
            return_tensors="pt",
        )
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        out = self.model.generate(
            **inputs,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=self.pad_token_id,
            streamer=clock,
        )
        prompt_len = inputs["input_ids"].shape[1]
        num_prompt_tokens = int(inputs["attention_mask"].sum())
        return num_prompt_tokens, out[:, prompt_len:].cpu().tolist()

    def warm_up(self, request: BenchmarkRequest) -> None:
        self._generate([request], 2, None)
        _sync(self.device)

    def run(self, requests: list[BenchmarkRequest]) -> RunResult:
        prompt_tokens = 0
        ttft: list[float] = []
        token_ids: list[list[int]] = []
        start = time.perf_counter()
        start_cpu = time.process_time()
        for i in range(0, len(requests), self.batch_size):
            batch = requests[i : i + self.batch_size]
            clock = _FirstTokenClock()
            num_prompt_tokens, generated = self._generate(batch, self.output_len, clock)
            prompt_tokens += num_prompt_tokens
            token_ids.extend(generated)
            ttft.extend([clock.first_token_time - start] * len(batch))
        return RunResult(
            engine=self.engine,
            elapsed_s=time.perf_counter() - start,
            cpu_s=time.process_time() - start_cpu,
            prompt_tokens=prompt_tokens,
            output_tokens=sum(len(t) for t in token_ids),
            ttft_s=ttft,
            token_ids=token_ids,
        )


def _agreement(ours: list[list[int]], theirs: list[list[int]]) -> str:
    identical = sum(a == b for a, b in zip(ours, theirs))
    prefix = []
    for a, b in zip(ours, theirs):
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        prefix.append(n)
    return (
        f"greedy outputs identical to HF: {identical}/{len(ours)} requests; "
        f"mean common prefix {statistics.mean(prefix):.1f} tokens"
    )


def _table(results: list[RunResult]) -> str:
    header = (
        f"{'engine':<16}{'req/s':>9}{'out tok/s':>11}{'total tok/s':>13}"
        f"{'median TTFT s':>15}{'elapsed s':>11}{'CPU s':>9}"
    )
    lines = [header]
    for r in results:
        lines.append(
            f"{r.engine:<16}{r.requests_per_s:>9.3f}{r.output_tokens_per_s:>11.2f}"
            f"{r.total_tokens_per_s:>13.2f}{r.median_ttft_s:>15.3f}{r.elapsed_s:>11.2f}"
            f"{r.cpu_s:>9.1f}"
        )
    if len(results) == 2:
        ours, hf = results
        lines.append(
            f"{'ratio (ours/HF)':<16}{ours.requests_per_s / hf.requests_per_s:>8.2f}x"
            f"{ours.output_tokens_per_s / hf.output_tokens_per_s:>10.2f}x"
            f"{ours.total_tokens_per_s / hf.total_tokens_per_s:>12.2f}x"
            f"{hf.median_ttft_s / ours.median_ttft_s:>14.2f}x"
            f"{'':>20}   (TTFT: HF's / ours)"
        )
    return "\n".join(lines)


def _summary(args: argparse.Namespace, model_name: str, results: list[RunResult]) -> str:
    ours = results[0]
    text = (
        f"offline_throughput {model_name} {args.device} {args.dtype} "
        f"{args.num_requests}x{args.output_len} best of {args.repeat}: aphrodite "
        f"{ours.output_tokens_per_s:.2f} out tok/s, median TTFT {ours.median_ttft_s:.3f} s"
    )
    if len(results) == 2:
        hf = results[1]
        text += (
            f"; HF {hf.output_tokens_per_s:.2f} out tok/s, median TTFT {hf.median_ttft_s:.3f} s; "
            f"throughput {ours.output_tokens_per_s / hf.output_tokens_per_s:.2f}x HF"
        )
    return text


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="local LLaVA checkpoint (default: the benchmark model)")
    parser.add_argument(
        "--model-cache",
        default=str(REPO_ROOT / "build" / "bench-model"),
        help="where the benchmark model is built once (without --model)",
    )
    parser.add_argument("--num-requests", type=int, default=16)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic requests")
    parser.add_argument("--skip-hf", action="store_true", help="run aphrodite only")
    parser.add_argument(
        "--hf-batch-size", type=int, help="HF requests per generate() call (default: all)"
    )
    parser.add_argument(
        "--kv-cache-gb", type=float, default=2.0, help="aphrodite's KV cache on the CPU, GiB"
    )
    parser.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=0.5,
        help="aphrodite's share of the GPU (HF shares the process)",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=2,
        help="timed rounds, alternating the engines' order; the fastest round of each counts",
    )
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run: 4 requests x 16 tokens, one round"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.num_requests, args.output_len, args.repeat = 4, 16, 1
    if args.repeat < 1:
        parser.error("--repeat must be >= 1")
    if args.num_requests < 1 or args.output_len < 1:
        parser.error("--num-requests and --output-len must be >= 1")
    if args.hf_batch_size is None:
        args.hf_batch_size = args.num_requests
    if args.hf_batch_size < 1:
        parser.error("--hf-batch-size must be >= 1")
    return args


def main(argv: list[str] | None = None) -> list[RunResult]:
    """Runs the benchmark and prints its report; returns aphrodite's result, then HF's."""
    args = parse_args(argv)
    if args.model:
        model = args.model
        model_name = Path(model).name
    else:
        print(f"benchmark model: {args.model_cache} (built on first use)", flush=True)
        model = str(build_benchmark_checkpoint(args.model_cache))
        model_name = "bench-llava-clipb16-llama350m"
    requests = synthetic_requests(args.num_requests, seed=args.seed)
    warmup = synthetic_requests(1, seed=args.seed + 1_000_003)[0]

    from aphrodite import _C

    print(
        f"{args.num_requests} requests x {args.output_len} output tokens, 1 image each "
        f"({sorted({r.image.size for r in requests})}), {model_name}, {args.device} "
        f"{args.dtype}, torch threads {torch.get_num_threads()}, core threads "
        f"{_C.num_threads()}",
        flush=True,
    )
    runners: list[AphroditeRunner | HFRunner] = [AphroditeRunner(model, args)]
    if not args.skip_hf:
        runners.append(HFRunner(model, args))
    for runner in runners:
        runner.warm_up(warmup)
    runs: dict[str, list[RunResult]] = {runner.engine: [] for runner in runners}
    expected_tokens = args.num_requests * args.output_len
    for round_index in range(args.repeat):
        # Alternate the order so that a change in the machine's load hits both engines alike.
        for runner in runners if round_index % 2 == 0 else runners[::-1]:
            result = runner.run(requests)
            if result.output_tokens != expected_tokens:
                raise RuntimeError(
                    f"{result.engine} generated {result.output_tokens} tokens, "
                    f"not {expected_tokens}"
                )
            runs[runner.engine].append(result)
            print(
                f"round {round_index + 1}: {result.engine} {result.elapsed_s:.2f} s "
                f"(process CPU time {result.cpu_s:.1f} s)",
                flush=True,
            )
    hits = runners[0].llm.llm_engine.stats()["prefix_cache_hits"]
    if hits:
        raise RuntimeError(f"aphrodite's timed runs hit the prefix cache ({hits} tokens)")
    results = [min(runs[runner.engine], key=lambda r: r.elapsed_s) for runner in runners]
    if len(results) == 2 and results[0].prompt_tokens != results[1].prompt_tokens:
        print(
            f"note: prompt tokens differ: aphrodite {results[0].prompt_tokens}, "
            f"HF {results[1].prompt_tokens}"
        )
    print(
        f"prompt tokens {results[0].prompt_tokens} (images included), "
        f"output tokens {results[0].output_tokens}"
    )
    print(_table(results))
    if len(results) == 2:
        print(_agreement(results[0].token_ids, results[1].token_ids))
    print(_summary(args, model_name, results), flush=True)
    return results


if __name__ == "__main__":
    main()
