"""What the chat and completion endpoints share: the model-name check, OpenAI-style errors,
request -> SamplingParams, logprob formatting, streamed deltas and disconnect handling."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import Request

from aphrodite.endpoints.openai.protocol import (
    ChatLogProb,
    ChatLogProbsContent,
    CompletionLogProbs,
    ErrorInfo,
    ErrorResponse,
    SamplingFields,
)
from aphrodite.engine.async_llm_engine import RequestStream
from aphrodite.outputs import CompletionOutput, Logprob, SampleLogprobs
from aphrodite.sampling_params import SamplingParams

T = TypeVar("T")


class APIError(Exception):
    """An error answered with an OpenAI-style body ``{"error": {"message", "type", "code"}}``."""

    def __init__(
        self,
        message: str,
        status_code: int = 400,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.type = type
        self.code = code
        self.param = param

    def body(self) -> dict:
        return ErrorResponse(
            error=ErrorInfo(message=self.message, type=self.type, code=self.code, param=self.param)
        ).model_dump()


class ClientDisconnected(Exception):
    """The HTTP client went away before the response was ready."""


@dataclass
class ServingContext:
    """What every endpoint needs from the server."""

    engine: Any  # AsyncLLMEngine
    tokenizer: Any
    served_model_names: list[str]
    model_path: str
    max_model_len: int
    image_placeholder: str
    max_images: int | None
    fetcher: Any  # ImageFetcher
    metrics: Any  # ServerMetrics
    log_requests: bool = True
    # Whether requests may bring their own chat template (--trust-request-chat-template): a
    # template is code the server runs, with no time limit.
    trust_request_chat_template: bool = False
    # The checkpoint's sampling defaults (ModelConfig.generation_defaults): what a request gets
    # for the fields it leaves out.
    generation_defaults: dict[str, Any] = field(default_factory=dict)

    @property
    def model_name(self) -> str:
        return self.served_model_names[0]

    def check_model(self, name: str | None) -> str:
        """The model name a response reports: the request's, or the served one when it named
        none. An unknown name is a 404, as OpenAI and vLLM answer it."""
        if name is None:
            return self.model_name
        if name in self.served_model_names or name == self.model_path:
            return name
        raise APIError(
            f"the model {name!r} does not exist; this server serves "
            f"{', '.join(repr(n) for n in self.served_model_names)}",
            status_code=404,
            code="model_not_found",
            param="model",
        )

    def chat_needs_bos(self, rendered: str) -> bool:
        """Whether to add the tokenizer's special tokens to a rendered chat prompt: not when
        the template wrote the BOS token itself (the rule LLM.chat follows too)."""
        bos = getattr(self.tokenizer, "bos_token", None)
        return not (bos and rendered.startswith(bos))

    def tokenize(self, text: str, add_special_tokens: bool) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def expand_image_tokens(self, ids: list[int], num_images: int) -> list[int]:
        """Token ids with each image placeholder expanded as the engine expands it (the
        prompt it runs)."""
        return self.engine.engine.preprocessor.expand_placeholders(ids, num_images)[0]

    async def tokenize_async(self, text: str, add_special_tokens: bool) -> list[int]:
        """:meth:`tokenize` on a worker thread: a long text does not hold up the event loop."""
        return await asyncio.to_thread(self.tokenize, text, add_special_tokens)

    def engine_prompt(self, text: str, images: list) -> Any:
        """The engine input for a rendered prompt and its decoded images."""
        if not images:
            return text
        return {"prompt": text, "multi_modal_data": {"image": images}}

    async def admit(
        self,
        request_id: str,
        prompt: Any,
        params: SamplingParams,
        add_special_tokens: bool,
        max_tokens_must_fit: bool = True,
    ) -> RequestStream:
        """Adds the request to the engine; returns its outputs. Requests the engine refuses
        (a prompt longer than the model allows, or, with ``max_tokens_must_fit``, one whose
        max_tokens would run past it) are 400s. Closing the stream (or dropping it) before the
        request finished aborts it, whether or not it was read."""
        try:
            return await self.engine.add_request(
                request_id, prompt, params, add_special_tokens=add_special_tokens,
                max_tokens_must_fit=max_tokens_must_fit,
            )
        except (ValueError, TypeError) as e:
            raise APIError(str(e), code="invalid_prompt") from None


def sampling_params_from(
    request: SamplingFields,
    max_tokens: int | None,
    logprobs: int | None,
    defaults: dict[str, Any] | None = None,
) -> SamplingParams:
    """Maps OpenAI request fields (and our extensions) onto SamplingParams; a bad combination is
    a 400 naming the parameter. A field the request leaves out takes the model's default
    (``defaults``: its generation config), else the OpenAI one."""
    defaults = defaults or {}

    def pick(value: Any, name: str, fallback: Any) -> Any:
        return defaults.get(name, fallback) if value is None else value

    try:
        return SamplingParams(
            n=request.n,
            temperature=pick(request.temperature, "temperature", 1.0),
            top_p=pick(request.top_p, "top_p", 1.0),
            top_k=pick(request.top_k, "top_k", 0),
            min_p=pick(request.min_p, "min_p", 0.0),
            seed=request.seed,
            stop=request.stop_list(),
            stop_token_ids=request.stop_token_ids,
            include_stop_str_in_output=request.include_stop_str_in_output,
            presence_penalty=request.presence_penalty or 0.0,
            frequency_penalty=request.frequency_penalty or 0.0,
            repetition_penalty=pick(request.repetition_penalty, "repetition_penalty", 1.0),
            ignore_eos=request.ignore_eos,
            max_tokens=pick(max_tokens, "max_tokens", None),
            min_tokens=request.min_tokens,
            logprobs=logprobs,
            skip_special_tokens=request.skip_special_tokens,
            spaces_between_special_tokens=request.spaces_between_special_tokens,
            logit_bias=request.logit_bias_ids(),
            allowed_token_ids=request.allowed_token_ids,
        )
    except ValueError as e:
        raise APIError(str(e), code="invalid_parameter") from None


def _token_text(tokenizer: Any, token_id: int, lp: Logprob) -> str:
    if lp.decoded_token is not None:
        return lp.decoded_token
    return tokenizer.decode([token_id])


def _top_entries(position: dict[int, Logprob], k: int) -> list[tuple[int, Logprob]]:
    ranked = sorted(position.items(), key=lambda kv: (kv[1].rank or 1 << 30, -kv[1].logprob))
    return ranked[:k]


def chat_logprobs(
    tokenizer: Any, token_ids: list[int], positions: list[dict[int, Logprob]], top_k: int
) -> list[ChatLogProbsContent]:
    out = []
    for token_id, position in zip(token_ids, positions):
        lp = position.get(token_id)
        text = _token_text(tokenizer, token_id, lp) if lp else tokenizer.decode([token_id])
        tops = [
            ChatLogProb(
                token=_token_text(tokenizer, tid, tlp),
                logprob=max(tlp.logprob, -9999.0),
                bytes=list(_token_text(tokenizer, tid, tlp).encode("utf-8")),
            )
            for tid, tlp in _top_entries(position, top_k)
        ]
        out.append(
            ChatLogProbsContent(
                token=text,
                logprob=max(lp.logprob, -9999.0) if lp else -9999.0,
                bytes=list(text.encode("utf-8")),
                top_logprobs=tops,
            )
        )
    return out


def completion_logprobs(
    tokenizer: Any,
    token_ids: list[int],
    positions: list[dict[int, Logprob] | None],
    top_k: int,
    text_offset: int,
) -> CompletionLogProbs:
    result = CompletionLogProbs()
    offset = text_offset
    for token_id, position in zip(token_ids, positions):
        lp = position.get(token_id) if position else None
        # No entry: an echoed prompt's first token (BOS, which the text leaves out).
        text = (
            _token_text(tokenizer, token_id, lp)
            if lp
            else tokenizer.decode([token_id], skip_special_tokens=True)
        )
        result.tokens.append(text)
        result.token_logprobs.append(max(lp.logprob, -9999.0) if lp else None)
        tops = None
        if position:
            # The top_k most likely tokens and the chosen one, which OpenAI always includes
            # (up to logprobs + 1 entries).
            entries = _top_entries(position, top_k)
            if lp is not None and all(tid != token_id for tid, _ in entries):
                entries.append((token_id, lp))
            tops = {
                _token_text(tokenizer, tid, tlp): max(tlp.logprob, -9999.0)
                for tid, tlp in entries
            }
        result.top_logprobs.append(tops)
        result.text_offset.append(offset)
        offset += len(text)
    return result


@dataclass
class ChoiceDelta:
    """What a streamed choice gained since its last chunk."""

    text: str
    token_ids: list[int]
    logprobs: SampleLogprobs  # one entry per new token (empty when not requested)
    text_offset: int  # characters of the choice's text sent before this delta
    finish_reason: str | None
    stop_reason: int | str | None


class StreamedChoices:
    """How much of each choice of a streamed response has been sent, so that every chunk
    carries only what is new (engine outputs are cumulative)."""

    def __init__(self, num_choices: int):
        self._sent_text = [0] * num_choices
        self._sent_tokens = [0] * num_choices
        self._finished = [False] * num_choices

    def advance(self, index: int, output: CompletionOutput) -> ChoiceDelta | None:
        """The unsent part of choice ``index`` (now counted as sent); None once it finished."""
        if self._finished[index]:
            return None
        sent_text, sent_tokens = self._sent_text[index], self._sent_tokens[index]
        self._sent_text[index] = len(output.text)
        self._sent_tokens[index] = len(output.token_ids)
        self._finished[index] = output.finish_reason is not None
        return ChoiceDelta(
            text=output.text[sent_text:],
            token_ids=output.token_ids[sent_tokens:],
            logprobs=(output.logprobs or [])[sent_tokens:],
            text_offset=sent_text,
            finish_reason=output.finish_reason,
            stop_reason=output.stop_reason,
        )

    @property
    def num_tokens_sent(self) -> int:
        return sum(self._sent_tokens)


async def until_disconnected(request: Request) -> None:
    """Returns as soon as the ASGI server reports the client gone. The body has been read by
    then, so the next message on the request's channel is http.disconnect (polling
    ``is_disconnected`` every 0.5 s let a short generation finish, unaborted, after its client
    had left)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def unless_disconnected(awaitable: Awaitable[T], request: Request) -> T:
    """Awaits ``awaitable`` but cancels it (which aborts its engine requests) when the client
    disconnects first; then raises ClientDisconnected."""
    work = asyncio.ensure_future(awaitable)
    watch = asyncio.ensure_future(until_disconnected(request))
    try:
        done, _ = await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if work in done:
        return work.result()
    work.cancel()
    try:
        await work
    except (asyncio.CancelledError, Exception):
        pass
    raise ClientDisconnected()


async def merge_async_iterators(
    *iterators: AsyncIterator[T],
) -> AsyncIterator[tuple[int, T]]:
    """Yields (index of the iterator, item) from several iterators as items arrive; closing the
    merged iterator cancels (and so aborts) the ones still running."""
    queue: asyncio.Queue = asyncio.Queue()
    done_marker = object()

    async def drain(index: int, it: AsyncIterator[T]):
        try:
            async for item in it:
                await queue.put((index, item))
            await queue.put((index, done_marker))
        except Exception as e:
            await queue.put((index, e))

    tasks = [asyncio.ensure_future(drain(i, it)) for i, it in enumerate(iterators)]
    remaining = len(tasks)
    try:
        while remaining:
            index, item = await queue.get()
            if item is done_marker:
                remaining -= 1
                continue
            if isinstance(item, Exception):
                raise item
            yield index, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
