"""CUDA-graph decode steps: the bucket helpers (everywhere) and, on a GPU, replays that give the
same tokens as eager steps."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import CUDA_USABLE
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


@pytest.mark.skipif(not CUDA_USABLE, reason="no usable CUDA device")
def test_graph_decode_matches_eager_on_cuda(tiny64) -> None:
    """Greedy bf16 generation with graphs (4 requests, then 2, then 1 as they finish: batches
    equal to the buckets, so the eager GEMMs see the same row counts) gives exactly the eager
    engine's tokens: same kernels, and contexts short enough that no context split differs."""
    checkpoint = tiny64
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
    # Eager; graphs; graphs with the KV cache sized by profiling (which counts the graphs' pool).
    for key, eager, kv in (("eager", True, 64), ("graphs", False, 64), ("profiled", False, None)):
        llm = LLM(
            model=str(checkpoint),
            device="cuda",
            dtype="bfloat16",
            max_model_len=256,
            max_num_seqs=8,
            num_kv_blocks=kv,
            gpu_memory_utilization=0.3,
            enforce_eager=eager,
        )
        graphs = llm.llm_engine.runner.graphs
        assert (graphs is None) == eager
        outputs[key] = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
        if not eager:
            assert graphs.replays >= 19  # every decode step but the ones with a prefill
        del llm, graphs
        torch.cuda.empty_cache()
    assert outputs["graphs"] == outputs["eager"]
    assert outputs["profiled"] == outputs["eager"]


def test_decode_inputs_stage_a_plan_and_pad_the_bucket() -> None:
    """The graphs' input staging (on the CPU here; pinned buffers and async copies on CUDA)."""
    from aphrodite.worker.cuda_graph import DecodeInputs

    x = DecodeInputs(rows=8, max_blocks=5, device=torch.device("cpu"))
    plan = SimpleNamespace(
        num_tokens=3,
        input_ids=np.array([11, 12, 13], dtype=np.int32),
        positions=np.array([40, 7, 19], dtype=np.int64),
        slot_mapping=np.array([81, 22, -1], dtype=np.int64),
        seq_lens=np.array([41, 8, 20], dtype=np.int32),
        block_tables=np.array([[3, 4, 5], [6, 0, 0], [7, 8, 0]], dtype=np.int32),
    )
    x.stage(plan, 4)
    assert x.input_ids[:3].tolist() == [11, 12, 13]
    assert x.positions[:3].tolist() == [40, 7, 19]
    assert x.slot_mapping[:4].tolist() == [81, 22, -1, -1]  # row 3 pads: no KV write
    assert x.seq_lens[:4].tolist() == [41, 8, 20, 1]
    assert x.block_tables[:3, :3].tolist() == plan.block_tables.tolist()
    assert x.query_start_loc[:5].tolist() == [0, 1, 2, 3, 4]
    # A smaller step next: its rows replace the first ones, the rest of the bucket pads.
    small = SimpleNamespace(
        num_tokens=1,
        input_ids=np.array([99]),
        positions=np.array([5]),
        slot_mapping=np.array([9]),
        seq_lens=np.array([6]),
        block_tables=np.array([[2]], dtype=np.int32),
    )
    x.stage(small, 2)
    assert x.slot_mapping[:2].tolist() == [9, -1] and x.seq_lens[:2].tolist() == [6, 1]
    assert x.block_tables[0, 0].item() == 2 and x.input_ids[0].item() == 99
    assert 0 <= x.block_tables[1, 0].item() < 9  # the padding row reads a valid block
    with pytest.raises(ValueError, match="does not fit"):
        x.stage(plan, 2)
