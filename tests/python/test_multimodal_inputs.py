"""Image loading, RGB conversion (as Hugging Face does it), hashing, placeholder expansion
and the input errors raised before anything is scheduled."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from aphrodite.inputs import InputPreprocessor
from aphrodite.multimodal import (
    hash_embeddings,
    hash_rgb_array,
    load_image,
    to_rgb_array,
    to_rgb_arrays,
)

IMAGE_TOKEN = 7
NUM_IMAGE_TOKENS = 4
HIDDEN = 6


def _random_image(mode: str, size=(13, 9), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    rgba = rng.integers(0, 256, size=(size[1], size[0], 4), dtype=np.uint8)
    image = Image.fromarray(rgba, "RGBA")
    if mode == "P":
        return image.convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE, colors=32)
    if mode == "P_transparent":
        p = image.convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE, colors=32)
        p.info["transparency"] = 3
        return p
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, size=(size[1], size[0]), dtype=np.uint16))
    return image.convert(mode)


@pytest.mark.parametrize("mode", ["RGB", "L", "LA", "RGBA", "P", "P_transparent", "CMYK", "I;16"])
def test_rgb_conversion_matches_hugging_face(mode):
    """The pixels HF's image processor works on (everything but the conversion switched off),
    whatever transformers version is installed."""
    image = _random_image(mode)
    ours = to_rgb_array(image)
    proc = CLIPImageProcessorPil(
        do_resize=False, do_center_crop=False, do_rescale=False, do_normalize=False)
    theirs = proc(images=[image], return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    assert ours.dtype == np.uint8 and ours.shape == (9, 13, 3) and ours.flags.c_contiguous
    np.testing.assert_array_equal(ours, theirs)


def test_batch_conversion_keeps_order_and_errors():
    """to_rgb_arrays (threaded for several images) gives each image's to_rgb_array, in order,
    and raises the error of a bad image."""
    modes = ["RGB", "L", "RGBA", "P_transparent", "CMYK", "I;16"] * 3
    images = [_random_image(mode, seed=i) for i, mode in enumerate(modes)]
    images.append(np.asarray(_random_image("RGB", seed=99)))
    arrays = to_rgb_arrays(images)
    assert len(arrays) == len(images)
    for image, array in zip(images, arrays):
        np.testing.assert_array_equal(array, to_rgb_array(image))
    assert to_rgb_arrays([]) == []
    with pytest.raises(TypeError, match="uint8"):
        to_rgb_arrays([images[0], np.zeros((4, 4, 3), dtype=np.float32)])


def test_hash_depends_on_pixels_and_shape_only():
    a = _random_image("RGB", seed=1)
    same_pixels = Image.fromarray(np.asarray(a).copy())
    h = hash_rgb_array(to_rgb_array(a))
    assert len(h) == 32
    assert h == hash_rgb_array(to_rgb_array(same_pixels))
    pixels = to_rgb_array(a).copy()
    pixels[0, 0, 0] ^= 1
    assert hash_rgb_array(pixels) != h
    # same bytes, another shape
    flat = to_rgb_array(a)
    assert hash_rgb_array(flat.reshape(13, 9, 3)) != h
    e = torch.randn(NUM_IMAGE_TOKENS, HIDDEN)
    assert hash_embeddings(e) == hash_embeddings(e.clone())
    assert hash_embeddings(e) != hash_embeddings(e.to(torch.float16))


def test_load_image_from_data_url_and_path(tmp_path):
    image = _random_image("RGB", seed=2)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    np.testing.assert_array_equal(to_rgb_array(load_image(url)), np.asarray(image))
    path = tmp_path / "x.png"
    path.write_bytes(buf.getvalue())
    np.testing.assert_array_equal(to_rgb_array(load_image(str(path))), np.asarray(image))
    np.testing.assert_array_equal(to_rgb_array(load_image(path.as_uri())), np.asarray(image))
    with pytest.raises(ValueError, match="cannot load image"):
        load_image(str(tmp_path / "missing.png"))
    with pytest.raises(ValueError, match="cannot load image"):
        load_image("data:image/png;base64,bm90IGFuIGltYWdl")
    with pytest.raises(ValueError, match="scheme"):
        load_image("ftp://example.com/x.png")


class _CharTokenizer:
    """One token per character ('#' is the image token), BOS = 1."""

    def encode(self, text, add_special_tokens=True):
        ids = [IMAGE_TOKEN if c == "#" else 10 + (ord(c) % 50) for c in text]
        return ([1] if add_special_tokens else []) + ids


def _preprocessor(max_model_len=64, limit=2, tokenizer=None, check_image_size=None):
    return InputPreprocessor(
        tokenizer or _CharTokenizer(),
        vocab_size=100,
        max_model_len=max_model_len,
        image_token_id=IMAGE_TOKEN,
        num_image_tokens=NUM_IMAGE_TOKENS,
        hidden_size=HIDDEN,
        limit_mm_per_prompt={"image": limit},
        check_image_size=check_image_size,
    )


def test_placeholders_expand_to_image_tokens():
    pre = _preprocessor()
    a, b = _random_image("RGB", seed=3), _random_image("L", size=(5, 20), seed=4)
    out = pre.process({"prompt": "ab#c#d", "multi_modal_data": {"image": [a, b]}})
    ids = out.prompt_token_ids
    assert len(ids) == 1 + 6 - 2 + 2 * NUM_IMAGE_TOKENS
    assert [(m.offset, m.length) for m in out.mm_items] == [(3, 4), (8, 4)]
    for m in out.mm_items:
        assert ids[m.offset : m.offset + m.length] == [IMAGE_TOKEN] * NUM_IMAGE_TOKENS
    assert ids.count(IMAGE_TOKEN) == 2 * NUM_IMAGE_TOKENS
    assert out.mm_items[1].data.shape == (20, 5, 3)
    assert out.mm_items[0].hash == hash_rgb_array(to_rgb_array(a))
    # an already expanded token prompt is kept as is
    again = pre.process({"prompt_token_ids": ids, "multi_modal_data": {"image": [a, b]}})
    assert again.prompt_token_ids == ids
    assert [m.offset for m in again.mm_items] == [3, 8]
    # embeddings: one [tokens, hidden] tensor per image
    emb = torch.randn(2, NUM_IMAGE_TOKENS, HIDDEN)
    out = pre.process({"prompt": "#x#", "multi_modal_data": {"image": emb}})
    assert [m.offset for m in out.mm_items] == [1, 6]
    assert torch.equal(out.mm_items[1].data, emb[1])


def test_input_errors_are_value_errors():
    pre = _preprocessor(max_model_len=12)
    img = _random_image("RGB")
    with pytest.raises(ValueError, match=r"1 image placeholder.*2 image"):
        pre.process({"prompt": "#a", "multi_modal_data": {"image": [img, img]}})
    with pytest.raises(ValueError, match=r"2 image placeholder.*1 image"):
        pre.process({"prompt": "##", "multi_modal_data": {"image": img}})
    with pytest.raises(ValueError, match="0 image"):
        pre.process("text with # but no image")
    with pytest.raises(ValueError, match="max_model_len"):
        pre.process({"prompt": "abcdefgh#", "multi_modal_data": {"image": img}})
    with pytest.raises(ValueError, match="numpy images must hold uint8"):
        pre.process({"prompt": "#", "multi_modal_data": {"image": np.zeros((4, 4, 3))}})
    with pytest.raises(ValueError, match="unsupported image type str"):
        pre.process({"prompt": "#", "multi_modal_data": {"image": "cat.png"}})
    with pytest.raises(ValueError, match="limit_mm_per_prompt"):
        _preprocessor(limit=1).process({"prompt": "##", "multi_modal_data": {"image": [img] * 2}})
    with pytest.raises(ValueError, match="shape"):
        pre.process({"prompt": "#", "multi_modal_data": {"image": torch.zeros(3, HIDDEN)}})
    with pytest.raises(ValueError, match="unsupported multimodal"):
        pre.process({"prompt": "a", "multi_modal_data": {"audio": b""}})
    with pytest.raises(ValueError, match="out of range"):
        pre.process({"prompt_token_ids": [1, 100]})
    with pytest.raises(TypeError):
        pre.process(123)


def test_images_the_preprocessing_cannot_take_fail_at_admission():
    """An extreme aspect ratio would make the resize overflow the op's limits: the request
    fails when its prompt is processed, not later in the batch that would encode it."""
    from aphrodite import ops

    def check(height: int, width: int) -> None:
        ops.check_image_size(height, width, 336, (336, 336))

    pre = _preprocessor(limit=1, check_image_size=check)
    strip = np.zeros((1, 2_000_000, 3), dtype=np.uint8)  # 336 x 672,000,000 once resized
    with pytest.raises(ValueError, match="aspect ratio is too extreme"):
        pre.process({"prompt": "#", "multi_modal_data": {"image": strip}})
    small = np.zeros((1, 500, 3), dtype=np.uint8)
    ok = pre.process({"prompt": "#", "multi_modal_data": {"image": small}})
    assert len(ok.mm_items) == 1
    # The op's own rules, as the engine's preprocessing applies them.
    ops.check_image_size(1, 1, 336, (336, 336))
    with pytest.raises(ValueError, match="height and width"):
        ops.check_image_size(0, 5, 336, (336, 336))
    with pytest.raises(ValueError, match="without center crop"):
        ops.check_image_size(300, 400, 336, (336, 336), do_center_crop=False)
    ops.check_image_size(336, 336, 336, (336, 336), do_resize=False, do_center_crop=False)


def test_a_text_far_too_long_is_refused_after_tokenizing_its_beginning():
    class CountingTokenizer(_CharTokenizer):
        lengths: list[int] = []

        def get_vocab(self):  # one character per token: a text of n chars is n tokens
            return {chr(c): c for c in range(32, 127)}

        def encode(self, text, add_special_tokens=True):
            self.lengths.append(len(text))
            return super().encode(text, add_special_tokens)

    tokenizer = CountingTokenizer()
    pre = _preprocessor(limit=1, tokenizer=tokenizer)
    with pytest.raises(ValueError, match="longer than max_model_len=64 tokens"):
        pre.process("x" * 1_000_000)
    assert tokenizer.lengths == [(64 + 16) * 1]  # only the beginning was tokenized
    # Near the limit the whole text is tokenized and the exact length check decides.
    tokenizer.lengths.clear()
    with pytest.raises(ValueError, match="the prompt is 76 tokens long"):
        pre.process("x" * 75)
    assert tokenizer.lengths == [75]
    assert len(pre.process("x" * 60).prompt_token_ids) == 61
