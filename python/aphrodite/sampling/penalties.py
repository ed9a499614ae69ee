"""Repetition, presence and frequency penalties and min_tokens masking, batched over rows."""

from __future__ import annotations

import torch


def token_counts(token_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Counts of each token id per row. token_ids [rows, length] int64 padded with vocab_size
    (a padding column that is dropped); returns [rows, vocab_size] int32."""
    rows = token_ids.shape[0]
    counts = torch.zeros(rows, vocab_size + 1, dtype=torch.int32, device=token_ids.device)
    counts.scatter_add_(1, token_ids, torch.ones_like(token_ids, dtype=torch.int32))
    return counts[:, :vocab_size]


def apply_penalties(
    logits: torch.Tensor,
    prompt_token_ids: torch.Tensor,
    output_token_ids: torch.Tensor,
    presence_penalties: torch.Tensor,
    frequency_penalties: torch.Tensor,
    repetition_penalties: torch.Tensor,
) -> torch.Tensor:
    """Penalise logits in place, vLLM's semantics.

    Repetition (CTRL): tokens seen in the prompt or the output have positive logits divided by
    the penalty and negative ones multiplied by it. Frequency and presence (OpenAI): for tokens
    in the output, subtract frequency * count and presence * (count > 0).
    logits [rows, vocab] float32; *_token_ids [rows, length] int64 padded with vocab; penalties
    [rows] float32.
    """
    vocab_size = logits.shape[1]
    output_counts = token_counts(output_token_ids, vocab_size)
    output_mask = output_counts > 0
    seen = token_counts(prompt_token_ids, vocab_size) > 0
    seen |= output_mask
    repetition = torch.where(seen, repetition_penalties.unsqueeze(1), 1.0)
    logits.copy_(torch.where(logits > 0, logits / repetition, logits * repetition))
    logits -= frequency_penalties.unsqueeze(1) * output_counts
    logits -= presence_penalties.unsqueeze(1) * output_mask
    return logits


def mask_stop_tokens(
    logits: torch.Tensor, rows: torch.Tensor, token_ids: torch.Tensor
) -> torch.Tensor:
    """Forbid (row, token) pairs in place: used for stop tokens before min_tokens is reached."""
    logits[rows, token_ids] = float("-inf")
    return logits
