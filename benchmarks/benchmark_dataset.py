"""What the end-to-end benchmarks share: the synthetic requests and the benchmark checkpoint.

Requests are LLaVA-1.5 prompts (``USER: <image>\\n... ASSISTANT:``) with one image each, drawn
from a fixed seed: image sizes from thumbnails to 1280x960 in several aspect ratios (every
image is resized and cropped to the model's input, so the sizes exercise the preprocessing) and
questions of 4 to 40 words.

The benchmark checkpoint is a random LLaVA model with real shapes, small enough to run on a CPU
in minutes: a CLIP ViT-B/16 tower at 224x224 pixels (hidden 768, 12 layers, 12 heads, MLP 3072,
patch 16: 196 image tokens per image) and a Llama decoder of about 350M parameters (hidden 1024,
24 layers, 16 query heads and 8 KV heads of 128, MLP 2816, vocabulary 32064: the 1,024 x 2,816
and 1,024 x 32,064 GEMM shapes of the kernel benchmarks), joined by LLaVA-1.5's two-layer GELU
projector (768 -> 1024 -> 1024). It is built once into a cache folder.

Its tokenizer is the tiny checkpoint's (a few hundred BPE tokens trained offline), far fewer
than the 32064 rows of the LM head. The rows of the LM head for special tokens and for ids past
the tokenizer are zeroed, like the padding rows a trained model never picks: greedy decoding
then always produces text, so a server streams one chunk per token, as with a real model. The
compute is unchanged.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

BENCHMARK_MODEL_SHAPES = dict(
    seed=0,
    vocab_size=32064,
    hidden_size=1024,
    intermediate_size=2816,
    num_hidden_layers=24,
    num_attention_heads=16,
    num_key_value_heads=8,
    max_position_embeddings=4096,
    image_size=224,
    patch_size=16,
    vision_hidden_size=768,
    vision_intermediate_size=3072,
    vision_num_hidden_layers=12,
    vision_num_attention_heads=12,
    vision_hidden_act="quick_gelu",
)
_SHAPES_FILE = "benchmark_shapes.json"

IMAGE_SIZES = [
    (160, 120),
    (224, 224),
    (320, 240),
    (336, 336),
    (480, 640),
    (640, 480),
    (800, 600),
    (1024, 768),
    (720, 1280),
    (1280, 960),
]

_WORDS = (
    "the a this that image picture photo shows is are of in on with and to what color red "
    "green blue yellow black white cat dog car tree house street sky sun person man woman "
    "child table chair book cup left right top bottom large small many one two three "
    "describe content question answer detail scene background foreground light dark"
).split()
_QUESTIONS = (
    "What is shown in this image?",
    "Describe the image in detail.",
    "What colors appear in the picture?",
    "How many objects are in the scene?",
)


@dataclass
class BenchmarkRequest:
    prompt: str
    image: Image.Image


def build_benchmark_checkpoint(path: str | Path) -> Path:
    """Builds the benchmark checkpoint into ``path`` unless a build with the same shapes is
    already there; returns the path."""
    from aphrodite.testing.tiny_llava import build_tiny_llava

    folder = Path(path)
    marker = folder / _SHAPES_FILE
    if marker.exists() and json.loads(marker.read_text()) == BENCHMARK_MODEL_SHAPES:
        return folder
    if folder.exists():
        shutil.rmtree(folder)
    build_tiny_llava(folder, **BENCHMARK_MODEL_SHAPES)
    _zero_lm_head_rows_without_text(folder)
    # Written last: a build that was interrupted has no marker and is redone.
    marker.write_text(json.dumps(BENCHMARK_MODEL_SHAPES, indent=2) + "\n")
    return folder


def _zero_lm_head_rows_without_text(folder: Path) -> None:
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    config = json.loads((folder / "config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    weights_file = folder / "model.safetensors"
    tensors = load_file(weights_file)
    (lm_head,) = [name for name in tensors if name.endswith("lm_head.weight")]
    # The tokenizer's trained vocabulary ends where the <image> token was added.
    tensors[lm_head][config["image_token_index"] :] = 0
    tensors[lm_head][tokenizer.all_special_ids] = 0
    save_file(tensors, weights_file, metadata={"format": "pt"})


def _image(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    # Smooth random content (a coarse grid upsampled), closer to a photo than white noise.
    coarse = rng.integers(0, 256, size=(max(height // 32, 2), max(width // 32, 2), 3))
    return Image.fromarray(coarse.astype(np.uint8)).resize((width, height), Image.BILINEAR)


def synthetic_requests(
    num_requests: int, seed: int = 0, min_words: int = 4, max_words: int = 40
) -> list[BenchmarkRequest]:
    """``num_requests`` LLaVA-1.5 prompts with one image each, the same for the same seed."""
    rng = np.random.default_rng(seed)
    requests = []
    for _ in range(num_requests):
        width, height = IMAGE_SIZES[rng.integers(len(IMAGE_SIZES))]
        question = _QUESTIONS[rng.integers(len(_QUESTIONS))]
        num_words = int(rng.integers(min_words, max_words + 1))
        context = " ".join(_WORDS[i] for i in rng.integers(len(_WORDS), size=num_words))
        prompt = f"USER: <image>\n{context}. {question}\nASSISTANT:"
        requests.append(BenchmarkRequest(prompt, _image(rng, width, height)))
    return requests
