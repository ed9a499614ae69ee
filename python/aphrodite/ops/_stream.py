"""The CUDA stream handle an op must run on."""

from __future__ import annotations

import torch


def stream_of(t: torch.Tensor) -> int:
    """The current torch stream of ``t``'s device as an integer handle (0 for CPU tensors)."""
    if t.is_cuda:
        return int(torch.cuda.current_stream(t.device).cuda_stream)
    return 0
