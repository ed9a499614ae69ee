"""The DLPack bridge: zero-copy import from torch and numpy, export of core-owned buffers, and
every rejection path with its message."""

from __future__ import annotations

import gc
import sys

import numpy as np
import pytest
import torch

from aphrodite import _C

DTYPES = [
    (torch.float32, "float32"),
    (torch.float16, "float16"),
    (torch.bfloat16, "bfloat16"),
    (torch.int32, "int32"),
    (torch.int64, "int64"),
    (torch.uint8, "uint8"),
]


@pytest.mark.parametrize("torch_dtype,name", DTYPES)
def test_torch_round_trip_dtypes(device: str, torch_dtype: torch.dtype, name: str) -> None:
    t = torch.zeros(3, 5, 7, dtype=torch_dtype, device=device)
    info = _C.tensor_info(t)
    assert info["dtype"] == name
    assert info["device"] == ("cpu" if device == "cpu" else "cuda:0")
    assert info["shape"] == (3, 5, 7)
    assert info["strides"] == (35, 7, 1)
    assert info["data_ptr"] == t.data_ptr()
    assert info["contiguous"]


def test_torch_sliced_view_keeps_strides_and_offset(device: str) -> None:
    base = torch.arange(4 * 6 * 8, dtype=torch.float32, device=device).reshape(4, 6, 8)
    view = base[1:3, ::2, 3:]
    info = _C.tensor_info(view)
    assert info["shape"] == tuple(view.shape) == (2, 3, 5)
    assert info["strides"] == tuple(view.stride()) == (48, 16, 1)
    # The view's first element, not the base's: the byte offset is applied.
    assert info["data_ptr"] == view.data_ptr() == base.data_ptr() + (48 + 3) * 4
    assert not info["contiguous"]


def test_transposed_view_reports_strides() -> None:
    t = torch.randn(4, 9).t()
    info = _C.tensor_info(t)
    assert info["shape"] == (9, 4)
    assert info["strides"] == (1, 9)
    assert not info["contiguous"]


@pytest.mark.parametrize(
    "np_dtype,name",
    [(np.float32, "float32"), (np.float16, "float16"), (np.int32, "int32"), (np.int64, "int64"),
     (np.uint8, "uint8")],
)
def test_numpy_round_trip(np_dtype: type, name: str) -> None:
    a = np.arange(2 * 3 * 4).astype(np_dtype).reshape(2, 3, 4)[:, 1:, ::2]
    info = _C.tensor_info(a)
    assert info["dtype"] == name
    assert info["device"] == "cpu"
    assert info["shape"] == a.shape
    assert info["strides"] == tuple(s // a.itemsize for s in a.strides)
    assert info["data_ptr"] == a.__array_interface__["data"][0]


def test_zero_size_and_scalar_tensors() -> None:
    assert _C.tensor_info(torch.empty(0, 4))["shape"] == (0, 4)
    assert _C.tensor_info(torch.tensor(3.0))["shape"] == ()


def test_import_releases_the_producer() -> None:
    # numpy's DLPack capsule holds a reference to the array until its deleter runs: if our
    # import did not call the deleter, the reference count would grow with every call.
    a = np.ones((16, 16), dtype=np.float32)
    before = sys.getrefcount(a)
    for _ in range(100):
        _C.tensor_info(a)
        with pytest.raises(TypeError):
            _C.check_tensor(a, "x", dtypes=["int32"])
    gc.collect()
    assert sys.getrefcount(a) == before


def test_raw_capsule_is_accepted_once() -> None:
    t = torch.arange(6, dtype=torch.int64)
    capsule = t.__dlpack__()
    assert _C.tensor_info(capsule)["shape"] == (6,)
    with pytest.raises(ValueError, match="unused 'dltensor' capsule"):
        _C.tensor_info(capsule)


def test_rejects_read_only_output() -> None:
    a = np.zeros(4, dtype=np.float32)
    a.flags.writeable = False
    assert _C.check_tensor(a, "x")["shape"] == (4,)  # reading is fine
    with pytest.raises(ValueError, match="'out' is read-only"):
        _C.check_tensor(a, "out", writable=True)


def test_legacy_capsule_export_for_old_consumers() -> None:
    core = _C.empty([3], dtype="int64")
    assert _C.tensor_info(core.__dlpack__())["shape"] == (3,)
    assert _C.tensor_info(core.__dlpack__(max_version=(1, 0)))["shape"] == (3,)


def test_rejects_non_tensor() -> None:
    with pytest.raises(TypeError, match=r"'query' must be a tensor .*got list"):
        _C.check_tensor([1, 2, 3], "query")


def test_rejects_unsupported_dtype() -> None:
    with pytest.raises(TypeError, match=r"'mask' has unsupported dtype bool8"):
        _C.check_tensor(torch.zeros(3, dtype=torch.bool), "mask")
    with pytest.raises(TypeError, match=r"'x' has unsupported dtype float64"):
        _C.check_tensor(torch.zeros(3, dtype=torch.float64), "x")


def test_rejects_wrong_dtype_naming_argument() -> None:
    with pytest.raises(TypeError, match=r"'slot_mapping' must have dtype int32 or int64, got "
                                        r"float32\[4\] on cpu"):
        _C.check_tensor(torch.zeros(4), "slot_mapping", dtypes=["int32", "int64"])


def test_rejects_wrong_shape() -> None:
    with pytest.raises(ValueError, match=r"'key' must have shape \[\*, 8, 64\], got "
                                         r"float32\[5, 4, 64\] on cpu"):
        _C.check_tensor(torch.zeros(5, 4, 64), "key", shape=[-1, 8, 64])
    with pytest.raises(ValueError, match=r"'key' must have shape \[\*, 8\]"):
        _C.check_tensor(torch.zeros(5, 8, 1), "key", shape=[-1, 8])


def test_rejects_non_contiguous() -> None:
    t = torch.zeros(8, 8)[:, ::2]
    with pytest.raises(ValueError, match=r"'cache' must be contiguous, got float32\[8, 4\] "
                                         r"\(strides \[8, 2\]\) on cpu"):
        _C.check_tensor(t, "cache", contiguous=True)


def test_rejects_wrong_device() -> None:
    with pytest.raises(ValueError, match=r"'out' must be on cuda:0, got float32\[2\] on cpu"):
        _C.check_tensor(torch.zeros(2), "out", device="cuda:0")


def test_rejects_bad_dtype_and_device_names() -> None:
    with pytest.raises(TypeError, match="unsupported dtype 'complex64'"):
        _C.empty([2], dtype="complex64")
    with pytest.raises(ValueError, match="invalid device 'tpu'"):
        _C.empty([2], device="tpu")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int64", "uint8"])
def test_export_core_buffer_to_torch(device: str, dtype: str) -> None:
    start = _C.live_buffers()
    core = _C.empty([4, 3], dtype=dtype, device=device)
    assert core.shape == (4, 3) and core.dtype == dtype
    t = torch.from_dlpack(core)
    assert t.shape == (4, 3)
    assert str(t.dtype) == f"torch.{dtype}"
    assert t.device.type == device
    assert t.data_ptr() == core.data_ptr
    t.fill_(7)
    # Write through one view, read through another: the memory is shared.
    again = torch.from_dlpack(core)
    assert torch.all(again == 7)
    del core, again
    gc.collect()
    assert _C.live_buffers() == start + 1  # the torch tensor keeps the buffer alive
    del t
    gc.collect()
    assert _C.live_buffers() == start


def test_export_core_buffer_to_numpy() -> None:
    start = _C.live_buffers()
    core = _C.empty([2, 5], dtype="int32")
    a = np.from_dlpack(core)
    a[:] = np.arange(10, dtype=np.int32).reshape(2, 5)
    assert core.data_ptr == a.__array_interface__["data"][0]
    b = np.from_dlpack(core)
    np.testing.assert_array_equal(b, a)
    del core, a, b
    gc.collect()
    assert _C.live_buffers() == start


def test_unconsumed_export_capsule_frees_buffer() -> None:
    start = _C.live_buffers()
    core = _C.empty([8])
    capsule = core.__dlpack__()
    del core
    gc.collect()
    assert _C.live_buffers() == start + 1
    del capsule
    gc.collect()
    assert _C.live_buffers() == start


def test_export_refuses_copy_request() -> None:
    core = _C.empty([2])
    with pytest.raises(BufferError):
        core.__dlpack__(copy=True)
