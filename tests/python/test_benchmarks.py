"""The end-to-end benchmark scripts run (so that they cannot rot): offline_throughput.py in its
--quick mode on a tiny checkpoint, against HF transformers."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from aphrodite.testing.tiny_llava import build_tiny_llava

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture
def offline_throughput(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    return importlib.import_module("offline_throughput")


def test_offline_throughput_quick_matches_hf(offline_throughput, tmp_path, capsys):
    model = build_tiny_llava(tmp_path / "tiny", seed=3)
    ours, hf = offline_throughput.main(["--model", str(model), "--quick", "--kv-cache-gb", "0.1"])
    assert (ours.engine, hf.engine) == ("aphrodite", "HF transformers")
    for result in (ours, hf):
        assert result.num_requests == 4
        assert [len(t) for t in result.token_ids] == [16] * 4
        assert len(result.ttft_s) == 4
        assert all(0 < t <= result.elapsed_s for t in result.ttft_s)
    # Both engines saw the same prompts (image tokens included) and decoded greedily in float32.
    assert ours.prompt_tokens == hf.prompt_tokens
    assert ours.token_ids == hf.token_ids
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("offline_throughput tiny cpu float32 4x16 best of 1: aphrodite ")
    assert "x HF" in lines[-1]


def test_serving_benchmark_against_a_server(monkeypatch, tmp_path, capsys):
    """serving.py against a live server on a tiny checkpoint: every request succeeds and the
    inter-token latencies are per token (one per output token after the first)."""
    from test_server import REPO, free_port, start_server, stop, wait_healthy

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    serving = importlib.import_module("serving")
    model = build_tiny_llava(tmp_path / "tiny", seed=4)
    port = free_port()
    proc = start_server(model, port, ["--chat-template", str(REPO / "examples" / "llava.jinja"),
                                      "--served-model-name", "bench"])
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, base)
        args = serving.parse_args(["--base-url", base, "--model", "bench", "--num-prompts", "3",
                                   "--output-len", "8", "--no-warmup"])
        requests = serving.build_requests(args.num_prompts, args.seed)
        timings, duration = serving.asyncio.run(serving.run_benchmark(args, requests))
    finally:
        stop(proc)
    assert duration > 0 and all(t.ok for t in timings), [t.error for t in timings]
    for t in timings:
        assert t.output_tokens == 8 and t.prompt_tokens > 0
        assert len(t.itl_s) == t.output_tokens - 1
        assert 0 < t.ttft_s <= t.latency_s
