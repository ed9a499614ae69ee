"""Image preprocessing for vision towers (HF CLIPImageProcessorPil semantics, PIL-exact resize)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import PIL
import torch

from aphrodite import _C
from aphrodite.multimodal.image import rgb_pixels
from aphrodite.ops._stream import stream_of

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

PilPassOrder = _C.ops.PilPassOrder


def pil_pass_order(version: str) -> PilPassOrder:
    """The resize pass-order rule of a Pillow release (``PIL.__version__``). Checked bit for bit
    against Image.resize(BICUBIC) of Pillow 10.4, 11.0, 11.3, 12.0, 12.1, 12.2, 12.3 and 13.0;
    older releases are assumed to be like 10.x (always horizontal first, the rule of long
    standing), newer ones like 13."""
    major, minor = (int(part) for part in version.split(".")[:2])
    if major >= 13:
        return PilPassOrder.VERTICAL_FIRST_WHEN_HEIGHT_SHRINKS_MORE
    if (major, minor) >= (12, 2):
        return PilPassOrder.VERTICAL_FIRST_WHEN_TALL
    return PilPassOrder.HORIZONTAL_FIRST


INSTALLED_PIL_PASS_ORDER = pil_pass_order(PIL.__version__)


def preprocess_images(
    images: Sequence[Any],
    out: torch.Tensor,
    shortest_edge: int,
    crop_size: tuple[int, int],
    mean: Sequence[float],
    std: Sequence[float],
    rescale_factor: float = 1 / 255,
    do_resize: bool = True,
    do_center_crop: bool = True,
    pass_order: PilPassOrder | None = None,
) -> torch.Tensor:
    """Resizes (PIL bicubic, shortest edge), center-crops (HF's zero padding when smaller),
    rescales and normalises RGB uint8 ``[H, W, 3]`` CPU images (torch tensors or numpy arrays,
    each its own size) into ``out`` ``[N, 3, crop_h, crop_w]`` (float32/float16/bfloat16, CPU or
    CUDA; on CUDA it runs on the current stream). Returns ``out``. The resize equals
    ``Image.resize(BICUBIC)`` of the installed Pillow, or of the release whose rule
    ``pass_order`` names. Images whose pixels are 4 bytes apart (the RGB channels of an RGBX
    buffer, as :func:`aphrodite.multimodal.image.pil_rgb_view` gives) or whose rows are padded
    are read in place; other layouts are copied to contiguous ones first."""
    arrays = [_readable_layout(im) for im in images]
    _C.ops.preprocess_images(
        arrays,
        out,
        int(shortest_edge),
        (int(crop_size[0]), int(crop_size[1])),
        tuple(float(m) for m in mean),
        tuple(float(s) for s in std),
        float(rescale_factor),
        bool(do_resize),
        bool(do_center_crop),
        INSTALLED_PIL_PASS_ORDER if pass_order is None else pass_order,
        stream=stream_of(out),
    )
    return out


def empty_pixels(
    n: int, crop_size: tuple[int, int], dtype: torch.dtype, device: torch.device | str
) -> torch.Tensor:
    """An uninitialised ``[n, 3, crop_h, crop_w]`` output for :func:`preprocess_images`. On the
    CPU it comes from the core's allocator, which backs large buffers with transparent huge
    pages: the op's first writes then fault 2 MiB pages instead of 4 KiB ones (64 llava-1.5
    images, 86 MB: about 11 instead of 32 ms, as long as the op's own work on a third of
    them)."""
    shape = [int(n), 3, int(crop_size[0]), int(crop_size[1])]
    if torch.device(device).type == "cpu" and n > 0:
        return torch.from_dlpack(_C.empty(shape, dtype))
    return torch.empty(shape, dtype=dtype, device=device)


def _readable_layout(image: Any) -> Any:
    """``image`` itself where the op reads its layout in place (channels adjacent, pixels 3 or 4
    bytes apart, rows not overlapping), else a contiguous copy."""
    if isinstance(image, np.ndarray):
        strides = image.strides
        shape = image.shape
    else:
        strides = image.stride()
        shape = tuple(image.shape)
    if len(shape) == 3 and shape[2] == 3 and strides[2] == 1:
        height, width = shape[0], shape[1]
        pixel = 3 if width == 1 else strides[1]
        row = width * pixel if height == 1 else strides[0]
        if pixel in (3, 4) and row >= width * pixel:
            return image
    return np.ascontiguousarray(image) if isinstance(image, np.ndarray) else image.contiguous()


def check_image_size(
    height: int,
    width: int,
    shortest_edge: int,
    crop_size: tuple[int, int],
    do_resize: bool = True,
    do_center_crop: bool = True,
    name: str = "image",
) -> None:
    """Raises ValueError unless :func:`preprocess_images` can take an image of
    ``height x width`` with these settings (the op's own check, for validating an image when a
    request brings it instead of when its batch runs)."""
    _C.ops.check_image_size(
        int(height),
        int(width),
        int(shortest_edge),
        (int(crop_size[0]), int(crop_size[1])),
        bool(do_resize),
        bool(do_center_crop),
        name,
    )


def clip_preprocess(
    images: Sequence[Any],
    image_processor_config: dict[str, Any],
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """HF CLIPImageProcessorPil on ``images`` (PIL images or numpy arrays), configured by a
    preprocessor_config.json dict: returns pixel values ``[N, 3, crop_h, crop_w]``. Numpy
    arrays are channels-last uint8 (``[H, W, 3]``, ``[H, W]``, ``[H, W, 4]``), converted as
    the PIL image of the same pixels (HF guesses the channel axis of arrays instead)."""
    cfg = image_processor_config
    size = cfg.get("size", {"shortest_edge": 224})
    shortest_edge = size["shortest_edge"] if isinstance(size, dict) else int(size)
    crop = cfg.get("crop_size", {"height": 224, "width": 224})
    crop_h, crop_w = (crop["height"], crop["width"]) if isinstance(crop, dict) else (crop, crop)
    resample = cfg.get("resample", 3)
    if cfg.get("do_resize", True) and resample != 3:
        raise ValueError(f"only bicubic resampling (resample=3) is supported, got {resample}")
    mean = cfg.get("image_mean", OPENAI_CLIP_MEAN) if cfg.get("do_normalize", True) else (0, 0, 0)
    std = cfg.get("image_std", OPENAI_CLIP_STD) if cfg.get("do_normalize", True) else (1, 1, 1)
    rescale = cfg.get("rescale_factor", 1 / 255) if cfg.get("do_rescale", True) else 1.0
    if cfg.get("do_convert_rgb", True):
        arrays = rgb_pixels(images)
    else:
        arrays = [np.asarray(im) for im in images]
    out = empty_pixels(len(arrays), (crop_h, crop_w), dtype, device)
    return preprocess_images(
        arrays,
        out,
        shortest_edge,
        (crop_h, crop_w),
        mean,
        std,
        rescale,
        cfg.get("do_resize", True),
        cfg.get("do_center_crop", True),
    )
