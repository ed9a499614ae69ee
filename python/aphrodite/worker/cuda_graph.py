"""CUDA graphs for decode steps (as vLLM captures them): on a GPU a decode step of a small batch
is a few hundred short kernels, and launching them one by one from Python costs more than
running them. The decoder (embedding, every layer, final norm) is captured once per batch-size
bucket over static input buffers; a decode-only step copies its inputs into the buffers and
replays the graph of the smallest bucket that holds it.

Padding rows of a bucket write no KV (slot -1) and attend to one key of a valid block; their
outputs are never read. The block-table buffer has the width of ``max_model_len``, so a replay
serves any context length, and paged attention sizes its context splits from that width (the
same on every replay, as a captured launch configuration must be).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from aphrodite.modeling.llama import AttentionMetadata

if TYPE_CHECKING:
    from aphrodite.worker.model_runner import ModelRunner

logger = logging.getLogger(__name__)

# Captured batch sizes: 1, 2, 4, then every multiple of 8 up to this (or max_num_seqs).
MAX_CAPTURED_BATCH = 256


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """The buckets to capture for at most ``max_num_seqs`` decode sequences, ascending."""
    limit = min(max_num_seqs, MAX_CAPTURED_BATCH)
    sizes = [b for b in (1, 2, 4) if b <= limit] + list(range(8, limit + 1, 8))
    if limit not in sizes:
        sizes.append(limit)
    return sorted(sizes)


def bucket_for(num_tokens: int, sizes: list[int]) -> int | None:
    """The smallest captured size holding ``num_tokens`` rows, or None (run eagerly)."""
    for size in sizes:
        if size >= num_tokens:
            return size
    return None


def is_decode_only(plan: Any) -> bool:
    """Every scheduled sequence has exactly one query token and no image row is merged."""
    qsl = np.asarray(plan.query_start_loc)
    if len(qsl) < 2 or int(plan.num_tokens) != len(qsl) - 1:
        return False
    q_lens = np.diff(qsl)
    return bool((q_lens == 1).all()) and len(plan.mm_embeds) == 0


class DecodeGraphs:
    """The captured decode graphs of one ModelRunner (CUDA only)."""

    def __init__(self, runner: ModelRunner, max_num_seqs: int) -> None:
        self.runner = runner
        self.sizes = graph_batch_sizes(max_num_seqs)
        device = runner.device
        rows = self.sizes[-1]
        max_blocks = -(-runner.model_config.max_model_len // runner.block_size)
        self.input_ids = torch.zeros(rows, dtype=torch.int64, device=device)
        self.positions = torch.zeros(rows, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((rows,), -1, dtype=torch.int64, device=device)
        self.block_tables = torch.zeros(rows, max_blocks, dtype=torch.int32, device=device)
        self.seq_lens = torch.ones(rows, dtype=torch.int32, device=device)
        # One token per sequence: the same for every decode step.
        self.query_start_loc = torch.arange(rows + 1, dtype=torch.int32, device=device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.replays = 0  # steps served by a graph (tests and logs)

    def _forward(self, size: int) -> torch.Tensor:
        meta = AttentionMetadata(
            slot_mapping=self.slot_mapping[:size],
            block_tables=self.block_tables[:size],
            seq_lens=self.seq_lens[:size],
            query_start_loc=self.query_start_loc[: size + 1],
            max_query_len=1,
        )
        model = self.runner.model
        embeds = model.language_model.embed(self.input_ids[:size])
        return model(embeds, self.positions[:size], self.runner.kv_caches, meta)

    @torch.inference_mode()
    def capture(self) -> None:
        """Captures every bucket, largest first, into one shared memory pool. The buffers hold
        padding meanwhile, so the captures and their warm-up runs write no KV."""
        with torch.cuda.device(self.runner.device):
            self._capture_all()
        logger.info("captured CUDA graphs for decode batches of %s sequences", self.sizes)

    def _capture_all(self) -> None:
        pool = None
        for size in reversed(self.sizes):
            self._forward(size)  # warm-up: lazy initialisation, allocator, kernel attributes
            torch.cuda.synchronize(self.runner.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = self._forward(size)
            if pool is None:
                pool = graph.pool()
            self.graphs[size] = (graph, out)
        torch.cuda.synchronize(self.runner.device)

    def can_run(self, plan: Any) -> bool:
        return (
            bool(self.graphs)
            and bucket_for(int(plan.num_tokens), self.sizes) is not None
            and is_decode_only(plan)
        )

    def run(self, plan: Any) -> torch.Tensor:
        """Replays the bucket's graph on the plan's inputs; returns hidden states
        ``[num_tokens, hidden]``, a view of the graph's output that the next replay
        overwrites."""
        n = int(plan.num_tokens)
        size = bucket_for(n, self.sizes)
        assert size is not None
        tables = np.asarray(plan.block_tables)
        self.input_ids[:n].copy_(torch.tensor(np.asarray(plan.input_ids), dtype=torch.int64))
        self.positions[:n].copy_(torch.tensor(np.asarray(plan.positions), dtype=torch.int64))
        self.slot_mapping[:n].copy_(torch.tensor(np.asarray(plan.slot_mapping), dtype=torch.int64))
        self.seq_lens[:n].copy_(torch.tensor(np.asarray(plan.seq_lens), dtype=torch.int32))
        self.block_tables[:n, : tables.shape[1]].copy_(torch.tensor(tables, dtype=torch.int32))
        if size > n:
            # Padding rows: no KV write, one key of their (stale or zero) first block.
            self.slot_mapping[n:size].fill_(-1)
            self.seq_lens[n:size].fill_(1)
        graph, out = self.graphs[size]
        with torch.cuda.device(self.runner.device):  # the captured device, from any thread
            graph.replay()
        self.replays += 1
        return out[:n]
