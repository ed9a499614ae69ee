"""Log-probabilities reported to users: the model's raw distribution (before penalties,
temperature and truncation), as vLLM reports them."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LogprobsTensors:
    """Per row: token_ids [rows, 1 + k] (the chosen token first, then the top-k), their
    log-probabilities [rows, 1 + k] and the chosen token's rank [rows] (1 = most likely)."""

    token_ids: torch.Tensor
    logprobs: torch.Tensor
    ranks: torch.Tensor

    def tolists(self) -> tuple[list[list[int]], list[list[float]], list[int]]:
        return (
            self.token_ids.cpu().tolist(),
            self.logprobs.cpu().tolist(),
            self.ranks.cpu().tolist(),
        )


def chosen_logprobs(logits: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """log_softmax(logits)[row, token_ids[row]] without materialising the whole log_softmax."""
    picked = logits.gather(1, token_ids.view(-1, 1)).squeeze(1)
    return picked - torch.logsumexp(logits, dim=-1)


def gather_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, k: int) -> LogprobsTensors:
    """The chosen tokens' log-probabilities and ranks plus the top-k of each row.

    logits [rows, vocab] float32 (raw), token_ids [rows] int64."""
    logprobs = torch.log_softmax(logits, dim=-1)
    token_ids = token_ids.view(-1, 1).to(torch.int64)
    chosen = logprobs.gather(1, token_ids)
    ranks = (logprobs > chosen).sum(dim=-1) + 1
    if k > 0:
        top_logprobs, top_ids = logprobs.topk(k, dim=-1)
        ids = torch.cat([token_ids, top_ids], dim=1)
        values = torch.cat([chosen, top_logprobs], dim=1)
    else:
        ids, values = token_ids, chosen
    return LogprobsTensors(token_ids=ids, logprobs=values, ranks=ranks)
