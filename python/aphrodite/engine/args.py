"""Engine arguments: the model, the scheduler limits and the KV-cache size."""

from __future__ import annotations

import math
from dataclasses import dataclass

DEFAULT_MAX_NUM_BATCHED_TOKENS = 2048
SUPPORTED_BLOCK_SIZES = (8, 16, 32)


@dataclass
class EngineArgs:
    """Arguments of LLMEngine (and LLM, which forwards its keyword arguments here).

    Args:
        model: a local checkpoint folder or a Hugging Face hub id (from the local HF cache).
        tokenizer: tokenizer folder or id when it differs from model.
        revision: hub revision.
        dtype: "auto" (the checkpoint's; float32 on CPU when it is float16), "float16",
            "bfloat16" or "float32".
        device: "auto" (CUDA when available), "cuda", "cuda:N" or "cpu".
        seed: seeds the sampler's generator for requests without their own seed.
        max_model_len: context length (prompt + output); default: the model's.
        max_num_seqs: the most sequences in one step.
        max_num_batched_tokens: the token budget of one step (default 2048; with chunked
            prefill disabled at least max_model_len).
        block_size: tokens per KV-cache block: 8, 16 or 32.
        enable_prefix_caching: reuse the KV blocks of identical prompt prefixes (images
            included, by content hash).
        enable_chunked_prefill: split long prompts over several steps.
        gpu_memory_utilization: on CUDA, the fraction of the device memory the engine may use;
            the KV cache gets what a worst-case step leaves of it.
        kv_cache_memory_gb: on CPU, the KV-cache size in GiB (default: env
            APHRODITE_CPU_KVCACHE_SPACE, else 4).
        num_kv_blocks: a fixed number of KV-cache blocks instead of the two rules above.
        limit_mm_per_prompt: the most items per modality in one prompt, e.g. {"image": 2}
            (default: one image).
        max_logprobs: the largest `logprobs` / `prompt_logprobs` a request may ask for.
        enforce_eager: on CUDA, run decode steps op by op instead of replaying CUDA graphs
            captured at start-up (for debugging, or to skip the capture's seconds).
    """

    model: str
    tokenizer: str | None = None
    revision: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    seed: int | None = 0  # None: no seed (the sampler's generator is seeded from entropy)
    max_model_len: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    block_size: int = 16
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    gpu_memory_utilization: float = 0.9
    kv_cache_memory_gb: float | None = None
    num_kv_blocks: int | None = None
    limit_mm_per_prompt: dict[str, int] | None = None
    max_logprobs: int = 20
    enforce_eager: bool = False

    def __post_init__(self) -> None:
        # Types first, so that a wrong one is named here instead of failing deep in loading.
        for name in ("seed", "max_model_len", "max_num_seqs", "max_num_batched_tokens",
                     "block_size", "num_kv_blocks", "max_logprobs"):
            value = getattr(self, name)
            optional = name not in ("max_num_seqs", "block_size", "max_logprobs")
            if (value is None and optional) or (
                isinstance(value, int) and not isinstance(value, bool)
            ):
                continue
            raise TypeError(
                f"{name} must be an int{' or None' if optional else ''}, got {value!r}"
            )
        for name in ("gpu_memory_utilization", "kv_cache_memory_gb"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, (int, float))
            ):
                raise TypeError(f"{name} must be a number, got {value!r}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")
        if self.max_logprobs < 0:
            raise ValueError(f"max_logprobs must be >= 0, got {self.max_logprobs}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.block_size not in SUPPORTED_BLOCK_SIZES:
            raise ValueError(
                f"block_size must be one of {SUPPORTED_BLOCK_SIZES} (what paged attention "
                f"supports), got {self.block_size}"
            )
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )
        if self.kv_cache_memory_gb is not None and self.kv_cache_memory_gb <= 0:
            raise ValueError(f"kv_cache_memory_gb must be > 0, got {self.kv_cache_memory_gb}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 2:
            raise ValueError(f"num_kv_blocks must be >= 2, got {self.num_kv_blocks}")
        limits = self.limit_mm_per_prompt or {}
        unknown = set(limits) - {"image"}
        if unknown:
            raise ValueError(f"limit_mm_per_prompt: unsupported modalities {sorted(unknown)}")
        if any(not isinstance(v, int) or isinstance(v, bool) or v < 0 for v in limits.values()):
            raise ValueError(f"limit_mm_per_prompt values must be ints >= 0, got {limits}")
        self.limit_mm_per_prompt = {"image": 1, **limits}

    def resolve_max_num_batched_tokens(self, max_model_len: int) -> int:
        value = self.max_num_batched_tokens
        if value is None:
            value = DEFAULT_MAX_NUM_BATCHED_TOKENS
            if not self.enable_chunked_prefill:
                value = max(value, max_model_len)
            value = max(value, self.max_num_seqs)
        if value < self.max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens ({value}) must be >= max_num_seqs ({self.max_num_seqs})"
            )
        if not self.enable_chunked_prefill and value < max_model_len:
            raise ValueError(
                f"without chunked prefill max_num_batched_tokens ({value}) must be >= "
                f"max_model_len ({max_model_len}) so that every prompt fits in one step"
            )
        return value

    def max_useful_blocks(self, max_model_len: int) -> int:
        """Blocks beyond this can never be used at once (every sequence at full length), plus
        the reserved null block."""
        return self.max_num_seqs * math.ceil(max_model_len / self.block_size) + 1
