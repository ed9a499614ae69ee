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
    with pytest.raises(ValueError, match="unsupported chat content part 'audio_url'"):
        audio = {"type": "audio_url", "audio_url": "x"}
        _chat([{"role": "user", "content": [audio]}], STRING_TEMPLATE)
    # The message names the part's type, not its payload (a tensor of embeddings, say).
    with pytest.raises(ValueError, match="'image_embeds' \\(supported") as err:
        embeds = {"type": "image_embeds", "image_embeds": "x" * 10000}
        _chat([{"role": "user", "content": [embeds]}], STRING_TEMPLATE)
    assert len(str(err.value)) < 200
    with pytest.raises(ValueError, match="cannot load image"):
        missing = {"type": "image_url", "image_url": {"url": "/nope.png"}}
        _chat([{"role": "user", "content": [missing]}], STRING_TEMPLATE)


def test_template_text_of_any_length_is_a_template_not_a_path():
    """A long template (any real one) was taken for a file name: too long for the OS."""
    from aphrodite.endpoints.chat_utils import load_chat_template

    long_template = "{# " + "x/" * 300 + " #}" + STRING_TEMPLATE
    assert load_chat_template(long_template) == long_template
    prompt, _ = _chat([{"role": "user", "content": "hi"}], long_template)
    assert prompt == "USER: hi\nASSISTANT:"


@pytest.mark.parametrize(
    "loop",
    [
        # Filters after the content, and a variable set from it through a filter, then chained.
        "{% for c in m['content'] | selectattr('type', 'equalto', 'text') | list %}"
        "{{ c['text'] }}{% endfor %}",
        "{% set parts = m['content'] | default([]) %}{% set p2 = parts %}"
        "{% for c in p2 %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}",
        "{% for c in m.content %}{{ c.text }}{% endfor %}",
    ],
)
def test_content_loops_through_filters_and_variables_are_openai_format(loop):
    template = "{% for m in messages %}" + loop + "{% endfor %}"
    assert ChatTemplate(template).content_format == "openai"
    prompt, _ = _chat([{"role": "user", "content": [{"type": "text", "text": "What is it?"}]}],
                      template)
    assert prompt == "What is it?"


def test_tojson_and_special_tokens_are_transformers():
    """tojson is transformers' (plain json.dumps, no HTML or ASCII escaping) and every special
    token of the tokenizer is a template variable."""
    import json

    template = "{{ pad_token }}|{{ unk_token }}|{{ messages[0]['content'] | tojson }}"
    text = "Is 2 < 3 & 'x' café?"
    prompt, _ = _chat([{"role": "user", "content": text}], template)
    assert prompt == "|<unk>|" + json.dumps(text, ensure_ascii=False)


def test_tool_messages_and_calls_are_refused():
    from aphrodite.endpoints.chat_utils import ChatInputError

    for messages in (
        [{"role": "user", "content": "hi"}, {"role": "tool", "content": "42"}],
        [{"role": "user", "content": "hi"},
         {"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]}],
    ):
        with pytest.raises(ChatInputError, match="tool"):
            _chat(messages, STRING_TEMPLATE)


def test_continue_final_message_matches_transformers():
    """transformers' rule: the last text part continues, the spaces the template keeps stay,
    and the cut is where the final message ends, not at a later copy of its text."""
    from transformers.utils.chat_template_utils import render_jinja_template

    tokenizer = _tokenizer()
    cases = [
        (LLAVA_HF_TEMPLATE, [{"role": "user", "content": [{"type": "text", "text": "hi"}]},
                             {"role": "assistant", "content": [
                                 {"type": "text", "text": "A red"},
                                 {"type": "text", "text": "dog is"}]}]),
        (STRING_TEMPLATE, [{"role": "user", "content": "hi"},
                           {"role": "assistant", "content": "A red "}]),
        (STRING_TEMPLATE + "{{ 's' }}", [{"role": "user", "content": "hi"},
                                        {"role": "assistant", "content": "s"}]),
    ]
    for template, messages in cases:
        ours, _ = render_chat(ChatTemplate(template), messages, image_placeholder="<image>",
                              tokenizer=tokenizer, add_generation_prompt=False,
                              continue_final_message=True)
        theirs = render_jinja_template(conversations=[messages], chat_template=template,
                                       continue_final_message=True, add_generation_prompt=False,
                                       **tokenizer.special_tokens_map)[0][0]
        assert ours == theirs, (ours, theirs)
