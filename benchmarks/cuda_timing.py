"""Device time per call of a CUDA op, the same way for ours and for the peer.

Calls are queued behind a spinning kernel (``torch.cuda._sleep``, as nvbench's blocking kernel):
while the device spins, the host enqueues every call, so the events around them see the
kernels run back to back and time the device's work alone, not the host's Python, argument
checks and launches. Without that, a side whose calls cost the host more than their kernels
take (small shapes; torch's three launches per projector against our one) is timed by its
host. A sample whose enqueueing outlasted the spin is retried with a longer spin.
"""

from __future__ import annotations

import time
from typing import Callable

import torch

CALLS_PER_SAMPLE = 10
_cycles_per_second: float | None = None


def _spin_rate() -> float:
    """The spinning kernel's cycles per second on the current device (its clock), once."""
    global _cycles_per_second
    if _cycles_per_second is None:
        cycles = 20_000_000
        torch.cuda._sleep(cycles)  # warm-up: the clock ramps up under load
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.cuda._sleep(cycles)
        end.record()
        end.synchronize()
        _cycles_per_second = cycles / (start.elapsed_time(end) / 1e3)
    return _cycles_per_second


def device_seconds_per_call(fn: Callable[[], object], calls: int = CALLS_PER_SAMPLE) -> float:
    """Seconds of device time per call of ``fn`` over ``calls`` calls queued back to back (up to
    a second of spin: past that the host is the bottleneck and is timed with it)."""
    spin_s = 2e-3
    while True:
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(int(spin_s * _spin_rate()))
        t0 = time.perf_counter()
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        host_s = time.perf_counter() - t0
        end.synchronize()
        if host_s < 0.8 * spin_s or spin_s > 1.0:
            return start.elapsed_time(end) / 1e3 / calls
        spin_s *= 4
