"""Token sampling: the batched sampler, penalties and reported log-probabilities."""

from aphrodite.sampling.logprobs import LogprobsTensors, chosen_logprobs, gather_logprobs
from aphrodite.sampling.sampler import (
    Sampler,
    SamplerOutput,
    SamplingMetadata,
    SamplingRow,
    apply_min_p,
    apply_top_k_top_p,
)

__all__ = [
    "LogprobsTensors",
    "Sampler",
    "SamplerOutput",
    "SamplingMetadata",
    "SamplingRow",
    "apply_min_p",
    "apply_top_k_top_p",
    "chosen_logprobs",
    "gather_logprobs",
]
