"""The shared chat parser as LLM.chat uses it: dict messages with PIL/URL image parts -> prompt
text and images, for part-reading and string templates."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from aphrodite.endpoints.chat_utils import ChatTemplate, render_chat, resolve_chat_template
from aphrodite.multimodal import load_images

# llava-hf/llava-1.5-7b-hf's chat template (reads the parts' "type").
LLAVA_HF_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}"
    "{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
# A template that reads content as a string (like vLLM's examples/template_llava.jinja).
STRING_TEMPLATE = (
    "{% for message in messages %}{{ message['role'].upper() + ': ' + message['content'] + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def _tokenizer():
    tok = Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", unk_token="<unk>")


def _chat(messages, template: str | None):
    """What LLM.chat does with one conversation: (prompt, loaded images)."""
    tokenizer = _tokenizer()
    prompt, sources = render_chat(
        resolve_chat_template(None, template, how_to_pass="chat_template="),
        messages,
        image_placeholder="<image>",
        tokenizer=tokenizer,
    )
    return prompt, load_images(sources)


def _data_url(color) -> tuple[str, Image.Image]:
    image = Image.new("RGB", (5, 4), color)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode(), image


def test_template_format_detection():
    assert ChatTemplate(LLAVA_HF_TEMPLATE).content_format == "openai"
    assert ChatTemplate(STRING_TEMPLATE).content_format == "string"


def test_parts_template_gets_image_parts_in_order():
    url, image = _data_url((255, 0, 0))
    pil = Image.new("RGB", (3, 3), (0, 0, 255))
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Compare"},
                {"type": "image_url", "image_url": {"url": url}},
                {"type": "image", "image": pil},
            ],
        }
    ]
    prompt, images = _chat(messages, LLAVA_HF_TEMPLATE)
    assert prompt == "USER: <image>\n<image>\nCompare ASSISTANT:"
    assert len(images) == 2
    np.testing.assert_array_equal(np.asarray(images[0]), np.asarray(image))
    assert images[1] is pil


def test_string_template_gets_placeholders_before_text():
    url, _ = _data_url((0, 255, 0))
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": url}},
                {"type": "text", "text": "What is it?"},
            ],
        },
        {"role": "assistant", "content": "Green."},
        {"role": "user", "content": "Sure?"},
    ]
    prompt, images = _chat(messages, STRING_TEMPLATE)
    assert prompt == "USER: <image>\nWhat is it?\nASSISTANT: Green.\nUSER: Sure?\nASSISTANT:"
    assert len(images) == 1


def test_chat_errors():
    with pytest.raises(ValueError, match="chat template"):
        _chat([{"role": "user", "content": "hi"}], None)
    with pytest.raises(ValueError, match="unsupported chat content part"):
        audio = {"type": "audio_url", "audio_url": "x"}
        _chat([{"role": "user", "content": [audio]}], STRING_TEMPLATE)
    with pytest.raises(ValueError, match="cannot load image"):
        missing = {"type": "image_url", "image_url": {"url": "/nope.png"}}
        _chat([{"role": "user", "content": [missing]}], STRING_TEMPLATE)
