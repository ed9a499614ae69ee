"""What every op wrapper hands to ``aphrodite._C.ops``: the stream to run on, and its tensors."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.dlpack import to_dlpack


def stream_of(t: Any) -> int:
    """The current torch stream of ``t``'s device as an integer handle (0 for CPU tensors and
    for anything that is not a torch tensor, e.g. numpy arrays)."""
    if isinstance(t, torch.Tensor) and t.is_cuda:
        return int(torch.cuda.current_stream(t.device).cuda_stream)
    return 0


def int32_arg(value: Any, name: str) -> int:
    """``value`` as an int the core's int32 parameters take; a clear ValueError otherwise (the
    bindings' own error would list every argument, tensors included)."""
    as_int = int(value)
    if not -(2**31) <= as_int < 2**31:
        raise ValueError(f"{name} must fit in int32, got {as_int}")
    return as_int


def capsule(t: Any) -> Any:
    """A torch tensor as a DLPack capsule made in C (about 0.3 us) instead of through
    ``Tensor.__dlpack__`` (2-3 us on the CPU; on CUDA it also builds stream objects to compare
    the current stream with the default one). A decode step hands over hundreds of tensors.
    Skipping ``__dlpack__``'s stream handshake is safe because every op runs on the stream it is
    given, the current one, on which the tensors were produced. Anything else is passed through
    for the core to import or to reject with its own message."""
    return to_dlpack(t) if isinstance(t, torch.Tensor) else t


def optional_capsule(t: Any) -> Any:
    """:func:`capsule`, keeping None."""
    return None if t is None else capsule(t)
