"""``POST /v1/chat/completions``: messages with text and image_url parts -> one engine request."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request

from aphrodite.endpoints.chat_utils import ChatTemplate, ChatTemplateError, render_chat
from aphrodite.endpoints.openai.protocol import (
    ChatChoiceLogProbs,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionResponseChoice,
    ChatCompletionResponseStreamChoice,
    ChatCompletionStreamResponse,
    ChatResponseMessage,
    DeltaMessage,
    UsageInfo,
    random_id,
)
from aphrodite.endpoints.openai.serving_engine import (
    APIError,
    ServingContext,
    StreamedChoices,
    chat_logprobs,
    sampling_params_from,
    unless_disconnected,
)
from aphrodite.engine.async_llm_engine import RequestStream
from aphrodite.outputs import RequestOutput

logger = logging.getLogger("aphrodite.server")


class OpenAIServingChat:
    def __init__(self, ctx: ServingContext, chat_template: ChatTemplate, response_role: str):
        self.ctx = ctx
        self.chat_template = chat_template
        self.response_role = response_role

    def render_prompt(self, request: Any) -> tuple[str, list[str]]:
        """The prompt text and the image URLs in placeholder order."""
        template = self.chat_template
        if request.chat_template:
            if not self.ctx.trust_request_chat_template:
                raise APIError(
                    "this server does not take chat templates from requests; start it with "
                    "--trust-request-chat-template to allow them",
                    param="chat_template",
                )
            try:
                template = ChatTemplate(request.chat_template)
            except ChatTemplateError as e:
                raise APIError(str(e), param="chat_template") from None
        # The request model admits only text and image_url parts, so every image is a URL.
        return render_chat(
            template,
            request.messages,
            image_placeholder=self.ctx.image_placeholder,
            tokenizer=self.ctx.tokenizer,
            add_generation_prompt=request.add_generation_prompt,
            continue_final_message=request.continue_final_message,
            max_images=self.ctx.max_images,
            extra=request.chat_template_kwargs,
        )

    async def render_prompt_async(self, request: Any) -> tuple[str, list[str]]:
        """:meth:`render_prompt` on a worker thread (long conversations, heavy templates)."""
        return await asyncio.to_thread(self.render_prompt, request)

    async def create(self, request: ChatCompletionRequest, raw: Request):
        ctx = self.ctx
        request.model = ctx.check_model(request.model)
        text, urls = await self.render_prompt_async(request)
        # A client that leaves while its images download (or its prompt is admitted) stops
        # both: nothing is fetched, encoded or prefilled for nobody.
        images = await unless_disconnected(ctx.fetcher.fetch_images(urls), raw) if urls else []
        prompt = ctx.engine_prompt(text, images)
        top = request.top_logprobs or 0
        max_tokens = request.requested_max_tokens()
        params = sampling_params_from(
            request, max_tokens, top if request.logprobs else None, ctx.generation_defaults
        )
        request_id = random_id("chatcmpl")
        if ctx.log_requests:
            logger.info("request %s: %d image(s), params %s", request_id, len(images), params)
        created = int(time.time())
        # Admission errors (prompt too long for the model, ...) surface here, before any byte
        # of a stream is sent, so they can still be 400s.
        # Only a max_tokens the client asked for must fit; a default is capped by the model.
        stream = await unless_disconnected(
            ctx.admit(request_id, prompt, params, add_special_tokens=ctx.chat_needs_bos(text),
                      max_tokens_must_fit=max_tokens is not None),
            raw,
        )
        if request.stream:
            return self._stream(request, request_id, created, stream)
        final = await unless_disconnected(_last(stream), raw)
        return self._full_response(request, request_id, created, final)

    def _full_response(
        self, request: ChatCompletionRequest, request_id: str, created: int, out: RequestOutput
    ) -> ChatCompletionResponse:
        choices = []
        for c in out.outputs:
            logprobs = None
            if request.logprobs:
                logprobs = ChatChoiceLogProbs(
                    content=chat_logprobs(
                        self.ctx.tokenizer, c.token_ids, c.logprobs or [],
                        request.top_logprobs or 0,
                    )
                )
            choices.append(
                ChatCompletionResponseChoice(
                    index=c.index,
                    message=ChatResponseMessage(role=self.response_role, content=c.text),
                    logprobs=logprobs,
                    finish_reason=c.finish_reason,
                    stop_reason=c.stop_reason,
                )
            )
        num_prompt = len(out.prompt_token_ids)
        num_gen = sum(len(c.token_ids) for c in out.outputs)
        return ChatCompletionResponse(
            id=request_id,
            created=created,
            model=request.model,
            choices=choices,
            usage=UsageInfo(
                prompt_tokens=num_prompt, completion_tokens=num_gen,
                total_tokens=num_prompt + num_gen,
            ),
        )

    async def _stream(
        self, request: ChatCompletionRequest, request_id: str, created: int,
        outputs: RequestStream,
    ) -> AsyncIterator[str]:
        n = request.n
        streamed = StreamedChoices(n)
        num_prompt = outputs.num_prompt_tokens
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        # vLLM's extension: the usage so far in every chunk.
        continuous = include_usage and bool(request.stream_options.continuous_usage_stats)

        def usage_so_far() -> UsageInfo:
            num_gen = streamed.num_tokens_sent
            return UsageInfo(prompt_tokens=num_prompt, completion_tokens=num_gen,
                             total_tokens=num_prompt + num_gen)

        def chunk(choices, usage: UsageInfo | None = None) -> str:
            if usage is None and continuous:
                usage = usage_so_far()
            body = ChatCompletionStreamResponse(
                id=request_id, created=created, model=request.model, choices=choices, usage=usage
            )
            return f"data: {body.model_dump_json(exclude_unset=False)}\n\n"

        try:
            yield chunk([
                ChatCompletionResponseStreamChoice(
                    index=i, delta=DeltaMessage(role=self.response_role, content="")
                )
                for i in range(n)
            ])
            async for out in outputs:
                for c in out.outputs:
                    delta = streamed.advance(c.index, c)
                    if delta is None:
                        continue
                    logprobs = None
                    if request.logprobs and delta.token_ids:
                        logprobs = ChatChoiceLogProbs(
                            content=chat_logprobs(
                                self.ctx.tokenizer, delta.token_ids, delta.logprobs,
                                request.top_logprobs or 0,
                            )
                        )
                    if not delta.text and logprobs is None and delta.finish_reason is None:
                        continue
                    yield chunk([
                        ChatCompletionResponseStreamChoice(
                            index=c.index,
                            delta=DeltaMessage(content=delta.text or None),
                            logprobs=logprobs,
                            finish_reason=delta.finish_reason,
                            stop_reason=delta.stop_reason,
                        )
                    ])
            if include_usage:
                yield chunk([], usage_so_far())
        except APIError as e:
            yield f"data: {json.dumps(e.body())}\n\n"
        except Exception as e:  # the engine died mid-stream: tell the client in-band
            logger.exception("stream %s failed", request_id)
            err = APIError(f"internal error: {e}", status_code=500, type="server_error")
            yield f"data: {json.dumps(err.body())}\n\n"
        finally:
            await outputs.aclose()  # aborts the request when the client went away
        yield "data: [DONE]\n\n"


async def _last(outputs: AsyncIterator[RequestOutput]) -> RequestOutput:
    final = None
    async for out in outputs:
        final = out
    if final is None:
        raise APIError("the request was aborted", status_code=500, type="server_error")
    return final
