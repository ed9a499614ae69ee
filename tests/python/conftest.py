"""Shared fixtures: the devices every op test runs on (CPU always, CUDA when usable)."""

from __future__ import annotations

import os

import pytest
import torch

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

# The kernel tests draw fresh random inputs on every run; APHRODITE_TEST_SEED=<the seed printed
# in the report header> draws a run's inputs again.
TEST_SEED = int(os.environ.get("APHRODITE_TEST_SEED") or int.from_bytes(os.urandom(4), "little"))


def case_generator(key: int) -> torch.Generator:
    """A generator for one test case: this run's seed combined with the case's own key, so that
    cases differ from each other and from run to run."""
    return torch.Generator().manual_seed((TEST_SEED * 1_000_003 + key) % 2**63)


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    if exitstatus not in (0, 5):
        terminalreporter.write_line(f"random inputs of this run: APHRODITE_TEST_SEED={TEST_SEED}")


def pytest_report_header(config: pytest.Config) -> str:
    return (
        f"aphrodite {_C.__version__}: testing on devices {DEVICES}; "
        f"random inputs: APHRODITE_TEST_SEED={TEST_SEED}"
    )


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
