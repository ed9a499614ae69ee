"""preprocess_images against HF's CLIPImageProcessorPil (transformers 5), and CUDA against CPU."""

from __future__ import annotations

import os

import numpy as np
import PIL
import pytest
import torch
from PIL import Image
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from aphrodite import _C, ops
from aphrodite.ops.image import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD


def fresh_rng() -> np.random.Generator:
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"image test seed {seed}")
    return np.random.default_rng(seed)


def gradient(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    y = np.linspace(0, 1, h)[:, None, None]
    x = np.linspace(0, 1, w)[None, :, None]
    a, b = rng.uniform(0, 255, 3), rng.uniform(-255, 255, 3)
    return np.clip(a * (1 - x) + b * y * x + 20 * np.sin(7 * x + 3 * y), 0, 255).astype(np.uint8)


def photo_like(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """Smooth blobs plus sharp edges plus a little noise, like natural images."""
    small = rng.integers(0, 256, (max(2, h // 16), max(2, w // 16), 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(small).resize((w, h), Image.BILINEAR)).astype(np.int16)
    base[h // 3 : h // 2, w // 4 : w // 2] = rng.integers(0, 256, 3)
    noise = rng.integers(-6, 7, base.shape)
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def random_image(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    kind = rng.integers(0, 3)
    if kind == 0:
        return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    return gradient(h, w, rng) if kind == 1 else photo_like(h, w, rng)


def hf_processor(shortest_edge: int, crop: tuple[int, int], **kwargs) -> CLIPImageProcessorPil:
    return CLIPImageProcessorPil(
        size={"shortest_edge": shortest_edge},
        crop_size={"height": crop[0], "width": crop[1]},
        **kwargs,
    )


def hf_pixels(proc: CLIPImageProcessorPil, images: list) -> torch.Tensor:
    pil = [im if isinstance(im, Image.Image) else Image.fromarray(im) for im in images]
    out = proc(images=pil, return_tensors="np")["pixel_values"]
    return torch.from_numpy(np.stack(out) if isinstance(out, list) else out)


def ours(images, shortest_edge, crop, device="cpu", dtype=torch.float32, mean=OPENAI_CLIP_MEAN,
         std=OPENAI_CLIP_STD, **kwargs) -> torch.Tensor:
    out = torch.empty(len(images), 3, *crop, dtype=dtype, device=device)
    ops.preprocess_images(images, out, shortest_edge, crop, mean, std, **kwargs)
    return out.cpu()


def assert_same_as_hf(got: torch.Tensor, want: torch.Tensor, std=OPENAI_CLIP_STD) -> None:
    """Bit-identical float32; on failure report the difference in uint8 levels."""
    assert got.shape == want.shape
    if not torch.equal(got, want):
        levels = (got - want).abs() * torch.tensor(std).view(1, 3, 1, 1) * 255
        raise AssertionError(
            f"max {levels.max().item():.3f} uint8 levels apart, "
            f"{(levels > 0.01).float().mean().item():.2e} of the pixels differ")


SIZES_LLAVA = [(1, 1), (1, 7), (9, 1), (1, 90), (2, 3), (335, 336), (336, 336), (337, 500),
               (480, 640), (1080, 1920), (600, 8000), (33, 47), (700, 40)]


def test_llava_settings_match_hf(device: str) -> None:
    rng = fresh_rng()
    sizes = SIZES_LLAVA + [tuple(int(v) for v in rng.integers(1, 900, 2)) for _ in range(8)]
    images = [random_image(rng, h, w) for h, w in sizes]
    want = hf_pixels(hf_processor(336, (336, 336)), images)
    assert_same_as_hf(ours(images, 336, (336, 336), device), want)


@pytest.mark.parametrize(
    "shortest_edge,crop",
    [(224, (224, 224)), (100, (160, 120)), (64, (48, 80)), (17, (17, 17)), (300, (7, 301))],
)
def test_other_settings_match_hf(device: str, shortest_edge: int, crop: tuple[int, int]) -> None:
    rng = fresh_rng()
    sizes = [(1, 1), (3, 200), (200, 3)] + [
        tuple(int(v) for v in rng.integers(1, 400, 2)) for _ in range(9)]
    images = [random_image(rng, h, w) for h, w in sizes]
    want = hf_pixels(hf_processor(shortest_edge, crop), images)
    assert_same_as_hf(ours(images, shortest_edge, crop, device), want)


def test_custom_mean_std_and_rescale_match_hf(device: str) -> None:
    rng = fresh_rng()
    images = [random_image(rng, int(h), int(w)) for h, w in rng.integers(20, 300, (6, 2))]
    mean, std = (0.5, 0.25, 0.75), (0.5, 0.125, 2.0)
    proc = hf_processor(96, (80, 96), image_mean=list(mean), image_std=list(std),
                        rescale_factor=1 / 127)
    got = ours(images, 96, (80, 96), device, mean=mean, std=std, rescale_factor=1 / 127)
    assert_same_as_hf(got, hf_pixels(proc, images), std=std)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_dtypes_round_hf_float32(device: str, dtype: torch.dtype) -> None:
    rng = fresh_rng()
    images = [random_image(rng, int(h), int(w)) for h, w in rng.integers(1, 500, (6, 2))]
    want = hf_pixels(hf_processor(224, (224, 224)), images).to(dtype)
    got = ours(images, 224, (224, 224), device, dtype)
    assert torch.equal(got, want)


def test_without_resize_or_crop_match_hf(device: str) -> None:
    rng = fresh_rng()
    images = [random_image(rng, int(h), int(w)) for h, w in rng.integers(1, 120, (5, 2))]
    want = hf_pixels(hf_processor(224, (64, 48), do_resize=False), images)
    assert_same_as_hf(ours(images, 224, (64, 48), device, do_resize=False), want)
    same = [random_image(rng, 50, 70) for _ in range(3)]
    want = hf_pixels(hf_processor(50, (50, 70), do_center_crop=False), same)
    assert_same_as_hf(ours(same, 50, (50, 70), device, do_center_crop=False), want)


def strided_layouts(image: np.ndarray, rng: np.random.Generator) -> dict[str, object]:
    """The same pixels in layouts the op reads in place (4-byte pixels with junk in the fourth
    byte, padded rows; numpy and torch) and in ones the wrapper copies first (transposed,
    flipped, channels reversed twice)."""
    h, w, _ = image.shape
    rgbx = rng.integers(0, 256, (h, w + 3, 4), dtype=np.uint8)
    rgbx[:, :w, :3] = image
    padded = rng.integers(0, 256, (h, w + 2, 3), dtype=np.uint8)
    padded[:, :w] = image
    return {
        "rgbx": rgbx[:, :w, :3],
        "padded rows": padded[:, :w],
        "torch rgbx": torch.from_numpy(rgbx)[:, :w, :3],
        "transposed": np.ascontiguousarray(image.transpose(1, 0, 2)).transpose(1, 0, 2),
        "flipped": np.ascontiguousarray(image[::-1])[::-1],
        "bgr reversed": np.ascontiguousarray(image[..., ::-1])[..., ::-1],
    }


def test_strided_layouts_equal_contiguous(device: str) -> None:
    rng = fresh_rng()
    sizes = [(1, 1), (1, 9), (9, 1), (480, 640), (700, 40), (40, 700)]
    sizes += [tuple(int(v) for v in rng.integers(1, 600, 2)) for _ in range(4)]
    images = [random_image(rng, h, w) for h, w in sizes]
    for shortest_edge, crop in ((336, (336, 336)), (64, (48, 80))):
        want = ours(images, shortest_edge, crop, device)
        layouts = [strided_layouts(im, rng) for im in images]
        for name in layouts[0]:
            got = ours([lay[name] for lay in layouts], shortest_edge, crop, device)
            assert torch.equal(got, want), name
        # A single image splits its rows across the pool instead of the images.
        got = ours([layouts[3]["rgbx"]], shortest_edge, crop, device)
        assert torch.equal(got, want[3:4])


def test_pil_rgb_view_is_pillow_memory() -> None:
    """RGB PIL images are read in place: the view equals the pixels, outlives the image object,
    and is refused (None) for other modes and images whose rows Pillow splits across blocks;
    clip_preprocess of PIL images (views or copies) still equals HF."""
    from aphrodite.multimodal.image import pil_rgb_view

    rng = fresh_rng()
    pixels = random_image(rng, 300, 401)
    image = Image.fromarray(pixels)
    view = pil_rgb_view(image)
    if view is None:
        assert int(PIL.__version__.split(".")[0]) < 13
        pytest.skip(f"Pillow {PIL.__version__}: images are not read in place before Pillow 13")
    assert view.shape == (300, 401, 3) and view.strides == (4 * 401, 4, 1)
    assert not view.flags.writeable
    del image
    for _ in range(3):  # reuse freed memory, if the image's were freed
        Image.fromarray(rng.integers(0, 256, (300, 401, 3), dtype=np.uint8))
    assert np.array_equal(view, pixels)
    assert pil_rgb_view(Image.fromarray(pixels).convert("L")) is None
    assert pil_rgb_view(Image.fromarray(pixels).convert("RGBA")) is None
    keyed = Image.fromarray(pixels)
    keyed.info["transparency"] = (0, 0, 0)
    assert pil_rgb_view(keyed) is None
    # Over Pillow's block size (16 MiB by default) the rows are in several blocks.
    large = Image.new("RGB", (2600, 1700), (10, 20, 30))
    if (Image.core.get_block_size() < 2600 * 1700 * 4
            and not Image.core.get_use_block_allocator()):
        assert pil_rgb_view(large) is None
    images = [Image.fromarray(random_image(rng, h, w)) for h, w in ((300, 401), (1, 1), (77, 5))]
    images.append(large)
    config = {"size": {"shortest_edge": 64}, "crop_size": {"height": 64, "width": 64}}
    assert_same_as_hf(ops.clip_preprocess(images, config),
                      hf_pixels(CLIPImageProcessorPil(**config), images))


def test_pil_resize_exact_on_many_sizes() -> None:
    """The resized pixels equal the installed PIL's Image.resize(BICUBIC) exactly (the wrapper
    picks that release's pass order): identity normalisation and a crop equal to the resized
    size, over upscales, downscales, both pass orders and tall images."""
    rng = fresh_rng()
    for i in range(80):
        if i % 4 == 0:  # tall and thin (Pillow 12.2's rule), downscaled
            h, w, edge = int(rng.integers(100, 700)), int(rng.integers(1, 5)), 1
        else:
            h, w = (int(v) for v in rng.integers(1, 300, 2))
            edge = int(rng.integers(1, 200))
        rh, rw = _C.ops.shortest_edge_resize_size(h, w, edge)
        if rh * rw > 2_000_000:
            continue
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        want = np.asarray(Image.fromarray(img).resize((rw, rh), Image.BICUBIC))
        got = ours([img], edge, (rh, rw), mean=(0, 0, 0), std=(1, 1, 1), rescale_factor=1.0)
        assert np.array_equal(got[0].permute(1, 2, 0).numpy().astype(np.uint8), want), (h, w, edge)


def test_cuda_equals_cpu() -> None:
    from conftest import CUDA_USABLE

    if not CUDA_USABLE:
        pytest.skip("no usable CUDA device")
    rng = fresh_rng()
    sizes = SIZES_LLAVA + [tuple(int(v) for v in rng.integers(1, 2000, 2)) for _ in range(10)]
    images = [random_image(rng, h, w) for h, w in sizes]
    for dtype in (torch.float32, torch.bfloat16):
        cpu = ours(images, 336, (336, 336), "cpu", dtype)
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            cuda = ours(images, 336, (336, 336), "cuda", dtype)
        assert torch.equal(cpu, cuda)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "I;16", "LA", "1"])
def test_clip_preprocess_converts_modes_like_hf(mode: str) -> None:
    rng = fresh_rng()
    rgba = Image.fromarray(rng.integers(0, 256, (37, 53, 4), dtype=np.uint8), "RGBA")
    if mode == "I;16":
        image = Image.fromarray(rng.integers(0, 65536, (37, 53), dtype=np.uint16))
    elif mode == "P":
        image = rgba.convert("RGB").convert("P")
    else:
        image = rgba.convert(mode)
    config = {"size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32}}
    want = hf_pixels(CLIPImageProcessorPil(**config), [image])
    assert_same_as_hf(ops.clip_preprocess([image], config), want)


def test_clip_preprocess_numpy_inputs() -> None:
    """Numpy images go through the same conversion as HF's processor. A one-channel image is
    repeated to RGB (some transformers versions reject it; it is then compared with its RGB
    repetition only); an RGBA one is compared with HF, or where this transformers version
    rejects four-channel arrays (the GPU machine's did), with HF on the PIL RGBA image of the
    same pixels (HF's convert_to_rgb then decides how transparency is flattened, as it does
    for our op)."""
    rng = fresh_rng()
    gray = rng.integers(0, 256, (40, 30, 1), dtype=np.uint8)
    rgba = rng.integers(0, 256, (40, 30, 4), dtype=np.uint8)
    config = {"size": {"shortest_edge": 24}, "crop_size": {"height": 24, "width": 24}}
    proc = CLIPImageProcessorPil(**config)
    assert_same_as_hf(ops.clip_preprocess([gray, gray[..., 0]], config),
                      ops.clip_preprocess([np.repeat(gray, 3, axis=-1)] * 2, config))
    try:
        want = torch.from_numpy(proc(images=[rgba], return_tensors="np")["pixel_values"])
    except ValueError:
        want = hf_pixels(proc, [Image.fromarray(rgba)])
    assert_same_as_hf(ops.clip_preprocess([rgba], config), want)
    try:
        want = torch.from_numpy(proc(images=[gray], return_tensors="np")["pixel_values"])
    except ValueError:
        return
    assert_same_as_hf(ops.clip_preprocess([gray], config), want)


def two_step_resize(img: np.ndarray, rh: int, rw: int, vertical_first: bool) -> np.ndarray:
    """PIL's two-pass resize with the pass order given: each single-axis Image.resize is one
    pass in every Pillow release."""
    h, w = img.shape[:2]
    first = (w, rh) if vertical_first else (rw, h)
    return np.asarray(Image.fromarray(img).resize(first, Image.BICUBIC)
                      .resize((rw, rh), Image.BICUBIC))


def test_every_pass_order_rule_resizes_like_pil() -> None:
    """Each Pillow release's rule, whatever Pillow is installed: the op equals PIL's two passes in
    the order the rule picks (both orders occur), and the rules pick as documented."""
    rng = fresh_rng()
    rules = list(ops.PilPassOrder.__members__.values())
    seen = {(rule, vf): 0 for rule in rules for vf in (False, True)}
    sizes = [(450, 3, 2), (140, 32, 8), (300, 200, 150)]
    sizes += [tuple(int(v) for v in rng.integers(1, 260, 2)) + (int(rng.integers(1, 120)),)
              for _ in range(25)]
    for h, w, edge in sizes:
        rh, rw = _C.ops.shortest_edge_resize_size(h, w, edge)
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        for rule in rules:
            vertical_first = _C.ops.pil_vertical_pass_first(h, w, rh, rw, rule)
            seen[(rule, vertical_first)] += 1
            got = ours([img], edge, (rh, rw), mean=(0, 0, 0), std=(1, 1, 1), rescale_factor=1.0,
                       pass_order=rule)
            want = two_step_resize(img, rh, rw, vertical_first)
            assert np.array_equal(got[0].permute(1, 2, 0).numpy().astype(np.uint8), want), (
                h, w, edge, rule)
    assert seen[(ops.PilPassOrder.HORIZONTAL_FIRST, True)] == 0
    assert all(n > 0 for (rule, vf), n in seen.items()
               if rule != ops.PilPassOrder.HORIZONTAL_FIRST or not vf)
    tall = ops.PilPassOrder.VERTICAL_FIRST_WHEN_TALL
    assert _C.ops.pil_vertical_pass_first(201, 2, 100, 50, tall)
    assert not _C.ops.pil_vertical_pass_first(200, 2, 100, 50, tall)
    assert not _C.ops.pil_vertical_pass_first(201, 2, 300, 50, tall)  # the height grows
    shrinks = ops.PilPassOrder.VERTICAL_FIRST_WHEN_HEIGHT_SHRINKS_MORE
    assert _C.ops.pil_vertical_pass_first(140, 32, 35, 8, shrinks)  # 105 > 2 * 24
    assert not _C.ops.pil_vertical_pass_first(140, 32, 84, 4, shrinks)  # 56 == 2 * 28
    assert not _C.ops.pil_vertical_pass_first(140, 32, 35, 32, shrinks)  # one pass only


def test_pass_order_follows_the_pillow_version() -> None:
    assert ops.pil_pass_order("9.5.0") == ops.PilPassOrder.HORIZONTAL_FIRST
    assert ops.pil_pass_order("10.4.0") == ops.PilPassOrder.HORIZONTAL_FIRST
    assert ops.pil_pass_order("12.1.1") == ops.PilPassOrder.HORIZONTAL_FIRST
    assert ops.pil_pass_order("12.2.0") == ops.PilPassOrder.VERTICAL_FIRST_WHEN_TALL
    assert ops.pil_pass_order("12.3.0") == ops.PilPassOrder.VERTICAL_FIRST_WHEN_TALL
    assert ops.pil_pass_order("13.0.0") == ops.PilPassOrder.VERTICAL_FIRST_WHEN_HEIGHT_SHRINKS_MORE
    assert ops.pil_pass_order("14.1.0.dev0") == (
        ops.PilPassOrder.VERTICAL_FIRST_WHEN_HEIGHT_SHRINKS_MORE)


def test_argument_errors() -> None:
    img = np.zeros((10, 12, 3), np.uint8)
    out = torch.empty(1, 3, 8, 8)
    norm = ((0.5,) * 3, (0.5,) * 3)
    with pytest.raises(TypeError, match="images\\[0\\]"):
        _C.ops.preprocess_images([img.astype(np.float32)], out, 8, (8, 8), *norm)
    with pytest.raises(ValueError, match="images\\[0\\]"):
        _C.ops.preprocess_images([np.zeros((10, 12, 4), np.uint8)], out, 8, (8, 8), *norm)
    with pytest.raises(ValueError, match="3 or 4 bytes per pixel"):  # the op itself copies nothing
        _C.ops.preprocess_images([np.zeros((10, 24, 3), np.uint8)[:, ::2]], out, 8, (8, 8), *norm)
    with pytest.raises(ValueError, match="images\\[0\\]"):
        _C.ops.preprocess_images([np.zeros((0, 12, 3), np.uint8)], out, 8, (8, 8), *norm)
    with pytest.raises(ValueError, match="out"):
        _C.ops.preprocess_images([img, img], out, 8, (8, 8), *norm)
    with pytest.raises(ValueError, match="crop_size"):
        _C.ops.preprocess_images([img], out, 8, (8, 9), *norm)
    with pytest.raises(TypeError, match="out"):
        _C.ops.preprocess_images([img], torch.empty(1, 3, 8, 8, dtype=torch.int32), 8, (8, 8),
                                 *norm)
    with pytest.raises(ValueError, match="shortest_edge"):
        _C.ops.preprocess_images([img], out, 0, (8, 8), *norm)
    with pytest.raises(ValueError, match="without center crop"):
        _C.ops.preprocess_images([img], out, 8, (8, 8), *norm, do_center_crop=False)
    with pytest.raises(ValueError, match="out"):
        _C.ops.preprocess_images([img], torch.empty(1, 3, 8, 8).transpose(2, 3)[..., :8], 8,
                                 (8, 8), *norm)
