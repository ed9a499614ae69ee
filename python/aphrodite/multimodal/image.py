"""Images: conversion to RGB uint8 pixels exactly as Hugging Face's image processors do it,
and content hashing. Loading images from URLs and paths is :mod:`aphrodite.multimodal.fetch`."""

from __future__ import annotations

import hashlib

import numpy as np
import torch
from PIL import Image


def to_rgb_array(image: Image.Image) -> np.ndarray:
    """RGB uint8 pixels [H, W, 3] (C-contiguous) of a PIL image of any mode.

    Follows transformers.image_transforms.convert_to_rgb, which the LLaVA image processor
    applies: images with an alpha band or a transparency key are composited onto white, all
    others go through PIL's convert("RGB") (L, P, CMYK, I;16, ...)."""
    if not isinstance(image, Image.Image):
        raise ValueError(f"expected a PIL.Image.Image, got {type(image).__name__}")
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        rgb = Image.alpha_composite(white, rgba).convert("RGB")
    else:
        rgb = image.convert("RGB")
    return np.ascontiguousarray(np.asarray(rgb, dtype=np.uint8))


def hash_rgb_array(pixels: np.ndarray) -> bytes:
    """SHA-256 (32 bytes) of an RGB uint8 image's shape and pixels: equal images give equal
    hashes whatever object or file they came from."""
    digest = hashlib.sha256()
    digest.update(b"rgb8:" + ",".join(str(d) for d in pixels.shape).encode() + b":")
    digest.update(np.ascontiguousarray(pixels, dtype=np.uint8).tobytes())
    return digest.digest()


def hash_embeddings(embeddings: torch.Tensor) -> bytes:
    """SHA-256 (32 bytes) of precomputed image embeddings: dtype, shape and raw bytes."""
    flat = embeddings.detach().to("cpu").contiguous()
    digest = hashlib.sha256()
    header = f"embeds:{flat.dtype}:{','.join(str(d) for d in flat.shape)}:"
    digest.update(header.encode())
    digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.digest()
