"""Images: conversion to RGB uint8 pixels by Hugging Face's own function (what its image
processors apply), and content hashing. Loading images from URLs and paths is
:mod:`aphrodite.multimodal.fetch`."""

from __future__ import annotations

import ctypes
import functools
import hashlib
import inspect
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import numpy as np
import PIL
import torch
from PIL import Image
from transformers.image_transforms import convert_to_rgb as hf_convert_to_rgb


def _hf_convert_to_rgb() -> Callable[[Any], Any]:
    """The installed transformers' convert_to_rgb, called so that it returns pixels: its
    signature changed within 5.x (``return_numpy`` appeared, returning a PIL image without it
    became deprecated), so the keyword is passed only where it exists."""
    if "return_numpy" in inspect.signature(hf_convert_to_rgb).parameters:
        return functools.partial(hf_convert_to_rgb, return_numpy=True)
    return hf_convert_to_rgb


_convert = _hf_convert_to_rgb()


def to_rgb_array(image: Any) -> np.ndarray:
    """RGB uint8 pixels ``[H, W, 3]`` (C-contiguous) of a PIL image of any mode or of a uint8
    numpy array ``[H, W]`` / ``[H, W, C]``: the package's one RGB conversion.

    The conversion is the installed transformers' own ``convert_to_rgb`` (what HF's image
    processors apply; how it treats transparency differs between transformers versions), so the
    pixels equal HF's on every version. One exception, a pure copy saved: an RGB PIL image
    without a transparency key, which every version passes through ``convert("RGB")`` unchanged,
    is read directly. A numpy array converts as the PIL image of its pixels: [H, W, 3] is
    taken as RGB, [H, W] / [H, W, 1] as gray ("L"), [H, W, 4] as RGBA."""
    if isinstance(image, Image.Image):
        if image.mode == "RGB" and image.info.get("transparency") is None:
            return np.ascontiguousarray(np.asarray(image, dtype=np.uint8))
        rgb = np.asarray(_convert(image))
    elif isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise TypeError(f"numpy images must be uint8, got {image.dtype}")
        if image.ndim == 2:
            image = image[..., None]
        if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
            raise ValueError(f"numpy images must be [H, W] or [H, W, 1|3|4], got {image.shape}")
        if image.shape[-1] == 3:
            # Already RGB. A copy: the caller may reuse its buffer before the image is encoded.
            return np.array(image, order="C", copy=True)
        # Gray and RGBA pixels convert as the PIL image of the same pixels does (HF's numpy
        # path guesses the channel axis and takes a 1 x N x 3 array for channels-first).
        # Image.fromarray makes an "L" image of [H, W] and an "RGBA" one of [H, W, 4] uint8.
        pixels = image[..., 0] if image.shape[-1] == 1 else image
        return to_rgb_array(Image.fromarray(np.ascontiguousarray(pixels)))
    else:
        raise ValueError(f"expected a PIL.Image.Image or a numpy array, got {type(image).__name__}")
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[-1] != 3:
        raise ValueError(
            "the installed transformers' convert_to_rgb does not give RGB uint8 pixels for this "
            f"image (got {rgb.dtype} {rgb.shape}); HF's image processor cannot take it either"
        )
    return np.ascontiguousarray(rgb)


class _ArrowSchema(ctypes.Structure):
    pass


_ArrowSchema._fields_ = [
    ("format", ctypes.c_char_p),
    ("name", ctypes.c_char_p),
    ("metadata", ctypes.c_char_p),
    ("flags", ctypes.c_int64),
    ("n_children", ctypes.c_int64),
    ("children", ctypes.POINTER(ctypes.POINTER(_ArrowSchema))),
    ("dictionary", ctypes.c_void_p),
    ("release", ctypes.c_void_p),
    ("private_data", ctypes.c_void_p),
]


class _ArrowArray(ctypes.Structure):
    pass


_ArrowArray._fields_ = [
    ("length", ctypes.c_int64),
    ("null_count", ctypes.c_int64),
    ("offset", ctypes.c_int64),
    ("n_buffers", ctypes.c_int64),
    ("n_children", ctypes.c_int64),
    ("buffers", ctypes.POINTER(ctypes.c_void_p)),
    ("children", ctypes.POINTER(ctypes.POINTER(_ArrowArray))),
    ("dictionary", ctypes.c_void_p),
    ("release", ctypes.c_void_p),
    ("private_data", ctypes.c_void_p),
]

_capsule_pointer = ctypes.pythonapi.PyCapsule_GetPointer
_capsule_pointer.restype = ctypes.c_void_p
_capsule_pointer.argtypes = [ctypes.py_object, ctypes.c_char_p]


class _PillowPixels:
    """Numpy's view of a Pillow image's exported Arrow array: holding the array's capsules keeps
    the image's memory alive (their release runs when the capsules are collected), so arrays
    made from this object own that reference through their ``base``."""

    __slots__ = ("__array_interface__", "_capsules")

    def __init__(self, interface: dict[str, Any], capsules: tuple[object, object]) -> None:
        self.__array_interface__ = interface
        self._capsules = capsules


# Pillow 13 exports an image through Arrow only when its rows are packed in one block (it
# refuses otherwise); Pillow 11.2-12.x also exports images with aligned, padded rows
# (PILLOW_ALIGNMENT) without saying so, which a packed view would read shifted.
_PILLOW_EXPORTS_PACKED_ROWS = int(PIL.__version__.split(".")[0]) >= 13


def pil_rgb_view(image: Image.Image) -> np.ndarray | None:
    """The pixels of an RGB PIL image as a read-only ``[H, W, 3]`` uint8 view of Pillow's own
    memory (no copy), or None where Pillow cannot lend it: before Pillow 13 (whose Arrow export
    can hide padded rows), rows not in one block (images over Pillow's 16 MiB block size),
    another mode, or a transparency key that HF's RGB conversion would apply. Pillow keeps RGB
    as 4 bytes per pixel, so the view's pixels are 4 bytes apart
    (:func:`aphrodite.ops.preprocess_images` reads that layout in place). It shows the image's
    current pixels: it is for use while the image is not modified, such as within one call."""
    if (
        not _PILLOW_EXPORTS_PACKED_ROWS
        or image.mode != "RGB"
        or image.info.get("transparency") is not None
    ):
        return None
    export = getattr(image, "__arrow_c_array__", None)
    if export is None:
        return None
    try:
        capsules = export()
    except ValueError:  # "Image rows are not contiguous in memory."
        return None
    schema = _ArrowSchema.from_address(_capsule_pointer(capsules[0], b"arrow_schema"))
    array = _ArrowArray.from_address(_capsule_pointer(capsules[1], b"arrow_array"))
    width, height = image.size
    # A fixed-size list of 4 uint8 per pixel: one child array holding every byte.
    if (
        schema.format != b"+w:4"
        or schema.n_children != 1
        or schema.children[0].contents.format != b"C"
        or array.length != width * height
        or array.offset != 0
        or array.n_children != 1
    ):
        return None
    child = array.children[0].contents
    if child.offset != 0 or child.n_buffers != 2 or child.length != 4 * width * height:
        return None
    data = child.buffers[1]
    if not data:
        return None
    interface = {
        "shape": (height, width, 3),
        "typestr": "|u1",
        "strides": (4 * width, 4, 1),
        "data": (data, True),
        "version": 3,
    }
    return np.asarray(_PillowPixels(interface, capsules))


def rgb_pixels(images: Sequence[Any]) -> list[np.ndarray]:
    """RGB uint8 ``[H, W, 3]`` pixels of each image for immediate use, in order: RGB PIL images
    and RGB uint8 arrays as they are (:func:`pil_rgb_view`, no copy), everything else through
    :func:`to_rgb_arrays`. The results may share memory with the inputs, so they are for use
    before the inputs change (:func:`to_rgb_array` copies, for keeping)."""
    views: list[np.ndarray | None] = []
    for image in images:
        view = None
        if isinstance(image, Image.Image):
            view = pil_rgb_view(image)
        elif (
            isinstance(image, np.ndarray)
            and image.dtype == np.uint8
            and image.ndim == 3
            and image.shape[-1] == 3
        ):
            view = image
        views.append(view)
    converted = iter(to_rgb_arrays([im for im, view in zip(images, views) if view is None]))
    return [view if view is not None else next(converted) for view in views]


_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _conversion_pool() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            from aphrodite import _C

            _pool = ThreadPoolExecutor(
                max_workers=max(1, _C.num_threads()), thread_name_prefix="aphrodite-rgb"
            )
        return _pool


def to_rgb_arrays(images: Sequence[Any]) -> list[np.ndarray]:
    """:func:`to_rgb_array` of each image, in order. Several images are converted on a thread
    pool as large as the core's: Pillow releases the GIL while it copies pixels out (about 5 ms
    for a 2-megapixel photo, as long as the preprocessing op itself), so this scales with the
    cores instead of running one image at a time."""
    if len(images) < 2:
        return [to_rgb_array(im) for im in images]
    return list(_conversion_pool().map(to_rgb_array, images))


def hash_rgb_array(pixels: np.ndarray) -> bytes:
    """SHA-256 (32 bytes) of an RGB uint8 image's shape and pixels: equal images give equal
    hashes whatever object or file they came from."""
    digest = hashlib.sha256()
    digest.update(b"rgb8:" + ",".join(str(d) for d in pixels.shape).encode() + b":")
    # The array's own buffer, not a bytes copy of it (a 1080p photo: 4.3 instead of 5.1 ms).
    digest.update(memoryview(np.ascontiguousarray(pixels, dtype=np.uint8)).cast("B"))
    return digest.digest()


def hash_embeddings(embeddings: torch.Tensor) -> bytes:
    """SHA-256 (32 bytes) of precomputed image embeddings: dtype, shape and raw bytes."""
    flat = embeddings.detach().to("cpu").contiguous()
    digest = hashlib.sha256()
    header = f"embeds:{flat.dtype}:{','.join(str(d) for d in flat.shape)}:"
    digest.update(header.encode())
    digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.digest()
