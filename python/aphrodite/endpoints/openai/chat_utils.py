"""Chat templates and OpenAI chat messages -> one prompt string plus its image URLs.

Two template styles exist in the wild and both are supported:

- "string" templates (such as ``examples/llava.jinja``) read ``message['content']`` as text. The
  server flattens each message's parts into one string; when the text has no image placeholder,
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
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.parser
from jinja2.sandbox import ImmutableSandboxedEnvironment

from aphrodite.endpoints.openai.protocol import ChatMessage

ContentFormat = Literal["string", "openai"]


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
    path = Path(value).expanduser()
    try:
        if path.is_file():
            return path.read_text(encoding="utf-8")
    except OSError as e:
        raise ChatTemplateError(f"cannot read chat template file {value!r}: {e}") from None
    if any(c in value for c in "{}\n"):
        return value
    raise ChatTemplateError(
        f"chat template file {value!r} not found (pass a path to a .jinja file or the template "
        "text itself)"
    )


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


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


def _detect_content_format(ast: jinja2.nodes.Template) -> ContentFormat:
    """"openai" when the template loops over a message's content (``for x in m['content']``),
    directly or through a variable set from it; "string" otherwise."""
    content_vars = {
        a.target.name
        for a in ast.find_all(jinja2.nodes.Assign)
        if isinstance(a.target, jinja2.nodes.Name) and _is_content_access(a.node)
    }
    for loop in ast.find_all(jinja2.nodes.For):
        it = loop.iter
        if isinstance(it, jinja2.nodes.Filter) and it.node is not None:
            it = it.node
        if _is_content_access(it):
            return "openai"
        if isinstance(it, jinja2.nodes.Name) and it.name in content_vars:
            return "openai"
    return "string"


class ChatTemplate:
    """A compiled chat template; :meth:`render` turns parsed messages into the prompt text."""

    def __init__(self, source: str):
        self.source = source
        self._template, self.content_format = _compile(source)

    def render(
        self,
        conversation: list[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        bos_token: str | None = None,
        eos_token: str | None = None,
        extra: dict[str, Any] | None = None,
    ) -> str:
        variables = dict(extra or {})
        variables.update(
            messages=conversation,
            add_generation_prompt=add_generation_prompt,
            bos_token=bos_token or "",
            eos_token=eos_token or "",
        )
        try:
            text = self._template.render(**variables)
        except jinja2.TemplateError as e:
            # raise_exception() in templates reports bad conversations (e.g. roles that do not
            # alternate): the client's fault.
            raise ChatInputError(f"chat template rejected the messages: {e}") from None
        if continue_final_message:
            final = conversation[-1]["content"]
            if not isinstance(final, str):
                final = "".join(p.get("text", "") for p in final if p.get("type") == "text")
            end = text.rfind(final.strip()) if final.strip() else -1
            if end < 0:
                raise ChatInputError(
                    "continue_final_message: the final message's text is not in the rendered "
                    "prompt"
                )
            text = text[: end + len(final.strip())]
        return text


def resolve_chat_template(cli_value: str | None, model_template: str | None) -> ChatTemplate:
    """The template given on the command line, else the checkpoint's own (tokenizer config,
    chat_template.jinja or chat_template.json); an error if neither exists."""
    source = load_chat_template(cli_value) or model_template
    if not source:
        raise ChatTemplateError(
            "the model has no chat template (none in its tokenizer config, chat_template.jinja "
            "or chat_template.json), so chat requests cannot be formatted; pass one with "
            "--chat-template FILE_OR_STRING (for LLaVA-1.5: --chat-template examples/llava.jinja)"
        )
    return ChatTemplate(source)


@dataclass
class ParsedChat:
    conversation: list[dict[str, Any]]  # what the template sees
    image_urls: list[str]  # in prompt order: the i-th placeholder is the i-th URL


def parse_chat_messages(
    messages: list[ChatMessage | dict[str, Any]],
    *,
    image_placeholder: str,
    content_format: ContentFormat,
    max_images: int | None = None,
) -> ParsedChat:
    """Flattens OpenAI chat messages for a template and collects their image URLs.

    Raises :class:`ChatInputError` for more images than ``max_images``, for images outside user
    messages, and for a message whose explicit placeholders do not match its image count.
    """
    conversation: list[dict[str, Any]] = []
    urls: list[str] = []
    for index, raw in enumerate(messages):
        msg = raw if isinstance(raw, ChatMessage) else ChatMessage.model_validate(raw)
        texts: list[str] = []
        parts_out: list[dict[str, Any]] = []
        message_urls: list[str] = []
        if isinstance(msg.content, str):
            texts.append(msg.content)
            parts_out.append({"type": "text", "text": msg.content})
        elif msg.content is not None:
            for part in msg.content:
                if part.type == "text":
                    texts.append(part.text)
                    parts_out.append({"type": "text", "text": part.text})
                else:
                    message_urls.append(part.image_url.url)
                    parts_out.append({"type": "image"})
        if message_urls and msg.role != "user":
            raise ChatInputError(
                f"messages[{index}]: images are only accepted in user messages, "
                f"not in role {msg.role!r}"
            )
        urls.extend(message_urls)
        if max_images is not None and len(urls) > max_images:
            raise ChatInputError(
                f"too many images: at most {max_images} per request (--limit-mm-per-prompt "
                f"image={max_images}), this request has at least {len(urls)}"
            )
        entry: dict[str, Any] = {"role": msg.role}
        if msg.name is not None:
            entry["name"] = msg.name
        if content_format == "openai":
            entry["content"] = parts_out
        else:
            text = "\n".join(texts)
            explicit = text.count(image_placeholder)
            if explicit == 0:
                text = "".join(f"{image_placeholder}\n" for _ in message_urls) + text
            elif explicit != len(message_urls):
                raise ChatInputError(
                    f"messages[{index}] has {explicit} {image_placeholder!r} placeholder(s) but "
                    f"{len(message_urls)} image(s); give one placeholder per image or none"
                )
            entry["content"] = text
        conversation.append(entry)
    return ParsedChat(conversation=conversation, image_urls=urls)
