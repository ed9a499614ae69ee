"""Offline inference with a vision-language model (LLaVA-1.5): one prompt, then a batch.

    python examples/offline_inference_vision.py --model llava-hf/llava-1.5-7b-hf --image cat.jpg
    python examples/offline_inference_vision.py --tiny   # a small random checkpoint built here

--tiny builds a randomly initialised LLaVA checkpoint (aphrodite.testing.tiny_llava) in a
temporary folder, so the script runs offline; its answers are random tokens.
"""

from __future__ import annotations

import argparse
import tempfile

from PIL import Image, ImageDraw

from aphrodite import LLM, SamplingParams


def demo_image(color: str, shape: str) -> Image.Image:
    image = Image.new("RGB", (320, 240), "white")
    draw = ImageDraw.Draw(image)
    box = (80, 40, 240, 200)
    if shape == "circle":
        draw.ellipse(box, fill=color)
    else:
        draw.rectangle(box, fill=color)
    return image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="checkpoint folder or Hugging Face hub id")
    source.add_argument("--tiny", action="store_true", help="build and use a tiny random model")
    parser.add_argument("--image", nargs="*", default=[], help="image files (default: drawn)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if args.tiny:
            from aphrodite.testing.tiny_llava import build_tiny_llava

            model = build_tiny_llava(tmp)
        llm = LLM(model=model, device=args.device)
        images = [Image.open(p) for p in args.image] or [
            demo_image("red", "circle"),
            demo_image("blue", "square"),
        ]
        params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)

        # Single prompt inference. The prompt follows the model's format on Hugging Face.
        prompt = "USER: <image>\nWhat is the content of this image?\nASSISTANT:"
        outputs = llm.generate({"prompt": prompt, "multi_modal_data": {"image": images[0]}}, params)
        for o in outputs:
            print(o.outputs[0].text)

        # Batch inference.
        outputs = llm.generate(
            [
                {
                    "prompt": "USER: <image>\nWhat is the content of this image?\nASSISTANT:",
                    "multi_modal_data": {"image": images[0]},
                },
                {
                    "prompt": "USER: <image>\nWhat's the color of this image?\nASSISTANT:",
                    "multi_modal_data": {"image": images[-1]},
                },
            ],
            params,
        )
        for o in outputs:
            print(o.outputs[0].text)


if __name__ == "__main__":
    main()
