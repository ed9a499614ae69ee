"""The sampler: one vectorised torch pass over the logits of every sequence that samples in a
step.

Order (vLLM's): raw log-probabilities for reporting -> allowed_token_ids -> logit_bias ->
penalties -> min_tokens masking -> greedy argmax | temperature -> min_p -> top_k/top_p (one
sort) -> a draw per row. A draw is the exponential race argmax(p / E) with E ~ Exp(1), which
samples token i with probability p_i.
Rows with a seed draw E from their own torch.Generator, so their tokens do not depend on which
other requests share the batch; the other rows draw from the engine's generator.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from aphrodite.sampling.logprobs import LogprobsTensors, chosen_logprobs, gather_logprobs
from aphrodite.sampling.penalties import apply_penalties, mask_stop_tokens
from aphrodite.sampling_params import SamplingParams


@dataclass
class SamplingRow:
    """What the sampler needs to know about one sampling sequence."""

    params: SamplingParams
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]
    generator: torch.Generator | None = None


def _padded(rows: list[Sequence[int]], pad: int, device: torch.device) -> torch.Tensor:
    width = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), max(width, 1)), pad, dtype=torch.int64)
    for i, r in enumerate(rows):
        if len(r):
            out[i, : len(r)] = torch.as_tensor(r, dtype=torch.int64)
    return out.to(device)


@dataclass
class SamplingMetadata:
    """The per-row parameters of one step as device tensors (None where no row uses them)."""

    temperature: torch.Tensor  # [rows] float32, 0 = greedy
    all_greedy: bool
    top_p: torch.Tensor | None
    top_k: torch.Tensor | None  # [rows] int64, vocab_size where disabled
    min_p: torch.Tensor | None
    generators: dict[int, torch.Generator]
    # penalties
    prompt_token_ids: torch.Tensor | None
    output_token_ids: torch.Tensor | None
    presence_penalties: torch.Tensor | None
    frequency_penalties: torch.Tensor | None
    repetition_penalties: torch.Tensor | None
    # min_tokens: (row, token) pairs that may not be sampled yet
    stop_mask_rows: torch.Tensor | None
    stop_mask_tokens: torch.Tensor | None
    max_num_logprobs: int | None
    # logit_bias: (row, token, bias) triples
    bias_rows: torch.Tensor | None = None
    bias_tokens: torch.Tensor | None = None
    bias_values: torch.Tensor | None = None
    # allowed_token_ids: the rows that restrict their tokens and, per such row, which tokens
    # are not allowed ([len(rows), vocab] bool)
    allowed_rows: torch.Tensor | None = None
    disallowed: torch.Tensor | None = None

    @classmethod
    def build(
        cls, rows: Sequence[SamplingRow], vocab_size: int, device: torch.device
    ) -> SamplingMetadata:
        params = [r.params for r in rows]

        def floats(values: list[float]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.float32).to(device)

        temperature = floats([p.temperature for p in params])
        all_greedy = all(p.temperature == 0.0 for p in params)
        top_p = top_k = min_p = None
        if any(p.top_p < 1.0 for p in params):
            top_p = floats([p.top_p for p in params])
        if any(0 < p.top_k < vocab_size for p in params):
            top_k = torch.tensor(
                [p.top_k if 0 < p.top_k < vocab_size else vocab_size for p in params],
                dtype=torch.int64,
            ).to(device)
        if any(p.min_p > 0.0 for p in params):
            min_p = floats([p.min_p for p in params])

        prompt_ids = output_ids = presence = frequency = repetition = None
        if any(p.uses_penalties for p in params):
            # Rows without penalties get neutral values: the batched pass is still exact for them.
            prompt_ids = _padded(
                [r.prompt_token_ids if r.params.repetition_penalty != 1.0 else () for r in rows],
                vocab_size,
                device,
            )
            output_ids = _padded(
                [r.output_token_ids if r.params.uses_penalties else () for r in rows],
                vocab_size,
                device,
            )
            presence = floats([p.presence_penalty for p in params])
            frequency = floats([p.frequency_penalty for p in params])
            repetition = floats([p.repetition_penalty for p in params])

        mask_rows: list[int] = []
        mask_tokens: list[int] = []
        for i, r in enumerate(rows):
            if len(r.output_token_ids) < r.params.min_tokens:
                stops = [t for t in r.params.all_stop_token_ids if 0 <= t < vocab_size]
                mask_rows += [i] * len(stops)
                mask_tokens += stops
        stop_rows = stop_tokens = None
        if mask_rows:
            stop_rows = torch.tensor(mask_rows, dtype=torch.int64).to(device)
            stop_tokens = torch.tensor(mask_tokens, dtype=torch.int64).to(device)

        bias_rows: list[int] = []
        bias_tokens: list[int] = []
        bias_values: list[float] = []
        allowed_rows: list[int] = []
        disallowed = None
        for i, p in enumerate(params):
            for token, bias in (p.logit_bias or {}).items():
                if 0 <= token < vocab_size:
                    bias_rows.append(i)
                    bias_tokens.append(token)
                    bias_values.append(float(bias))
            if p.allowed_token_ids is not None:
                allowed_rows.append(i)
        if allowed_rows:
            disallowed = torch.ones(len(allowed_rows), vocab_size, dtype=torch.bool)
            for k, i in enumerate(allowed_rows):
                ids = [t for t in params[i].allowed_token_ids if 0 <= t < vocab_size]
                disallowed[k, torch.tensor(ids, dtype=torch.int64)] = False
            disallowed = disallowed.to(device)

        def longs(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.int64).to(device)

        wanted = [p.logprobs for p in params if p.logprobs is not None]
        return cls(
            temperature=temperature,
            all_greedy=all_greedy,
            top_p=top_p,
            top_k=top_k,
            min_p=min_p,
            generators={i: r.generator for i, r in enumerate(rows) if r.generator is not None},
            prompt_token_ids=prompt_ids,
            output_token_ids=output_ids,
            presence_penalties=presence,
            frequency_penalties=frequency,
            repetition_penalties=repetition,
            stop_mask_rows=stop_rows,
            stop_mask_tokens=stop_tokens,
            max_num_logprobs=max(wanted) if wanted else None,
            bias_rows=longs(bias_rows) if bias_rows else None,
            bias_tokens=longs(bias_tokens) if bias_rows else None,
            bias_values=floats(bias_values) if bias_rows else None,
            allowed_rows=longs(allowed_rows) if allowed_rows else None,
            disallowed=disallowed,
        )


@dataclass
class SamplerOutput:
    sampled_token_ids: torch.Tensor  # [rows] int64
    sampled_logprobs: torch.Tensor  # [rows] float32: raw log-probability of the sampled token
    logprobs: LogprobsTensors | None  # when some row asked for logprobs


def apply_top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None
) -> torch.Tensor:
    """Mask logits outside each row's top-k and top-p sets with -inf (one ascending sort).

    Ties at the k-th value are all kept. top_p keeps the smallest set of most likely tokens whose
    probability reaches p (the most likely token is always kept)."""
    if top_k is None and top_p is None:
        return logits
    sorted_logits, sorted_idx = logits.sort(dim=-1, descending=False)
    vocab = logits.shape[1]
    if top_k is not None:
        kth = sorted_logits.gather(1, (vocab - top_k).clamp(min=0).view(-1, 1))
        sorted_logits.masked_fill_(sorted_logits < kth, float("-inf"))
    if top_p is not None:
        probs = sorted_logits.softmax(dim=-1)
        cumulative = probs.cumsum(dim=-1)
        drop = cumulative <= (1.0 - top_p).unsqueeze(1)
        drop[:, -1] = False
        sorted_logits.masked_fill_(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, sorted_idx, sorted_logits)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    probs = logits.softmax(dim=-1)
    threshold = probs.amax(dim=-1, keepdim=True) * min_p.unsqueeze(1)
    return logits.masked_fill_(probs < threshold, float("-inf"))


def exponential_race(
    probs: torch.Tensor,
    generators: dict[int, torch.Generator],
    default_generator: torch.Generator | None,
) -> torch.Tensor:
    """Sample one token per row of probs: argmax(p / E), E ~ Exp(1) i.i.d."""
    noise = torch.empty_like(probs)
    if len(generators) < probs.shape[0]:
        noise.exponential_(generator=default_generator)
    for row, generator in generators.items():
        noise[row].exponential_(generator=generator)
    # Exp(1) can round to 0; a tiny floor keeps p / E finite (0 / tiny = 0 never wins).
    noise.clamp_(min=torch.finfo(noise.dtype).tiny)
    return (probs / noise).argmax(dim=-1)


class Sampler:
    """Samples the next token of every row of a step's logits; see the module docstring."""

    def __init__(self, generator: torch.Generator | None = None) -> None:
        self.generator = generator

    def __call__(self, logits: torch.Tensor, meta: SamplingMetadata) -> SamplerOutput:
        logits = logits.to(torch.float32)
        raw = logits
        logits = logits.clone()
        if meta.allowed_rows is not None:
            restricted = logits.index_select(0, meta.allowed_rows)
            restricted.masked_fill_(meta.disallowed, float("-inf"))
            logits.index_copy_(0, meta.allowed_rows, restricted)
        if meta.bias_rows is not None:
            logits.index_put_((meta.bias_rows, meta.bias_tokens), meta.bias_values, accumulate=True)
        if meta.repetition_penalties is not None:
            apply_penalties(
                logits,
                meta.prompt_token_ids,
                meta.output_token_ids,
                meta.presence_penalties,
                meta.frequency_penalties,
                meta.repetition_penalties,
            )
        if meta.stop_mask_rows is not None:
            mask_stop_tokens(logits, meta.stop_mask_rows, meta.stop_mask_tokens)

        greedy = logits.argmax(dim=-1)
        if meta.all_greedy:
            sampled = greedy
        else:
            is_greedy = meta.temperature == 0.0
            logits /= torch.where(is_greedy, 1.0, meta.temperature).unsqueeze(1)
            if meta.min_p is not None:
                apply_min_p(logits, meta.min_p)
            logits = apply_top_k_top_p(logits, meta.top_k, meta.top_p)
            random = exponential_race(logits.softmax(dim=-1), meta.generators, self.generator)
            sampled = torch.where(is_greedy, greedy, random)

        logprobs = None
        if meta.max_num_logprobs is not None:
            logprobs = gather_logprobs(raw, sampled, meta.max_num_logprobs)
            sampled_logprobs = logprobs.logprobs[:, 0]
        else:
            sampled_logprobs = chosen_logprobs(raw, sampled)
        return SamplerOutput(
            sampled_token_ids=sampled, sampled_logprobs=sampled_logprobs, logprobs=logprobs
        )
