"""Sampling parameters of one request (the vLLM/Aphrodite ``SamplingParams`` surface)."""

from __future__ import annotations

import copy
import math
import numbers
from dataclasses import dataclass, field
from enum import IntEnum

# Temperatures below this are treated as greedy decoding: dividing logits by a value this small
# would overflow float32 without changing the argmax.
_GREEDY_TEMPERATURE = 1e-5

# torch generators take seeds in [-2**63, 2**64).
_SEED_MIN, _SEED_END = -(2**63), 2**64


# Numeric fields, normalised to float / int (numpy scalars included) before they are checked.
_FLOAT_FIELDS = (
    "temperature",
    "top_p",
    "min_p",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
)
_INT_FIELDS = ("n", "top_k", "seed", "max_tokens", "min_tokens", "logprobs", "prompt_logprobs")


def _as_int(value: object) -> object:
    """Integers of any kind (numpy's included) as int; bools and everything else unchanged, for
    the checks to reject."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    return value


def _as_float(value: object) -> object:
    """Real numbers of any kind (numpy's included) as float; the rest unchanged."""
    if isinstance(value, numbers.Real) and not isinstance(value, (bool, numbers.Integral)):
        return float(value)
    return value


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class SamplingType(IntEnum):
    GREEDY = 0
    RANDOM = 1
    RANDOM_SEED = 2


@dataclass
class SamplingParams:
    """How to sample the completion(s) of one prompt.

    Args:
        n: number of completions returned for the prompt.
        presence_penalty: subtracted from the logit of every token already generated (> 0
            favours new tokens), in [-2, 2].
        frequency_penalty: subtracted once per previous occurrence in the generated text, in
            [-2, 2].
        repetition_penalty: multiplicative penalty (CTRL paper) on tokens seen in the prompt or
            the generated text; 1 disables it.
        temperature: 0 means greedy decoding (the exact argmax).
        top_p: keep the smallest set of most likely tokens whose probability reaches top_p.
        top_k: keep the k most likely tokens; 0 or -1 disables it.
        min_p: drop tokens whose probability is below min_p times the most likely one's.
        seed: per-request seed; the same seed gives the same tokens whatever the other requests
            in the batch are.
        stop: strings that end the completion; the text excludes them unless
            include_stop_str_in_output.
        stop_token_ids: token ids that end the completion (the id stays in token_ids).
        include_stop_str_in_output: keep the matched stop string (or stop token text) in text.
        ignore_eos: keep generating after the end-of-sequence token.
        max_tokens: the most tokens generated; None means up to the model's context length.
        min_tokens: end-of-sequence, stop tokens and stop strings are ignored before this many
            tokens were generated.
        logprobs: also return the log-probabilities of this many most likely tokens (plus the
            sampled one) at every generated position; 0 returns only the sampled token's.
        prompt_logprobs: the same for every prompt position (the first one has none).
        detokenize: produce text (otherwise only token ids; stop strings need it).
        skip_special_tokens: leave special tokens out of the text.
        spaces_between_special_tokens: join special tokens with spaces when they are kept.
        logit_bias: {token id: bias} added to the logits before sampling (and before greedy
            argmax); the reported log-probabilities are the model's, without it.
        allowed_token_ids: only these tokens may be sampled.
    """

    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    detokenize: bool = True
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    # Filled in by the engine (end-of-sequence and the stop ids of the model), not by users.
    all_stop_token_ids: set[int] = field(default_factory=set, repr=False)

    def __post_init__(self) -> None:
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        else:
            self.stop = list(self.stop)
        self.stop_token_ids = (
            [] if self.stop_token_ids is None else [_as_int(t) for t in self.stop_token_ids]
        )
        if self.logit_bias is not None:
            self.logit_bias = {_as_int(t): _as_float(b) for t, b in dict(self.logit_bias).items()}
        if self.allowed_token_ids is not None:
            # Each id once, in order: a long list with repeats costs every step otherwise.
            self.allowed_token_ids = list(dict.fromkeys(_as_int(t) for t in self.allowed_token_ids))
        for name in _FLOAT_FIELDS:
            setattr(self, name, _as_float(getattr(self, name)))
        for name in _INT_FIELDS:
            setattr(self, name, _as_int(getattr(self, name)))
        if self.top_k == -1:
            self.top_k = 0
        self._verify()
        if self.temperature < _GREEDY_TEMPERATURE:
            # Greedy decoding ignores truncation; normalising here keeps the sampler's rows simple.
            self.temperature = 0.0
            self.top_p = 1.0
            self.top_k = 0
            self.min_p = 0.0
        self.all_stop_token_ids = set(self.stop_token_ids)

    def _verify(self) -> None:
        def check(cond: bool, message: str) -> None:
            if not cond:
                raise ValueError(message)

        for name in _FLOAT_FIELDS:
            value = getattr(self, name)
            check(
                _is_real(value) and math.isfinite(value),
                f"{name} must be a finite number, got {value!r}",
            )
        check(_is_int(self.n) and self.n >= 1, f"n must be an int >= 1, got {self.n!r}")
        check(
            -2.0 <= self.presence_penalty <= 2.0,
            f"presence_penalty must be in [-2, 2], got {self.presence_penalty}",
        )
        check(
            -2.0 <= self.frequency_penalty <= 2.0,
            f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}",
        )
        check(
            self.repetition_penalty > 0.0,
            f"repetition_penalty must be > 0, got {self.repetition_penalty}",
        )
        check(self.temperature >= 0.0, f"temperature must be >= 0, got {self.temperature}")
        check(0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}")
        check(
            _is_int(self.top_k) and self.top_k >= 0,
            f"top_k must be an int: -1 or 0 (disabled) or >= 1, got {self.top_k!r}",
        )
        check(0.0 <= self.min_p <= 1.0, f"min_p must be in [0, 1], got {self.min_p}")
        check(
            self.seed is None
            or (_is_int(self.seed) and _SEED_MIN <= self.seed and self.seed + self.n <= _SEED_END),
            f"seed must be None or an int in [-2**63, 2**64 - n], got {self.seed!r}",
        )
        check(
            self.max_tokens is None or (_is_int(self.max_tokens) and self.max_tokens >= 1),
            f"max_tokens must be an int >= 1 or None, got {self.max_tokens!r}",
        )
        check(
            _is_int(self.min_tokens) and self.min_tokens >= 0,
            f"min_tokens must be an int >= 0, got {self.min_tokens!r}",
        )
        check(
            self.max_tokens is None or self.min_tokens <= self.max_tokens,
            f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})",
        )
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            check(
                value is None or (_is_int(value) and value >= 0),
                f"{name} must be an int >= 0 or None, got {value!r}",
            )
        check(
            all(isinstance(s, str) and s for s in self.stop),
            f"stop must be non-empty strings, got {self.stop!r}",
        )
        check(
            all(_is_int(t) and t >= 0 for t in self.stop_token_ids),
            f"stop_token_ids must be non-negative ints, got {self.stop_token_ids!r}",
        )
        check(
            self.logit_bias is None
            or all(
                _is_int(t) and t >= 0 and _is_real(b) and math.isfinite(b)
                for t, b in self.logit_bias.items()
            ),
            f"logit_bias must map token ids (ints >= 0) to finite numbers, got {self.logit_bias!r}",
        )
        check(
            self.allowed_token_ids is None
            or (
                len(self.allowed_token_ids) > 0
                and all(_is_int(t) and t >= 0 for t in self.allowed_token_ids)
            ),
            "allowed_token_ids must be a non-empty list of token ids (ints >= 0), got "
            f"{self.allowed_token_ids!r}",
        )
        check(
            self.detokenize or not self.stop,
            "stop strings need detokenize=True (they are matched on the text)",
        )

    @property
    def sampling_type(self) -> SamplingType:
        if self.temperature == 0.0:
            return SamplingType.GREEDY
        if self.seed is not None:
            return SamplingType.RANDOM_SEED
        return SamplingType.RANDOM

    @property
    def uses_penalties(self) -> bool:
        return (
            self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
            or self.repetition_penalty != 1.0
        )

    def clone(self) -> SamplingParams:
        return copy.deepcopy(self)
