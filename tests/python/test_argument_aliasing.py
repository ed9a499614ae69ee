"""Inputs found by fuzzing the ops and the engine core's bindings that crashed the process or
gave wrong results silently: each is now a clear TypeError/ValueError (or works)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from aphrodite import _C, ops


def test_linear_refuses_a_bias_inside_its_output() -> None:
    x, w = torch.randn(64, 32), torch.randn(48, 32)
    out = torch.randn(64, 48)
    with pytest.raises(ValueError, match="out and bias must not overlap"):
        ops.linear(x, w, out[63], out=out)


def test_layer_ops_refuse_overlapping_in_place_arguments() -> None:
    qkv = torch.randn(5, (4 + 2 + 2) * 16)
    q = qkv[:, : 4 * 16].view(5, 4, 16)
    k = qkv[:, 4 * 16 : 6 * 16].view(5, 2, 16)
    positions = torch.arange(5)
    cos, sin = torch.randn(8, 16), torch.randn(8, 16)
    # Slices of one fused QKV buffer are fine (their rows interleave, their elements do not).
    ops.rotary_embedding(positions, q, k, cos, sin)
    with pytest.raises(ValueError, match="query and key must not overlap"):
        ops.rotary_embedding(positions, q, q[:, :2], cos, sin)
    x = torch.randn(6, 32)
    with pytest.raises(ValueError, match="x and residual must not overlap"):
        buf = torch.randn(7, 32)
        ops.fused_add_rms_norm(buf[:6], buf[1:], torch.ones(32), 1e-6)
    with pytest.raises(ValueError, match="out and weight must not overlap"):
        ops.rms_norm(x, x[0], 1e-6, out=x)
    ops.rms_norm(x, torch.ones(32), 1e-6, out=x)  # exactly in place: fine


def test_reshape_and_cache_refuses_keys_inside_the_cache() -> None:
    cache = torch.zeros(4, 16, 2, 64)
    other = torch.zeros(4, 16, 2, 64)
    key = cache[0, :3]  # [3, 2, 64], a view into the cache itself
    with pytest.raises(ValueError, match="key_cache and key must not overlap"):
        ops.reshape_and_cache(key, key.clone(), cache, other, torch.tensor([20, 21, 22]))


def test_paged_attention_needs_heads() -> None:
    cache = torch.zeros(4, 16, 2, 64)
    meta = dict(
        block_tables=torch.tensor([[1]], dtype=torch.int32),
        seq_lens=torch.tensor([1], dtype=torch.int32),
        query_start_loc=torch.tensor([0, 1], dtype=torch.int32),
        scale=0.125,
    )
    with pytest.raises(ValueError, match="at least one head"):
        q = torch.empty(1, 0, 64)
        ops.paged_attention(torch.empty(1, 0, 64), q, cache, cache.clone(), **meta)
    no_heads = torch.as_strided(torch.empty(0), (4, 16, 0, 64), (0, 0, 64, 1))
    with pytest.raises(ValueError, match="at least one kv head"):
        ops.paged_attention(
            torch.empty(1, 4, 64), torch.randn(1, 4, 64), no_heads, no_heads, **meta
        )


def test_paged_attention_takes_numpy_caches() -> None:
    rng = np.random.default_rng(0)
    kc = rng.standard_normal((4, 16, 2, 64), dtype=np.float32)
    vc = rng.standard_normal((4, 16, 2, 64), dtype=np.float32)
    q = torch.randn(1, 4, 64)
    meta = dict(
        block_tables=torch.tensor([[1]], dtype=torch.int32),
        seq_lens=torch.tensor([5], dtype=torch.int32),
        query_start_loc=torch.tensor([0, 1], dtype=torch.int32),
        scale=0.125,
    )
    got, want = torch.empty(1, 4, 64), torch.empty(1, 4, 64)
    ops.paged_attention(got, q, kc, vc, **meta)
    ops.paged_attention(want, q, torch.from_numpy(kc), torch.from_numpy(vc), **meta)
    assert torch.equal(got, want)


def test_engine_config_bounds_keep_block_tables_sane() -> None:
    for kwargs, words in [
        (dict(block_size=2**31 - 1, max_model_len=2**31 - 1), "block_size must be in"),
        (dict(max_model_len=2**31 - 1), "max_model_len must be in"),
    ]:
        with pytest.raises(ValueError, match=words):
            _C.EngineCore(
                _C.EngineConfig(num_blocks=4, max_num_seqs=1, max_num_batched_tokens=16, **kwargs)
            )


def _core() -> _C.EngineCore:
    return _C.EngineCore(
        _C.EngineConfig(
            num_blocks=16,
            block_size=16,
            max_model_len=64,
            max_num_seqs=4,
            max_num_batched_tokens=64,
        )
    )


def test_token_ids_are_checked_not_converted() -> None:
    core = _core()
    for bad, error, words in [
        (np.array([2**40 + 3]), ValueError, "out of range"),
        ([1.9, 2.0], TypeError, "must hold integers"),
        (np.array([True, False]), TypeError, "must hold integers"),
        (["1", "2"], TypeError, "must hold integers"),
        ([-1, 5], ValueError, "out of range"),
    ]:
        with pytest.raises(error, match=words):
            core.add_request("a", bad, max_tokens=2)
    core.add_request("a", np.array([3, 4], dtype=np.uint16), max_tokens=2, eos_token_id=2)
    core.schedule()
    with pytest.raises(ValueError, match="out of range"):
        core.update(np.array([2**32 + 2]))


def test_plan_arrays_are_read_only_views() -> None:
    core = _core()
    core.add_request("a", [5, 6, 7], max_tokens=2)
    plan = core.schedule()
    for name in (
        "input_ids",
        "positions",
        "slot_mapping",
        "block_tables",
        "seq_lens",
        "query_start_loc",
        "num_computed_tokens",
        "logits_indices",
    ):
        array = getattr(plan, name)
        assert not array.flags.writeable, name
        with pytest.raises(ValueError, match="read-only"):
            array[...] = 0
    core.update([9])
    core.check_consistency()


def test_image_size_checks_refuse_what_the_op_cannot_take() -> None:
    with pytest.raises(ValueError, match="crop size must be positive"):
        ops.check_image_size(10, 10, 8, (0, 0))
    with pytest.raises(ValueError, match="overflows"):
        _C.ops.shortest_edge_resize_size(2**62, 3, 7)


def test_layer_op_wrappers_name_shape_errors() -> None:
    with pytest.raises(ValueError, match="at least one dimension"):
        ops.rms_norm(torch.tensor(1.0), torch.randn(1), 1e-6)
    with pytest.raises(ValueError, match="even last dimension"):
        ops.silu_and_mul(torch.randn(5, 1))
    assert ops.rms_norm(torch.randn(5, 0), torch.randn(0), 1e-6).shape == (5, 0)
    assert ops.silu_and_mul(torch.randn(3, 0)).shape == (3, 0)


@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512"])
@pytest.mark.parametrize("q_len", [1, 12])  # decode rows and transposed prefill rows
def test_nan_in_the_cache_reaches_the_output_as_in_torch(isa: str, q_len: int) -> None:
    previous = ops.linear_cpu_isa()
    try:
        ops.set_linear_cpu_isa(isa)
    except ValueError:
        pytest.skip(f"{isa} kernels do not run on this CPU")
    try:
        torch.manual_seed(0)
        kc, vc = torch.randn(4, 16, 2, 64), torch.randn(4, 16, 2, 64)
        kc[1, 3, 0, 5] = float("nan")  # sequence 0's key 3, kv head 0
        seq_lens = torch.tensor([20, 20], dtype=torch.int32)
        qsl = torch.tensor([0, q_len, 2 * q_len], dtype=torch.int32)
        tables = torch.tensor([[1, 2], [3, 0]], dtype=torch.int32)
        q = torch.randn(2 * q_len, 4, 64)
        out = torch.full((2 * q_len, 4, 64), 7.0)
        ops.paged_attention(out, q, kc, vc, tables, seq_lens, qsl, 0.125)
        # Sequence 0's heads of kv head 0 (heads 0, 1) see the NaN key: NaN like SDPA's output.
        assert torch.isnan(out[:q_len, :2]).all()
        assert torch.isfinite(out[:q_len, 2:]).all() and torch.isfinite(out[q_len:]).all()
        # A NaN through a fused GELU epilogue stays NaN (column 0's bias), the rest is finite.
        bias = torch.tensor([float("nan"), 0.0, 0.0, 0.0])
        y = ops.linear(torch.randn(3, 4), torch.eye(4), bias, activation="gelu")
        assert torch.isnan(y[:, 0]).all() and torch.isfinite(y[:, 1:]).all()
    finally:
        ops.set_linear_cpu_isa(previous)


def test_out_of_range_ints_are_named() -> None:
    args = dict(
        block_tables=torch.tensor([[1]], dtype=torch.int32),
        seq_lens=torch.tensor([1], dtype=torch.int32),
        query_start_loc=torch.tensor([0, 1], dtype=torch.int32),
        scale=0.125,
    )
    cache = torch.zeros(4, 16, 2, 64)
    with pytest.raises(ValueError, match="max_query_len must fit in int32"):
        ops.paged_attention(
            torch.empty(1, 4, 64),
            torch.randn(1, 4, 64),
            cache,
            cache.clone(),
            **args,
            max_query_len=2**40,
        )
