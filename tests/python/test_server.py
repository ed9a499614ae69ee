"""The OpenAI-compatible server end to end: a real server process on 127.0.0.1 serving a tiny
random LLaVA checkpoint on the CPU, driven with the official `openai` client and with httpx,
with images from a local HTTP server."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import openai
import pytest
from _image_server import ImageServer

from aphrodite.testing.tiny_llava import build_tiny_llava

REPO = Path(__file__).resolve().parents[2]
API_KEY = "test-key"
MODEL = "tiny-llava"
FETCH_TIMEOUT_S = 2.0
MAX_MODEL_LEN = 512
MAX_IMAGES = 2
MAX_IMAGE_BYTES = 200_000
STARTUP_TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(checkpoint: Path, port: int, extra: list[str], env: dict | None = None):
    cmd = [
        sys.executable, "-m", "aphrodite.endpoints.cli", "run", str(checkpoint),
        "--host", "127.0.0.1", "--port", str(port), "--device", "cpu", "--dtype", "float32",
        "--max-model-len", str(MAX_MODEL_LEN), "--num-kv-blocks", "400",
        "--uvicorn-log-level", "warning", *extra,
    ]
    full_env = {**os.environ, "APHRODITE_NUM_THREADS": "1", **(env or {})}
    full_env.pop("APHRODITE_API_KEY", None)
    # The log goes to a file, not a pipe: nobody reads a pipe until the server stops, and once
    # its 64 KiB filled up (a hundred logged requests) the server blocked on its next log line.
    log = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, env=full_env)
    proc.log = log  # type: ignore[attr-defined]
    return proc


def server_log(proc: subprocess.Popen) -> str:
    proc.log.seek(0)  # type: ignore[attr-defined]
    return proc.log.read()  # type: ignore[attr-defined]


def wait_healthy(proc: subprocess.Popen, base: str) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{server_log(proc)}")
        try:
            if httpx.get(f"{base}/health", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"server not healthy after {STARTUP_TIMEOUT_S} s:\n{server_log(proc)}")


def stop(proc: subprocess.Popen) -> str:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    out = server_log(proc)
    proc.log.close()  # type: ignore[attr-defined]
    return out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return build_tiny_llava(tmp_path_factory.mktemp("tiny_llava"), seed=0)


@pytest.fixture(scope="module")
def images():
    with ImageServer() as s:
        yield s


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory, images) -> Path:
    folder = tmp_path_factory.mktemp("media")
    (folder / "local.png").write_bytes(images.images["/rgb.png"])
    return folder


@pytest.fixture(scope="module")
def server(checkpoint, media_dir):
    port = free_port()
    proc = start_server(
        checkpoint, port,
        ["--api-keys", API_KEY, "--served-model-name", MODEL,
         "--chat-template", str(REPO / "examples" / "llava.jinja"),
         "--limit-mm-per-prompt", f"image={MAX_IMAGES}",
         "--allowed-media-domains", "127.0.0.1",
         "--allowed-local-media-path", str(media_dir),
         "--max-image-bytes", str(MAX_IMAGE_BYTES), "--max-image-pixels", str(4096 * 4096)],
        env={"APHRODITE_IMAGE_FETCH_TIMEOUT": str(FETCH_TIMEOUT_S)},
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, base)
    except BaseException:
        if proc.poll() is None:
            stop(proc)
        raise
    yield base
    log = stop(proc)
    assert "Traceback" not in log, log


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server, timeout=60,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as c:
        yield c


def user(*parts) -> list[dict]:
    return [{"role": "user", "content": list(parts)}]


def text(t: str) -> dict:
    return {"type": "text", "text": t}


def image(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def metric(body: str, name: str, **labels) -> float:
    """The value of one sample in Prometheus text format (labels must match exactly those
    given; other labels are ignored)."""
    for line in body.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def num_image_tokens(http, images) -> int:
    """Tokens one image takes in the prompt: /v1/tokenize expands each image placeholder to
    them (runs of the image token), so its count equals the prompt tokens a chat request with
    the same messages uses."""
    msgs = user(text("hi"), image(data_url(images.images["/rgb.png"])))
    tok = http.post("/v1/tokenize", json={"model": MODEL, "messages": msgs}).json()
    r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": msgs,
                                               "max_tokens": 1}).json()
    assert r["usage"]["prompt_tokens"] == tok["count"] == len(tok["tokens"])
    per_image = image_token_count(tok["tokens"])
    assert per_image > 1
    return per_image


def image_token_count(ids: list[int]) -> int:
    """How many ids are the image token (the most repeated id in these short prompts)."""
    return max(ids.count(t) for t in set(ids))


# ------------------------------------------------------------------ basics


def test_health_version_models(server, client):
    assert httpx.get(f"{server}/health").status_code == 200  # no key needed
    assert re.match(r"\d+\.\d+", httpx.get(f"{server}/version").json()["version"])
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_chat_http_and_data_urls(client, images, http):
    per_image = num_image_tokens(http, images)
    for url in (images.url("/rgb.jpg"), images.url("/gray.png"), images.url("/rgba.png"),
                data_url(images.images["/rgb.png"]),
                data_url(images.images["/rgb.jpg"], "image/jpeg")):
        msgs = user(text("What's in this image?"), image(url))
        r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=8,
                                           temperature=0)
        choice = r.choices[0]
        assert choice.finish_reason in ("stop", "length")
        assert isinstance(choice.message.content, str) and choice.message.role == "assistant"
        tok = http.post("/v1/tokenize", json={"model": MODEL, "messages": msgs}).json()
        # The server inserted exactly one placeholder, expanded to the image's tokens.
        assert r.usage.prompt_tokens == tok["count"]
        assert image_token_count(tok["tokens"]) == per_image
        assert 1 <= r.usage.completion_tokens <= 8
        assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_two_images_in_one_message(client, images, http):
    per_image = num_image_tokens(http, images)
    msgs = user(text("Compare these."), image(images.url("/rgb.png")),
                image(data_url(images.images["/gray.png"])))
    rendered = http.post("/v1/tokenize", json={"model": MODEL, "messages": msgs}).json()
    r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=4, temperature=0)
    assert r.usage.prompt_tokens == rendered["count"]
    assert image_token_count(rendered["tokens"]) == 2 * per_image
    # Swapping the images changes the prompt's image content, so the engine must not treat
    # it as the same prompt: both succeed and the usage is the same.
    swapped = user(text("Compare these."), image(data_url(images.images["/gray.png"])),
                   image(images.url("/rgb.png")))
    r2 = client.chat.completions.create(model=MODEL, messages=swapped, max_tokens=4,
                                        temperature=0)
    assert r2.usage.prompt_tokens == r.usage.prompt_tokens
    # Images spread over two user turns count together.
    conv = [
        {"role": "user", "content": [text("First."), image(images.url("/rgb.png"))]},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": [text("Second."), image(images.url("/gray.png"))]},
    ]
    r3 = client.chat.completions.create(model=MODEL, messages=conv, max_tokens=2)
    assert r3.choices[0].finish_reason in ("stop", "length")


def test_stream_equals_non_stream(client, images):
    msgs = user(text("Describe the picture in detail."), image(images.url("/rgb.jpg")))
    full = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=24,
                                          temperature=0)
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=msgs, max_tokens=24, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks
                if c.choices and c.choices[0].finish_reason]
    assert streamed == full.choices[0].message.content
    assert finishes == [full.choices[0].finish_reason]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.model_dump() == full.usage.model_dump()
    # Without include_usage there is no usage chunk.
    plain = list(client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=4,
                                                temperature=0, stream=True))
    assert all(c.usage is None for c in plain)
    # continuous_usage_stats (vLLM): the usage so far in every chunk, chat and completions.
    for stream in (
        client.chat.completions.create(
            model=MODEL, messages=msgs, max_tokens=24, temperature=0, stream=True,
            stream_options={"include_usage": True, "continuous_usage_stats": True}),
        client.completions.create(
            model=MODEL, prompt=["a b", "c"], n=2, max_tokens=6, temperature=0, stream=True,
            stream_options={"include_usage": True, "continuous_usage_stats": True},
            extra_body={"ignore_eos": True}),
    ):
        chunks = list(stream)
        usages = [c.usage for c in chunks]
        assert all(u is not None for u in usages)
        assert len({u.prompt_tokens for u in usages}) == 1 and usages[0].prompt_tokens > 0
        done = [u.completion_tokens for u in usages]
        assert done == sorted(done) and all(
            u.total_tokens == u.prompt_tokens + u.completion_tokens for u in usages)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 2 * 2 * 6
    assert usages[-1].model_dump() == chunks[-1].usage.model_dump()


def test_sampling_parameters(client, images):
    msgs = user(text("Tell me a story."))
    greedy = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=16,
                                            temperature=0)
    content = greedy.choices[0].message.content
    assert greedy.usage.completion_tokens <= 16
    # max_completion_tokens (OpenAI's newer name) limits like max_tokens.
    short = client.chat.completions.create(model=MODEL, messages=msgs,
                                           max_completion_tokens=3, temperature=0)
    assert short.usage.completion_tokens <= 3
    assert content.startswith(short.choices[0].message.content)
    # A stop string cuts the text before it.
    if len(content) >= 8:
        stop = content[4:7]
        cut = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=16,
                                             temperature=0, stop=[stop])
        assert cut.choices[0].message.content == content[: content.index(stop)]
        assert cut.choices[0].finish_reason == "stop"
    # Seeded sampling is reproducible; n gives n choices.
    a = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=12,
                                       temperature=1.0, top_p=0.9, seed=7, n=2)
    b = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=12,
                                       temperature=1.0, top_p=0.9, seed=7, n=2)
    assert [c.index for c in a.choices] == [0, 1]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]


def test_chat_logprobs(client):
    r = client.chat.completions.create(model=MODEL, messages=user(text("Hello there")),
                                       max_tokens=6, temperature=0, logprobs=True,
                                       top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0.0
        assert len(entry.top_logprobs) == 3
        # Greedy: the chosen token is the most likely one.
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-4)
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob


def choice_text(response) -> str:
    return response.choices[0].text


def test_completions_and_tokenizer_endpoints(client, http):
    r = client.completions.create(model=MODEL, prompt="USER: hello ASSISTANT:", max_tokens=5,
                                  temperature=0, logprobs=2, n=2)
    assert [c.index for c in r.choices] == [0, 1]
    assert r.choices[0].text == r.choices[1].text  # greedy twice
    assert len(r.choices[0].logprobs.tokens) == r.choices[0].logprobs.token_logprobs.__len__()
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt="USER: hello ASSISTANT:", max_tokens=5, temperature=0,
        stream=True) if c.choices)
    assert streamed == r.choices[0].text
    # The tokens of the logprobs add up to the text, their offsets point into it (a token's
    # word-initial space is its own, not lost by decoding it alone).
    for choice in r.choices:
        lp = choice.logprobs
        assert "".join(lp.tokens) == choice.text
        assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    echo = client.completions.create(model=MODEL, prompt="USER: hi", max_tokens=2, echo=True,
                                     temperature=0, logprobs=1, extra_body={"ignore_eos": True})
    choice = echo.choices[0]
    assert choice.text.startswith("USER: hi")
    # With echo the prompt's tokens come first: the first (BOS) without a logprob.
    prompt_len = echo.usage.prompt_tokens
    assert len(choice.logprobs.tokens) == prompt_len + 2
    assert choice.logprobs.token_logprobs[0] is None
    assert all(v is not None for v in choice.logprobs.token_logprobs[1:])
    assert "".join(choice.logprobs.tokens) == choice.text
    # top_logprobs always hold the chosen token (OpenAI: up to logprobs + 1 entries), also
    # with logprobs=0.
    for k in (0, 1):
        sampled = client.completions.create(model=MODEL, prompt="USER: hi", max_tokens=6,
                                            temperature=2.0, seed=3, logprobs=k)
        lp = sampled.choices[0].logprobs
        for token, logprob, tops in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
            assert tops[token] == logprob and k <= len(tops) <= k + 1
    # Streamed echo: the same text and logprobs, the prompt in each choice's first chunk.
    chunks = list(client.completions.create(
        model=MODEL, prompt="USER: hi", max_tokens=2, echo=True, temperature=0, logprobs=1,
        stream=True, extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].text.startswith("USER: hi")
    assert "".join(c.choices[0].text for c in chunks) == choice.text
    streamed_lp = [c.choices[0].logprobs for c in chunks if c.choices[0].logprobs]
    for field in ("tokens", "token_logprobs", "text_offset", "top_logprobs"):
        assert sum((getattr(lp, field) for lp in streamed_lp), []) == getattr(
            choice.logprobs, field)
    # Echo without generation (prompt scoring, as lm-eval asks for it): only the prompt.
    scored = client.completions.create(model=MODEL, prompt="USER: hi", max_tokens=0, echo=True,
                                       logprobs=1)
    choice = scored.choices[0]
    assert choice.text == "USER: hi" and scored.usage.completion_tokens == 0
    assert len(choice.logprobs.tokens) == prompt_len
    assert choice.logprobs.token_logprobs[1:] == echo.choices[0].logprobs.token_logprobs[
        1:prompt_len]
    # Echo of a token-id prompt: its text without the BOS, which the tokens add up to.
    ids = http.post("/v1/tokenize", json={"model": MODEL, "prompt": "USER: hi"}).json()["tokens"]
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=2, echo=True,
                                       temperature=0, logprobs=1, extra_body={"ignore_eos": True})
    assert by_ids.choices[0].text == choice_text(echo)
    lp = by_ids.choices[0].logprobs
    assert "".join(lp.tokens) == by_ids.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    # The model may be left out (the served one answers, under its name).
    unnamed = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1})
    assert unnamed.status_code == 200 and unnamed.json()["model"] == MODEL
    # Token-id prompts, and several prompts in one request.
    ids = http.post("/v1/tokenize", json={"model": MODEL, "prompt": "USER: hello ASSISTANT:"}
                    ).json()["tokens"]
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=5, temperature=0)
    assert by_ids.choices[0].text == r.choices[0].text
    multi = client.completions.create(model=MODEL, prompt=["a", "b c"], max_tokens=2)
    assert sorted(c.index for c in multi.choices) == [0, 1]
    text_back = http.post("/v1/detokenize", json={"model": MODEL, "tokens": ids}).json()
    assert "hello" in text_back["prompt"]


# ------------------------------------------------------------------ errors


def assert_error(resp: httpx.Response, status: int, code: str | None, words: str):
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) >= {"message", "type", "code"}
    if code is not None:
        assert err["code"] == code, err
    assert words.lower() in err["message"].lower(), err


# A DDS header whose pixel format flags name no format: Pillow raises NotImplementedError.
DDS_UNKNOWN_PIXEL_FORMAT = (
    b"DDS " + struct.pack("<7I", 124, 0x1007, 4, 4, 0, 0, 0) + bytes(44)
    + struct.pack("<2I", 32, 0x1) + bytes(44) + bytes(64)
)


@pytest.mark.parametrize(
    "make_url, code, words",
    [
        (lambda s: s.url("/missing.png"), "image_not_found", "404"),
        (lambda s: s.url("/notimage.png"), "invalid_image", "not an image"),
        (lambda s: s.url("/truncated.jpg"), "truncated_image", "truncated"),
        (lambda s: "data:image/png;base64,@@not-base64@@", "invalid_base64", "base64"),
        (lambda s: s.url(f"/big.bin?n={MAX_IMAGE_BYTES + 1}"), "image_too_large", "byte limit"),
        (lambda s: s.url(f"/big-chunked.bin?n={2 * MAX_IMAGE_BYTES}"), "image_too_large",
         "byte limit"),
        (lambda s: s.url("/bomb.png"), "image_too_many_pixels", "pixel limit"),
        (lambda s: "http://example.com/cat.png", "domain_not_allowed", "example.com"),
        (lambda s: "ftp://127.0.0.1/cat.png", "unsupported_url_scheme", "ftp"),
        (lambda s: "file:///etc/hostname", "local_media_not_allowed", "outside"),
        (lambda s: s.url("/redirect-to?url=file:///etc/passwd"), "unsupported_url_scheme",
         "redirect"),
        # URLs and files the libraries underneath fail on with other exceptions.
        (lambda s: "http://[::1/x.png", "invalid_image_url", "invalid image url"),
        (lambda s: "http://127.0.0.1:99999/x.png", "invalid_image_url", "port"),
        (lambda s: s.url("/redirect-to?url=http://127.0.0.1:99999/x.png"), "invalid_image_url",
         "port"),
        (lambda s: data_url(DDS_UNKNOWN_PIXEL_FORMAT, "image/dds"), "invalid_image",
         "NotImplementedError"),
    ],
)
def test_image_errors_are_400(http, images, make_url, code, words):
    msgs = user(text("What is this?"), image(make_url(images)))
    resp = http.post("/v1/chat/completions", json={"model": MODEL, "messages": msgs})
    assert_error(resp, 400, code, words)


def test_local_file_inside_allowed_folder(http, media_dir):
    msgs = user(text("What is this?"), image(f"file://{media_dir}/local.png"))
    r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": msgs,
                                               "max_tokens": 2})
    assert r.status_code == 200, r.text


def test_fetch_timeout(http, images):
    msgs = user(text("slow"), image(images.url("/slow.png?s=30")))
    start = time.monotonic()
    resp = http.post("/v1/chat/completions", json={"model": MODEL, "messages": msgs})
    elapsed = time.monotonic() - start
    assert_error(resp, 400, "image_fetch_timeout", "timed out")
    assert FETCH_TIMEOUT_S <= elapsed < FETCH_TIMEOUT_S + 1.0


def test_request_validation_errors(http, images):
    ok = user(text("hi"))
    # An unknown model is a 404 (OpenAI, vLLM: the client's NotFoundError).
    assert_error(http.post("/v1/chat/completions", json={"model": "nope", "messages": ok}),
                 404, "model_not_found", "does not exist")
    assert_error(http.post("/v1/completions", json={"model": "nope", "prompt": "hi"}),
                 404, "model_not_found", "does not exist")
    cases = [
        ({"model": MODEL, "messages": ok, "temperature": 5}, None, "temperature"),
        ({"model": MODEL, "messages": ok, "n": 0}, None, "n"),
        ({"model": MODEL, "messages": ok, "top_logprobs": 2}, None, "logprobs"),
        ({"model": MODEL, "messages": ok, "max_tokens": 0}, None, "max_tokens"),
        ({"model": MODEL, "messages": []}, None, "messages"),
        ({"model": MODEL, "messages": [{"role": "user", "content": [{"type": "video"}]}]},
         None, "messages"),
        ({"model": MODEL, "messages": user(*[image(images.url("/rgb.png"))] * 3)},
         "invalid_messages", f"at most {MAX_IMAGES}"),
        ({"model": MODEL, "messages": user(text("<image> <image>"), image(images.url(
            "/rgb.png")))}, "invalid_messages", "placeholder"),
        ({"model": MODEL, "messages": user(text("word " * (MAX_MODEL_LEN * 2)))},
         "invalid_prompt", "max_model_len"),
        # The prompt fits but not with max_tokens on top (vLLM's 400, not a shorter answer).
        ({"model": MODEL, "messages": ok, "max_tokens": MAX_MODEL_LEN}, "invalid_prompt",
         f"maximum context length is {MAX_MODEL_LEN} tokens"),
    ]
    for body, code, words in cases:
        assert_error(http.post("/v1/chat/completions", json=body), 400, code, words)
    r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": ok, "top_p": 7})
    assert_error(r, 400, "invalid_parameter", "top_p")
    assert r.json()["error"]["param"] == "top_p"
    # A validator's message comes without pydantic's "Value error, " prefix.
    r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": ok,
                                               "logit_bias": {"-1": 3}})
    assert_error(r, 400, None, "logit_bias")
    assert "Value error" not in r.json()["error"]["message"]
    assert_error(http.post("/v1/completions", json={"model": MODEL, "prompt": "hi",
                                                    "max_tokens": 0}), 400, None, "echo")
    bad_json = http.post("/v1/chat/completions", content=b"{not json",
                         headers={"Content-Type": "application/json"})
    assert_error(bad_json, 400, None, "json")
    assert bad_json.json()["error"]["param"] is None
    assert_error(http.post("/v1/completions", json={"model": MODEL, "prompt": [10**9]}),
                 400, None, "out of range")


def test_logit_bias_and_allowed_token_ids_steer_the_tokens(http):
    token = 42
    expected = http.post("/v1/detokenize", json={"model": MODEL, "tokens": [token] * 4}).json()
    for extra in ({"logit_bias": {str(token): 100}}, {"allowed_token_ids": [token]}):
        body = {"model": MODEL, "prompt": "USER: hi ASSISTANT:", "max_tokens": 4,
                "temperature": 0, "ignore_eos": True, **extra}
        r = http.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == expected["prompt"], extra
    # Between two allowed tokens greedy takes one; a strong negative bias on it gives the other.
    texts = {t: http.post("/v1/detokenize", json={"model": MODEL, "tokens": [t]}).json()["prompt"]
             for t in (42, 43)}
    assert texts[42] != texts[43]
    body = {"model": MODEL, "prompt": "USER: hi ASSISTANT:", "max_tokens": 1, "temperature": 0,
            "allowed_token_ids": [42, 43]}
    first = http.post("/v1/completions", json=body).json()["choices"][0]["text"]
    chosen = 42 if first == texts[42] else 43
    assert first == texts[chosen]
    banned = http.post("/v1/completions", json={**body, "logit_bias": {str(chosen): -100}})
    assert banned.json()["choices"][0]["text"] == texts[85 - chosen]


def test_parameters_we_do_not_implement_or_trust_are_refused(http):
    ok = user(text("hi"))
    cases = [
        ({"logit_bias": {"x": 10}}, "token ids"),
        ({"logit_bias": {"\u0665": 10}}, "token ids"),  # an Arabic-Indic digit five
        ({"logit_bias": {"5": 500}}, "[-100, 100]"),
        ({"logit_bias": {"999999": 5}}, "vocabulary size"),
        ({"allowed_token_ids": []}, "allowed_token_ids"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"stop_token_ids": [2**40]}, "vocabulary size"),
        ({"seed": 2**64}, "seed"),
        ({"seed": 2**64 - 1, "n": 2}, "seed"),
        ({"repetition_penalty": 1e999}, "finite"),
        # A request's own template is code the server would run: refused by default.
        ({"chat_template": "{{ 1 / 0 }}"}, "--trust-request-chat-template"),
    ]
    for extra, words in cases:
        # json.dumps writes the infinity as `Infinity`, as JavaScript clients may send it.
        body = json.dumps({"model": MODEL, "messages": ok, **extra})
        resp = http.post("/v1/chat/completions", content=body,
                         headers={"Content-Type": "application/json"})
        assert_error(resp, 400, None, words)
    # Asking for nothing unsupported is fine.
    fine = {"response_format": {"type": "text"}, "tool_choice": "none", "logit_bias": {}}
    r = http.post("/v1/chat/completions",
                  json={"model": MODEL, "messages": ok, "max_tokens": 1, **fine})
    assert r.status_code == 200, r.text
    resp = http.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "logprobs": True})
    assert_error(resp, 400, "invalid_parameter", "logprobs")
    deep = '{"prompt": ' + "[" * 5000 + "]" * 5000 + "}"
    for path in ("/v1/tokenize", "/v1/chat/completions", "/v1/completions"):
        resp = http.post(path, content=deep, headers={"Content-Type": "application/json"})
        assert resp.status_code == 400, (path, resp.text)


def test_oversized_bodies_and_unknown_routes(http):
    limit = MAX_IMAGES * MAX_IMAGE_BYTES * 4 // 3 + (1 << 20)
    huge = json.dumps({"model": MODEL, "messages": user(text("x" * (limit + 10)))}).encode()
    assert_error(http.post("/v1/chat/completions", content=huge,
                           headers={"Content-Type": "application/json"}),
                 413, "request_too_large", "byte limit")

    def chunks():  # no Content-Length: the limit is enforced while reading
        yield b'{"model": "tiny-llava", "messages": [{"role": "user", "content": "'
        for _ in range(limit // 65536 + 2):
            yield b"y" * 65536
        yield b'"}]}'

    assert_error(http.post("/v1/chat/completions", content=chunks(),
                           headers={"Content-Type": "application/json"}),
                 413, "request_too_large", "byte limit")
    assert_error(http.get("/v1/nothing-here"), 404, None, "not found")


def test_openai_client_sees_errors(client, images):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=MODEL, messages=user(text("x"), image(images.url("/missing.png"))))
    assert "404" in str(info.value)


def test_auth(server):
    body = {"model": MODEL, "messages": user(text("hi")), "max_tokens": 1}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        resp = httpx.post(f"{server}/v1/chat/completions", json=body, headers=headers)
        assert_error(resp, 401, "invalid_api_key", "api key")
    assert httpx.get(f"{server}/v1/models").status_code == 401
    ok = httpx.post(f"{server}/v1/chat/completions", json=body,
                    headers={"Authorization": f"Bearer {API_KEY}"})
    assert ok.status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0).models.list()
    assert httpx.get(f"{server}/health").status_code == 200
    assert httpx.get(f"{server}/metrics").status_code == 200


# ------------------------------------------------------------------ load and disconnects


def test_concurrent_requests(server, images):
    async def main():
        client = openai.AsyncOpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0,
                                    timeout=120)

        async def one(i: int):
            msgs = user(text(f"Request number {i}"),
                        *([image(images.url("/rgb.png"))] if i % 3 == 0 else []))
            if i % 2:
                stream = await client.chat.completions.create(
                    model=MODEL, messages=msgs, max_tokens=8, stream=True, temperature=0)
                finishes = [c.choices[0].finish_reason async for c in stream
                            if c.choices and c.choices[0].finish_reason]
                return finishes
            r = await client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=8)
            return [r.choices[0].finish_reason]

        try:
            return await asyncio.gather(*(one(i) for i in range(32)))
        finally:
            await client.close()

    results = asyncio.run(main())
    assert len(results) == 32
    assert all(len(f) == 1 and f[0] in ("stop", "length") for f in results)


def test_disconnect_mid_stream_frees_blocks(server, http):
    def scrape() -> str:
        return httpx.get(f"{server}/metrics").text

    before = scrape()
    aborted_before = metric(before, "aphrodite:request_success_total", finished_reason="abort")
    body = {"model": MODEL, "messages": user(text("Go on forever")), "stream": True,
            "ignore_eos": True, "temperature": 0}
    with http.stream("POST", "/v1/chat/completions", json=body) as resp:
        assert resp.status_code == 200
        lines = resp.iter_lines()
        got = [line for _, line in zip(range(6), lines) if line.startswith("data:")]
        assert got
        mid = scrape()
        assert metric(mid, "aphrodite:num_requests_running") == 1
        assert metric(mid, "aphrodite:kv_cache_usage_perc") > 0
    # Closing the response closed the connection: the server aborts the request and its
    # blocks go back to the pool.
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        now = scrape()
        if metric(now, "aphrodite:request_success_total", finished_reason="abort") > (
                aborted_before):
            break
        time.sleep(0.1)
    assert metric(now, "aphrodite:request_success_total", finished_reason="abort") == (
        aborted_before + 1)
    assert metric(now, "aphrodite:num_requests_running") == 0
    assert metric(now, "aphrodite:kv_cache_usage_perc") == 0.0
    assert metric(now, "aphrodite:kv_cache_free_blocks") == metric(
        now, "aphrodite:kv_cache_total_blocks")


def test_disconnect_while_waiting_for_a_full_response(server):
    def aborted() -> float:
        return metric(httpx.get(f"{server}/metrics").text, "aphrodite:request_success_total",
                      finished_reason="abort")

    before = aborted()
    body = {"model": MODEL, "messages": user(text("Keep talking")), "ignore_eos": True}
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{server}/v1/chat/completions", json=body, timeout=0.3,
                   headers={"Authorization": f"Bearer {API_KEY}"})
    deadline = time.monotonic() + 15
    while aborted() == before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert aborted() == before + 1
    assert metric(httpx.get(f"{server}/metrics").text, "aphrodite:kv_cache_usage_perc") == 0.0


def test_cors_preflight_and_headers(server):
    """Browsers may call the API (vLLM's defaults: any origin); the preflight needs no key, the
    request itself still does."""
    origin = {"Origin": "http://example.com"}
    pre = httpx.options(f"{server}/v1/chat/completions", headers={
        **origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})
    assert pre.status_code == 200
    assert pre.headers["access-control-allow-origin"] == "*"
    assert "POST" in pre.headers["access-control-allow-methods"]
    models = httpx.get(f"{server}/v1/models",
                       headers={**origin, "Authorization": f"Bearer {API_KEY}"})
    assert models.status_code == 200 and models.headers["access-control-allow-origin"] == "*"
    no_key = httpx.get(f"{server}/v1/models", headers=origin)
    assert no_key.status_code == 401 and no_key.headers["access-control-allow-origin"] == "*"


def test_leaving_while_an_image_downloads_runs_nothing(server, images):
    """A client that disconnects while its image is being fetched: the fetch stops and the
    request is never admitted (no prompt tokens prefilled for nobody)."""
    def prompt_tokens() -> float:
        return metric(httpx.get(f"{server}/metrics").text, "aphrodite:prompt_tokens_total")

    before = prompt_tokens()
    body = {"model": MODEL, "messages": user(text("slow"), image(images.url("/slow.png?s=2")))}
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{server}/v1/chat/completions", json=body, timeout=0.3,
                   headers={"Authorization": f"Bearer {API_KEY}"})
    time.sleep(2.5)  # past the image's delay: an unstopped fetch would have been admitted
    assert prompt_tokens() == before
    assert metric(httpx.get(f"{server}/metrics").text, "aphrodite:num_requests_running") == 0


def test_refused_multi_prompt_request_leaves_nothing_running(server, http):
    """A completions request whose later prompt is refused is a 400, and the prompts admitted
    before it are aborted, not left generating for nobody."""
    def scrape() -> str:
        return httpx.get(f"{server}/metrics").text

    aborted_before = metric(scrape(), "aphrodite:request_success_total", finished_reason="abort")
    body = {"model": MODEL, "prompt": [[1, 53], [1, 53], [1, 10**6]], "n": 3,
            "max_tokens": None, "ignore_eos": True}
    r = http.post("/v1/completions", json=body)
    assert r.status_code == 400 and "out of range" in r.json()["error"]["message"]
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        now = scrape()
        if metric(now, "aphrodite:num_requests_running") == 0:
            break
        time.sleep(0.05)
    assert metric(now, "aphrodite:num_requests_running") == 0
    assert metric(now, "aphrodite:request_success_total", finished_reason="abort") == (
        aborted_before + 2)
    assert metric(now, "aphrodite:kv_cache_usage_perc") == 0.0


def test_metrics(server, client, http, images):
    def scrape() -> str:
        return httpx.get(f"{server}/metrics").text

    before = scrape()
    long_prompt = "Describe the scene with the red car and the small dog " * 4
    msgs = user(text(long_prompt), image(images.url("/rgb.png")))
    for _ in range(2):  # the second one finds the prompt's blocks in the prefix cache
        client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=3)
    missing = user(text("x"), image(images.url("/missing.png")))
    assert http.post("/v1/chat/completions", json={"model": MODEL, "messages": missing}
                     ).status_code == 400
    body = scrape()
    for name in ("aphrodite:time_to_first_token_seconds_bucket",
                 "aphrodite:inter_token_latency_seconds_bucket",
                 "aphrodite:e2e_request_latency_seconds_bucket",
                 "aphrodite:num_requests_waiting", "aphrodite:prefix_cache_hit_rate"):
        assert name in body, name

    def grew(name: str, by: float = 1, **labels) -> bool:
        return metric(body, name, **labels) >= metric(before, name, **labels) + by

    assert grew("aphrodite:request_success_total", 2, finished_reason="length")
    assert grew("aphrodite:prompt_tokens_total", 2 * len(long_prompt.split()))
    assert grew("aphrodite:generation_tokens_total", 6)
    assert grew("aphrodite:time_to_first_token_seconds_count", 2)
    assert grew("aphrodite:inter_token_latency_seconds_count", 4)
    assert grew("aphrodite:e2e_request_latency_seconds_count", 2)
    assert grew("aphrodite:image_fetch_seconds_count", 2)
    assert grew("aphrodite:image_decode_seconds_count", 2)
    assert grew("aphrodite:prompt_preprocess_seconds_count", 2)
    assert grew("aphrodite:image_fetch_errors_total", code="image_not_found")
    assert grew("aphrodite:http_requests_total", 2, endpoint="/v1/chat/completions",
                status="200")
    assert grew("aphrodite:http_requests_total", endpoint="/v1/chat/completions", status="400")
    assert grew("aphrodite:prefix_cache_hits", 16)
    assert 0.0 < metric(body, "aphrodite:prefix_cache_hit_rate") <= 1.0


def test_seed_examples_from_the_docs(server, images):
    """The seed's curl example (image by URL, content parts) as raw JSON."""
    payload = json.dumps({
        "model": MODEL,
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": "What's in this image?"},
            {"type": "image_url", "image_url": {"url": images.url("/rgb.jpg")}},
        ]}],
    })
    out = subprocess.run(
        ["curl", "-sS", "-X", "POST", f"{server}/v1/chat/completions",
         "-H", "Content-Type: application/json", "-H", f"Authorization: Bearer {API_KEY}",
         "-d", payload],
        capture_output=True, text=True, timeout=60)
    if out.returncode == 127:
        pytest.fail("curl is not installed")
    reply = json.loads(out.stdout)
    assert reply["object"] == "chat.completion" and reply["choices"][0]["message"]["content"]


def test_startup_fails_without_chat_template(checkpoint, tmp_path):
    bare = tmp_path / "no_template"
    bare.mkdir()
    for f in checkpoint.iterdir():
        if f.name not in ("chat_template.jinja", "chat_template.json"):
            (bare / f.name).symlink_to(f)
    proc = start_server(bare, free_port(), [])
    proc.wait(timeout=STARTUP_TIMEOUT_S)
    out = stop(proc)
    assert proc.returncode != 0
    assert "--chat-template" in out and "no chat template" in out


def test_still_serving_after_all_error_cases(client, images):
    # Last in the module: every error case above has run against this server.
    r = client.chat.completions.create(model=MODEL, max_tokens=2, messages=user(
        text("still there?"), image(images.url("/rgb.png"))))
    assert r.choices[0].finish_reason in ("stop", "length")


def test_fields_left_out_take_the_generation_config_defaults():
    from aphrodite.endpoints.openai.protocol import ChatCompletionRequest
    from aphrodite.endpoints.openai.serving_engine import sampling_params_from

    defaults = {"temperature": 0.6, "top_p": 0.9, "top_k": 20, "repetition_penalty": 1.1,
                "max_tokens": 30}
    req = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], top_p=0.5,
                                temperature=0.3)
    p = sampling_params_from(req, None, None, defaults)
    assert (p.temperature, p.top_p, p.top_k, p.repetition_penalty, p.max_tokens) == (
        0.3, 0.5, 20, 1.1, 30)
    assert sampling_params_from(req, 4, None, defaults).max_tokens == 4
    plain = sampling_params_from(ChatCompletionRequest(messages=[{"role": "user",
                                                                  "content": "hi"}]), None, None)
    assert (plain.temperature, plain.top_p, plain.top_k, plain.max_tokens) == (1.0, 1.0, 0, None)
