"""Shared fixtures: the devices every op test runs on (CPU always, CUDA when usable)."""

from __future__ import annotations

import pytest

from aphrodite import _C
from aphrodite.testing import build_tiny_llava


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


@pytest.fixture(scope="module")
def tiny64(tmp_path_factory):
    """A tiny LLaVA with head_dim 64: a size the CUDA attention kernels take (for tests on a
    GPU)."""
    return build_tiny_llava(
        tmp_path_factory.mktemp("tiny64") / "ckpt",
        hidden_size=128,
        intermediate_size=256,
        num_attention_heads=2,
        num_key_value_heads=1,
        vision_hidden_size=64,
        vision_intermediate_size=128,
        vision_num_attention_heads=1,
        seed=7,
    )
