"""Paged KV-cache write and paged attention (``aphrodite._C.ops``), on the tensors' device.

Cache layout: ``[num_blocks, block_size, num_kv_heads, head_size]`` for K and for V;
``slot = block_id * block_size + offset`` and slot -1 skips a token. See
``cpp/include/aphrodite/attention.h`` for the full contract.
"""

from __future__ import annotations

import torch

from aphrodite import _C
from aphrodite.ops._stream import capsule, int32_arg, optional_capsule, stream_of


def reshape_and_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Writes ``key``/``value`` ``[num_tokens, num_kv_heads, head_size]`` into the caches at
    ``slot_mapping`` (int64 or int32, ``[num_tokens]``)."""
    _C.ops.reshape_and_cache(
        capsule(key),
        capsule(value),
        capsule(key_cache),
        capsule(value_cache),
        capsule(slot_mapping),
        stream=stream_of(key_cache),
    )


def paged_attention(
    out: torch.Tensor,
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    sliding_window: int = 0,
    *,
    max_query_len: int = 0,
) -> None:
    """Attention of ``query`` ``[num_tokens, num_heads, head_size]`` over each sequence's cached
    context, written into ``out``.

    ``block_tables`` int32 ``[num_seqs, max_blocks]``, ``seq_lens`` int32 ``[num_seqs]`` (context
    length including this step's tokens), ``query_start_loc`` int32 ``[num_seqs + 1]``. Query token
    j of sequence s is at position ``seq_lens[s] - q_len + j`` and sees keys at positions
    ``<=`` its own and, with ``sliding_window > 0``, ``> position - sliding_window``.

    ``max_query_len`` > 0 promises that no sequence has more query tokens (0: unknown); on CUDA
    it spares the kernels for longer queries (a decode-only batch passes 1), which trust it as
    they trust the rest of the metadata; the CPU checks it.

    On CUDA the split-context workspace comes from torch's caching allocator, which keeps the call
    safe to capture in a CUDA graph (the workspace size depends on shapes only).
    """
    workspace = None
    if isinstance(key_cache, torch.Tensor) and key_cache.is_cuda:
        nbytes = _C.ops.paged_attention_workspace_bytes(
            capsule(query), capsule(key_cache), capsule(block_tables)
        )
        if nbytes:
            workspace = torch.empty(nbytes, dtype=torch.uint8, device=key_cache.device)
    _C.ops.paged_attention(
        capsule(out),
        capsule(query),
        capsule(key_cache),
        capsule(value_cache),
        capsule(block_tables),
        capsule(seq_lens),
        capsule(query_start_loc),
        float(scale),
        int32_arg(sliding_window, "sliding_window"),
        workspace=optional_capsule(workspace),
        stream=stream_of(key_cache),
        max_query_len=int32_arg(max_query_len, "max_query_len"),
    )
