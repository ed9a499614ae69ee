"""Online serving benchmark: drives a running server through the OpenAI chat API.

    aphrodite run build/bench-model --port 2242 &          # or any OpenAI-compatible server
    python benchmarks/serving.py --base-url http://localhost:2242 --num-prompts 16
    python benchmarks/serving.py --request-rate 2 --num-prompts 64 --output-len 128

Each request is a streamed chat completion with one image (a JPEG data URL) and a question,
from the synthetic dataset of the offline benchmark (benchmark_dataset.py, fixed seed),
greedy, with exactly --output-len tokens (``ignore_eos``, an extra body field that vLLM-style
servers accept; --no-ignore-eos leaves it out). Requests start all at once
(--request-rate inf, the default) or at Poisson arrivals of the given rate per second, at
most --max-concurrency in flight, after one untimed warm-up request (another image).
A server's prefix cache keeps the images of earlier runs: run again with another --seed, or
the repeated prompts are served from the cache.

Reported: request and token throughput over the whole run, and per request (mean, median,
p99): time to first token (request sent -> first content chunk), time per output token
((latency - TTFT) / (output tokens - 1)), inter-token latency (gaps between content chunks)
and end-to-end latency. Token counts come from the server's usage chunk
(``stream_options.include_usage``).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import sys
import time
from dataclasses import dataclass, field

import numpy as np
from benchmark_dataset import synthetic_requests


@dataclass
class ChatRequest:
    question: str
    image_url: str


@dataclass
class RequestTiming:
    ok: bool
    error: str = ""
    ttft_s: float = 0.0
    latency_s: float = 0.0
    prompt_tokens: int = 0
    output_tokens: int = 0
    itl_s: list[float] = field(default_factory=list)


def _data_url(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def build_requests(num_prompts: int, seed: int) -> list[ChatRequest]:
    requests = []
    for r in synthetic_requests(num_prompts, seed=seed):
        # The dataset's prompts are raw LLaVA-1.5 text; the chat API gets the question only and
        # the server's chat template adds USER:/ASSISTANT: and the image placeholder.
        question = r.prompt.removeprefix("USER: <image>\n").removesuffix("\nASSISTANT:")
        requests.append(ChatRequest(question, _data_url(r.image)))
    return requests


async def _one_request(
    client, model: str, request: ChatRequest, args, max_tokens: int | None = None
) -> RequestTiming:
    extra_body = {} if args.no_ignore_eos else {"ignore_eos": True}
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": request.image_url}},
                {"type": "text", "text": request.question},
            ],
        }
    ]
    timing = RequestTiming(ok=False)
    start = time.perf_counter()
    last = None
    chunks = 0
    try:
        stream = await client.chat.completions.create(
            model=model,
            messages=messages,
            max_tokens=max_tokens or args.output_len,
            temperature=0.0,
            stream=True,
            # continuous_usage_stats: every chunk says how many tokens were generated so far,
            # so a chunk that carries several tokens (tokens without text of their own ride
            # with the next text) counts as that many inter-token gaps, not one.
            stream_options={"include_usage": True, "continuous_usage_stats": True},
            extra_body=extra_body,
        )
        tokens_seen = 0
        async for chunk in stream:
            now = time.perf_counter()
            tokens_now = None
            if chunk.usage is not None:
                timing.prompt_tokens = chunk.usage.prompt_tokens
                timing.output_tokens = tokens_now = chunk.usage.completion_tokens
            if not chunk.choices or not chunk.choices[0].delta.content:
                continue
            chunks += 1
            new_tokens = 1 if tokens_now is None else max(1, tokens_now - tokens_seen)
            tokens_seen = tokens_now if tokens_now is not None else tokens_seen + 1
            if last is None:
                timing.ttft_s = now - start
            else:
                timing.itl_s.extend([(now - last) / new_tokens] * new_tokens)
            last = now
        timing.latency_s = time.perf_counter() - start
        if last is None:
            timing.error = "no content was streamed"
        else:
            timing.ok = True
            if timing.output_tokens == 0:
                # A server that sends no usage: count content chunks instead.
                timing.output_tokens = chunks
    except Exception as e:  # a failed request is counted and reported, not fatal
        timing.error = f"{type(e).__name__}: {e}"
    return timing


async def run_benchmark(args, requests: list[ChatRequest]) -> tuple[list[RequestTiming], float]:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(
        base_url=args.base_url.rstrip("/") + "/v1",
        api_key=args.api_key,
        timeout=args.timeout,
        max_retries=0,
    )
    model = args.model
    if model is None:
        model = (await client.models.list()).data[0].id
    if args.warmup:
        # One short request with another image first: the server's first step pays one-time
        # costs (allocations, thread start-up) that are not what a loaded server does.
        warmup = build_requests(1, args.seed + 1_000_003)[0]
        timing = await _one_request(client, model, warmup, args, max_tokens=2)
        if not timing.ok:
            raise RuntimeError(f"the warm-up request failed: {timing.error}")
    rng = np.random.default_rng(args.seed)
    limit = asyncio.Semaphore(args.max_concurrency or len(requests))

    async def limited(request: ChatRequest) -> RequestTiming:
        async with limit:
            return await _one_request(client, model, request, args)

    tasks = []
    start = time.perf_counter()
    for i, request in enumerate(requests):
        if i > 0 and args.request_rate != float("inf"):
            await asyncio.sleep(rng.exponential(1.0 / args.request_rate))
        tasks.append(asyncio.create_task(limited(request)))
    timings = await asyncio.gather(*tasks)
    duration = time.perf_counter() - start
    await client.close()
    return timings, duration


def _stats_line(name: str, values_s: list[float]) -> str:
    if not values_s:
        return f"{name:<26}{'n/a':>10}"
    ms = np.asarray(values_s) * 1000.0
    return (
        f"{name:<26}{ms.mean():>10.1f}{np.percentile(ms, 50):>10.1f}{np.percentile(ms, 99):>10.1f}"
    )


def report(args, timings: list[RequestTiming], duration: float) -> str:
    done = [t for t in timings if t.ok]
    failed = [t for t in timings if not t.ok]
    prompt_tokens = sum(t.prompt_tokens for t in done)
    output_tokens = sum(t.output_tokens for t in done)
    tpot = [(t.latency_s - t.ttft_s) / (t.output_tokens - 1) for t in done if t.output_tokens > 1]
    lines = [
        f"requests: {len(done)} completed, {len(failed)} failed; request rate "
        f"{args.request_rate}/s; duration {duration:.2f} s",
        f"request throughput      {len(done) / duration:10.3f} req/s",
        f"output token throughput {output_tokens / duration:10.2f} tok/s",
        f"total token throughput  {(prompt_tokens + output_tokens) / duration:10.2f} tok/s",
        f"prompt tokens {prompt_tokens} (images included), output tokens {output_tokens}",
        f"{'':<26}{'mean ms':>10}{'p50 ms':>10}{'p99 ms':>10}",
        _stats_line("time to first token", [t.ttft_s for t in done]),
        _stats_line("time per output token", tpot),
        _stats_line("inter-token latency", [x for t in done for x in t.itl_s]),
        _stats_line("end-to-end latency", [t.latency_s for t in done]),
    ]
    for t in failed[:5]:
        lines.append(f"failed: {t.error}")
    ttft_p50 = np.percentile([t.ttft_s for t in done], 50) * 1000 if done else float("nan")
    tpot_p50 = np.percentile(tpot, 50) * 1000 if tpot else float("nan")
    lines.append(
        f"serving {len(done)}/{len(timings)} ok, rate {args.request_rate}/s: "
        f"{output_tokens / duration:.2f} out tok/s, median TTFT {ttft_p50:.1f} ms, "
        f"median TPOT {tpot_p50:.1f} ms"
    )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://localhost:2242")
    parser.add_argument("--model", help="model name for the API (default: the server's first)")
    parser.add_argument("--api-key", default="EMPTY")
    parser.add_argument("--num-prompts", type=int, default=16)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument(
        "--request-rate",
        type=float,
        default=float("inf"),
        help="requests per second with Poisson arrivals; inf sends them all at once",
    )
    parser.add_argument("--max-concurrency", type=int, help="most requests in flight")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=1800.0, help="per request, seconds")
    parser.add_argument(
        "--no-ignore-eos", action="store_true", help="let requests stop at end-of-sequence"
    )
    parser.add_argument(
        "--no-warmup",
        dest="warmup",
        action="store_false",
        help="skip the untimed warm-up request",
    )
    args = parser.parse_args(argv)
    if args.num_prompts < 1 or args.output_len < 1:
        parser.error("--num-prompts and --output-len must be >= 1")
    if args.request_rate <= 0:
        parser.error("--request-rate must be > 0 (inf: all at once)")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        parser.error("--max-concurrency must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    requests = build_requests(args.num_prompts, args.seed)
    timings, duration = asyncio.run(run_benchmark(args, requests))
    print(report(args, timings, duration), flush=True)
    return 0 if all(t.ok for t in timings) else 1


if __name__ == "__main__":
    sys.exit(main())
