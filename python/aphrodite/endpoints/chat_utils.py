"""OpenAI-style chat messages -> a prompt (rendered with the model's chat template) and the
images of the conversation.

Content is a string or a list of parts: {"type": "text", "text": ...},
{"type": "image_url", "image_url": {"url": ...}} (http(s), data: or file: URLs, local paths)
and {"type": "image", "image": <PIL image or URL>} / {"type": "image_pil", "image_pil": img}.
Templates that read the parts (like llava-hf's, which emits "<image>\\n" for each
{"type": "image"}) get the parts; templates that read ``message['content']`` as a string get
the text with one image placeholder line per image in front of it, as vLLM does.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from PIL import Image

from aphrodite.multimodal import load_image

# A template that looks at a part's "type" renders the parts itself.
_READS_PARTS = re.compile(r"""\[\s*['"]type['"]\s*\]|\.type\b|['"]type['"]""")


def template_reads_parts(template: str) -> bool:
    return bool(_READS_PARTS.search(template))


def _part_image(part: Mapping) -> Image.Image:
    kind = part["type"]
    if kind == "image_url":
        value = part.get("image_url")
        url = value.get("url") if isinstance(value, Mapping) else value
        if not isinstance(url, str):
            raise ValueError("an image_url part needs {'image_url': {'url': '...'}}")
        return load_image(url)
    value = part.get(kind)
    if value is None:
        raise ValueError(f"a {kind!r} part needs a {kind!r} field with the image")
    return load_image(value)


def parse_chat_messages(
    messages: Sequence[Mapping[str, Any]], image_placeholder: str, parts_format: bool
) -> tuple[list[dict[str, Any]], list[Image.Image]]:
    """Messages for the chat template, and the images in the order they appear."""
    conversation: list[dict[str, Any]] = []
    images: list[Image.Image] = []
    for message in messages:
        if not isinstance(message, Mapping) or "role" not in message:
            raise ValueError(f"a chat message must be a dict with a 'role', got {message!r}")
        content = message.get("content")
        rendered = {k: v for k, v in message.items() if k != "content"}
        if content is None or isinstance(content, str):
            rendered["content"] = (
                [{"type": "text", "text": content}] if parts_format and content else content or ""
            )
            conversation.append(rendered)
            continue
        texts: list[str] = []
        parts: list[dict[str, Any]] = []
        num_images = 0
        for part in content:
            kind = part.get("type") if isinstance(part, Mapping) else None
            if kind == "text":
                texts.append(part["text"])
                parts.append({"type": "text", "text": part["text"]})
            elif kind in ("image_url", "image", "image_pil"):
                images.append(_part_image(part))
                parts.append({"type": "image"})
                num_images += 1
            else:
                raise ValueError(f"unsupported chat content part {part!r}")
        if parts_format:
            rendered["content"] = parts
        else:
            rendered["content"] = "\n".join([image_placeholder] * num_images + texts)
        conversation.append(rendered)
    return conversation, images


def render_chat(
    tokenizer: Any,
    messages: Sequence[Mapping[str, Any]],
    chat_template: str | None,
    image_placeholder: str,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
) -> tuple[str, list[Image.Image]]:
    """(prompt text, images) of one conversation."""
    template = chat_template or getattr(tokenizer, "chat_template", None)
    if not template:
        raise ValueError(
            "the model has no chat template: pass chat_template= (a Jinja string) to chat()"
        )
    conversation, images = parse_chat_messages(
        messages, image_placeholder, template_reads_parts(template)
    )
    prompt = tokenizer.apply_chat_template(
        conversation,
        chat_template=template,
        add_generation_prompt=add_generation_prompt and not continue_final_message,
        continue_final_message=continue_final_message,
        tokenize=False,
    )
    return prompt, images
