"""reshape_and_cache and paged_attention against a float64 reference written here: torch's
scaled_dot_product_attention over each sequence's context gathered from the tensors the test
generated (not from the cache the op under test wrote)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import case_generator

from aphrodite import ops

HEAD_SIZES = [64, 80, 96, 112, 128, 256]
# (num_heads, num_kv_heads): GQA ratios 1, 4 and 8.
HEAD_LAYOUTS = [(4, 4), (8, 2), (16, 2)]
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def default_dtype(device: str) -> torch.dtype:
    return torch.float32 if device == "cpu" else torch.bfloat16


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    """Every element within tol * (|ref| + max|ref|): relative error against the output's scale."""
    out64 = out.to("cpu", torch.float64)
    assert torch.isfinite(out64).all(), "output holds non-finite values (poison not overwritten?)"
    tol = TOLERANCE[dtype]
    scale = ref.abs().max().item()
    err = (out64 - ref).abs()
    bound = tol * (ref.abs() + scale)
    worst = (err / bound).max().item()
    assert worst <= 1.0, (
        f"max error {err.max().item():.3g} exceeds {tol} relative (ratio {worst:.3g})"
    )


class Batch:
    """A mixed batch: random cache contents for each sequence's earlier context, this step's
    query/key/value, block tables over a shuffled block pool, and the float64 truth."""

    def __init__(
        self,
        gen: torch.Generator,
        device: str,
        dtype: torch.dtype,
        num_heads: int,
        num_kv_heads: int,
        head_size: int,
        block_size: int,
        q_lens: list[int],
        seq_lens: list[int],
        pad_tokens: int = 0,
        fused_qkv: bool = False,
    ) -> None:
        assert all(s >= q for q, s in zip(q_lens, seq_lens))
        self.device, self.dtype = device, dtype
        self.num_heads, self.num_kv_heads, self.head_size = num_heads, num_kv_heads, head_size
        self.q_lens, self.seq_lens = q_lens, seq_lens
        blocks_per_seq = [math.ceil(s / block_size) for s in seq_lens]
        max_blocks = max(blocks_per_seq + [1]) + 1  # a spare column: padding the op must ignore
        num_blocks = sum(blocks_per_seq) + 3  # block 0 stays unused, as a null block would be
        pool = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()
        self.block_tables = torch.full((len(seq_lens), max_blocks), -1, dtype=torch.int32)
        for s, n in enumerate(blocks_per_seq):
            self.block_tables[s, :n] = torch.tensor([pool.pop() for _ in range(n)])

        def rnd(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, generator=gen).to(dtype)

        cache_shape = (num_blocks, block_size, num_kv_heads, head_size)
        self.key_cache = rnd(*cache_shape)
        self.value_cache = rnd(*cache_shape)
        # Full context of each sequence (earlier tokens and this step's), as the test knows it.
        self.keys = [rnd(s, num_kv_heads, head_size) for s in seq_lens]
        self.values = [rnd(s, num_kv_heads, head_size) for s in seq_lens]
        slots = []
        for s, (q, n) in enumerate(zip(q_lens, seq_lens)):
            pos = torch.arange(n)
            slot = self.block_tables[s, pos // block_size].long() * block_size + pos % block_size
            cached = slot[: n - q]
            self.key_cache.view(-1, num_kv_heads, head_size)[cached] = self.keys[s][: n - q]
            self.value_cache.view(-1, num_kv_heads, head_size)[cached] = self.values[s][: n - q]
            slots.append(slot[n - q :])
        # Padding tokens (slot -1) are spread through the step's tokens for reshape_and_cache.
        step_k = torch.cat([k[n - q :] for k, q, n in zip(self.keys, q_lens, seq_lens)])
        step_v = torch.cat([v[n - q :] for v, q, n in zip(self.values, q_lens, seq_lens)])
        step_slots = torch.cat(slots)
        for _ in range(pad_tokens):
            at = int(torch.randint(0, step_slots.numel() + 1, (1,), generator=gen))
            step_k = torch.cat([step_k[:at], rnd(1, num_kv_heads, head_size), step_k[at:]])
            step_v = torch.cat([step_v[:at], rnd(1, num_kv_heads, head_size), step_v[at:]])
            step_slots = torch.cat([step_slots[:at], torch.tensor([-1]), step_slots[at:]])
        self.step_key, self.step_value, self.slot_mapping = step_k, step_v, step_slots

        num_tokens = sum(q_lens)
        width = num_heads * head_size
        if fused_qkv:
            # query as a slice of a fused QKV projection: strided in the token dimension.
            qkv = rnd(num_tokens, width + 2 * num_kv_heads * head_size)
            self.query = qkv[:, :width].view(num_tokens, num_heads, head_size)
        else:
            self.query = rnd(num_tokens, num_heads, head_size)
        self.query_start_loc = torch.tensor(
            [0] + list(torch.tensor(q_lens).cumsum(0)), dtype=torch.int32
        )
        self.seq_lens_t = torch.tensor(seq_lens, dtype=torch.int32)

    def to_device(self) -> None:
        d = self.device
        for name in (
            "block_tables",
            "key_cache",
            "value_cache",
            "step_key",
            "step_value",
            "slot_mapping",
            "query",
            "query_start_loc",
            "seq_lens_t",
        ):
            setattr(self, name, getattr(self, name).to(d))

    def reference(self, scale: float, sliding_window: int) -> torch.Tensor:
        group = self.num_heads // self.num_kv_heads
        outs = []
        q_all = self.query.to("cpu", torch.float64)
        start = 0
        for k, v, q_len, n in zip(self.keys, self.values, self.q_lens, self.seq_lens):
            q = q_all[start : start + q_len].transpose(0, 1)  # [heads, q_len, D]
            start += q_len
            kk = k.double().repeat_interleave(group, dim=1).transpose(0, 1)
            vv = v.double().repeat_interleave(group, dim=1).transpose(0, 1)
            qpos = torch.arange(n - q_len, n)[:, None]
            kpos = torch.arange(n)[None, :]
            mask = kpos <= qpos
            if sliding_window > 0:
                mask &= kpos > qpos - sliding_window
            o = F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask, scale=scale)
            outs.append(o.transpose(0, 1))
        return torch.cat(outs)


def run_case(
    device: str,
    gen: torch.Generator,
    dtype: torch.dtype,
    num_heads: int,
    num_kv_heads: int,
    head_size: int,
    block_size: int,
    q_lens: list[int],
    seq_lens: list[int],
    sliding_window: int = 0,
    pad_tokens: int = 0,
    fused_qkv: bool = False,
    strided_out: bool = False,
    hint_max_query_len: bool = False,
) -> None:
    """One paged_attention call checked against the reference; with ``hint_max_query_len`` the
    call is told the batch's longest query (on CUDA the kernels for longer ones are skipped)."""
    b = Batch(
        gen,
        device,
        dtype,
        num_heads,
        num_kv_heads,
        head_size,
        block_size,
        q_lens,
        seq_lens,
        pad_tokens,
        fused_qkv,
    )
    b.to_device()
    ops.reshape_and_cache(b.step_key, b.step_value, b.key_cache, b.value_cache, b.slot_mapping)
    num_tokens = sum(q_lens)
    if strided_out:
        big = torch.empty(num_tokens, num_heads * head_size + 24, dtype=dtype, device=device)
        out = big[:, : num_heads * head_size].view(num_tokens, num_heads, head_size)
    else:
        out = torch.empty(num_tokens, num_heads, head_size, dtype=dtype, device=device)
    out.fill_(float("nan"))
    scale = float(torch.empty(1).uniform_(0.5, 1.5, generator=gen)) / math.sqrt(head_size)
    ops.paged_attention(
        out,
        b.query,
        b.key_cache,
        b.value_cache,
        b.block_tables,
        b.seq_lens_t,
        b.query_start_loc,
        scale,
        sliding_window,
        max_query_len=max(q_lens) if hint_max_query_len else 0,
    )
    assert_close(out, b.reference(scale, sliding_window), dtype)


def random_composition(
    gen: torch.Generator, num_seqs: int, max_ctx: int
) -> tuple[list[int], list[int]]:
    """Decode tokens, prefill chunks over a cached prefix and whole prompts, mixed."""
    q_lens, seq_lens = [], []
    for _ in range(num_seqs):
        kind = int(torch.randint(0, 3, (1,), generator=gen))
        n = int(torch.randint(1, max_ctx + 1, (1,), generator=gen))
        if kind == 0:
            q = 1
        elif kind == 1:
            q = int(torch.randint(1, min(n, 40) + 1, (1,), generator=gen))
        else:
            q = n
        q_lens.append(q)
        seq_lens.append(n)
    return q_lens, seq_lens


@pytest.mark.parametrize("head_size", HEAD_SIZES)
@pytest.mark.parametrize("num_heads,num_kv_heads", HEAD_LAYOUTS)
def test_paged_attention_mixed_batch(
    device: str, head_size: int, num_heads: int, num_kv_heads: int
) -> None:
    gen = case_generator(1000 * head_size + 10 * num_heads + num_kv_heads)
    for hint in (False, True):
        q_lens, seq_lens = random_composition(gen, num_seqs=5, max_ctx=150)
        block_size = [8, 16, 32][int(torch.randint(0, 3, (1,), generator=gen))]
        run_case(
            device,
            gen,
            default_dtype(device),
            num_heads,
            num_kv_heads,
            head_size,
            block_size,
            q_lens,
            seq_lens,
            pad_tokens=2,
            hint_max_query_len=hint,
        )


@pytest.mark.parametrize("block_size", [8, 16, 32])
@pytest.mark.parametrize("sliding_window", [1, 7, 50])
def test_paged_attention_sliding_window(device: str, block_size: int, sliding_window: int) -> None:
    gen = case_generator(block_size * 100 + sliding_window)
    q_lens, seq_lens = random_composition(gen, num_seqs=4, max_ctx=130)
    run_case(
        device,
        gen,
        default_dtype(device),
        8,
        2,
        64,
        block_size,
        q_lens,
        seq_lens,
        sliding_window=sliding_window,
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_size", [64, 128])
def test_paged_attention_half_dtypes(device: str, dtype: torch.dtype, head_size: int) -> None:
    gen = case_generator(7 + head_size)
    q_lens, seq_lens = random_composition(gen, num_seqs=4, max_ctx=100)
    run_case(device, gen, dtype, 8, 1, head_size, 16, q_lens, seq_lens, sliding_window=0)


# (num_heads, num_kv_heads) covering every CUDA decode tiling: on tensor cores (head sizes up to
# 128) groups of up to 16 heads in one block, 32 in two full blocks and 20 in a full and a
# partial one; for head size 256 groups 1, 2, 4 and 8 (one block per group), 6 (three blocks of
# 2 heads) and 3 (three blocks of 1 head).
DECODE_LAYOUTS = [(4, 4), (8, 4), (8, 2), (16, 2), (24, 4), (12, 4), (32, 1), (40, 2)]


@pytest.mark.parametrize("num_heads,num_kv_heads", DECODE_LAYOUTS)
@pytest.mark.parametrize("head_size", [64, 80, 128, 256])
def test_paged_attention_decode_batch(
    device: str, head_size: int, num_heads: int, num_kv_heads: int
) -> None:
    """Single-token sequences only, contexts from 1 key to a few thousand (off every block, tile
    and split boundary); on CUDA the decode kernel with the context split and merged, alone (the
    call is told max_query_len 1, as the engine's decode steps are)."""
    gen = case_generator(head_size * 100 + num_heads * 10 + num_kv_heads)
    seq_lens = [1, 2, 17, 300, 1029, 2100]
    block_size = [8, 16, 32][(head_size + num_heads) % 3]
    run_case(
        device,
        gen,
        default_dtype(device),
        num_heads,
        num_kv_heads,
        head_size,
        block_size,
        [1] * len(seq_lens),
        seq_lens,
        hint_max_query_len=True,
    )


@pytest.mark.parametrize("sliding_window", [1, 5, 700])
@pytest.mark.parametrize("num_heads,num_kv_heads,head_size", [(32, 8, 128), (8, 1, 64)])
def test_paged_attention_decode_sliding_window(
    device: str, sliding_window: int, num_heads: int, num_kv_heads: int, head_size: int
) -> None:
    gen = case_generator(sliding_window + num_heads)
    seq_lens = [1, 6, 700, 701, 1500]
    run_case(
        device,
        gen,
        default_dtype(device),
        num_heads,
        num_kv_heads,
        head_size,
        16,
        [1] * len(seq_lens),
        seq_lens,
        sliding_window=sliding_window,
    )


def test_paged_attention_many_decode_sequences(device: str) -> None:
    """Enough sequences and kv heads that CUDA does not split the context (>= 16 blocks per SM
    of a 132-SM device without splitting): each decode block writes `out` itself."""
    gen = case_generator(11)
    seq_lens = torch.randint(1, 150, (40,), generator=gen).tolist()
    run_case(device, gen, default_dtype(device), 64, 64, 64, 16, [1] * len(seq_lens), seq_lens)


@pytest.mark.parametrize("head_size", HEAD_SIZES)
@pytest.mark.parametrize("num_heads,num_kv_heads", HEAD_LAYOUTS)
def test_paged_attention_prefill_tiles(
    device: str, head_size: int, num_heads: int, num_kv_heads: int
) -> None:
    """Prefill chunks of >= 64 tokens (on CUDA the tensor-core kernel for head sizes <= 128): a
    whole prompt of exactly one 64-token tile, chunks over a cached prefix whose lengths fall off
    the query-tile and key-tile grids, and a decode token in the same batch."""
    gen = case_generator(head_size * 10 + num_heads + num_kv_heads)
    block_size = [8, 16, 32][head_size % 3]
    sliding_window = 37 if head_size % 32 == 0 else 0
    run_case(
        device,
        gen,
        default_dtype(device),
        num_heads,
        num_kv_heads,
        head_size,
        block_size,
        [64, 130, 77, 1],
        [64, 200, 141, 90],
        sliding_window=sliding_window,
        hint_max_query_len=head_size % 64 == 0,
    )


def test_paged_attention_long_decode(device: str) -> None:
    """Long contexts with few sequences: the case CUDA splits across thread blocks."""
    gen = case_generator(3)
    run_case(device, gen, default_dtype(device), 32, 8, 128, 16, [1, 1, 3], [3000, 1777, 2500])


def test_paged_attention_long_prefill(device: str) -> None:
    gen = case_generator(4)
    run_case(
        device, gen, default_dtype(device), 4, 1, 128, 16, [300, 1], [300, 700], sliding_window=0
    )


@pytest.mark.parametrize("sliding_window", [0, 150])
def test_paged_attention_long_prefill_chunks(device: str, sliding_window: int) -> None:
    """Prefill chunks spanning several 128-token tensor-core windows, over cached prefixes whose
    lengths fall off every tile grid, next to a whole prompt and a decode token: on CUDA the
    warps of a window skip the key tiles past their causal limit or before their window."""
    gen = case_generator(5 + sliding_window)
    run_case(
        device,
        gen,
        default_dtype(device),
        8,
        2,
        128,
        16,
        [700, 260, 1, 97],
        [901, 260, 400, 350],
        sliding_window=sliding_window,
    )


def test_paged_attention_three_prefills_in_one_window(device: str) -> None:
    """Tensor-core prefill sequences of 64 to 70 tokens: on CUDA one 128-token window holds the
    end of one, a whole one and the start of a third, computed one after the other."""
    gen = case_generator(6)
    run_case(device, gen, default_dtype(device), 8, 2, 64, 16, [70, 64, 64, 64], [70, 100, 64, 80])


def test_paged_attention_strided_query_and_out(device: str) -> None:
    gen = case_generator(5)
    q_lens, seq_lens = random_composition(gen, num_seqs=5, max_ctx=90)
    run_case(
        device,
        gen,
        default_dtype(device),
        8,
        2,
        96,
        16,
        q_lens,
        seq_lens,
        fused_qkv=True,
        strided_out=True,
    )


def test_paged_attention_sequence_without_tokens(device: str) -> None:
    gen = case_generator(6)
    run_case(device, gen, default_dtype(device), 4, 2, 64, 16, [3, 0, 1], [20, 33, 17])


def test_reshape_and_cache_writes_only_mapped_slots(device: str) -> None:
    gen = case_generator(8)
    dtype = default_dtype(device)
    num_blocks, block_size, kv_heads, head_size, tokens = 6, 16, 2, 80, 40
    for index_dtype in (torch.int64, torch.int32):
        cache_k = torch.randn(num_blocks, block_size, kv_heads, head_size, generator=gen).to(dtype)
        cache_v = torch.randn(num_blocks, block_size, kv_heads, head_size, generator=gen).to(dtype)
        slots = torch.randperm(num_blocks * block_size, generator=gen)[:tokens]
        slots[::5] = -1
        # key/value as slices of a fused QKV output: strided tokens.
        kv = torch.randn(tokens, 3, kv_heads, head_size, generator=gen).to(dtype)
        key, value = kv[:, 1], kv[:, 2]
        expect_k, expect_v = cache_k.clone(), cache_v.clone()
        keep = slots >= 0
        expect_k.view(-1, kv_heads, head_size)[slots[keep]] = key[keep]
        expect_v.view(-1, kv_heads, head_size)[slots[keep]] = value[keep]
        dk, dv = cache_k.to(device), cache_v.to(device)
        ops.reshape_and_cache(
            key.to(device), value.to(device), dk, dv, slots.to(device, index_dtype)
        )
        assert torch.equal(dk.cpu(), expect_k)
        assert torch.equal(dv.cpu(), expect_v)


def small_args(device: str, dtype: torch.dtype | None = None) -> dict:
    dtype = dtype or default_dtype(device)
    return dict(
        out=torch.empty(2, 4, 64, dtype=dtype, device=device),
        query=torch.randn(2, 4, 64).to(dtype).to(device),
        key_cache=torch.zeros(4, 16, 2, 64, dtype=dtype, device=device),
        value_cache=torch.zeros(4, 16, 2, 64, dtype=dtype, device=device),
        block_tables=torch.tensor([[1, 2]], dtype=torch.int32, device=device),
        seq_lens=torch.tensor([20], dtype=torch.int32, device=device),
        query_start_loc=torch.tensor([0, 2], dtype=torch.int32, device=device),
        scale=0.125,
    )


def test_paged_attention_rejects_bad_arguments(device: str) -> None:
    args = small_args(device)
    ops.paged_attention(**args)
    with pytest.raises(TypeError, match="block_tables"):
        ops.paged_attention(**{**args, "block_tables": args["block_tables"].long()})
    with pytest.raises(ValueError, match="multiple of the cache's kv heads"):
        ops.paged_attention(**{**args, "query": torch.randn(2, 3, 64).to(args["query"])})
    with pytest.raises(ValueError, match="query_start_loc"):
        ops.paged_attention(**{**args, "query_start_loc": args["query_start_loc"][:1]})
    with pytest.raises(ValueError, match="block_size"):
        bad = torch.zeros(4, 12, 2, 64, dtype=args["key_cache"].dtype, device=device)
        ops.paged_attention(**{**args, "key_cache": bad, "value_cache": bad})
    with pytest.raises(ValueError, match="dense"):
        ops.paged_attention(
            **{**args, "query": args["query"].transpose(0, 1).contiguous().transpose(0, 1)}
        )
    with pytest.raises(ValueError, match="sliding_window"):
        ops.paged_attention(**args, sliding_window=-1)
    with pytest.raises(ValueError, match="max_query_len must be >= 0"):
        ops.paged_attention(**args, max_query_len=-1)
    with pytest.raises(TypeError, match="out"):
        ops.paged_attention(
            **{**args, "out": args["out"].float() if device != "cpu" else args["out"].half()}
        )


def test_paged_attention_cpu_checks_metadata() -> None:
    args = small_args("cpu")
    with pytest.raises(ValueError, match="not a block of the cache"):
        ops.paged_attention(**{**args, "block_tables": torch.tensor([[1, 9]], dtype=torch.int32)})
    with pytest.raises(ValueError, match="below the sequence's query length"):
        ops.paged_attention(**{**args, "seq_lens": torch.tensor([1], dtype=torch.int32)})
    with pytest.raises(ValueError, match="more blocks than block_tables"):
        ops.paged_attention(**{**args, "seq_lens": torch.tensor([40], dtype=torch.int32)})
    with pytest.raises(ValueError, match="more than max_query_len = 1"):
        ops.paged_attention(**args, max_query_len=1)
    ops.paged_attention(**args, max_query_len=2)
    with pytest.raises(ValueError, match="slot_mapping"):
        k = torch.randn(2, 2, 64)
        ops.reshape_and_cache(k, k, args["key_cache"], args["value_cache"], torch.tensor([0, 64]))


def test_cuda_rejects_float32_and_unsupported_head_sizes(device: str) -> None:
    """The CUDA kernels are instantiated for float16/bfloat16 and the listed head sizes only; the
    CPU accepts float32 and any multiple of 8."""
    if device == "cpu":
        args = small_args(device, torch.float32)
        ops.paged_attention(**args)
        return
    with pytest.raises(TypeError, match="key_cache"):
        ops.paged_attention(**small_args(device, torch.float32))
    args = small_args(device)
    odd = {k: v for k, v in args.items()}
    odd["query"] = torch.zeros(2, 4, 72, dtype=args["query"].dtype, device=device)
    odd["out"] = torch.zeros_like(odd["query"])
    odd["key_cache"] = torch.zeros(4, 16, 2, 72, dtype=args["query"].dtype, device=device)
    odd["value_cache"] = odd["key_cache"].clone()
    with pytest.raises(ValueError, match="head sizes"):
        ops.paged_attention(**odd)


def test_paged_attention_cuda_graph_replay() -> None:
    """Captured once, replayed on new query values: the split-context path (workspace from
    torch's allocator, merge kernel) runs inside the graph with no host work."""
    from conftest import CUDA_USABLE

    if not CUDA_USABLE:
        pytest.skip("no usable CUDA device")
    gen = case_generator(9)
    b = Batch(gen, "cuda", torch.bfloat16, 32, 8, 128, 16, [1, 1, 2], [3000, 1777, 2500])
    b.to_device()
    ops.reshape_and_cache(b.step_key, b.step_value, b.key_cache, b.value_cache, b.slot_mapping)
    out = torch.empty_like(b.query)
    scale = 1 / math.sqrt(128)

    def step() -> None:
        ops.paged_attention(
            out,
            b.query,
            b.key_cache,
            b.value_cache,
            b.block_tables,
            b.seq_lens_t,
            b.query_start_loc,
            scale,
        )

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm-up outside the capture, as torch recommends
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for _ in range(2):
        b.query.copy_(torch.randn(b.query.shape, generator=gen).to(b.query))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert_close(out, b.reference(scale, 0), torch.bfloat16)
