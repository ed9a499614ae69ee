"""AsyncLLMEngine: the synchronous LLMEngine stepped in a background thread for asyncio servers.

Ownership: only the engine thread steps the LLMEngine (and so touches the C++ core, the model
and the KV cache). Prompts are tokenized and their images converted on a separate preprocessing
thread (``LLMEngine.process_prompt`` keeps no state), so a huge prompt delays neither the event
loop nor the other requests' steps. Coroutines hand the engine thread work through two queues
(requests to add, requests to abort) and wake it with an event; it hands back results through
per-request asyncio queues with ``loop.call_soon_threadsafe``. Between steps the thread drains
both queues, so a new request waits at most one step to be admitted, and an abort frees the
request's KV blocks before the next step (``LLMEngine.abort_request`` frees them in the core
at once).

A step that raises aborts the requests it ran (the LLMEngine closes its plan; their streams
end with RequestFailedError) and the engine goes on with the others; only after
MAX_CONSECUTIVE_STEP_FAILURES failed steps in a row (a broken device) does the thread stop, and
every request then gets EngineDeadError.

After every step and every abort the thread refreshes a stats snapshot (running and waiting
requests, KV-cache usage, prefix-cache counters) that /metrics reads without locking the engine.

A request's stream is aborted when its consumer goes away: ``generate`` aborts in ``finally``
unless the request finished, which covers a client disconnect (the server cancels the task or
closes the generator) as well as errors.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any, Callable

from aphrodite.outputs import RequestOutput
from aphrodite.sampling_params import SamplingParams

logger = logging.getLogger("aphrodite.engine")


class EngineDeadError(RuntimeError):
    """The engine thread stopped after an unexpected error; the server must be restarted."""


class RequestFailedError(RuntimeError):
    """An engine step that ran the request failed; the request was aborted and the engine went
    on with the others."""


# Steps in a row that may fail (each aborting only its own requests) before the engine is
# declared dead: a one-off failure (an input nothing caught earlier, an out-of-memory step)
# costs only the requests it ran, a broken device stops the server.
MAX_CONSECUTIVE_STEP_FAILURES = 3


@dataclass
class _Pending:
    request_id: str
    processed: Any  # the LLMEngine's ProcessedPrompt
    params: SamplingParams
    sink: _Sink
    accepted: asyncio.Future
    arrival: float = field(default_factory=time.perf_counter)


@dataclass
class _RequestTiming:
    arrival: float
    num_prompt_tokens: int = 0
    first_token: float | None = None
    last_token: float | None = None
    num_generated: int = 0
    inter_token: list[float] = field(default_factory=list)


class _Sink:
    """The engine thread's end of a request's stream: hands outputs over to the consumer's
    event loop. The engine holds this, not the :class:`RequestStream`, so that a stream its
    consumer dropped can be collected (and its request aborted)."""

    FINISHED = object()

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()

    # Called from the engine thread.
    def put_threadsafe(self, item: Any) -> None:
        self._loop.call_soon_threadsafe(self.queue.put_nowait, item)

    def finish_threadsafe(self, error: BaseException | None = None) -> None:
        self._loop.call_soon_threadsafe(
            self.queue.put_nowait, error if error is not None else self.FINISHED
        )


class RequestStream:
    """The outputs of one request, filled from the engine thread, read by one coroutine.

    Iterating yields outputs until the request finishes. The request is aborted when its
    consumer stops before the end: leaving the iteration early (cancelled, or the iterator
    closed), :meth:`aclose` (whether or not iteration ever started), or dropping the stream
    unfinished (when it is garbage-collected: a response that was never sent, say).
    """

    def __init__(
        self,
        request_id: str,
        loop: asyncio.AbstractEventLoop,
        abort: Callable[[str], None],
        num_prompt_tokens: int = 0,
    ):
        self.request_id = request_id
        self.num_prompt_tokens = num_prompt_tokens  # the processed prompt's, images expanded
        self.sink = _Sink(loop)
        self._abort = abort
        self.finished = False
        # Holds neither the stream nor the sink: runs once the stream is collected unfinished.
        self._abort_when_dropped = weakref.finalize(self, abort, request_id)
        self._abort_when_dropped.atexit = False

    def _set_finished(self) -> None:
        self.finished = True
        self._abort_when_dropped.detach()

    async def __aiter__(self) -> AsyncGenerator[RequestOutput, None]:
        try:
            while True:
                item = await self.sink.queue.get()
                if item is _Sink.FINISHED:
                    self._set_finished()
                    return
                if isinstance(item, BaseException):
                    self._set_finished()
                    raise item
                if item.finished:
                    self._set_finished()
                yield item
                if self.finished:
                    return
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        """Aborts the request unless it finished (a no-op after the end)."""
        if not self.finished:
            self._set_finished()
            self._abort(self.request_id)


class AsyncLLMEngine:
    """Serves many concurrent requests from asyncio over one :class:`LLMEngine`.

    Args:
        engine: the synchronous engine (``add_request``, ``process_prompt``, ``step``,
            ``abort_request``, ``has_unfinished_requests``, ``stats``); after :meth:`start`
            only the engine thread uses it, except ``process_prompt``, which the
            preprocessing thread calls.

    Hooks (set before :meth:`start`; called on the engine thread):
        on_finished(finish_reason, prompt tokens, generated tokens, time to first token or
            None, inter-token gaps, end-to-end seconds) when a request ends;
        on_preprocessed(seconds) after a prompt was tokenized and its images converted,
            hashed and expanded (called on the preprocessing thread).
    """

    def __init__(self, engine: Any):
        self.engine = engine
        self.on_finished: Callable[..., None] | None = None
        self.on_preprocessed: Callable[[float], None] | None = None
        self._lock = threading.Lock()
        self._adds: deque[_Pending] = deque()
        self._aborts: deque[str] = deque()
        self._wakeup = threading.Event()
        self._stop = False
        self._streams: dict[str, _Sink] = {}  # of the admitted, unfinished requests
        self._timings: dict[str, _RequestTiming] = {}
        self._thread: threading.Thread | None = None
        # A few threads, so that a long prompt does not hold up the short ones behind it (the
        # tokenizer is shared with the engine thread's detokenizer; all of them only read it,
        # and the tokenizers library releases the GIL while it works).
        self._preprocess = concurrent.futures.ThreadPoolExecutor(
            max_workers=min(4, os.cpu_count() or 1), thread_name_prefix="aphrodite-preprocess"
        )
        self._dead: BaseException | None = None
        self._stats: dict = {}
        self._refresh_stats()

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="aphrodite-engine", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        with self._lock:
            self._stop = True
        self._wakeup.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self._preprocess.shutdown(wait=False, cancel_futures=True)

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._dead is None

    @property
    def dead_error(self) -> BaseException | None:
        return self._dead

    def stats(self) -> dict:
        """The latest stats snapshot (refreshed after every step and abort)."""
        return dict(self._stats)

    # ------------------------------------------------------------------ requests

    async def add_request(
        self,
        request_id: str,
        prompt: Any,
        params: SamplingParams,
        add_special_tokens: bool = True,
        max_tokens_must_fit: bool = False,
    ) -> RequestStream:
        """Queues a request; returns its stream once the engine accepted it. Raises the
        engine's ValueError when the request can never run (e.g. the prompt is too long).
        ``add_special_tokens=False`` for prompts rendered by a chat template, which already
        carry the BOS token. With ``max_tokens_must_fit`` a prompt whose max_tokens would run
        past the model's length is refused (the OpenAI server's rule) instead of stopping
        early with finish_reason "length"."""
        with self._lock:
            self._check_accepting()
        loop = asyncio.get_running_loop()
        arrival = time.perf_counter()
        # A bad prompt (too long, bad ids, an image the model cannot take) raises here.
        try:
            processed = await loop.run_in_executor(
                self._preprocess, self._process_prompt, prompt, add_special_tokens
            )
        except RuntimeError:
            with self._lock:
                self._check_accepting()  # the executor refused: shut down meanwhile
            raise
        prompt_len = len(processed.prompt_token_ids)
        limit = self.engine.max_model_len
        if max_tokens_must_fit and params.max_tokens is not None and (
            prompt_len + params.max_tokens > limit
        ):
            raise ValueError(
                f"This model's maximum context length is {limit} tokens. However, you "
                f"requested {prompt_len + params.max_tokens} tokens ({prompt_len} in the "
                f"prompt, {params.max_tokens} in the completion). Please reduce the length "
                "of the prompt or of the completion."
            )
        stream = RequestStream(request_id, loop, self.abort, prompt_len)
        pending = _Pending(
            request_id, processed, params, stream.sink, loop.create_future(), arrival
        )
        with self._lock:
            # Checked again under the lock: the engine thread drains the queue under it when it
            # stops or dies.
            self._check_accepting()
            self._adds.append(pending)
        self._wakeup.set()
        try:
            await pending.accepted
        except asyncio.CancelledError:
            # The caller went away while the request was queued: it may be admitted anyway.
            await stream.aclose()
            raise
        except BaseException:
            stream._set_finished()  # refused: nothing to abort (the id may be another's)
            raise
        return stream

    def _check_accepting(self) -> None:
        """Raises EngineDeadError once the engine died or is shutting down (under _lock)."""
        if self._dead is not None:
            raise EngineDeadError(f"the engine stopped after an error: {self._dead}")
        if self._stop:
            raise EngineDeadError("the engine is shutting down")

    def abort(self, request_id: str) -> None:
        """Aborts a request (no-op when it already finished); its KV blocks are freed before
        the engine's next step."""
        with self._lock:
            self._aborts.append(request_id)
        self._wakeup.set()

    async def generate(
        self, prompt: Any, params: SamplingParams, request_id: str
    ) -> AsyncGenerator[RequestOutput, None]:
        """Yields the request's outputs as they grow; aborts it when the consumer stops early."""
        stream = await self.add_request(request_id, prompt, params)
        try:
            async for output in stream:
                yield output
        finally:
            await stream.aclose()  # aborts the request unless it finished

    # ------------------------------------------------------------------ engine thread

    def _refresh_stats(self) -> None:
        self._stats = dict(self.engine.stats())

    def _run(self) -> None:
        failures = 0  # consecutive failed steps
        try:
            while True:
                self._wakeup.clear()
                with self._lock:
                    if self._stop:
                        # Requests queued meanwhile will not run (add_request queues no more).
                        stopping = EngineDeadError("the engine is shutting down")
                        for pending in self._adds:
                            self._resolve(pending.accepted, stopping)
                        self._adds.clear()
                        break
                    adds = list(self._adds)
                    self._adds.clear()
                    aborts = list(self._aborts)
                    self._aborts.clear()
                for pending in adds:
                    self._admit(pending)
                if aborts:
                    self._abort_now(aborts)
                if self.engine.has_unfinished_requests():
                    try:
                        outputs = self.engine.step()
                    except Exception as e:
                        failures += 1
                        if failures >= MAX_CONSECUTIVE_STEP_FAILURES:
                            raise
                        self._fail_step(e)
                        continue
                    failures = 0
                    self._dispatch(outputs)
                    self._refresh_stats()
                elif not adds and not aborts:
                    self._wakeup.wait()
        except BaseException as e:  # noqa: B036 - the thread must report any failure
            logger.exception("engine loop failed")
            error = EngineDeadError(f"the engine stopped after an error: {e!r}")
            with self._lock:
                self._dead = e
                adds = list(self._adds)
                self._adds.clear()
            for pending in adds:
                self._resolve(pending.accepted, error)
            for stream in self._streams.values():
                stream.finish_threadsafe(error)
            self._streams.clear()

    def _fail_step(self, error: Exception) -> None:
        """A step failed and the LLMEngine aborted the requests it ran: their streams end with
        the error; the others go on."""
        logger.exception("engine step failed; its requests are aborted")
        for request_id in self.engine.failed_request_ids:
            stream = self._streams.pop(request_id, None)
            if stream is not None:
                self._finish_timing(request_id, "abort")
                stream.finish_threadsafe(
                    RequestFailedError(f"the engine step running this request failed: {error!r}")
                )
        self._refresh_stats()

    def _resolve(self, future: asyncio.Future, error: BaseException | None) -> None:
        def settle():
            if future.done():  # cancelled by the caller
                return
            if error is None:
                future.set_result(None)
            else:
                future.set_exception(error)

        try:
            future.get_loop().call_soon_threadsafe(settle)
        except RuntimeError:  # the caller's event loop is closed: nobody waits any more
            pass

    def _process_prompt(self, prompt: Any, add_special_tokens: bool) -> Any:
        start = time.perf_counter()
        processed = self.engine.process_prompt(prompt, add_special_tokens=add_special_tokens)
        if self.on_preprocessed is not None:
            self.on_preprocessed(time.perf_counter() - start)
        return processed

    def _admit(self, p: _Pending) -> None:
        if p.request_id in self._streams:
            self._resolve(p.accepted, ValueError(f"request id {p.request_id!r} is already in use"))
            return
        try:
            self.engine.add_request(p.request_id, p.processed, p.params)
        except Exception as e:
            # A bad request (ValueError/TypeError: bad parameters, ...) or an unexpected
            # failure while queueing it: either way only this request fails, the engine and
            # the other requests carry on.
            self._resolve(p.accepted, e)
            return
        self._streams[p.request_id] = p.sink
        self._timings[p.request_id] = _RequestTiming(
            arrival=p.arrival, num_prompt_tokens=len(p.processed.prompt_token_ids)
        )
        self._resolve(p.accepted, None)

    def _abort_now(self, request_ids: list[str]) -> None:
        live = [r for r in request_ids if r in self._streams]
        if not live:
            return
        self.engine.abort_request(live)
        for request_id in live:
            stream = self._streams.pop(request_id)
            self._finish_timing(request_id, "abort")
            stream.finish_threadsafe()
        self._refresh_stats()

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        now = time.perf_counter()
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            timing = self._timings[out.request_id]
            timing.num_prompt_tokens = len(out.prompt_token_ids)
            generated = sum(len(c.token_ids) for c in out.outputs)
            if generated > timing.num_generated:
                if timing.first_token is None:
                    timing.first_token = now
                else:
                    timing.inter_token.append(now - timing.last_token)
                timing.last_token = now
                timing.num_generated = generated
            if out.finished:
                # Metrics first: a client that reads /metrics right after its response must
                # find its request counted.
                del self._streams[out.request_id]
                reasons = [c.finish_reason for c in out.outputs if c.finish_reason]
                self._finish_timing(out.request_id, reasons[0] if reasons else "stop")
            stream.put_threadsafe(out)

    def _finish_timing(self, request_id: str, reason: str) -> None:
        timing = self._timings.pop(request_id, None)
        if timing is None or self.on_finished is None:
            return
        now = time.perf_counter()
        ttft = timing.first_token - timing.arrival if timing.first_token is not None else None
        try:
            self.on_finished(
                reason,
                timing.num_prompt_tokens,
                timing.num_generated,
                ttft,
                timing.inter_token,
                now - timing.arrival,
            )
        except Exception:
            logger.exception("request metrics hook failed")
