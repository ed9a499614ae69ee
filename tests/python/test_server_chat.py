"""Chat templates and chat-message parsing of the server, and its command-line flags."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from aphrodite.endpoints.chat_utils import (
    ChatInputError,
    ChatTemplate,
    ChatTemplateError,
    load_chat_template,
    parse_chat_messages,
    resolve_chat_template,
)
from aphrodite.endpoints.openai.cli_args import make_arg_parser, parse_limit_mm_per_prompt

LLAVA_JINJA = Path(__file__).resolve().parents[2] / "examples" / "llava.jinja"

# The shape of the template Hugging Face ships with llava-hf checkpoints: it loops over the
# content parts and writes the <image> placeholders itself.
HF_STYLE = (
    "{% for message in messages %}{{ message['role'].upper() + ': ' }}"
    "{% for part in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{% for part in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ part['text'] + ' ' }}{% endgeneration %}{% endfor %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def image(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def text(t: str) -> dict:
    return {"type": "text", "text": t}


def render(template: ChatTemplate, messages, **kw) -> tuple[str, list[str]]:
    parsed = parse_chat_messages(messages, image_placeholder="<image>",
                                 content_format=template.content_format, **kw)
    return template.render(parsed.conversation,
                           special_tokens={"bos_token": "<s>", "eos_token": "</s>"}), (
        parsed.images)


def test_llava_template_inserts_one_placeholder_per_image_in_order():
    t = ChatTemplate(LLAVA_JINJA.read_text())
    assert t.content_format == "string"
    prompt, urls = render(t, [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [text("Compare"), image("a"), text("and"), image("b")]},
        {"role": "assistant", "content": "They differ."},
        {"role": "user", "content": [image("c"), text("And this?")]},
    ])
    assert prompt == (
        "<s>Be brief. USER: <image>\n<image>\nCompare\nand\nASSISTANT: They differ.</s>\n"
        "USER: <image>\nAnd this?\nASSISTANT:"
    )
    assert urls == ["a", "b", "c"]


def test_explicit_placeholders_are_kept_and_checked():
    t = ChatTemplate(LLAVA_JINJA.read_text())
    prompt, _ = render(t, [{"role": "user", "content": [text("A <image> then B <image>"),
                                                        image("a"), image("b")]}])
    assert prompt == "<s>USER: A <image> then B <image>\nASSISTANT:"
    with pytest.raises(ChatInputError, match="1 '<image>' placeholder.*2 image"):
        render(t, [{"role": "user", "content": [text("<image>"), image("a"), image("b")]}])
    with pytest.raises(ChatInputError, match="placeholder"):
        render(t, [{"role": "user", "content": "<image> with no image"}])


def test_image_limit_and_roles():
    t = ChatTemplate(LLAVA_JINJA.read_text())
    msgs = [{"role": "user", "content": [image("a"), image("b"), image("c")]}]
    assert render(t, msgs, max_images=3)[1] == ["a", "b", "c"]
    with pytest.raises(ChatInputError, match="at most 2 per request"):
        render(t, msgs, max_images=2)
    with pytest.raises(ChatInputError, match="only accepted in user messages"):
        render(t, [{"role": "assistant", "content": [image("a")]}])
    with pytest.raises(ChatInputError, match="alternate"):
        render(t, [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


def test_openai_style_template():
    t = ChatTemplate(HF_STYLE)
    assert t.content_format == "openai"
    prompt, urls = render(t, [{"role": "user", "content": [text("What?"), image("x")]}])
    assert prompt == "USER: <image>\nWhat? ASSISTANT:"
    assert urls == ["x"]


def test_continue_final_message():
    t = ChatTemplate(LLAVA_JINJA.read_text())
    parsed = parse_chat_messages(
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello, I am"}],
        image_placeholder="<image>", content_format="string")
    out = t.render(parsed.conversation, add_generation_prompt=False,
                   continue_final_message=True, special_tokens={"eos_token": "</s>"})
    assert out == "USER: Hi\nASSISTANT: Hello, I am"


def test_load_and_resolve(tmp_path):
    path = tmp_path / "t.jinja"
    path.write_text("{{ messages[0]['content'] }}")
    assert load_chat_template(str(path)) == "{{ messages[0]['content'] }}"
    assert load_chat_template("{{ 'inline' }}") == "{{ 'inline' }}"
    assert load_chat_template(None) is None
    with pytest.raises(ChatTemplateError, match="not found"):
        load_chat_template(str(tmp_path / "missing.jinja"))
    with pytest.raises(ChatTemplateError, match="syntax error"):
        ChatTemplate("{% for x in %}")

    with pytest.raises(ChatTemplateError, match="--chat-template"):
        resolve_chat_template(None, None)
    assert resolve_chat_template(None, "{{ 'own' }}").source == "{{ 'own' }}"
    assert resolve_chat_template(str(path), "{{ 'own' }}").source == path.read_text()


def test_templates_are_sandboxed():
    t = ChatTemplate("{{ messages.__class__.__mro__ }}")
    with pytest.raises(Exception, match="unsafe|not safely|access"):
        t.render([{"role": "user", "content": "x"}])


def test_template_failures_are_the_messages_fault():
    # Runtime errors of a template on these messages are 400s (ChatInputError), not 500s.
    for source in ("{{ 1 / 0 }}", "{{ messages + 1 }}"):
        with pytest.raises(ChatInputError, match="chat template failed"):
            ChatTemplate(source).render([{"role": "user", "content": "x"}])


def test_limit_mm_per_prompt_parsing():
    assert parse_limit_mm_per_prompt(["image=4"]) == {"image": 4}
    assert parse_limit_mm_per_prompt(None) == {}
    for bad in (["image"], ["image=x"], ["video=1"], ["image=-1"]):
        with pytest.raises(Exception, match="limit-mm-per-prompt"):
            parse_limit_mm_per_prompt(bad)


def test_arg_parser_defaults_and_flags():
    args = make_arg_parser().parse_args(
        ["m", "--api-keys", "k1", "k2", "--limit-mm-per-prompt", "image=3",
         "--no-enable-prefix-caching", "--allowed-media-domains", "a.org", "b.org"])
    assert args.port == 2242 and args.api_keys == ["k1", "k2"]
    assert args.enable_prefix_caching is False
    assert args.allowed_media_domains == ["a.org", "b.org"]
    assert args.allowed_local_media_path is None
    assert args.trust_request_chat_template is False
    trusting = make_arg_parser().parse_args(["m", "--trust-request-chat-template"])
    assert trusting.trust_request_chat_template is True


@pytest.mark.parametrize("cmd", [
    [sys.executable, "-m", "aphrodite.endpoints.cli", "run", "--help"],
    [sys.executable, "-m", "aphrodite.endpoints.openai.api_server", "--help"],
])
def test_help_lists_every_flag(cmd):
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True).stdout
    for flag in ("--host", "--port", "--api-keys", "--served-model-name", "--chat-template",
                 "--max-model-len", "--dtype", "--device", "--max-num-seqs",
                 "--limit-mm-per-prompt", "--enable-prefix-caching", "--no-enable-prefix-caching",
                 "--allowed-media-domains", "--allowed-local-media-path",
                 "APHRODITE_IMAGE_FETCH_TIMEOUT", "APHRODITE_API_KEY"):
        assert flag in out, flag


def test_unhandled_errors_are_counted_as_500s():
    """Starlette turns an unhandled exception into its 500 outside every user middleware; the
    status metrics middleware counts it anyway."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from aphrodite.endpoints.openai.api_server import _StatusMetricsMiddleware
    from aphrodite.endpoints.openai.metrics import ServerMetrics

    metrics = ServerMetrics("m")
    app = FastAPI()

    @app.post("/v1/completions")
    async def broken():
        raise ZeroDivisionError("boom")

    @app.get("/health")
    async def health():
        return {}

    app.add_middleware(_StatusMetricsMiddleware, metrics=metrics)
    client = TestClient(app, raise_server_exceptions=False)
    assert client.post("/v1/completions").status_code == 500
    assert client.get("/health").status_code == 200

    def count(path: str, status: str) -> float:
        return metrics.registry.get_sample_value(
            "aphrodite:http_requests_total", {"endpoint": path, "status": status}
        )

    assert count("/v1/completions", "500") == 1.0
    assert count("/health", "200") == 1.0
