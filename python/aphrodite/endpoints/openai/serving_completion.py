"""``POST /v1/completions``: text (or token-id) prompts, one engine request per prompt."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator

from fastapi import Request

from aphrodite.endpoints.openai.protocol import (
    CompletionLogProbs,
    CompletionRequest,
    CompletionResponse,
    CompletionResponseChoice,
    CompletionResponseStreamChoice,
    CompletionStreamResponse,
    UsageInfo,
    random_id,
)
from aphrodite.endpoints.openai.serving_engine import (
    APIError,
    ServingContext,
    StreamedChoices,
    completion_logprobs,
    merge_async_iterators,
    sampling_params_from,
    unless_disconnected,
)
from aphrodite.engine.async_llm_engine import RequestStream
from aphrodite.outputs import RequestOutput

logger = logging.getLogger("aphrodite.server")


class OpenAIServingCompletion:
    def __init__(self, ctx: ServingContext):
        self.ctx = ctx

    def _engine_prompt(self, prompt: str | list[int]):
        if isinstance(prompt, str):
            return prompt
        vocab = len(self.ctx.tokenizer)
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise APIError(f"prompt token id {bad[0]} is out of range [0, {vocab})",
                           param="prompt")
        return {"prompt_token_ids": list(prompt)}

    async def create(self, request: CompletionRequest, raw: Request):
        ctx = self.ctx
        request.model = ctx.check_model(request.model)
        try:
            prompts = request.prompts()
        except ValueError as e:
            raise APIError(str(e), param="prompt") from None
        if request.echo_only and request.stream:
            raise APIError("echo with max_tokens 0 is not supported with stream", param="echo")
        # echo with max_tokens 0 runs one step for the prompt's logprobs and drops its token.
        max_tokens = 1 if request.echo_only else request.max_tokens
        params = sampling_params_from(
            request, max_tokens, request.logprobs, ctx.generation_defaults
        )
        if request.echo and request.logprobs is not None:
            params.prompt_logprobs = request.logprobs  # the echoed prompt gets logprobs too
        request_id = random_id("cmpl")
        created = int(time.time())
        streams: list[RequestStream] = []
        try:
            for i, prompt in enumerate(prompts):
                admitted = ctx.admit(f"{request_id}-{i}", self._engine_prompt(prompt), params,
                                     add_special_tokens=request.add_special_tokens,
                                     max_tokens_must_fit=max_tokens is not None)
                streams.append(await unless_disconnected(admitted, raw))
        except BaseException:
            for s in streams:
                await s.aclose()
            raise
        if ctx.log_requests:
            logger.info("request %s: %d prompt(s), params %s", request_id, len(prompts), params)
        if request.stream:
            return self._stream(request, request_id, created, streams)
        finals = await unless_disconnected(_collect(streams), raw)
        return self._full_response(request, request_id, created, finals)

    def _echo_text(self, out: RequestOutput) -> str:
        """The echoed prompt: its text, or for a token-id prompt the decoded ids (special
        tokens left out, as in the logprob tokens, which then add up to the text)."""
        if out.prompt is not None:
            return out.prompt
        return self.ctx.tokenizer.decode(out.prompt_token_ids, skip_special_tokens=True)

    def _echo_logprobs(self, request: CompletionRequest, out: RequestOutput) -> CompletionLogProbs:
        """The echoed prompt's logprobs (its first token has none), as OpenAI gives them."""
        return completion_logprobs(
            self.ctx.tokenizer, out.prompt_token_ids,
            out.prompt_logprobs or [None] * len(out.prompt_token_ids), request.logprobs, 0,
        )

    def _choice_logprobs(
        self,
        request: CompletionRequest,
        c,
        text_offset: int = 0,
        prompt: RequestOutput | None = None,
    ):
        if request.logprobs is None:
            return None
        token_ids = [] if request.echo_only else c.token_ids
        generated = completion_logprobs(
            self.ctx.tokenizer, token_ids, c.logprobs or [], request.logprobs, text_offset
        )
        if prompt is None:
            return generated
        return _concat(self._echo_logprobs(request, prompt), generated)

    def _full_response(self, request, request_id, created, finals) -> CompletionResponse:
        choices = []
        num_prompt = num_gen = 0
        for p, out in enumerate(finals):
            num_prompt += len(out.prompt_token_ids)
            prefix = self._echo_text(out) if request.echo else ""
            for c in out.outputs:
                generated = "" if request.echo_only else c.text
                num_gen += 0 if request.echo_only else len(c.token_ids)
                choices.append(
                    CompletionResponseChoice(
                        index=p * request.n + c.index,
                        text=prefix + generated,
                        logprobs=self._choice_logprobs(
                            request, c, len(prefix), out if request.echo else None
                        ),
                        finish_reason=c.finish_reason,
                        stop_reason=c.stop_reason,
                    )
                )
        return CompletionResponse(
            id=request_id, created=created, model=request.model, choices=choices,
            usage=UsageInfo(prompt_tokens=num_prompt, completion_tokens=num_gen,
                            total_tokens=num_prompt + num_gen),
        )

    async def _stream(
        self, request: CompletionRequest, request_id: str, created: int,
        streams: list[RequestStream],
    ) -> AsyncIterator[str]:
        n = request.n
        streamed = StreamedChoices(n * len(streams))
        num_prompt = sum(s.num_prompt_tokens for s in streams)
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
            body = CompletionStreamResponse(
                id=request_id, created=created, model=request.model, choices=choices, usage=usage
            )
            return f"data: {body.model_dump_json()}\n\n"

        # With echo, each choice's first chunk starts with the prompt (and its logprobs).
        echoed = [not request.echo] * (n * len(streams))
        prefixes: dict[int, str] = {}  # echoed text per prompt, decoded once
        merged = merge_async_iterators(*streams)
        try:
            async for p, out in merged:
                prefix = ""
                if request.echo:
                    if p not in prefixes:
                        prefixes[p] = self._echo_text(out)
                    prefix = prefixes[p]
                for c in out.outputs:
                    i = p * n + c.index
                    delta = streamed.advance(i, c)
                    if delta is None:
                        continue
                    logprobs = None
                    if request.logprobs is not None and delta.token_ids:
                        logprobs = completion_logprobs(
                            self.ctx.tokenizer, delta.token_ids, delta.logprobs,
                            request.logprobs, len(prefix) + delta.text_offset,
                        )
                    text = delta.text
                    # (Once the prompt is done: its logprobs are complete with the first token.)
                    if not echoed[i] and (delta.token_ids or delta.finish_reason is not None):
                        echoed[i] = True
                        text = prefix + text
                        if request.logprobs is not None:
                            logprobs = _concat(self._echo_logprobs(request, out),
                                               logprobs or CompletionLogProbs())
                    if not text and logprobs is None and delta.finish_reason is None:
                        continue
                    yield chunk([CompletionResponseStreamChoice(
                        index=i, text=text, logprobs=logprobs,
                        finish_reason=delta.finish_reason, stop_reason=delta.stop_reason,
                    )])
            if include_usage:
                yield chunk([], usage_so_far())
        except Exception as e:
            logger.exception("stream %s failed", request_id)
            err = APIError(f"internal error: {e}", status_code=500, type="server_error")
            yield f"data: {json.dumps(err.body())}\n\n"
        finally:
            await merged.aclose()
            for s in streams:
                await s.aclose()  # aborts the requests when the client went away
        yield "data: [DONE]\n\n"


def _concat(first: CompletionLogProbs, second: CompletionLogProbs) -> CompletionLogProbs:
    return CompletionLogProbs(
        text_offset=first.text_offset + second.text_offset,
        token_logprobs=first.token_logprobs + second.token_logprobs,
        tokens=first.tokens + second.tokens,
        top_logprobs=first.top_logprobs + second.top_logprobs,
    )


async def _collect(streams: list[RequestStream]) -> list[RequestOutput]:
    finals: list[RequestOutput | None] = [None] * len(streams)
    merged = merge_async_iterators(*streams)
    try:
        async for p, out in merged:
            finals[p] = out
    finally:
        await merged.aclose()
        for s in streams:
            await s.aclose()
    if any(f is None for f in finals):
        raise APIError("the request was aborted", status_code=500, type="server_error")
    return finals
