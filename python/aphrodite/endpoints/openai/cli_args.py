"""Command-line flags of the OpenAI-compatible server (``aphrodite run`` and
``python -m aphrodite.endpoints.openai.api_server`` share them)."""

from __future__ import annotations

import argparse
import os

DEFAULT_PORT = 2242


def parse_limit_mm_per_prompt(values: list[str] | None) -> dict[str, int]:
    """``image=4 [video=0 ...]`` (also ``image=4,video=0``) -> {"image": 4}."""
    limits: dict[str, int] = {}
    for value in values or []:
        for item in value.split(","):
            item = item.strip()
            if not item:
                continue
            key, sep, num = item.partition("=")
            if not sep or not key.strip():
                raise argparse.ArgumentTypeError(
                    f"--limit-mm-per-prompt expects MODALITY=N (e.g. image=4), got {item!r}"
                )
            try:
                n = int(num)
            except ValueError:
                raise argparse.ArgumentTypeError(
                    f"--limit-mm-per-prompt: {num!r} is not an integer"
                ) from None
            if n < 0:
                raise argparse.ArgumentTypeError("--limit-mm-per-prompt: limits must be >= 0")
            limits[key.strip()] = n
    unknown = set(limits) - {"image"}
    if unknown:
        raise argparse.ArgumentTypeError(
            f"--limit-mm-per-prompt: unsupported modality {sorted(unknown)[0]!r} (only image)"
        )
    return limits


def add_server_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument(
        "model",
        help="Hugging Face model id (resolved through the local HF cache, downloaded if absent) "
        "or a local checkpoint folder, e.g. llava-hf/llava-1.5-7b-hf.",
    )

    srv = parser.add_argument_group("server")
    srv.add_argument("--host", default="0.0.0.0",
                     help="Address to listen on (default: 0.0.0.0, every interface; use "
                     "127.0.0.1 to accept local clients only).")
    srv.add_argument("--port", type=int, default=DEFAULT_PORT,
                     help=f"TCP port to listen on (default: {DEFAULT_PORT}).")
    srv.add_argument("--api-keys", nargs="+", metavar="KEY", default=None,
                     help="Require 'Authorization: Bearer KEY' on /v1/* with one of these keys "
                     "(401 otherwise). Also read from APHRODITE_API_KEY. /health, /version "
                     "and /metrics stay open.")
    srv.add_argument("--allowed-origins", nargs="+", metavar="ORIGIN", default=["*"],
                     help="Origins (scheme://host[:port]) whose browser pages may call the API "
                     "(CORS; default: any). Browser requests still need an API key when keys "
                     "are set.")
    srv.add_argument("--allowed-methods", nargs="+", metavar="METHOD", default=["*"],
                     help="HTTP methods allowed for cross-origin requests (default: any).")
    srv.add_argument("--allowed-headers", nargs="+", metavar="HEADER", default=["*"],
                     help="Request headers allowed for cross-origin requests (default: any).")
    srv.add_argument("--allow-credentials", action="store_true",
                     help="Allow cross-origin requests to send cookies and HTTP "
                     "authentication (CORS credentials; off by default).")
    srv.add_argument("--served-model-name", nargs="+", metavar="NAME", default=None,
                     help="Name(s) clients use in the 'model' field; the first is reported by "
                     "/v1/models (default: the MODEL argument).")
    srv.add_argument("--chat-template", metavar="FILE_OR_STRING", default=None,
                     help="Jinja chat template for /v1/chat/completions: a file path or the "
                     "template text. Default: the tokenizer's own; startup fails when it has "
                     "none (LLaVA-1.5: examples/llava.jinja).")
    srv.add_argument("--trust-request-chat-template", action="store_true",
                     help="Let requests bring their own chat template (the chat_template "
                     "field). Off by default: a template is code the server runs.")
    srv.add_argument("--response-role", default="assistant",
                     help="Role of the generated chat message (default: assistant).")
    srv.add_argument("--uvicorn-log-level", default="info",
                     choices=["critical", "error", "warning", "info", "debug", "trace"],
                     help="Log level of the HTTP server (default: info).")
    srv.add_argument("--disable-log-requests", action="store_true",
                     help="Do not log each request's id and parameters.")

    media = parser.add_argument_group(
        "image fetching",
        "Images named by URL are fetched by the server. A server reachable by untrusted clients "
        "can be made to request any URL it can reach, internal hosts included; restrict it with "
        "--allowed-media-domains. The fetch timeout is APHRODITE_IMAGE_FETCH_TIMEOUT seconds "
        "(default 10).",
    )
    media.add_argument("--allowed-media-domains", nargs="+", metavar="HOST", default=None,
                       help="Only fetch http(s) images from these host names (exact match); "
                       "other hosts get a 400. Default: any host.")
    media.add_argument("--allowed-local-media-path", metavar="DIR", default=None,
                       help="Allow file:// image URLs for files under DIR (symlinks resolved). "
                       "Off by default; only for trusted clients.")
    media.add_argument("--max-image-bytes", type=int, default=None, metavar="N",
                       help="Largest image download or data URL in bytes (default: "
                       "APHRODITE_IMAGE_FETCH_MAX_BYTES or 20 MiB).")
    media.add_argument("--max-image-pixels", type=int, default=None, metavar="N",
                       help="Largest decoded image, width*height (default: "
                       "APHRODITE_IMAGE_MAX_PIXELS or 36 million); guards against "
                       "decompression bombs.")
    media.add_argument("--max-image-redirects", type=int, default=5, metavar="N",
                       help="Redirects followed when fetching an image (default: 5).")

    eng = parser.add_argument_group("model and engine")
    eng.add_argument("--tokenizer", default=None,
                     help="Tokenizer id or folder (default: the model's).")
    eng.add_argument("--revision", default=None, help="Model revision (branch, tag or commit).")
    eng.add_argument("--dtype", default="auto",
                     choices=["auto", "float16", "bfloat16", "float32", "half", "float"],
                     help="Weight and activation dtype (default: auto: the checkpoint's dtype "
                     "on CUDA, float32 on CPU).")
    eng.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"],
                     help="Where to run the model (default: auto: CUDA when available).")
    eng.add_argument("--max-model-len", type=int, default=None, metavar="N",
                     help="Longest prompt + output in tokens (default: the model's context "
                     "length).")
    eng.add_argument("--max-num-seqs", type=int, default=None, metavar="N",
                     help="Most sequences batched in one step.")
    eng.add_argument("--max-num-batched-tokens", type=int, default=None, metavar="N",
                     help="Token budget of one step (prefill chunks + decodes).")
    eng.add_argument("--block-size", type=int, default=None, metavar="N",
                     help="Tokens per KV-cache block.")
    eng.add_argument("--gpu-memory-utilization", type=float, default=None, metavar="F",
                     help="Fraction of GPU memory the engine may use (weights, activations and "
                     "KV cache).")
    eng.add_argument("--kv-cache-memory-gb", type=float, default=None, metavar="GB",
                     help="On CPU: KV-cache size in GiB (default: APHRODITE_CPU_KVCACHE_SPACE, "
                     "else 4).")
    eng.add_argument("--num-kv-blocks", type=int, default=None, metavar="N",
                     help="Size the KV cache to exactly N blocks instead of profiling memory.")
    eng.add_argument("--limit-mm-per-prompt", nargs="+", metavar="MODALITY=N", default=None,
                     help="Most images per request, e.g. image=4 (more is a 400).")
    eng.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                     default=None,
                     help="Reuse KV blocks of identical prompt prefixes (same text and images) "
                     "across requests (default: on).")
    eng.add_argument("--enable-chunked-prefill", action=argparse.BooleanOptionalAction,
                     default=None,
                     help="Split long prompts over several steps (default: on).")
    eng.add_argument("--enforce-eager", action="store_true", default=None,
                     help="On CUDA, run decode steps op by op instead of replaying CUDA graphs "
                     "captured at start-up.")
    eng.add_argument("--seed", type=int, default=None, help="Seed of the engine's sampler.")
    return parser


def make_arg_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Serve a vision-language model over an OpenAI-compatible HTTP API "
        "(/v1/chat/completions, /v1/completions, /v1/models, /v1/tokenize, /v1/detokenize, "
        "/health, /version, /metrics).",
    )
    return add_server_args(parser)


def api_keys_from(args: argparse.Namespace) -> list[str]:
    keys = list(args.api_keys or [])
    env_key = os.environ.get("APHRODITE_API_KEY")
    if env_key:
        keys.append(env_key)
    return keys
