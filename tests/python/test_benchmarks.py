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
