"""The OpenAI-compatible HTTP server (FastAPI + uvicorn).

``aphrodite run MODEL`` and ``python -m aphrodite.endpoints.openai.api_server MODEL`` both end
in :func:`run_server_from_args`. :func:`build_app` assembles the app from an already built
engine, which lets tests and embedders serve any engine instance.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import logging
import os
import sys
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from aphrodite import __version__
from aphrodite.endpoints.chat_utils import (
    ChatInputError,
    ChatTemplate,
    ChatTemplateError,
    load_chat_template,
    resolve_chat_template,
)
from aphrodite.endpoints.openai.cli_args import (
    api_keys_from,
    make_arg_parser,
    parse_limit_mm_per_prompt,
)
from aphrodite.endpoints.openai.metrics import ServerMetrics
from aphrodite.endpoints.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    TokenizeResponse,
)
from aphrodite.endpoints.openai.serving_chat import OpenAIServingChat
from aphrodite.endpoints.openai.serving_completion import OpenAIServingCompletion
from aphrodite.endpoints.openai.serving_engine import APIError, ClientDisconnected, ServingContext
from aphrodite.engine.async_llm_engine import AsyncLLMEngine, EngineDeadError
from aphrodite.multimodal.fetch import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_PIXELS,
    ImageFetcher,
    MediaFetchError,
    MediaFetchPolicy,
    fetch_timeout_from_env,
)

logger = logging.getLogger("aphrodite.server")

_KNOWN_PATHS = {
    "/health", "/version", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions",
    "/v1/tokenize", "/v1/detokenize",
}


class _AuthMiddleware:
    """``Authorization: Bearer KEY`` on /v1/*; everything else stays open (health checks,
    Prometheus scrapes)."""

    def __init__(self, app, keys: list[str]):
        self.app = app
        self.expected = [f"Bearer {k}".encode() for k in keys]

    async def __call__(self, scope, receive, send):
        if (
            scope["type"] == "http"
            and scope["method"] != "OPTIONS"
            and (scope["path"] == "/v1" or scope["path"].startswith("/v1/"))
        ):
            given = dict(scope["headers"]).get(b"authorization", b"")
            # Compare against every key in constant time so timing leaks nothing.
            ok = False
            for expected in self.expected:
                ok |= hmac.compare_digest(given, expected)
            if not ok:
                err = APIError(
                    "missing or invalid API key: send 'Authorization: Bearer <key>'",
                    status_code=401, type="authentication_error", code="invalid_api_key",
                )
                await JSONResponse(err.body(), status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class _BodyTooLarge(Exception):
    pass


class _BodyLimitMiddleware:
    """Refuses request bodies over ``limit`` bytes (data: URLs make bodies large, but not
    unboundedly): by Content-Length before reading, or while reading a chunked body."""

    def __init__(self, app, limit: int):
        self.app = app
        self.limit = limit

    def _error(self) -> APIError:
        return APIError(f"request body exceeds the {self.limit} byte limit", status_code=413,
                        code="request_too_large")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            err = self._error()
            await JSONResponse(err.body(), status_code=413)(scope, receive, send)
            return
        seen = 0

        async def counting_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _BodyTooLarge(self._error().message)
            return message

        await self.app(scope, counting_receive, send)


class _StatusMetricsMiddleware:
    """Counts HTTP responses by endpoint and status code."""

    def __init__(self, app, metrics: ServerMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"] if scope["path"] in _KNOWN_PATHS else "other"
        started = False

        async def counting_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                self.metrics.http_requests.labels(path, str(message["status"])).inc()
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        except Exception:
            # Unhandled errors become their 500 response outside this middleware (Starlette's
            # ServerErrorMiddleware runs the Exception handler), so count it here.
            if not started:
                self.metrics.http_requests.labels(path, "500").inc()
            raise


class _AbortingStreamingResponse(StreamingResponse):
    """Closes the body iterator however the response ends, so that a client that disconnects
    mid-stream aborts its engine request at once instead of when the generator is collected."""

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


def _validation_message(errors: list[dict]) -> str:
    parts = []
    for e in errors[:5]:
        loc = ".".join(str(x) for x in e.get("loc", ()) if x not in ("body",))
        msg = e.get("msg", "invalid value")
        if e.get("type") == "json_invalid":
            loc, msg = "", f"invalid JSON at byte {loc}: {e.get('ctx', {}).get('error', msg)}"
        # A validator's ValueError comes back as pydantic's "Value error, <message>".
        msg = msg.removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts) or "invalid request"


def build_app(
    engine: AsyncLLMEngine,
    *,
    tokenizer: Any,
    model_path: str,
    served_model_names: list[str],
    max_model_len: int,
    image_placeholder: str,
    chat_template: ChatTemplate | None,
    fetch_policy: MediaFetchPolicy,
    max_images: int | None = None,
    max_request_bytes: int | None = None,
    api_keys: list[str] | None = None,
    response_role: str = "assistant",
    log_requests: bool = True,
    trust_request_chat_template: bool = False,
    cors: dict[str, Any] | None = None,
) -> FastAPI:
    metrics = ServerMetrics(served_model_names[0], engine.stats)
    engine.on_finished = metrics.observe_finished
    engine.on_preprocessed = metrics.observe_preprocess
    fetcher = ImageFetcher(fetch_policy, observe=metrics.observe_image)
    ctx = ServingContext(
        engine=engine, tokenizer=tokenizer, served_model_names=served_model_names,
        model_path=model_path, max_model_len=max_model_len,
        image_placeholder=image_placeholder, max_images=max_images, fetcher=fetcher,
        metrics=metrics, log_requests=log_requests,
        trust_request_chat_template=trust_request_chat_template,
        generation_defaults=dict(engine.engine.model_config.generation_defaults),
    )
    if ctx.generation_defaults:
        logger.info("sampling defaults from the model's generation config: %s",
                    ctx.generation_defaults)
    chat = OpenAIServingChat(ctx, chat_template, response_role) if chat_template else None
    completion = OpenAIServingCompletion(ctx)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            await fetcher.aclose()
            await asyncio.to_thread(engine.shutdown)

    app = FastAPI(title="Aphrodite OpenAI-compatible server", version=__version__,
                  lifespan=lifespan)
    app.state.ctx = ctx

    def error_response(err: APIError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status_code)

    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError):
        return error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, e: StarletteHTTPException):
        # FastAPI turns a failure while reading the body into a 400 "error parsing the body".
        if isinstance(e.__cause__, _BodyTooLarge):
            return error_response(APIError(str(e.__cause__), status_code=413,
                                           code="request_too_large"))
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return error_response(APIError(str(e.detail), status_code=e.status_code, type=kind))

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError):
        errors = e.errors()
        # OpenAI's `param`: the first invalid field ("messages.0.content", "temperature").
        # (A JSON syntax error's location is a byte offset, not a field.)
        loc = [x for x in (errors[0].get("loc", ()) if errors else ()) if x != "body"]
        if errors and errors[0].get("type") == "json_invalid":
            loc = []
        return error_response(APIError(_validation_message(errors), code="invalid_parameter",
                                       param=".".join(str(x) for x in loc) or None))

    @app.exception_handler(MediaFetchError)
    async def _media(_: Request, e: MediaFetchError):
        metrics.image_fetch_errors.labels(ctx.model_name, e.code).inc()
        return error_response(APIError(str(e), code=e.code, param="messages"))

    @app.exception_handler(ChatInputError)
    async def _chat_input(_: Request, e: ChatInputError):
        return error_response(APIError(str(e), code="invalid_messages", param="messages"))

    @app.exception_handler(EngineDeadError)
    async def _dead(_: Request, e: EngineDeadError):
        return error_response(APIError(str(e), status_code=503, type="server_error"))

    @app.exception_handler(ClientDisconnected)
    async def _gone(_: Request, e: ClientDisconnected):
        # Nobody reads this; 499 (nginx's "client closed request") marks it in the metrics.
        return Response(status_code=499)

    @app.exception_handler(Exception)
    async def _internal(_: Request, e: Exception):
        logger.exception("unhandled error")
        return error_response(
            APIError(f"internal error: {type(e).__name__}: {e}", status_code=500,
                     type="server_error")
        )

    @app.get("/health")
    async def health():
        if engine.is_running:
            return Response(status_code=200)
        return error_response(APIError("the engine is not running", status_code=503,
                                       type="server_error"))

    @app.get("/version")
    async def version():
        return {"version": __version__}

    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return ModelList(data=[
            ModelCard(id=name, root=model_path, max_model_len=max_model_len)
            for name in served_model_names
        ])

    async def respond(result):
        if not hasattr(result, "__aiter__"):
            return JSONResponse(result.model_dump())
        return _AbortingStreamingResponse(result, media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: ChatCompletionRequest, raw: Request):
        if chat is None:
            raise APIError("this server has no chat template; start it with --chat-template",
                           code="no_chat_template")
        return await respond(await chat.create(request, raw))

    @app.post("/v1/completions")
    async def completions(request: CompletionRequest, raw: Request):
        return await respond(await completion.create(request, raw))

    async def json_body(raw: Request) -> dict:
        try:
            body = json.loads(await raw.body())
        except ValueError as e:
            raise APIError(f"request body is not valid JSON: {e}") from None
        except RecursionError:
            raise APIError("request body is nested too deeply") from None
        if not isinstance(body, dict):
            raise APIError("request body must be a JSON object")
        return body

    @app.post("/v1/tokenize")
    async def tokenize(raw: Request):
        body = await json_body(raw)
        try:
            if "messages" in body:
                req = TokenizeChatRequest.model_validate(body)
                ctx.check_model(req.model)
                if chat is None:
                    raise APIError("this server has no chat template", code="no_chat_template")
                text, urls = await chat.render_prompt_async(req)
                ids = await ctx.tokenize_async(text, add_special_tokens=ctx.chat_needs_bos(text))
                # Each image takes num_image_tokens positions, as in the engine's prompt.
                ids = ctx.expand_image_tokens(ids, len(urls)) if urls else ids
            else:
                req = TokenizeCompletionRequest.model_validate(body)
                ctx.check_model(req.model)
                ids = await ctx.tokenize_async(
                    req.prompt, add_special_tokens=req.add_special_tokens
                )
        except ValidationError as e:
            raise APIError(_validation_message(e.errors()), code="invalid_parameter") from None
        except RecursionError:
            raise APIError("request body is nested too deeply") from None
        return TokenizeResponse(count=len(ids), max_model_len=max_model_len, tokens=ids)

    @app.post("/v1/detokenize")
    async def detokenize(request: DetokenizeRequest):
        ctx.check_model(request.model)
        vocab = len(tokenizer)
        bad = [t for t in request.tokens if not 0 <= t < vocab]
        if bad:
            raise APIError(f"token id {bad[0]} is out of range [0, {vocab})", param="tokens")
        return DetokenizeResponse(prompt=tokenizer.decode(request.tokens))

    if max_request_bytes is None:
        # Room for the largest allowed images as base64 data URLs, plus the text.
        images = max_images if max_images is not None else 1
        max_request_bytes = images * fetch_policy.max_bytes * 4 // 3 + (1 << 20)
    app.add_middleware(_BodyLimitMiddleware, limit=max_request_bytes)
    if api_keys:
        app.add_middleware(_AuthMiddleware, keys=api_keys)
    # CORS answers browsers' preflight requests before the key check (a preflight carries no
    # key), then adds its headers to every response.
    cors = {"allow_origins": ["*"], "allow_methods": ["*"], "allow_headers": ["*"]} | (cors or {})
    app.add_middleware(CORSMiddleware, **cors)
    app.add_middleware(_StatusMetricsMiddleware, metrics=metrics)
    return app


def fetch_policy_from_args(args: argparse.Namespace) -> MediaFetchPolicy:
    def env_int(name: str, default: int) -> int:
        raw = os.environ.get(name)
        return int(raw) if raw else default

    return MediaFetchPolicy(
        timeout_s=fetch_timeout_from_env(),
        max_bytes=args.max_image_bytes or env_int("APHRODITE_IMAGE_FETCH_MAX_BYTES",
                                                  DEFAULT_MAX_BYTES),
        max_pixels=args.max_image_pixels or env_int("APHRODITE_IMAGE_MAX_PIXELS",
                                                    DEFAULT_MAX_PIXELS),
        max_redirects=args.max_image_redirects,
        allowed_domains=frozenset(args.allowed_media_domains)
        if args.allowed_media_domains else None,
        allowed_local_media_path=Path(args.allowed_local_media_path)
        if args.allowed_local_media_path else None,
    )


def run_server_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Validates the flags, loads the model, starts the engine and serves until interrupted."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(asctime)s %(name)s: "
                        "%(message)s", datefmt="%H:%M:%S")
    # httpx logs every image download at INFO, URL included: too noisy, and URLs may carry
    # credentials.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        limits = parse_limit_mm_per_prompt(args.limit_mm_per_prompt)
        policy = fetch_policy_from_args(args)
    except (argparse.ArgumentTypeError, ValueError) as e:
        parser.error(str(e))
    if args.chat_template is not None:
        # A bad template file fails now, before minutes of model loading.
        try:
            ChatTemplate(load_chat_template(args.chat_template))
        except ChatTemplateError as e:
            parser.error(str(e))

    from aphrodite.engine import EngineArgs, LLMEngine

    dtype = {"half": "float16", "float": "float32"}.get(args.dtype, args.dtype)
    engine_args = EngineArgs(
        model=args.model, tokenizer=args.tokenizer, revision=args.revision, dtype=dtype,
        device=args.device, max_model_len=args.max_model_len,
        limit_mm_per_prompt=limits or None,
        **{
            name: getattr(args, name)
            for name in ("seed", "max_num_seqs", "max_num_batched_tokens", "block_size",
                         "enable_prefix_caching", "gpu_memory_utilization",
                         "kv_cache_memory_gb", "num_kv_blocks", "enable_chunked_prefill",
                         "enforce_eager")
            if getattr(args, name) is not None
        },
    )
    engine = LLMEngine(engine_args)
    config = engine.model_config
    try:
        chat_template = resolve_chat_template(args.chat_template, config.chat_template)
    except ChatTemplateError as e:
        logger.error("%s", e)
        return 2
    names = args.served_model_name or [args.model]
    keys = api_keys_from(args)
    tokenizer = engine.get_tokenizer()
    app = build_app(
        AsyncLLMEngine(engine),
        tokenizer=tokenizer, model_path=args.model, served_model_names=names,
        max_model_len=engine.max_model_len,
        image_placeholder=tokenizer.convert_ids_to_tokens(config.image_token_id),
        chat_template=chat_template, fetch_policy=policy,
        max_images=engine_args.limit_mm_per_prompt["image"], api_keys=keys,
        response_role=args.response_role, log_requests=not args.disable_log_requests,
        trust_request_chat_template=args.trust_request_chat_template,
        cors={
            "allow_origins": args.allowed_origins,
            "allow_methods": args.allowed_methods,
            "allow_headers": args.allowed_headers,
            "allow_credentials": args.allow_credentials,
        },
    )
    block_size = engine_args.block_size
    logger.info("model %s on %s (%s), max model length %d", args.model, engine.device,
                config.dtype, engine.max_model_len)
    # Block 0 is the core's reserved null block.
    logger.info("KV cache: %d blocks of %d tokens = %d tokens", engine.num_kv_blocks - 1,
                block_size, (engine.num_kv_blocks - 1) * block_size)
    if policy.allowed_domains is None:
        logger.info("images may be fetched from any host (restrict with --allowed-media-domains)")
    host_shown = f"[{args.host}]" if ":" in args.host else args.host
    logger.info("serving %s at http://%s:%d/v1 (API keys %s)", names[0], host_shown, args.port,
                "required" if keys else "off")
    config = uvicorn.Config(app, host=args.host, port=args.port,
                            log_level=args.uvicorn_log_level, timeout_keep_alive=5)
    uvicorn.Server(config).run()
    return 0


def main(argv: list[str] | None = None) -> None:
    parser = make_arg_parser(prog="python -m aphrodite.endpoints.openai.api_server")
    sys.exit(run_server_from_args(parser.parse_args(argv), parser))


if __name__ == "__main__":
    main()
