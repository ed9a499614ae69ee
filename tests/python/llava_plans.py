"""A small, fully predictable planner for driving ModelRunner in tests.

It produces plans with the same fields as aphrodite._C.SchedulerOutput (ENGINE_API.md) under
simple rules: every request gets its own contiguous run of blocks, prefill goes in chunks of at
most `chunk` tokens per request per step (so chunks can start and end inside an image), every
running request advances each step, and images are encoded the step their first token is
scheduled. That lets the runner tests place chunk boundaries exactly where they want them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np


@dataclass
class _Request:
    request_id: str
    token_ids: list[int]
    prompt_len: int
    images: list[tuple[int, int]]  # (offset, length)
    first_block: int
    num_computed: int = 0
    encoded: set[int] = field(default_factory=set)


class Planner:
    def __init__(self, block_size: int, blocks_per_request: int, chunk: int) -> None:
        self.block_size = block_size
        self.blocks_per_request = blocks_per_request
        self.chunk = chunk
        self.requests: list[_Request] = []
        self.next_block = 1  # block 0 is the null block
        self.freed: list[tuple[str, int]] = []

    @property
    def num_blocks(self) -> int:
        return self.next_block

    def add(self, request_id: str, prompt_ids: list[int], images: list[tuple[int, int]]) -> None:
        self.requests.append(
            _Request(request_id, list(prompt_ids), len(prompt_ids), images, self.next_block)
        )
        self.next_block += self.blocks_per_request

    def schedule(self) -> SimpleNamespace:
        ids, positions, slots, seq_lens, starts = [], [], [], [], [0]
        logits_indices, sampled, encoder_inputs, mm_embeds, request_ids = [], [], [], [], []
        tables, computed = [], []
        for seq_index, r in enumerate(self.requests):
            begin = r.num_computed
            computed.append(begin)
            end = min(len(r.token_ids), begin + self.chunk)
            flat0 = starts[-1]
            for pos in range(begin, end):
                ids.append(r.token_ids[pos])
                positions.append(pos)
                block = r.first_block + pos // self.block_size
                slots.append(block * self.block_size + pos % self.block_size)
            for mm_index, (offset, length) in enumerate(r.images):
                lo, hi = max(offset, begin), min(offset + length, end)
                if lo >= hi:
                    continue
                if mm_index not in r.encoded:
                    encoder_inputs.append((r.request_id, mm_index))
                    r.encoded.add(mm_index)
                mm_embeds.append((flat0 + lo - begin, r.request_id, mm_index, lo - offset, hi - lo))
                if hi == offset + length:
                    self.freed.append((r.request_id, mm_index))
            starts.append(flat0 + end - begin)
            seq_lens.append(end)
            tables.append(list(range(r.first_block, r.first_block + self.blocks_per_request)))
            request_ids.append(r.request_id)
            if end == len(r.token_ids):
                logits_indices.append(starts[-1] - 1)
                sampled.append(seq_index)
            r.num_computed = end
        freed, self.freed = self.freed, []
        return SimpleNamespace(
            num_seqs=len(self.requests),
            num_tokens=len(ids),
            request_ids=request_ids,
            input_ids=np.array(ids, dtype=np.int32),
            positions=np.array(positions, dtype=np.int64),
            slot_mapping=np.array(slots, dtype=np.int64),
            block_tables=np.array(tables, dtype=np.int32).reshape(len(tables), -1),
            seq_lens=np.array(seq_lens, dtype=np.int32),
            query_start_loc=np.array(starts, dtype=np.int32),
            num_computed_tokens=np.array(computed, dtype=np.int32),
            logits_indices=np.array(logits_indices, dtype=np.int32),
            sampled_seq_indices=np.array(sampled, dtype=np.int32),
            encoder_inputs=encoder_inputs,
            mm_embeds=mm_embeds,
            freed_encoder_outputs=freed,
            preempted_request_ids=[],
        )

    def update(self, plan: SimpleNamespace, sampled_ids: list[int]) -> None:
        for seq_index, token in zip(plan.sampled_seq_indices.tolist(), sampled_ids):
            self.requests[seq_index].token_ids.append(int(token))

    def generated(self, request_id: str) -> list[int]:
        r = next(r for r in self.requests if r.request_id == request_id)
        return r.token_ids[r.prompt_len :]


def image_spans(prompt_ids: list[int], image_token_id: int) -> list[tuple[int, int]]:
    """(offset, length) of each run of image tokens in a prompt."""
    spans: list[tuple[int, int]] = []
    for i, token in enumerate(prompt_ids):
        if token != image_token_id:
            continue
        if spans and spans[-1][0] + spans[-1][1] == i:
            spans[-1] = (spans[-1][0], spans[-1][1] + 1)
        else:
            spans.append((i, 1))
    return spans
