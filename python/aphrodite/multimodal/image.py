"""Images: loading (PIL objects, http(s), data: and file: URLs, paths), conversion to RGB
uint8 pixels exactly as Hugging Face's image processors do it, and content hashing."""

from __future__ import annotations

import base64
import hashlib
import io
import os
import urllib.parse
import urllib.request
from typing import Any

import numpy as np
import torch
from PIL import Image

DEFAULT_IMAGE_FETCH_TIMEOUT_S = 10.0


def image_fetch_timeout() -> float:
    """Seconds allowed for fetching an http(s) image (env APHRODITE_IMAGE_FETCH_TIMEOUT)."""
    return float(os.environ.get("APHRODITE_IMAGE_FETCH_TIMEOUT", DEFAULT_IMAGE_FETCH_TIMEOUT_S))


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


def load_image(source: Any, timeout: float | None = None) -> Image.Image:
    """A PIL image from a PIL image (returned as is), an http(s) URL, a data: URL (base64),
    a file: URL or a local path. Raises ValueError when it cannot be read."""
    if isinstance(source, Image.Image):
        return source
    if not isinstance(source, str):
        raise ValueError(
            f"unsupported image source {type(source).__name__}: expected a PIL image or a URL"
        )
    parsed = urllib.parse.urlparse(source)
    try:
        if parsed.scheme in ("http", "https"):
            request = urllib.request.Request(source, headers={"User-Agent": "aphrodite"})
            limit = image_fetch_timeout() if timeout is None else timeout
            with urllib.request.urlopen(request, timeout=limit) as response:
                data = response.read()
        elif parsed.scheme == "data":
            header, _, payload = source[len("data:") :].partition(",")
            if not header.endswith(";base64"):
                raise ValueError("only base64 data: URLs are supported")
            data = base64.b64decode(payload, validate=True)
        elif parsed.scheme == "file":
            with open(urllib.request.url2pathname(parsed.path), "rb") as f:
                data = f.read()
        elif parsed.scheme == "" or len(parsed.scheme) == 1:  # a path (or a Windows drive)
            with open(source, "rb") as f:
                data = f.read()
        else:
            raise ValueError(f"unsupported URL scheme {parsed.scheme!r}")
        image = Image.open(io.BytesIO(data))
        image.load()
    except ValueError as e:
        raise ValueError(f"cannot load image {_shorten(source)}: {e}") from e
    except OSError as e:  # network errors, missing files, undecodable bytes
        raise ValueError(f"cannot load image {_shorten(source)}: {e}") from e
    return image


def _shorten(source: str, limit: int = 80) -> str:
    return source if len(source) <= limit else source[:limit] + "..."
