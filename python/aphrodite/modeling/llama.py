"""The Llama decoder over a paged KV cache (LLaVA-1.5's language model).

One forward pass serves a whole scheduler step: a flat batch of tokens from many sequences
(prefill chunks and decode tokens mixed). Each layer writes the step's keys/values into the
paged cache with `ops.reshape_and_cache` and attends with `ops.paged_attention`, which reads
each sequence's whole context (cached prefix + this step's tokens) through its block table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from aphrodite import ops
from aphrodite.config import RopeConfig, TextConfig
from aphrodite.modeling.layers import Linear, RMSNorm, empty_param


@dataclass
class AttentionMetadata:
    """The step's paged-attention inputs, on the model's device (see ENGINE_API.md)."""

    slot_mapping: torch.Tensor  # int64 [num_tokens]
    block_tables: torch.Tensor  # int32 [num_seqs, max_blocks_per_seq]
    seq_lens: torch.Tensor  # int32 [num_seqs]
    query_start_loc: torch.Tensor  # int32 [num_seqs + 1]
    max_query_len: int = 0  # the longest sequence's query tokens (0: unknown)


def rope_inverse_frequencies(head_dim: int, rope: RopeConfig) -> torch.Tensor:
    """float32 [head_dim / 2], computed with the same operations as transformers so that the
    angles agree bit for bit."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float) / head_dim
    inv_freq = 1.0 / (rope.theta**exponents)
    if rope.rope_type == "linear":
        return inv_freq / rope.factor
    if rope.rope_type == "llama3":
        old_len = rope.original_max_position_embeddings
        low_freq_wavelen = old_len / rope.low_freq_factor
        high_freq_wavelen = old_len / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (old_len / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
        return torch.where(medium, smoothed, scaled)
    return inv_freq


class RotaryEmbedding(nn.Module):
    """cos/sin tables for every position up to max_positions (float32, on the device); looked up
    per token and cast to the activations' dtype before use, as HF does, by
    ``ops.rotary_embedding``, which rotates q and k in place. The angles and their cos/sin are
    computed on the device, as HF computes them in each forward (a CPU cos differs from a GPU's
    in the last bit of some float32 values)."""

    def __init__(self, head_dim: int, rope: RopeConfig, max_positions: int, device: torch.device):
        super().__init__()
        inv_freq = rope_inverse_frequencies(head_dim, rope).to(device)
        positions = torch.arange(max_positions, dtype=torch.float, device=device)
        freqs = positions[:, None] * inv_freq[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotates q ``[tokens, heads, head_dim]`` and k in place; returns them."""
        ops.rotary_embedding(positions, q, k, self.cos, self.sin)
        return q, k


class LlamaAttention(nn.Module):
    def __init__(self, cfg: TextConfig, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        q_size = self.num_heads * self.head_dim
        kv_size = self.num_kv_heads * self.head_dim
        self.q_size, self.kv_size = q_size, kv_size
        self.qkv_proj = Linear(
            cfg.hidden_size,
            q_size + 2 * kv_size,
            cfg.attention_bias,
            dtype,
            device,
            shards={"q_proj": q_size, "k_proj": kv_size, "v_proj": kv_size},
        )
        self.o_proj = Linear(q_size, cfg.hidden_size, cfg.attention_bias, dtype, device)
        self.scale = self.head_dim**-0.5
        self.sliding_window = cfg.sliding_window

    def pack(self) -> None:
        self.qkv_proj.pack()
        self.o_proj.pack()

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        rotary: RotaryEmbedding,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        q, k = rotary(positions, q, k)
        key_cache, value_cache = kv_cache
        ops.reshape_and_cache(k, v, key_cache, value_cache, meta.slot_mapping)
        out = torch.empty_like(q)
        ops.paged_attention(
            out,
            q,
            key_cache,
            value_cache,
            meta.block_tables,
            meta.seq_lens,
            meta.query_start_loc,
            self.scale,
            sliding_window=self.sliding_window,
            max_query_len=meta.max_query_len,
        )
        return self.o_proj(out.view(t, self.q_size))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: TextConfig, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        i = cfg.intermediate_size
        self.intermediate_size = i
        self.gate_up_proj = Linear(
            cfg.hidden_size,
            2 * i,
            cfg.mlp_bias,
            dtype,
            device,
            shards={"gate_proj": i, "up_proj": i},
        )
        self.down_proj = Linear(i, cfg.hidden_size, cfg.mlp_bias, dtype, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.gate_up_proj.swiglu(x))

    def pack(self) -> None:
        self.gate_up_proj.pack(gated=True)
        self.down_proj.pack()


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.self_attn = LlamaAttention(cfg, dtype, device)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.mlp = LlamaMLP(cfg, dtype, device)

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        positions: torch.Tensor,
        rotary: RotaryEmbedding,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """HF's ``x + attn(norm(x))`` then ``+ mlp(norm(.))``, with each residual add fused into
        the norm after it (vLLM's layout): takes and returns (this block's output, the residual
        stream before it is added); the first layer gets ``residual=None``. ``x`` and
        ``residual`` are updated in place."""
        if residual is None:
            residual = x
            h = self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm.add_and_norm(x, residual)
        h = self.self_attn(h, positions, rotary, kv_cache, meta)
        h, residual = self.post_attention_layernorm.add_and_norm(h, residual)
        return self.mlp(h), residual


class LlamaModel(nn.Module):
    """Token embeddings, the decoder layers and the final norm (no LM head)."""

    def __init__(
        self, cfg: TextConfig, max_positions: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        super().__init__()
        self.embed_tokens = nn.Module()
        self.embed_tokens.weight = empty_param(
            cfg.vocab_size, cfg.hidden_size, dtype=dtype, device=device
        )
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(cfg, dtype, device) for _ in range(cfg.num_hidden_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope, max_positions, device)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.embed_tokens.weight)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """The final norm's output ``[tokens, hidden]``. ``inputs_embeds`` becomes the residual
        stream and is overwritten."""
        if len(kv_caches) != len(self.layers):
            raise ValueError(f"{len(kv_caches)} KV caches for {len(self.layers)} layers")
        x, residual = inputs_embeds, None
        for layer, kv_cache in zip(self.layers, kv_caches):
            x, residual = layer(x, residual, positions, self.rotary, kv_cache, meta)
        if residual is None:  # no layers
            return self.norm(x)
        return self.norm.add_and_norm(x, residual)[0]
