"""ModelRunner: executes one scheduler plan (aphrodite._C.SchedulerOutput) on the model.

Per step: encode the images the plan lists (one preprocessing call, one vision-tower batch, one
projector call for all of them), keep their embeddings in the encoder cache keyed by
(request_id, mm_index), embed the step's tokens and overwrite the image-token rows with slices
of cached image embeddings (`plan.mm_embeds`; a prefill chunk may start or end inside an image),
run the decoder over the paged KV cache, and drop the encoder outputs the plan frees.

KV-cache sizing: `determine_num_kv_blocks` (CUDA: from gpu_memory_utilization after profiling a
worst-case step; CPU: from APHRODITE_CPU_KVCACHE_SPACE).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any, Union

import numpy as np
import torch

from aphrodite import ops
from aphrodite.config import ModelConfig
from aphrodite.modeling.llama import AttentionMetadata
from aphrodite.modeling.llava import LlavaForConditionalGeneration
from aphrodite.modeling.weights import iterate_weights
from aphrodite.worker.cuda_graph import DecodeGraphs

# An image as RGB uint8 [H, W, 3], or precomputed image embeddings [num_image_tokens, hidden].
MMInput = Union[np.ndarray, torch.Tensor]

# CPU KV-cache size in GiB when neither the caller nor the environment says otherwise.
DEFAULT_CPU_KVCACHE_SPACE_GIB = 4.0

# Kept free when CUDA graphs are captured, beyond the profiled decode step: the capture stream's
# own cuBLAS workspace and the fragmentation of the graphs' shared pool over many captures.
_GRAPH_MARGIN_BYTES = 64 << 20


class ModelRunner:
    def __init__(self, model_config: ModelConfig) -> None:
        self.model_config = model_config
        self.device = model_config.device
        self.dtype = model_config.dtype
        hf = model_config.hf_config
        self.model = LlavaForConditionalGeneration(
            hf, model_config.max_model_len, self.dtype, self.device
        ).eval()
        self.model.load_weights(iterate_weights(model_config.model))
        self.model.pack_cpu_linears()
        self.encoder_cache: dict[tuple[str, int], torch.Tensor] = {}
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.block_size = 0
        self.graphs: DecodeGraphs | None = None

    # KV cache -----------------------------------------------------------------------------

    def kv_block_bytes(self, block_size: int) -> int:
        """Bytes of K and V for one block over all layers."""
        c = self.model_config
        per_layer = block_size * c.num_kv_heads * c.head_dim * self.dtype.itemsize
        return 2 * c.num_layers * per_layer

    def allocate_kv_cache(self, num_blocks: int, block_size: int) -> None:
        """Per layer K and V [num_blocks, block_size, num_kv_heads, head_dim] in the model dtype.
        Zero-filled so that padding reads (the null block 0) never see NaN bit patterns."""
        if num_blocks < 2:
            raise ValueError(
                f"num_blocks must be at least 2 (block 0 is the null block), got {num_blocks}"
            )
        c = self.model_config
        shape = (num_blocks, block_size, c.num_kv_heads, c.head_dim)
        self.graphs = None  # captured over the previous caches
        self.kv_caches = []
        for _ in range(c.num_layers):
            k = torch.zeros(shape, dtype=self.dtype, device=self.device)
            v = torch.zeros(shape, dtype=self.dtype, device=self.device)
            self.kv_caches.append((k, v))
        self.block_size = block_size

    def capture_cuda_graphs(self, max_num_seqs: int) -> None:
        """Captures the decoder for decode steps of up to ``max_num_seqs`` sequences (CUDA;
        after allocate_kv_cache). Decode-only steps then replay a graph."""
        if self.device.type != "cuda":
            raise RuntimeError("CUDA graphs need a CUDA device")
        if not self.kv_caches:
            raise RuntimeError("allocate_kv_cache() must be called before capture_cuda_graphs()")
        graphs = DecodeGraphs(
            self.model,
            self.kv_caches,
            self.block_size,
            self.model_config.max_model_len,
            max_num_seqs,
        )
        graphs.capture()
        self.graphs = graphs

    # Execution ------------------------------------------------------------------------------

    @torch.inference_mode()
    def execute_model(self, plan: Any, mm_inputs: Callable[[str, int], MMInput]) -> torch.Tensor:
        """Runs one step; returns the final-normed hidden states [plan.num_tokens, hidden]."""
        if not self.kv_caches:
            raise RuntimeError("allocate_kv_cache() must be called before execute_model()")
        # A preempted request is recomputed later with its images encoded afresh; it is not in
        # this step's batch (the core admits nothing in a step that preempts).
        for request_id in getattr(plan, "preempted_request_ids", ()):
            self.drop_request(request_id)
        self._encode(list(plan.encoder_inputs), mm_inputs)
        num_tokens = int(plan.num_tokens)
        hidden_size = self.model_config.hidden_size
        if num_tokens == 0:
            self.free_encoder_outputs(plan.freed_encoder_outputs)
            return torch.empty(0, hidden_size, dtype=self.dtype, device=self.device)

        if self.graphs is not None and self.graphs.can_run(plan):
            hidden = self.graphs.run(plan)
            self.free_encoder_outputs(plan.freed_encoder_outputs)
            return hidden

        input_ids = self._to_device(plan.input_ids, torch.int64)
        positions = self._to_device(plan.positions, torch.int64)
        meta = AttentionMetadata(
            slot_mapping=self._to_device(plan.slot_mapping, torch.int64),
            block_tables=self._to_device(plan.block_tables, torch.int32),
            seq_lens=self._to_device(plan.seq_lens, torch.int32),
            query_start_loc=self._to_device(plan.query_start_loc, torch.int32),
            max_query_len=int(np.diff(plan.query_start_loc).max(initial=0)),
        )
        embeds = self.model.language_model.embed(input_ids)
        for start, request_id, mm_index, offset, length in plan.mm_embeds:
            key = (request_id, int(mm_index))
            cached = self.encoder_cache.get(key)
            if cached is None:
                raise RuntimeError(f"image {key} is scheduled but was never encoded")
            embeds[start : start + length] = cached[offset : offset + length]
        hidden = self.model(embeds, positions, self.kv_caches, meta)
        self.free_encoder_outputs(plan.freed_encoder_outputs)
        return hidden

    @torch.inference_mode()
    def compute_logits(self, hidden_rows: torch.Tensor) -> torch.Tensor:
        """[rows, vocab] float32 logits."""
        return self.model.compute_logits(hidden_rows)

    def drop_request(self, request_id: str) -> None:
        """Forgets every encoder output of the request (finished, aborted or preempted)."""
        for key in [k for k in self.encoder_cache if k[0] == request_id]:
            del self.encoder_cache[key]

    def free_encoder_outputs(self, freed: Any) -> None:
        """Drops the encoder outputs of (request_id, mm_index) pairs (absent ones are skipped)."""
        for request_id, mm_index in freed:
            self.encoder_cache.pop((request_id, int(mm_index)), None)

    def _to_device(self, array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
        # A copy: the plan's arrays are views into buffers the core reuses next step.
        return torch.tensor(np.asarray(array), dtype=dtype, device=self.device)

    def preprocess(self, images: list[np.ndarray]) -> torch.Tensor:
        """RGB uint8 [H, W, 3] images -> pixel values [n, 3, crop_h, crop_w] in the model's
        dtype on its device (one preprocessing op call for the batch)."""
        p = self.model_config.image_processor
        crop_h, crop_w = p["crop_size"]
        out = ops.empty_pixels(len(images), (crop_h, crop_w), self.dtype, self.device)
        return ops.preprocess_images(
            images,
            out,
            p["shortest_edge"],
            (crop_h, crop_w),
            p["mean"],
            p["std"],
            p["rescale_factor"],
            p["do_resize"],
            p["do_center_crop"],
        )

    def _encode(
        self, items: list[tuple[str, int]], mm_inputs: Callable[[str, int], MMInput]
    ) -> None:
        """Encodes the images scheduled this step in one batch and caches their embeddings. An
        image object listed for several keys (the completions of an n > 1 request share their
        prompt's images) is encoded once."""
        c = self.model_config
        image_keys: list[list[tuple[str, int]]] = []  # per image to encode, the keys it serves
        images: list[np.ndarray] = []
        seen: dict[int, int] = {}  # id(item) -> index in images
        for request_id, mm_index in items:
            key = (request_id, int(mm_index))
            item = mm_inputs(request_id, key[1])
            if isinstance(item, torch.Tensor):
                expected = (c.num_image_tokens, c.hidden_size)
                if tuple(item.shape) != expected:
                    raise ValueError(
                        f"image embeddings for {key} have shape {tuple(item.shape)}, "
                        f"expected {expected}"
                    )
                self.encoder_cache[key] = item.to(device=self.device, dtype=self.dtype)
            elif id(item) in seen:
                image_keys[seen[id(item)]].append(key)
            else:
                image = np.asarray(item)
                if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
                    raise ValueError(
                        f"image {key} must be RGB uint8 [H, W, 3], got {image.dtype} {image.shape}"
                    )
                seen[id(item)] = len(images)
                image_keys.append([key])
                images.append(image)
        if not images:
            return
        embeddings = self.model.encode_images(self.preprocess(images))
        for keys, embedding in zip(image_keys, embeddings):
            for key in keys:
                self.encoder_cache[key] = embedding

    # Memory profiling -------------------------------------------------------------------------

    @torch.inference_mode()
    def profile_peak_memory(
        self,
        max_num_batched_tokens: int,
        max_num_seqs: int,
        max_images: int,
        decode_graph_batch: int = 0,
        block_size: int = 16,
    ) -> int:
        """Peak bytes torch allocates on the device (weights included) while running a
        worst-case step: the full token budget spread over the most sequences, `max_images`
        images encoded and merged, and logits for every sequence. With `decode_graph_batch`,
        plus the activations of a decode step of that many sequences (block tables as wide as
        the graphs' for `block_size`): what the CUDA graphs' memory pool keeps once they are
        captured. CUDA only."""
        if self.device.type != "cuda":
            raise RuntimeError("profile_peak_memory needs a CUDA device")
        c = self.model_config
        num_seqs = max(1, min(max_num_seqs, max_num_batched_tokens))
        num_tokens = max_num_batched_tokens
        q_lens = np.full(num_seqs, num_tokens // num_seqs, dtype=np.int32)
        q_lens[: num_tokens % num_seqs] += 1
        query_start_loc = np.zeros(num_seqs + 1, dtype=np.int32)
        np.cumsum(q_lens, out=query_start_loc[1:])
        max_blocks = -(-int(q_lens.max()) // block_size)
        # Images: as many as fit in the token budget are merged; all are encoded.
        crop_h, crop_w = c.image_processor["crop_size"]
        rng = np.random.default_rng(0)
        images = {
            ("profile", i): rng.integers(0, 256, (crop_h, crop_w, 3), dtype=np.uint8)
            for i in range(max_images)
        }
        mm_embeds = []
        start = 0
        for i in range(max_images):
            length = min(c.num_image_tokens, num_tokens - start)
            if length <= 0:
                break
            mm_embeds.append((start, "profile", i, 0, length))
            start += length
        plan = SimpleNamespace(
            num_tokens=num_tokens,
            input_ids=np.zeros(num_tokens, dtype=np.int32),
            positions=np.concatenate([np.arange(n, dtype=np.int64) for n in q_lens]),
            # -1: nothing is written; attention reads the (zeroed) null block only.
            slot_mapping=np.full(num_tokens, -1, dtype=np.int64),
            block_tables=np.zeros((num_seqs, max_blocks), dtype=np.int32),
            seq_lens=q_lens,
            query_start_loc=query_start_loc,
            encoder_inputs=list(images),
            mm_embeds=mm_embeds,
            freed_encoder_outputs=list(images),
        )
        saved = self.kv_caches, self.block_size, self.graphs
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        try:
            self.allocate_kv_cache(2, block_size)
            hidden = self.execute_model(plan, lambda rid, idx: images[(rid, idx)])
            last_rows = torch.as_tensor(query_start_loc[1:] - 1, device=self.device).long()
            logits = self.compute_logits(hidden[last_rows])
            torch.softmax(logits, dim=-1)  # the sampler's largest temporary
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
            del hidden, logits
            if decode_graph_batch > 0:
                peak += self._decode_activation_bytes(decode_graph_batch, block_size)
                peak += _GRAPH_MARGIN_BYTES
        finally:
            self.kv_caches, self.block_size, self.graphs = saved
            torch.cuda.empty_cache()
        return int(peak)

    def _decode_activation_bytes(self, num_seqs: int, block_size: int) -> int:
        """Bytes a decode step of `num_seqs` sequences allocates beyond what is already
        allocated (the profile's KV cache of 2 blocks is in place). The block tables are as wide
        as the graphs' (max_model_len): attention sizes its split-context workspace by that
        width."""
        max_blocks = -(-self.model_config.max_model_len // block_size)
        plan = SimpleNamespace(
            num_tokens=num_seqs,
            input_ids=np.zeros(num_seqs, dtype=np.int32),
            positions=np.zeros(num_seqs, dtype=np.int64),
            slot_mapping=np.full(num_seqs, -1, dtype=np.int64),
            block_tables=np.zeros((num_seqs, max_blocks), dtype=np.int32),
            seq_lens=np.ones(num_seqs, dtype=np.int32),
            query_start_loc=np.arange(num_seqs + 1, dtype=np.int32),
            encoder_inputs=[],
            mm_embeds=[],
            freed_encoder_outputs=[],
        )
        torch.cuda.synchronize(self.device)
        base = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.execute_model(plan, lambda rid, idx: None)
        torch.cuda.synchronize(self.device)
        return max(0, torch.cuda.max_memory_allocated(self.device) - base)


def determine_num_kv_blocks(
    runner: ModelRunner,
    block_size: int,
    *,
    gpu_memory_utilization: float = 0.9,
    max_num_batched_tokens: int = 2048,
    max_num_seqs: int = 256,
    max_images: int = 1,
    cpu_kvcache_space_gib: float | None = None,
    decode_graph_batch: int = 0,
) -> int:
    """How many KV blocks to allocate.

    CUDA: the device's total memory x `gpu_memory_utilization`, minus the peak of a profiled
    worst-case step (`profile_peak_memory`) and minus memory outside torch's allocator (CUDA
    context, other processes) and the memory CUDA graphs of decode steps of up to
    `decode_graph_batch` sequences will keep (0: none are captured), divided by `kv_block_bytes`.
    CPU: `cpu_kvcache_space_gib`, else the environment variable APHRODITE_CPU_KVCACHE_SPACE
    (GiB, default 4), divided by `kv_block_bytes`.
    """
    block_bytes = runner.kv_block_bytes(block_size)
    if runner.device.type == "cuda":
        if not 0 < gpu_memory_utilization <= 1:
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}"
            )
        peak = runner.profile_peak_memory(
            max_num_batched_tokens, max_num_seqs, max_images, decode_graph_batch, block_size
        )
        free, total = torch.cuda.mem_get_info(runner.device)
        outside_torch = max(0, (total - free) - torch.cuda.memory_reserved(runner.device))
        available = int(total * gpu_memory_utilization) - peak - outside_torch
        where = (
            f"gpu_memory_utilization={gpu_memory_utilization} of {total / 2**30:.1f} GiB, "
            f"step peak {peak / 2**30:.2f} GiB, outside torch {outside_torch / 2**30:.2f} GiB"
        )
    else:
        if cpu_kvcache_space_gib is None:
            env = os.environ.get("APHRODITE_CPU_KVCACHE_SPACE")
            cpu_kvcache_space_gib = float(env) if env else DEFAULT_CPU_KVCACHE_SPACE_GIB
        if cpu_kvcache_space_gib <= 0:
            raise ValueError(
                f"the CPU KV-cache space must be positive, got {cpu_kvcache_space_gib}"
            )
        available = int(cpu_kvcache_space_gib * 2**30)
        where = f"CPU KV-cache space {cpu_kvcache_space_gib} GiB (APHRODITE_CPU_KVCACHE_SPACE)"
    num_blocks = available // block_bytes
    if num_blocks < 2:
        raise ValueError(
            f"no room for a KV cache ({where}; one block of {block_size} tokens takes "
            f"{block_bytes} bytes)"
        )
    return int(num_blocks)
