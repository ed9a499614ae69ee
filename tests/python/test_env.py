"""The build report (`python -m aphrodite.env`, aphrodite.env_info) tells the truth."""

from __future__ import annotations

import subprocess
import sys

import pytest

import aphrodite
from aphrodite import _C


def test_version_matches_package_metadata() -> None:
    from importlib.metadata import version

    assert aphrodite.__version__ == version("aphrodite")


def test_env_info_reports_backends() -> None:
    info = aphrodite.env_info()
    names = [b["name"] for b in info["backends"]]
    assert names == ["cpu", "cuda"]
    cpu, cuda = info["backends"]
    assert cpu["compiled"] and cpu["devices"]
    assert cuda["compiled"] == _C.cuda_compiled() == info["cuda_compiled"]
    if cuda["compiled"]:
        assert cuda["archs"], "a CUDA build must report its architectures"
    else:
        assert not cuda["devices"]


def test_env_module_prints_report() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "aphrodite.env"], check=True, capture_output=True, text=True
    )
    assert out.stdout.startswith(f"aphrodite {aphrodite.__version__}")
    assert ("cuda: compiled" in out.stdout) == _C.cuda_compiled()
    assert "RuntimeWarning" not in out.stderr


def test_cuda_device_without_gpu_raises_clear_error() -> None:
    has_cuda_device = any(b["name"] == "cuda" and b["devices"] for b in _C.backends_info())
    if has_cuda_device:
        _C.require_device("cuda:0")
        with pytest.raises(RuntimeError, match="cannot use cuda:99"):
            _C.require_device("cuda:99")
    else:
        with pytest.raises(RuntimeError, match="(?i)cuda"):
            _C.require_device("cuda")
        with pytest.raises(RuntimeError, match="(?i)cuda"):
            _C.empty([4], device="cuda")


def test_thread_count_can_be_changed() -> None:
    n = _C.num_threads()
    assert n >= 1
    _C.set_num_threads(1)
    assert _C.num_threads() == 1
    _C.set_num_threads(n)
    with pytest.raises(ValueError, match=">= 1"):
        _C.set_num_threads(0)
