"""Prometheus metrics of the server (``GET /metrics``).

Each server owns its registry (no global state, so several apps can live in one process). Names
use the ``aphrodite:`` prefix like vLLM's ``vllm:`` ones. Engine gauges (running/waiting
requests, KV-cache usage, prefix-cache hit rate) are read from the engine's latest stats snapshot
at scrape time; the engine thread refreshes that snapshot after every step and every abort, so a
scrape never touches the engine core concurrently with a step.
"""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

_LATENCY_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0,
)
_E2E_BUCKETS = (0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                60.0, 120.0, 240.0, 480.0)


class _EngineStatsCollector:
    """Turns the engine's stats dict into gauges at scrape time."""

    def __init__(self, model_name: str, stats: Callable[[], dict]):
        self._model = model_name
        self._stats = stats

    def collect(self):
        stats = self._stats()

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=["model_name"])
            g.add_metric([self._model], float(value))
            return g

        yield gauge("aphrodite:num_requests_running", "Requests being processed by the engine.",
                    stats.get("num_running", 0))
        yield gauge("aphrodite:num_requests_waiting", "Requests waiting to be scheduled.",
                    stats.get("num_waiting", 0))
        yield gauge("aphrodite:kv_cache_usage_perc",
                    "Fraction of KV-cache blocks in use (1 = full).",
                    stats.get("kv_cache_usage", 0.0))
        yield gauge("aphrodite:kv_cache_free_blocks", "KV-cache blocks free for new requests.",
                    stats.get("num_free_blocks", 0))
        yield gauge("aphrodite:kv_cache_total_blocks", "KV-cache blocks in the whole cache.",
                    stats.get("num_total_blocks", 0))
        queries = stats.get("prefix_cache_queries", 0)
        hits = stats.get("prefix_cache_hits", 0)
        yield gauge("aphrodite:prefix_cache_queries",
                    "Prompt tokens looked up in the prefix cache.", queries)
        yield gauge("aphrodite:prefix_cache_hits", "Prompt tokens found in the prefix cache.", hits)
        yield gauge("aphrodite:prefix_cache_hit_rate",
                    "Prefix-cache hits / queries, in tokens, since start.",
                    hits / queries if queries else 0.0)
        yield gauge("aphrodite:num_preemptions", "Preemptions since start.",
                    stats.get("num_preemptions", 0))


class ServerMetrics:
    def __init__(self, model_name: str, engine_stats: Callable[[], dict] | None = None):
        self.registry = CollectorRegistry()
        labels = ["model_name"]
        r = self.registry
        self.http_requests = Counter(
            "aphrodite:http_requests", "HTTP requests by endpoint and status code.",
            ["endpoint", "status"], registry=r)
        self.request_finished = Counter(
            "aphrodite:request_success", "Finished generation requests by finish reason "
            "(stop, length, abort).", labels + ["finished_reason"], registry=r)
        self.prompt_tokens = Counter(
            "aphrodite:prompt_tokens", "Prompt tokens processed.", labels, registry=r)
        self.generation_tokens = Counter(
            "aphrodite:generation_tokens", "Tokens generated.", labels, registry=r)
        self.time_to_first_token = Histogram(
            "aphrodite:time_to_first_token_seconds", "Time from arrival to the first token.",
            labels, buckets=_LATENCY_BUCKETS, registry=r)
        self.inter_token_latency = Histogram(
            "aphrodite:inter_token_latency_seconds", "Time between consecutive output tokens.",
            labels, buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e_latency = Histogram(
            "aphrodite:e2e_request_latency_seconds", "Time from arrival to the last token.",
            labels, buckets=_E2E_BUCKETS, registry=r)
        self.image_fetch_time = Histogram(
            "aphrodite:image_fetch_seconds", "Time to get an image's bytes (download, base64 "
            "decode or file read).", labels, buckets=_LATENCY_BUCKETS, registry=r)
        self.image_decode_time = Histogram(
            "aphrodite:image_decode_seconds", "Time to decode an image's bytes into pixels.",
            labels, buckets=_LATENCY_BUCKETS, registry=r)
        self.prompt_preprocess_time = Histogram(
            "aphrodite:prompt_preprocess_seconds", "Time to tokenize a prompt and convert, hash "
            "and expand its images (on the engine thread).", labels, buckets=_LATENCY_BUCKETS,
            registry=r)
        self.image_fetch_errors = Counter(
            "aphrodite:image_fetch_errors", "Image fetches that failed, by cause.",
            labels + ["code"], registry=r)
        self._model = model_name
        if engine_stats is not None:
            r.register(_EngineStatsCollector(model_name, engine_stats))

    def observe_image(self, stage: str, seconds: float) -> None:
        hist = self.image_fetch_time if stage == "fetch" else self.image_decode_time
        hist.labels(self._model).observe(seconds)

    def observe_preprocess(self, seconds: float) -> None:
        self.prompt_preprocess_time.labels(self._model).observe(seconds)

    def observe_finished(
        self,
        finish_reason: str,
        num_prompt_tokens: int,
        num_generated: int,
        ttft_s: float | None,
        inter_token_s: list[float],
        e2e_s: float,
    ) -> None:
        m = self._model
        self.request_finished.labels(m, finish_reason or "abort").inc()
        self.prompt_tokens.labels(m).inc(num_prompt_tokens)
        self.generation_tokens.labels(m).inc(num_generated)
        if ttft_s is not None:
            self.time_to_first_token.labels(m).observe(ttft_s)
        for s in inter_token_s:
            self.inter_token_latency.labels(m).observe(s)
        self.e2e_latency.labels(m).observe(e2e_s)

    def render(self) -> bytes:
        return generate_latest(self.registry)
