"""Chat templates and OpenAI-style chat messages -> one prompt string plus its images.

One parser serves both the server (``/v1/chat/completions``) and the offline ``LLM.chat``.
Message content is a string or a list of parts: ``{"type": "text", "text": ...}``,
``{"type": "image_url", "image_url": {"url": ...}}`` and, for ``LLM.chat`` (the server's request
model admits only the first two), ``{"type": "image", "image": <PIL image or URL>}`` and
``{"type": "image_pil", "image_pil": <PIL image>}``. Parsing collects the images in prompt order
without loading them: the server fetches URLs asynchronously under its limits, ``LLM.chat``
loads them with :func:`aphrodite.multimodal.load_images`.

Two template styles exist in the wild and both are supported:

- "string" templates (such as ``examples/llava.jinja``) read ``message['content']`` as text. Each
  message's parts are flattened into one string; when the text has no image placeholder,
  one placeholder per image of that message is put in front of the text, in order
  (``"<image>\\n<image>\\nWhat is in these images?"``), which is how LLaVA was trained.
- "openai" templates (such as the ones Hugging Face ships in ``chat_template.json``) loop over
  ``message['content']`` and emit the placeholder themselves for every ``{"type": "image"}``
  part. The parts are passed through in order.

Templates render in a sandboxed Jinja environment configured like the one in ``transformers``
(trim_blocks, lstrip_blocks, ``raise_exception``, ``strftime_now``), so that a template behaves
the same here as in ``tokenizer.apply_chat_template``.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, Union

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.parser
from jinja2.sandbox import ImmutableSandboxedEnvironment
from PIL import Image

ContentFormat = Literal["string", "openai"]
# An image of a conversation as the client named it: a URL or path, or (LLM.chat) a PIL image.
ImageSource = Union[str, Image.Image]


class ChatInputError(ValueError):
    """The messages cannot be turned into a prompt (the client's fault: a 400)."""


class ChatTemplateError(ValueError):
    """The chat template is missing, unreadable or failed to render."""


def load_chat_template(value: str | None) -> str | None:
    """``--chat-template``: a path to a Jinja file or the template itself.

    A value that names an existing file is read; a value with Jinja syntax or a newline is taken
    as the template; anything else is a missing file and an error (so a typo in a path is not
    silently used as a template that prints the path).
    """
    if value is None:
        return None
    if any(c in value for c in "{}\n\0"):
        # Template text (checked first: a long one is not even a valid file name).
        return value
    path = Path(value).expanduser()
    try:
        if path.is_file():
            return path.read_text(encoding="utf-8")
    except OSError as e:
        raise ChatTemplateError(f"cannot read chat template file {value!r}: {e}") from None
    raise ChatTemplateError(
        f"chat template file {value!r} not found (pass a path to a .jinja file or the template "
        "text itself)"
    )


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


def _tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    """transformers' tojson: plain json.dumps (Jinja's own escapes HTML characters and
    non-ASCII text, which would give the model other tokens)."""
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` (Hugging Face templates use it to mark the
    assistant's tokens for training masks); for inference it renders its body unchanged."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body, lineno=lineno)


@lru_cache(maxsize=8)
def _compile(source: str) -> tuple[jinja2.Template, ContentFormat]:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols, _GenerationTag]
    )
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.filters["tojson"] = _tojson
    try:
        ast = env.parse(source)
        template = env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template has a syntax error (line {e.lineno}): {e}") from e
    return template, _detect_content_format(ast)


def _is_content_access(node: jinja2.nodes.Node) -> bool:
    if isinstance(node, jinja2.nodes.Getitem):
        return isinstance(node.arg, jinja2.nodes.Const) and node.arg.value == "content"
    if isinstance(node, jinja2.nodes.Getattr):
        return node.attr == "content"
    return False


def _unwrap(node: jinja2.nodes.Node) -> jinja2.nodes.Node:
    """The expression under filters and tests: ``m['content'] | selectattr(...) | list`` ->
    ``m['content']``."""
    while isinstance(node, (jinja2.nodes.Filter, jinja2.nodes.Test)) and node.node is not None:
        node = node.node
    return node


def _detect_content_format(ast: jinja2.nodes.Template) -> ContentFormat:
    """"openai" when the template loops over a message's content (``for x in m['content']``),
    through filters (``m['content'] | selectattr(...) | list``) or variables set from it
    (``set parts = m['content'] | default([])``, also chained); "string" otherwise."""

    def is_content(node: jinja2.nodes.Node, names: set[str]) -> bool:
        node = _unwrap(node)
        return _is_content_access(node) or (
            isinstance(node, jinja2.nodes.Name) and node.name in names
        )

    assigns = [
        a for a in ast.find_all(jinja2.nodes.Assign) if isinstance(a.target, jinja2.nodes.Name)
    ]
    content_vars: set[str] = set()
    while True:  # to a fixed point: a variable set from one set from the content, ...
        found = {a.target.name for a in assigns if is_content(a.node, content_vars)}
        if found <= content_vars:
            break
        content_vars |= found
    for loop in ast.find_all(jinja2.nodes.For):
        if is_content(loop.iter, content_vars):
            return "openai"
    return "string"


class ChatTemplate:
    """A compiled chat template; :meth:`render` turns parsed messages into the prompt text."""

    def __init__(self, source: str):
        self.source = source
        self._template, self.content_format = _compile(source)

    # Marks where the final message ends when continuing it (transformers' method).
    _CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "

    def render(
        self,
        conversation: list[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        special_tokens: Mapping[str, Any] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> str:
        """The prompt text. ``special_tokens`` (the tokenizer's special_tokens_map: bos_token,
        eos_token, pad_token, ...) and then ``extra`` (chat_template_kwargs) are the
        template's variables besides ``messages`` and ``add_generation_prompt``, as in
        transformers."""
        variables: dict[str, Any] = {"bos_token": "", "eos_token": ""}
        variables.update(special_tokens or {})
        variables.update(extra or {})
        final_text = ""
        if continue_final_message:
            conversation, final_text = self._tag_final_message(conversation)
        variables.update(messages=conversation, add_generation_prompt=add_generation_prompt)
        try:
            text = self._template.render(**variables)
        except jinja2.TemplateError as e:
            # raise_exception() in templates reports bad conversations (e.g. roles that do not
            # alternate): the client's fault.
            raise ChatInputError(f"chat template rejected the messages: {e}") from None
        except Exception as e:
            # A template that fails on these messages (a division by zero, a message field of
            # an unexpected type, ...).
            raise ChatInputError(
                f"chat template failed on the messages: {type(e).__name__}: {e}"
            ) from None
        if continue_final_message:
            tag = self._CONTINUE_TAG
            if final_text.strip() not in text or tag.strip() not in text:
                raise ChatInputError(
                    "continue_final_message: the final message's text is not in the rendered "
                    "prompt (the chat template drops or rewrites it)"
                )
            at = text.rindex(tag.strip())
            # Cut at the tag: with the final message's trailing spaces where the template kept
            # them, without them where it trimmed them (transformers' rule).
            text = text[:at] if text[at : at + len(tag)] == tag else text[:at].rstrip()
        return text

    def _tag_final_message(
        self, conversation: list[dict[str, Any]]
    ) -> tuple[list[dict[str, Any]], str]:
        """A copy of the conversation whose final message's (last) text ends with the continue
        tag, and that text."""
        if not conversation:
            raise ChatInputError("continue_final_message: the conversation is empty")
        final = dict(conversation[-1])
        content = final.get("content")
        if isinstance(content, str):
            text = content
            final["content"] = content + self._CONTINUE_TAG
        elif isinstance(content, list):
            parts = [dict(p) for p in content]
            texts = [p for p in parts if isinstance(p.get("text"), str)]
            if not texts:
                raise ChatInputError(
                    "continue_final_message: the final message has no text to continue"
                )
            text = texts[-1]["text"]
            texts[-1]["text"] = text + self._CONTINUE_TAG
            final["content"] = parts
        else:
            raise ChatInputError("continue_final_message: the final message has no content")
        return [*conversation[:-1], final], text


_SERVER_TEMPLATE_HINT = (
    "--chat-template FILE_OR_STRING (for LLaVA-1.5: --chat-template examples/llava.jinja)"
)


def resolve_chat_template(
    explicit: str | None, model_template: str | None, *, how_to_pass: str = _SERVER_TEMPLATE_HINT
) -> ChatTemplate:
    """The template given explicitly (``--chat-template`` or ``chat_template=``: a path or the
    text), else the checkpoint's own (tokenizer config, chat_template.jinja or
    chat_template.json); an error, saying ``how_to_pass`` one, if neither exists."""
    source = load_chat_template(explicit) or model_template
    if not source:
        raise ChatTemplateError(
            "the model has no chat template (none in its tokenizer config, chat_template.jinja "
            f"or chat_template.json), so chat requests cannot be formatted; pass one with "
            f"{how_to_pass}"
        )
    return ChatTemplate(source)


@dataclass
class ParsedChat:
    conversation: list[dict[str, Any]]  # what the template sees
    images: list[ImageSource]  # in prompt order: the i-th placeholder is the i-th image


def _message_fields(raw: Any, index: int) -> Mapping[str, Any]:
    # The server hands validated pydantic messages, LLM.chat plain dicts.
    if not isinstance(raw, Mapping) and hasattr(raw, "model_dump"):
        raw = raw.model_dump(exclude_none=True)
    if not isinstance(raw, Mapping) or not isinstance(raw.get("role"), str):
        raise ChatInputError(f"a chat message must be a dict with a 'role', got {raw!r}")
    if raw["role"] == "tool" or raw.get("tool_calls"):
        # Tool calling is not implemented (requests with `tools` are refused too): a tool
        # result or call would otherwise be rendered wrongly or dropped by the template.
        raise ChatInputError(
            f"messages[{index}]: tool messages and tool_calls are not supported"
        )
    return raw


def _parse_part(part: Any, index: int) -> tuple[Literal["text", "image"], Any]:
    kind = part.get("type") if isinstance(part, Mapping) else None
    if kind == "text":
        if not isinstance(part.get("text"), str):
            raise ChatInputError(f"messages[{index}]: a text part needs a 'text' string")
        return "text", part["text"]
    if kind == "image_url":
        value = part.get("image_url")
        url = value.get("url") if isinstance(value, Mapping) else value
        if not isinstance(url, str):
            raise ChatInputError(
                f"messages[{index}]: an image_url part needs {{'image_url': {{'url': '...'}}}}"
            )
        return "image", url
    if kind in ("image", "image_pil"):
        value = part.get(kind)
        if not isinstance(value, (str, Image.Image)):
            raise ChatInputError(
                f"messages[{index}]: a {kind!r} part needs a {kind!r} field with a PIL image "
                "or a URL"
            )
        return "image", value
    # (The part's type only: its payload may be a large tensor or a long string.)
    described = repr(kind) if kind is not None else f"of type {type(part).__name__}"
    raise ChatInputError(
        f"messages[{index}]: unsupported chat content part {described} (supported: 'text', "
        "'image_url', 'image', 'image_pil')"
    )


def parse_chat_messages(
    messages: Sequence[Any],
    *,
    image_placeholder: str,
    content_format: ContentFormat,
    max_images: int | None = None,
) -> ParsedChat:
    """Flattens OpenAI-style chat messages (dicts or the server's ``ChatMessage`` models) for a
    template and collects their images. A message's fields other than its content (``name``,
    ...) are passed to the template as they are.

    Raises :class:`ChatInputError` for malformed messages or parts, for more images than
    ``max_images``, for images outside user messages, and for a message whose explicit
    placeholders do not match its image count.
    """
    conversation: list[dict[str, Any]] = []
    images: list[ImageSource] = []
    for index, raw in enumerate(messages):
        msg = _message_fields(raw, index)
        content = msg.get("content")
        texts: list[str] = []
        parts_out: list[dict[str, Any]] = []
        message_images: list[ImageSource] = []
        if isinstance(content, str):
            texts.append(content)
            parts_out.append({"type": "text", "text": content})
        elif content is not None:
            for part in content:
                kind, value = _parse_part(part, index)
                if kind == "text":
                    texts.append(value)
                    parts_out.append({"type": "text", "text": value})
                else:
                    message_images.append(value)
                    parts_out.append({"type": "image"})
        if message_images and msg["role"] != "user":
            raise ChatInputError(
                f"messages[{index}]: images are only accepted in user messages, "
                f"not in role {msg['role']!r}"
            )
        images.extend(message_images)
        if max_images is not None and len(images) > max_images:
            raise ChatInputError(
                f"too many images: at most {max_images} per request (--limit-mm-per-prompt "
                f"image={max_images}), this request has at least {len(images)}"
            )
        entry = {k: v for k, v in msg.items() if k != "content"}
        if content_format == "openai":
            entry["content"] = parts_out
        else:
            text = "\n".join(texts)
            explicit = text.count(image_placeholder)
            if explicit == 0:
                text = "".join(f"{image_placeholder}\n" for _ in message_images) + text
            elif explicit != len(message_images):
                raise ChatInputError(
                    f"messages[{index}] has {explicit} {image_placeholder!r} placeholder(s) but "
                    f"{len(message_images)} image(s); give one placeholder per image or none"
                )
            entry["content"] = text
        conversation.append(entry)
    return ParsedChat(conversation=conversation, images=images)


def render_chat(
    template: ChatTemplate,
    messages: Sequence[Any],
    *,
    image_placeholder: str,
    tokenizer: Any = None,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
    max_images: int | None = None,
    extra: dict[str, Any] | None = None,
) -> tuple[str, list[ImageSource]]:
    """(prompt text, images in placeholder order) of one conversation; the tokenizer's special
    tokens (``bos_token``, ``eos_token``, ``pad_token``, ...) are template variables."""
    parsed = parse_chat_messages(
        messages,
        image_placeholder=image_placeholder,
        content_format=template.content_format,
        max_images=max_images,
    )
    text = template.render(
        parsed.conversation,
        add_generation_prompt=add_generation_prompt,
        continue_final_message=continue_final_message,
        special_tokens=getattr(tokenizer, "special_tokens_map", None) or {},
        extra=extra,
    )
    return text, parsed.images
