"""The CLIP vision tower, evaluated only up to the deepest hidden state LLaVA selects.

Images are a fixed-size batch of patches, so the tower's attention is plain (unpaged) SDPA over
all patches of each image; there is no KV cache on this side.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from aphrodite.config import VisionConfig
from aphrodite.modeling.layers import LayerNorm, Linear, empty_param

# HF's activation names -> the activation Linear applies in fc1's epilogue.
_ACTIVATIONS = {
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "quick_gelu": "quick_gelu",
}


def _activation(name: str) -> str:
    if name not in _ACTIVATIONS:
        raise ValueError(f"unsupported CLIP activation {name!r}")
    return _ACTIVATIONS[name]


class CLIPEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        d, p = cfg.hidden_size, cfg.patch_size
        self.patch_size = p
        self.image_size = cfg.image_size
        self.class_embedding = empty_param(d, dtype=dtype, device=device)
        self.patch_embedding = nn.Module()
        self.patch_embedding.weight = empty_param(
            d, cfg.num_channels, p, p, dtype=dtype, device=device
        )
        self.position_embedding = nn.Module()
        self.position_embedding.weight = empty_param(
            cfg.num_patches + 1, d, dtype=dtype, device=device
        )

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        n, _, h, w = pixel_values.shape
        if (h, w) != (self.image_size, self.image_size):
            raise ValueError(
                f"pixel_values are {h}x{w}, the vision tower takes "
                f"{self.image_size}x{self.image_size}"
            )
        weight = self.patch_embedding.weight
        patches = F.conv2d(pixel_values.to(weight.dtype), weight, stride=self.patch_size)
        patches = patches.flatten(2).transpose(1, 2)  # [n, num_patches, d]
        cls = self.class_embedding.expand(n, 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight


class CLIPAttention(nn.Module):
    def __init__(self, cfg: VisionConfig, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.head_dim = d // self.num_heads
        self.qkv_proj = Linear(
            d, 3 * d, True, dtype, device, shards={"q_proj": d, "k_proj": d, "v_proj": d}
        )
        self.out_proj = Linear(d, d, True, dtype, device)

    def pack(self) -> None:
        self.qkv_proj.pack()
        self.out_proj.pack()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        qkv = self.qkv_proj(x).view(n, t, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], scale=self.head_dim**-0.5)
        return self.out_proj(out.transpose(1, 2).reshape(n, t, d))


class CLIPMLP(nn.Module):
    def __init__(self, cfg: VisionConfig, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.fc1 = Linear(cfg.hidden_size, cfg.intermediate_size, True, dtype, device)
        self.fc2 = Linear(cfg.intermediate_size, cfg.hidden_size, True, dtype, device)
        self.fc1_activation = _activation(cfg.hidden_act)

    def pack(self) -> None:
        self.fc1.pack()
        self.fc2.pack()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x, self.fc1_activation))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, cfg: VisionConfig, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.layer_norm1 = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, dtype, device)
        self.self_attn = CLIPAttention(cfg, dtype, device)
        self.layer_norm2 = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, dtype, device)
        self.mlp = CLIPMLP(cfg, dtype, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPVisionTower(nn.Module):
    """CLIP's embeddings, pre-layernorm and the first ``num_layers`` encoder layers (the ones
    after the deepest selected hidden state are never loaded; post_layernorm is unused by LLaVA)."""

    def __init__(
        self, cfg: VisionConfig, num_layers: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        super().__init__()
        self.embeddings = CLIPEmbeddings(cfg, dtype, device)
        self.pre_layrnorm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, dtype, device)
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(
            CLIPEncoderLayer(cfg, dtype, device) for _ in range(num_layers)
        )

    def forward(
        self, pixel_values: torch.Tensor, hidden_state_indices: list[int]
    ) -> list[torch.Tensor]:
        """The hidden states at ``hidden_state_indices`` (0 = the pre-normed embeddings, i = the
        output of encoder layer i, as in HF's ``hidden_states``), each [n, 1 + patches, d]."""
        wanted = set(hidden_state_indices)
        x = self.pre_layrnorm(self.embeddings(pixel_values))
        states = {0: x} if 0 in wanted else {}
        for i, layer in enumerate(self.encoder.layers, start=1):
            x = layer(x)
            if i in wanted:
                states[i] = x
        return [states[i] for i in hidden_state_indices]
