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
from typing import Any

import numpy as np
import torch

from aphrodite.modeling.llama import AttentionMetadata

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


class DecodeInputs:
    """The graphs' static input buffers and their host staging: a decode step's inputs are
    written into two pinned host buffers (int64: token ids, positions, slots; int32: sequence
    lengths, then the block tables) and reach the device in two asynchronous copies on the
    current stream, ahead of the replay. Any device (the CPU for tests; pinned memory on CUDA).
    """

    def __init__(self, rows: int, max_blocks: int, device: torch.device) -> None:
        self.rows, self.max_blocks, self.device = rows, max_blocks, device
        pin = device.type == "cuda"
        self._host64 = torch.zeros(3, rows, dtype=torch.int64, pin_memory=pin)
        self._host32 = torch.zeros(rows * (1 + max_blocks), dtype=torch.int32, pin_memory=pin)
        self._dev64 = torch.zeros(3, rows, dtype=torch.int64, device=device)
        self._dev32 = torch.zeros(rows * (1 + max_blocks), dtype=torch.int32, device=device)
        self._h64 = self._host64.numpy()
        self._h_seq_lens = self._host32.numpy()[:rows]
        self._h_tables = self._host32.numpy()[rows:].reshape(rows, max_blocks)
        # Padding rows write no KV (slot -1) and read one key.
        self._h64[2] = -1
        self._h_seq_lens[:] = 1
        self._dev64.copy_(self._host64)
        self._dev32.copy_(self._host32)
        self.input_ids, self.positions, self.slot_mapping = self._dev64.unbind(0)
        self.seq_lens = self._dev32[:rows]
        self.block_tables = self._dev32[rows:].view(rows, max_blocks)
        # One token per sequence: the same for every decode step.
        self.query_start_loc = torch.arange(rows + 1, dtype=torch.int32, device=device)
        # Recorded after each step's copies: the host buffers are not rewritten before they ran.
        self._copied = torch.cuda.Event() if pin else None

    def stage(self, plan: Any, size: int) -> None:
        """Copies a decode plan of n <= size sequences into rows [0, n) and makes rows
        [n, size) padding."""
        n = int(plan.num_tokens)
        tables = np.asarray(plan.block_tables)
        if n > size or size > self.rows or tables.shape[1] > self.max_blocks:
            raise ValueError(
                f"a decode step of {n} sequences and {tables.shape[1]} blocks does not fit a "
                f"graph of {size} rows (at most {self.rows} x {self.max_blocks})"
            )
        if self._copied is not None:
            self._copied.synchronize()
        h = self._h64
        h[0, :n] = plan.input_ids
        h[1, :n] = plan.positions
        h[2, :n] = plan.slot_mapping
        h[2, n:size] = -1
        self._h_seq_lens[:n] = plan.seq_lens
        self._h_seq_lens[n:size] = 1
        # Padding rows keep earlier (valid) block ids in their first column.
        self._h_tables[:n, : tables.shape[1]] = tables
        self._dev64.copy_(self._host64, non_blocking=True)
        used = self.rows + size * self.max_blocks
        self._dev32[:used].copy_(self._host32[:used], non_blocking=True)
        if self._copied is not None:
            self._copied.record()


class DecodeGraphs:
    """The captured decode graphs over one model and KV cache (CUDA only). It holds no
    reference to its ModelRunner (the runner owns it)."""

    def __init__(
        self,
        model: torch.nn.Module,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        block_size: int,
        max_model_len: int,
        max_num_seqs: int,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.device = kv_caches[0][0].device
        self.sizes = graph_batch_sizes(max_num_seqs)
        max_blocks = -(-max_model_len // block_size)
        self.inputs = DecodeInputs(self.sizes[-1], max_blocks, self.device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.replays = 0  # steps served by a graph (tests and logs)

    def _forward(self, size: int) -> torch.Tensor:
        x = self.inputs
        meta = AttentionMetadata(
            slot_mapping=x.slot_mapping[:size],
            block_tables=x.block_tables[:size],
            seq_lens=x.seq_lens[:size],
            query_start_loc=x.query_start_loc[: size + 1],
            max_query_len=1,
        )
        embeds = self.model.language_model.embed(x.input_ids[:size])
        return self.model(embeds, x.positions[:size], self.kv_caches, meta)

    @torch.inference_mode()
    def capture(self) -> None:
        """Captures every bucket, largest first, into one shared memory pool. The buffers hold
        padding meanwhile, so the captures and their warm-up runs write no KV."""
        with torch.cuda.device(self.device):
            self._capture_all()
        logger.info("captured CUDA graphs for decode batches of %s sequences", self.sizes)

    def _capture_all(self) -> None:
        pool = None
        # One capture stream of this device for every bucket (torch.cuda.graph's default stream
        # is made once per process, on whichever device was current then).
        stream = torch.cuda.Stream(self.device)
        for size in reversed(self.sizes):
            self._forward(size)  # warm-up: lazy initialisation, allocator, kernel attributes
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=stream):
                out = self._forward(size)
            if pool is None:
                pool = graph.pool()
            self.graphs[size] = (graph, out)
        torch.cuda.synchronize(self.device)

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
        graph, out = self.graphs[size]
        with torch.cuda.device(self.device):  # the captured device, from any thread
            self.inputs.stage(plan, size)
            graph.replay()
        self.replays += 1
        return out[:n]
