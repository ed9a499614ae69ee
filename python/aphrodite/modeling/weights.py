"""Reading HF safetensors checkpoints: single or sharded files, memory-mapped, one tensor at a time.

Tensor names are normalised to one layout whatever transformers version wrote the checkpoint:
`vision_tower.…` (CLIP without the `vision_model.` level), `multi_modal_projector.…`,
`language_model.…` (Llama without the `model.` level) and `lm_head.weight`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import torch

# (pattern, replacement), first match wins. transformers 4 wrote `language_model.model.layers…`,
# `language_model.lm_head…` and `vision_tower.vision_model…`; transformers 5 writes
# `model.language_model.layers…`, `lm_head…` and (in memory) `model.vision_tower…`.
_RENAMES = [
    (re.compile(r"^(?:model\.)?(?:language_model\.)?lm_head\."), "lm_head."),
    (re.compile(r"^(?:model\.)?vision_tower\.(?:vision_model\.)?"), "vision_tower."),
    (re.compile(r"^(?:model\.)?multi_modal_projector\."), "multi_modal_projector."),
    (re.compile(r"^(?:model\.)?language_model\.(?:model\.)?"), "language_model."),
]


def canonical_name(name: str) -> str:
    """The checkpoint tensor name in the runtime's layout (unchanged when no rule applies)."""
    for pattern, replacement in _RENAMES:
        new, n = pattern.subn(replacement, name, count=1)
        if n:
            return new
    return name


def safetensors_files(folder: str | Path) -> list[Path]:
    """The checkpoint's safetensors files: from the shard index when there is one."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [folder / name for name in sorted(set(weight_map.values()))]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"shards listed in {index} are missing: {missing}")
        return files
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
        raise ValueError(
            f"{folder} holds PyTorch pickle weights only; convert them to safetensors "
            "(aphrodite loads safetensors, which need no unpickling and can be memory-mapped)"
        )
    raise FileNotFoundError(f"no safetensors weights in {folder}")


def iterate_weights(folder: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yields (canonical name, CPU tensor) for every tensor, reading each file through a memory
    map so that only the tensor being copied is materialised."""
    from safetensors import safe_open

    for path in safetensors_files(folder):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                yield canonical_name(name), f.get_tensor(name)
