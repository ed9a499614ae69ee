"""Multimodal inputs: ``MultiModalDataDict`` and the image items handed to the engine."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypedDict, Union

import numpy as np
import torch
from PIL import Image

from aphrodite.multimodal.fetch import fetch_timeout_from_env, load_image, load_images
from aphrodite.multimodal.image import (
    hash_embeddings,
    hash_rgb_array,
    to_rgb_array,
    to_rgb_arrays,
)

# "image": one PIL image, a list of them (one per <image> placeholder, in order), or
# precomputed image embeddings: a tensor [num_image_tokens, hidden] for one image or
# [num_images, num_image_tokens, hidden] (or a list of 2-D tensors).
ImageInput = Union[Image.Image, list[Image.Image], torch.Tensor, list[torch.Tensor]]


class MultiModalDataDict(TypedDict, total=False):
    image: ImageInput


@dataclass
class MultiModalItem:
    """One image of a request after processing: where its tokens sit in the prompt, its
    content hash (the prefix cache key) and its data for the model runner (RGB uint8 pixels
    [H, W, 3] or embeddings [num_image_tokens, hidden])."""

    offset: int
    length: int
    hash: bytes
    data: np.ndarray | torch.Tensor

    def engine_item(self) -> tuple[int, int, bytes]:
        return (self.offset, self.length, self.hash)


__all__ = [
    "ImageInput",
    "MultiModalDataDict",
    "MultiModalItem",
    "hash_embeddings",
    "hash_rgb_array",
    "fetch_timeout_from_env",
    "load_image",
    "load_images",
    "to_rgb_array",
    "to_rgb_arrays",
]
