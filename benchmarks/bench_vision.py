"""Image preprocessing throughput: aphrodite's preprocess_images against HF's CLIPImageProcessorPil
on the same images (llava-1.5 settings: shortest edge 336, crop 336, CLIP mean/std).

    python benchmarks/bench_vision.py [--images 64] [--repeats 3]

Two inputs: PIL RGB images (ours: clip_preprocess, which reads Pillow's memory in place), and
RGB uint8 numpy arrays (the form the engine's image loader already holds for hashing; ours: the
op into a freshly allocated output, as the engine's runner calls it). Both sides allocate their
output on every call. Output: float32 pixel values [N, 3, 336, 336]. HF's processor is
single-threaded.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
from PIL import Image
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from aphrodite import _C, ops
from aphrodite.ops.image import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

CONFIG = {"size": {"shortest_edge": 336}, "crop_size": {"height": 336, "width": 336}}
PHOTO_SIZES = [(480, 640), (720, 1280), (1080, 1920), (768, 1024), (1080, 810), (600, 800)]


def photo_like(h: int, w: int, rng: np.random.Generator) -> Image.Image:
    small = rng.integers(0, 256, (h // 32, w // 32, 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(small).resize((w, h), Image.BILINEAR)).astype(np.int16)
    noise = rng.integers(-8, 9, base.shape)
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    images = [photo_like(*PHOTO_SIZES[i % len(PHOTO_SIZES)], rng) for i in range(args.images)]
    proc = CLIPImageProcessorPil(**CONFIG)
    cores = _C.num_threads()

    arrays = [np.asarray(im) for im in images]
    want = torch.from_numpy(np.stack(proc(images=images, return_tensors="np")["pixel_values"]))
    identical = torch.equal(ops.clip_preprocess(images, CONFIG), want)
    def ours_arrays() -> None:
        # A fresh output each call, as the engine's runner (and HF) allocate theirs.
        out = ops.empty_pixels(len(images), (336, 336), torch.float32, "cpu")
        ops.preprocess_images(arrays, out, 336, (336, 336), OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)

    n = len(images)
    rows = []
    for label, hf_fn, ours_fn in (
        (
            "PIL images",
            lambda: proc(images=images, return_tensors="np"),
            lambda: ops.clip_preprocess(images, CONFIG),
        ),
        ("uint8 arrays", lambda: proc(images=arrays, return_tensors="np"), ours_arrays),
    ):
        hf_rate = n / best_time(hf_fn, args.repeats)
        _C.set_num_threads(1)
        one_rate = n / best_time(ours_fn, args.repeats)
        _C.set_num_threads(cores)
        all_rate = n / best_time(ours_fn, args.repeats)
        rows.append((label, hf_rate, one_rate, all_rate))

    print(
        f"{n} images of {sorted(set(PHOTO_SIZES))} -> 3x336x336 float32, "
        f"{os.cpu_count()} CPUs, core threads {cores}; identical to HF: {identical}"
    )
    print(
        f"{'input':<13} {'HF img/s':>9} {'ours 1 thr':>11} {'ratio':>7} "
        f"{f'ours {cores} thr':>11} {'ratio':>7} {'per core':>9}"
    )
    for label, hf_rate, one_rate, all_rate in rows:
        print(
            f"{label:<13} {hf_rate:>9.1f} {one_rate:>11.1f} {one_rate / hf_rate:>6.2f}x "
            f"{all_rate:>11.1f} {all_rate / hf_rate:>6.2f}x {all_rate / cores / hf_rate:>8.2f}x"
        )


if __name__ == "__main__":
    main()
