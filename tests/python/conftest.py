"""Shared fixtures: the devices every op test runs on (CPU always, CUDA when usable)."""

from __future__ import annotations

import pytest

from aphrodite import _C


def _cuda_usable() -> bool:
    if not _C.cuda_compiled():
        return False
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available() and any(
        b["name"] == "cuda" and b["devices"] for b in _C.backends_info()
    )


CUDA_USABLE = _cuda_usable()
DEVICES = ["cpu"] + (["cuda"] if CUDA_USABLE else [])


def pytest_report_header(config: pytest.Config) -> str:
    return f"aphrodite {_C.__version__}: testing on devices {DEVICES}"


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> str:
    return request.param
