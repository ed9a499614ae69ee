"""CUDA-graph decode steps: the bucket helpers (everywhere) and, on a GPU, replays that give the
same tokens as eager steps."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from aphrodite import LLM, SamplingParams
from aphrodite.config import ModelConfig
from aphrodite.testing import build_tiny_llava
from aphrodite.worker.cuda_graph import bucket_for, graph_batch_sizes, is_decode_only
from aphrodite.worker.model_runner import ModelRunner


def test_graph_batch_sizes_and_buckets() -> None:
    assert graph_batch_sizes(1) == [1]
    assert graph_batch_sizes(6) == [1, 2, 4, 6]
    assert graph_batch_sizes(20) == [1, 2, 4, 8, 16, 20]
    sizes = graph_batch_sizes(1000)
    assert sizes[:5] == [1, 2, 4, 8, 16] and sizes[-1] == 256
    assert all(b % 8 == 0 for b in sizes[3:])
    assert bucket_for(1, sizes) == 1
    assert bucket_for(3, sizes) == 4
    assert bucket_for(9, sizes) == 16
    assert bucket_for(256, sizes) == 256
    assert bucket_for(257, sizes) is None


def _plan(q_lens: list[int], mm_embeds: list | None = None) -> SimpleNamespace:
    qsl = np.zeros(len(q_lens) + 1, dtype=np.int32)
    np.cumsum(q_lens, out=qsl[1:])
    return SimpleNamespace(num_tokens=int(qsl[-1]), query_start_loc=qsl, mm_embeds=mm_embeds or [])


def test_only_decode_steps_without_images_replay() -> None:
    assert is_decode_only(_plan([1, 1, 1]))
    assert not is_decode_only(_plan([1, 2]))  # a prefill chunk
    assert not is_decode_only(_plan([1, 0, 2]))
    assert not is_decode_only(_plan([1], mm_embeds=[(0, "r", 0, 5, 1)]))  # an image row
    assert not is_decode_only(_plan([]))


def test_capture_needs_cuda(tmp_path) -> None:
    runner = ModelRunner(ModelConfig.load(build_tiny_llava(tmp_path / "tiny"), device="cpu"))
    with pytest.raises(RuntimeError, match="CUDA device"):
        runner.capture_cuda_graphs(4)


def test_graph_decode_matches_eager_on_cuda(tmp_path) -> None:
    """Greedy bf16 generation with graphs (4 requests, then 2, then 1 as they finish: batches
    equal to the buckets, so the eager GEMMs see the same row counts) gives exactly the eager
    engine's tokens: same kernels, and contexts short enough that no context split differs."""
    from conftest import CUDA_USABLE

    if not CUDA_USABLE:
        pytest.skip("no usable CUDA device")
    checkpoint = build_tiny_llava(
        tmp_path / "tiny64",
        hidden_size=128,
        intermediate_size=256,
        num_attention_heads=2,
        num_key_value_heads=1,
        vision_hidden_size=64,
        vision_intermediate_size=128,
        vision_num_attention_heads=1,
        seed=7,
    )
    image = Image.fromarray(np.random.default_rng(3).integers(0, 256, (40, 52, 3), dtype=np.uint8))
    prompts = [
        {"prompt": "USER: <image>\nWhat is this? ASSISTANT:", "multi_modal_data": {"image": image}},
        "USER: tell me a story ASSISTANT:",
        "USER: hello ASSISTANT:",
        "USER: and now? ASSISTANT:",
    ]
    lengths = (20, 14, 9, 9)
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in lengths]
    outputs = {}
    for eager in (True, False):
        llm = LLM(
            model=str(checkpoint),
            device="cuda",
            dtype="bfloat16",
            max_model_len=256,
            max_num_seqs=8,
            num_kv_blocks=64,
            enforce_eager=eager,
        )
        graphs = llm.llm_engine.runner.graphs
        assert (graphs is None) == eager
        outputs[eager] = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
        if not eager:
            assert graphs.replays >= 19  # every decode step but the ones with a prefill
        del llm
        torch.cuda.empty_cache()
    assert outputs[False] == outputs[True]
