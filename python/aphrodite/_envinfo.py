"""Build and environment report (``python -m aphrodite.env``, :func:`aphrodite.env_info`)."""

from __future__ import annotations

import platform
import sys
from typing import Any

from aphrodite import _C


def env_info() -> dict[str, Any]:
    """Version, backends compiled in (with their architectures) and the devices they found."""
    return {
        "version": _C.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cuda_compiled": _C.cuda_compiled(),
        "num_threads": _C.num_threads(),
        "backends": _C.backends_info(),
    }


def format_env_info(info: dict[str, Any]) -> str:
    lines = [
        f"aphrodite {info['version']}",
        f"python {info['python']} on {info['platform']}",
        f"CPU threads: {info['num_threads']}",
    ]
    for backend in info["backends"]:
        name = backend["name"]
        if not backend["compiled"]:
            lines.append(f"{name}: not compiled ({backend['status']})")
            continue
        archs = ", ".join(backend["archs"]) or "baseline"
        lines.append(f"{name}: compiled (archs: {archs})")
        if backend["status"]:
            lines.append(f"  {backend['status']}")
        for dev in backend["devices"]:
            if name == "cuda":
                cc = ".".join(str(x) for x in dev["compute_capability"])
                gib = dev["total_memory"] / 2**30
                lines.append(
                    f"  cuda:{dev['index']}: {dev['name']} (sm_{cc.replace('.', '')}, "
                    f"{gib:.1f} GiB, {dev['multiprocessor_count']} SMs)"
                )
            else:
                lines.append(f"  {dev['name']}")
        if name == "cuda" and not backend["devices"] and not backend["status"]:
            lines.append("  no CUDA devices found")
    return "\n".join(lines)
