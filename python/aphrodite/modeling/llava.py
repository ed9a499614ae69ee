"""LLaVA-1.5: CLIP vision tower -> multimodal projector -> Llama decoder, with our own modules.

`encode_images` turns preprocessed pixels into one row of text-space embeddings per image token;
the runner merges those rows into the token embeddings at the image-token positions and runs the
decoder (`language_model`) over the paged KV cache.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from aphrodite import ops
from aphrodite.config import PROJECTOR_ACTIVATIONS, LlavaConfig
from aphrodite.modeling.clip import CLIPVisionTower
from aphrodite.modeling.layers import Linear, empty_param, own_cuda_gemm
from aphrodite.modeling.llama import AttentionMetadata, LlamaModel

logger = logging.getLogger(__name__)

_VISION_LAYER = re.compile(r"^vision_tower\.encoder\.layers\.(\d+)\.")
# Checkpoint tensors the model has no use for.
_UNUSED = re.compile(r"(rotary_emb\.inv_freq|^vision_tower\.post_layernorm\.|position_ids$)")


class LlavaMultiModalProjector(nn.Module):
    """linear_1 -> GELU -> linear_2 through `ops.llava_projector`.

    The op computes in float32 on the CPU (and float16/bfloat16 on CUDA), so a CPU model in a
    16-bit dtype keeps float32 copies of the projector weights (made once, after loading) and
    casts the result back to the model dtype.
    """

    def __init__(self, in_features: int, hidden: int, bias: bool, act: str, dtype, device) -> None:
        super().__init__()
        self.linear_1 = Linear(in_features, hidden, bias, dtype, device)
        self.linear_2 = Linear(hidden, hidden, bias, dtype, device)
        self.activation = PROJECTOR_ACTIVATIONS[act]
        self.compute_dtype = torch.float32 if torch.device(device).type == "cpu" else dtype
        self._op_weights: tuple[torch.Tensor, ...] | None = None

    def op_weights(self) -> tuple[torch.Tensor, ...]:
        """(w1, b1, w2, b2) in the op's dtype; missing biases (multimodal_projector_bias=False)
        become zeros, since the op always adds one."""
        if self._op_weights is None:
            weights = []
            for linear in (self.linear_1, self.linear_2):
                w = linear.weight
                b = linear.bias if linear.bias is not None else w.new_zeros(w.shape[0])
                weights += [w.to(self.compute_dtype), b.to(self.compute_dtype)]
            self._op_weights = tuple(weights)
        return self._op_weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w1, b1, w2, b2 = self.op_weights()
        out = ops.llava_projector(
            x.to(self.compute_dtype), w1, b1, w2, b2, activation=self.activation
        )
        return out.to(x.dtype)


class LlavaForConditionalGeneration(nn.Module):
    def __init__(
        self, config: LlavaConfig, max_positions: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        super().__init__()
        self.config = config
        self.feature_layers = config.resolved_feature_layers()
        self.vision_tower = CLIPVisionTower(
            config.vision, config.vision_layers_needed, dtype, device
        )
        text_hidden = config.text.hidden_size
        self.multi_modal_projector = LlavaMultiModalProjector(
            config.vision.hidden_size * len(self.feature_layers),
            text_hidden,
            config.multimodal_projector_bias,
            config.projector_hidden_act,
            dtype,
            device,
        )
        self.language_model = LlamaModel(config.text, max_positions, dtype, device)
        if config.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = nn.Module()
            self.lm_head.weight = empty_param(
                config.text.vocab_size, text_hidden, dtype=dtype, device=device
            )

        # The LM head packed for ops.linear (see pack_cpu_linears).
        self._lm_head_packed: ops.PackedLinearWeight | None = None

    @property
    def lm_head_weight(self) -> torch.Tensor:
        if self.lm_head is None:
            return self.language_model.embed_tokens.weight
        return self.lm_head.weight

    def pack_cpu_linears(self) -> None:
        """After loading, on CPU in float32: moves the decoder's projections (qkv, o, fused
        gate/up as SwiGLU, down), the LM head and the vision tower's projections into the core
        GEMM's packed layout. Measured against torch's CPU ``F.linear`` (BENCHMARKS.md, "CPU
        linear") it is on par at 1 row (a decode step of one sequence is bound by streaming
        the weights either way) and ahead from 4 rows up per core, so no layer falls back to
        torch. The torch copies are freed, except the embedding matrix, which a tied LM head
        shares with the token lookup."""
        head = self.lm_head_weight
        if head.device.type != "cpu" or head.dtype != torch.float32:
            return
        for layer in self.language_model.layers:
            layer.self_attn.pack()
            layer.mlp.pack()
        for layer in self.vision_tower.encoder.layers:
            layer.self_attn.pack()
            layer.mlp.pack()
        self._lm_head_packed = ops.pack_linear_weight(head)
        if self.lm_head is not None:
            self.lm_head.weight = None

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [n, 3, size, size] -> embeddings [n, num_image_tokens, text_hidden]."""
        states = self.vision_tower(pixel_values, self.feature_layers)
        if self.config.vision_feature_select_strategy == "default":
            states = [s[:, 1:] for s in states]  # drop CLS
        features = states[0] if len(states) == 1 else torch.cat(states, dim=-1)
        n, t, d = features.shape
        return self.multi_modal_projector(features.reshape(n * t, d)).view(n, t, -1)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        return self.language_model(inputs_embeds, positions, kv_caches, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self._lm_head_packed is not None:
            return ops.linear(hidden, self._lm_head_packed)
        if hidden.is_cuda and own_cuda_gemm():
            return ops.linear(hidden, self.lm_head_weight).float()
        return F.linear(hidden, self.lm_head_weight).float()

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copies checkpoint tensors (canonical names, see modeling.weights) into the parameters,
        converting dtype and device on the way; fails on a missing, unknown or misshapen tensor."""
        modules = dict(self.named_modules())
        params = dict(self.named_parameters())
        # Checkpoint name -> (parameter, first row) for tensors stacked into fused projections.
        stacked: dict[str, tuple[nn.Parameter, int]] = {}
        for module_name, module in modules.items():
            if isinstance(module, Linear) and module.shards:
                row = 0
                for shard, rows in module.shards.items():
                    hf = _shard_name(module_name, shard)
                    stacked[f"{hf}.weight"] = (module.weight, row)
                    if module.bias is not None:
                        stacked[f"{hf}.bias"] = (module.bias, row)
                    row += rows
        loaded: set[str] = set()
        filled_rows: dict[int, int] = {}
        stored_head_with_tie_flag = False
        num_vision_layers = len(self.vision_tower.encoder.layers)
        for name, tensor in weights:
            if _UNUSED.search(name):
                continue
            m = _VISION_LAYER.match(name)
            if m and int(m.group(1)) >= num_vision_layers:
                continue  # past the deepest selected hidden state
            if name == "lm_head.weight" and self.lm_head is None:
                # The config ties the head to the embeddings, yet the checkpoint has its own:
                # HF then uses the stored head unless it equals the embeddings (checked once
                # both are loaded), and so do we.
                embedding = self.language_model.embed_tokens.weight
                self.lm_head = nn.Module()
                self.lm_head.weight = empty_param(
                    *embedding.shape, dtype=embedding.dtype, device=embedding.device
                )
                params = dict(self.named_parameters())
                stored_head_with_tie_flag = True
            if name in stacked:
                param, row = stacked[name]
                target = param[row : row + tensor.shape[0]]
                filled_rows[id(param)] = filled_rows.get(id(param), 0) + tensor.shape[0]
            elif name in params:
                target = params[name]
                loaded.add(name)
            else:
                raise ValueError(f"unexpected tensor {name!r} in the checkpoint")
            if target.shape != tensor.shape:
                raise ValueError(
                    f"tensor {name!r} has shape {tuple(tensor.shape)}, "
                    f"expected {tuple(target.shape)}"
                )
            target.copy_(tensor)
        missing = [
            name
            for name, p in params.items()
            if name not in loaded and filled_rows.get(id(p), 0) != p.shape[0]
        ]
        if missing:
            raise ValueError(f"tensors missing from the checkpoint: {missing}")
        if stored_head_with_tie_flag:
            if torch.equal(self.lm_head.weight, self.language_model.embed_tokens.weight):
                self.lm_head = None  # tied after all: one matrix serves both
            else:
                logger.warning(
                    "the config ties the LM head to the word embeddings, but the checkpoint "
                    "stores a different lm_head.weight: using the stored head, as transformers "
                    "does (set tie_word_embeddings=false to silence this)"
                )
        self.multi_modal_projector._op_weights = None


def _shard_name(module_name: str, shard: str) -> str:
    """The checkpoint name of one shard of a fused projection: `…self_attn.qkv_proj` + `q_proj`
    -> `…self_attn.q_proj`."""
    return f"{module_name.rsplit('.', 1)[0]}.{shard}"
