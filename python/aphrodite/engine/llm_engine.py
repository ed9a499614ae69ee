"""LLMEngine: the synchronous engine loop around the C++ EngineCore and the ModelRunner.

One ``step()``: the core schedules (continuous batching, chunked prefill, prefix cache,
preemption) -> the runner encodes images and runs the decoder -> logits of the sampled rows
(and of prompt rows for requests asking for prompt logprobs) -> the sampler -> the core appends
the tokens and checks stop tokens and lengths -> Python detokenizes, applies stop strings
(finishing the request in the core when one hits) and builds RequestOutputs.

A request with n > 1 becomes n core requests ("{i}_{request_id}") sharing the prompt; the
prefix cache lets them share its blocks.
"""

from __future__ import annotations

import itertools
import logging
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from aphrodite import _C
from aphrodite.engine.args import EngineArgs
from aphrodite.inputs import InputPreprocessor, ProcessedPrompt, PromptInputs
from aphrodite.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from aphrodite.sampling import Sampler, SamplingMetadata, SamplingRow, gather_logprobs
from aphrodite.sampling_params import SamplingParams
from aphrodite.transformers_utils.detokenizer import IncrementalDetokenizer

logger = logging.getLogger(__name__)

# Tokens before a position that its log-probability entries are decoded after.
_TOKEN_TEXT_CONTEXT = 4


@dataclass
class _Sequence:
    """One completion of a request: one request in the core."""

    engine_id: str
    index: int
    params: SamplingParams
    parent: _Request
    generator: torch.Generator | None
    detokenizer: IncrementalDetokenizer | None
    output_token_ids: list[int] = field(default_factory=list)
    cumulative_logprob: float = 0.0
    logprobs: list[dict[int, Logprob]] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    wants_prompt_logprobs: bool = False

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def completion(self) -> CompletionOutput:
        text = self.detokenizer.streamed_text(self.finished) if self.detokenizer else ""
        return CompletionOutput(
            index=self.index,
            text=text,
            token_ids=list(self.output_token_ids),
            cumulative_logprob=self.cumulative_logprob,
            logprobs=None if self.logprobs is None else list(self.logprobs),
            finish_reason=self.finish_reason,
            stop_reason=self.stop_reason,
        )


@dataclass
class _Request:
    request_id: str
    processed: ProcessedPrompt
    params: SamplingParams
    max_tokens: int
    metrics: RequestMetrics
    seqs: list[_Sequence] = field(default_factory=list)
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    num_cached_tokens: int | None = None

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.seqs)

    def output(self) -> RequestOutput:
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.processed.prompt,
            prompt_token_ids=list(self.processed.prompt_token_ids),
            prompt_logprobs=None if self.prompt_logprobs is None else list(self.prompt_logprobs),
            outputs=[s.completion() for s in self.seqs],
            finished=self.finished,
            metrics=self.metrics,
            num_cached_tokens=self.num_cached_tokens or 0,
            multi_modal_placeholders=[(m.offset, m.length) for m in self.processed.mm_items],
        )


class LLMEngine:
    """Runs requests to completion, one ``step()`` at a time.

    ``add_request`` validates and queues a request (errors are ValueError/TypeError raised
    before it reaches the scheduler); ``step`` advances every running request by one token
    (or one prefill chunk) and returns the outputs of the requests it touched.
    """

    def __init__(self, args: EngineArgs, model_config: Any = None, runner: Any = None) -> None:
        """model_config and runner default to ModelConfig.load(args...) and
        ModelRunner(model_config); passing them lets a caller supply its own model."""
        self.args = args
        if model_config is None:
            from aphrodite.config import ModelConfig

            model_config = ModelConfig.load(
                args.model,
                tokenizer=args.tokenizer,
                dtype=args.dtype,
                device=args.device,
                max_model_len=args.max_model_len,
                revision=args.revision,
            )
        self.model_config = config = model_config
        self.tokenizer = config.tokenizer
        self.device = torch.device(config.device)
        self.max_model_len = config.max_model_len
        self.eos_token_id = config.eos_token_id
        # The model's other end-of-sequence ids stop a request as its stop_token_ids do (as in
        # vLLM, with the id as stop_reason); with the primary one they are never sampled before
        # min_tokens, even with ignore_eos.
        eos_ids = tuple(getattr(config, "eos_token_ids", ()) or ())
        self.extra_eos_token_ids = tuple(t for t in eos_ids if t != self.eos_token_id)
        self.all_eos_token_ids = frozenset(
            ([] if self.eos_token_id is None else [self.eos_token_id]) + list(eos_ids)
        )
        self.max_num_batched_tokens = args.resolve_max_num_batched_tokens(self.max_model_len)
        self.preprocessor = InputPreprocessor(
            self.tokenizer,
            vocab_size=config.vocab_size,
            max_model_len=self.max_model_len,
            image_token_id=config.image_token_id,
            num_image_tokens=config.num_image_tokens,
            hidden_size=config.hidden_size,
            limit_mm_per_prompt=args.limit_mm_per_prompt,
            check_image_size=config.check_image_size,
        )

        if runner is None:
            from aphrodite.worker.model_runner import ModelRunner

            runner = ModelRunner(config)
        self.runner = runner
        encoder_budget = max(self.max_num_batched_tokens, config.num_image_tokens)
        self.num_kv_blocks = self._num_kv_blocks(encoder_budget)
        self.runner.allocate_kv_cache(self.num_kv_blocks, args.block_size)
        # The longest sequence the cache can hold (block 0 is the core's null block; the last
        # sampled token needs no KV).
        self.max_cached_len = (self.num_kv_blocks - 1) * args.block_size + 1
        if self.max_cached_len < self.max_model_len:
            logger.warning(
                "the KV cache holds %d tokens, fewer than max_model_len %d: a request can use at "
                "most %d tokens (prompt and output); give the cache more memory or lower "
                "max_model_len", self.max_cached_len - 1, self.max_model_len,
                self.max_cached_len,
            )
        if self._decode_graph_batch():
            self.runner.capture_cuda_graphs(args.max_num_seqs)
        self.core = _C.EngineCore(
            _C.EngineConfig(
                num_blocks=self.num_kv_blocks,
                block_size=args.block_size,
                max_num_seqs=args.max_num_seqs,
                max_num_batched_tokens=self.max_num_batched_tokens,
                max_model_len=self.max_model_len,
                max_num_encoder_tokens=encoder_budget,
                encoder_cache_size=encoder_budget,
                enable_prefix_caching=args.enable_prefix_caching,
                enable_chunked_prefill=args.enable_chunked_prefill,
            )
        )
        generator = torch.Generator(self.device)
        if args.seed is None:
            generator.seed()  # from the system's entropy, as vLLM without a seed
        else:
            generator.manual_seed(args.seed)
        self.sampler = Sampler(generator)
        self._requests: dict[str, _Request] = {}
        self._seqs: dict[str, _Sequence] = {}
        self._token_text: dict[tuple[int, bool], str] = {}
        self._open_plan: Any = None  # a scheduled plan whose update() has not run yet
        # Requests aborted because the last step failed (for callers that report them).
        self.failed_request_ids: list[str] = []
        self._request_counter = itertools.count()

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> LLMEngine:
        return cls(args)

    def _decode_graph_batch(self) -> int:
        """The largest decode batch captured in a CUDA graph (0: decode steps run eagerly)."""
        if self.device.type != "cuda" or self.args.enforce_eager:
            return 0
        from aphrodite.worker.cuda_graph import graph_batch_sizes

        return graph_batch_sizes(self.args.max_num_seqs)[-1]

    def _num_kv_blocks(self, encoder_budget: int) -> int:
        """KV blocks: num_kv_blocks if given, else what gpu_memory_utilization leaves after a
        profiled worst-case step (CUDA) or kv_cache_memory_gb / APHRODITE_CPU_KVCACHE_SPACE
        (CPU), capped at what max_num_seqs sequences of max_model_len tokens can use."""
        args = self.args
        if args.num_kv_blocks is not None:
            return args.num_kv_blocks
        from aphrodite.worker.model_runner import determine_num_kv_blocks

        num_image_tokens = max(1, self.model_config.num_image_tokens)
        num_blocks = determine_num_kv_blocks(
            self.runner,
            args.block_size,
            gpu_memory_utilization=args.gpu_memory_utilization,
            max_num_batched_tokens=self.max_num_batched_tokens,
            max_num_seqs=args.max_num_seqs,
            max_images=max(1, encoder_budget // num_image_tokens),
            cpu_kvcache_space_gib=args.kv_cache_memory_gb,
            decode_graph_batch=self._decode_graph_batch(),
        )
        num_blocks = min(num_blocks, args.max_useful_blocks(self.max_model_len))
        if num_blocks - 1 < -(-self.max_model_len // args.block_size):
            logger.warning(
                "the KV cache holds %d tokens, less than max_model_len=%d: long requests "
                "will be rejected",
                (num_blocks - 1) * args.block_size,
                self.max_model_len,
            )
        return int(num_blocks)

    # ---------------------------------------------------------------- requests

    def get_tokenizer(self) -> Any:
        return self.tokenizer

    def next_request_id(self) -> str:
        return str(next(self._request_counter))

    def process_prompt(
        self, prompt: PromptInputs, add_special_tokens: bool = True
    ) -> ProcessedPrompt:
        """Tokenizes and validates a prompt (images loaded, hashed, placeholders expanded)."""
        return self.preprocessor.process(prompt, add_special_tokens=add_special_tokens)

    def add_request(
        self,
        request_id: str,
        prompt: PromptInputs | ProcessedPrompt,
        params: SamplingParams | None = None,
        arrival_time: float | None = None,
    ) -> None:
        """Queues a request. Raises ValueError (nothing queued) when it is invalid or can never
        fit in the engine."""
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be SamplingParams, got {type(params).__name__}")
        for name in ("logprobs", "prompt_logprobs"):
            wanted = getattr(params, name)
            if wanted is not None and wanted > self.args.max_logprobs:
                raise ValueError(
                    f"{name}={wanted} is more than max_logprobs={self.args.max_logprobs}"
                )
        vocab_size = self.model_config.vocab_size
        for name, ids in (
            ("stop_token_ids", params.stop_token_ids),
            ("logit_bias", list(params.logit_bias or ())),
            ("allowed_token_ids", params.allowed_token_ids or ()),
        ):
            bad = [t for t in ids if t >= vocab_size]
            if bad:
                raise ValueError(
                    f"{name}: token ids must be below the vocabulary size {vocab_size}, "
                    f"got {bad[:5]}"
                )
        if params.allowed_token_ids is not None and params.min_tokens > 0:
            stops = set(params.stop_token_ids) | self.all_eos_token_ids
            if set(params.allowed_token_ids) <= stops:
                raise ValueError(
                    "allowed_token_ids holds only stop tokens, which min_tokens="
                    f"{params.min_tokens} forbids at first: no token could be sampled"
                )
        processed = prompt if isinstance(prompt, ProcessedPrompt) else self.process_prompt(prompt)
        prompt_len = len(processed.prompt_token_ids)
        room = self.max_model_len - prompt_len
        # Without max_tokens: as many as the model length and the KV cache allow.
        max_tokens = (
            min(room, self.max_cached_len - prompt_len)
            if params.max_tokens is None
            else min(params.max_tokens, room)
        )
        if max_tokens < 1:
            raise ValueError(
                f"the prompt ({prompt_len} tokens) leaves no room in the KV cache, which holds "
                f"{self.max_cached_len - 1} tokens"
            )

        request = _Request(
            request_id=request_id,
            processed=processed,
            params=params,
            max_tokens=max_tokens,
            metrics=RequestMetrics(
                arrival_time=time.time() if arrival_time is None else arrival_time
            ),
        )
        if params.prompt_logprobs is not None:
            request.prompt_logprobs = [None] * prompt_len
        for index in range(params.n):
            engine_id = request_id if params.n == 1 else f"{index}_{request_id}"
            if engine_id in self._seqs:
                raise ValueError(f"request id {engine_id!r} is already in use")
            child = params.clone()
            if child.seed is not None:
                child.seed += index
            child.all_stop_token_ids.update(self.all_eos_token_ids)  # masked before min_tokens
            generator = None
            if child.seed is not None:
                generator = torch.Generator(self.device).manual_seed(child.seed)
            detokenizer = None
            if child.detokenize:
                detokenizer = IncrementalDetokenizer(
                    self.tokenizer,
                    processed.prompt_token_ids,
                    skip_special_tokens=child.skip_special_tokens,
                    spaces_between_special_tokens=child.spaces_between_special_tokens,
                    stop=child.stop,
                    include_stop_str_in_output=child.include_stop_str_in_output,
                )
            request.seqs.append(
                _Sequence(
                    engine_id=engine_id,
                    index=index,
                    params=child,
                    parent=request,
                    generator=generator,
                    detokenizer=detokenizer,
                    logprobs=[] if child.logprobs is not None else None,
                    wants_prompt_logprobs=index == 0 and params.prompt_logprobs is not None,
                )
            )

        added: list[str] = []
        try:
            for seq in request.seqs:
                self.core.add_request(
                    seq.engine_id,
                    np.asarray(processed.prompt_token_ids, dtype=np.int32),
                    mm_items=[m.engine_item() for m in processed.mm_items],
                    max_tokens=max_tokens,
                    min_tokens=min(seq.params.min_tokens, max_tokens),
                    ignore_eos=seq.params.ignore_eos,
                    eos_token_id=-1 if self.eos_token_id is None else self.eos_token_id,
                    stop_token_ids=self._stop_token_ids(seq.params),
                    # Prompt logprobs need every prompt position computed: a unique salt keeps
                    # this request out of other requests' cached blocks.
                    cache_salt=f"prompt_logprobs:{uuid.uuid4().hex}"
                    if seq.wants_prompt_logprobs
                    else None,
                )
                added.append(seq.engine_id)
        except Exception:
            for engine_id in added:
                self.core.abort_request(engine_id)
            raise
        self._requests[request_id] = request
        for seq in request.seqs:
            self._seqs[seq.engine_id] = seq

    def abort_request(self, request_ids: str | Iterable[str]) -> None:
        """Stops requests at once; they produce no further outputs."""
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        for request_id in ids:
            request = self._requests.pop(request_id, None)
            if request is None:
                continue
            for seq in request.seqs:
                if self._seqs.pop(seq.engine_id, None) is not None:
                    self.core.abort_request(seq.engine_id)
                    self.runner.drop_request(seq.engine_id)

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests)

    def get_num_unfinished_requests(self) -> int:
        return len(self._requests)

    def _stop_token_ids(self, params: SamplingParams) -> list[int]:
        """The ids that stop a sequence besides the primary EOS: its stop_token_ids, and the
        model's other EOS ids unless it ignores EOS."""
        if params.ignore_eos or not self.extra_eos_token_ids:
            return list(params.stop_token_ids)
        return list(dict.fromkeys([*params.stop_token_ids, *self.extra_eos_token_ids]))

    def stats(self) -> dict:
        return dict(self.core.stats())

    def reset_prefix_cache(self) -> bool:
        return bool(self.core.reset_prefix_cache())

    # ---------------------------------------------------------------- the step

    def _mm_input(self, engine_id: str, mm_index: int) -> Any:
        return self._seqs[engine_id].parent.processed.mm_items[mm_index].data

    def step(self, finished_only: bool = False) -> list[RequestOutput]:
        """One engine iteration; returns the outputs of the requests that advanced (finished
        ones have ``finished=True`` and are forgotten by the engine afterwards).

        ``finished_only``: return only the requests that finished in this step, for callers
        that do not stream (building every running request's output each step copies its
        prompt and output ids: work that grows with the sequences' lengths)."""
        self.failed_request_ids.clear()  # the last step's, read by its caller already
        if self._open_plan is not None:
            # The last step was interrupted while it abandoned its plan (a second Ctrl-C).
            self._abandon_plan(self._open_plan)
        plan = self.core.schedule()
        try:
            self._open_plan = plan
            now = time.time()
            sampled = np.empty(0, dtype=np.int32)
            per_seq: dict[str, tuple[float, dict[int, Logprob] | None]] = {}
            if plan.num_tokens > 0:
                self._note_scheduled(plan, now)
                sampled, per_seq = self._execute(plan)
        except BaseException:
            self._abandon_plan(plan)
            raise
        events = self.core.update(sampled)
        self._open_plan = None
        touched: dict[str, _Request] = {}
        now = time.time()
        for engine_id, new_token_ids, finish_reason, stop_token in events:
            seq = self._seqs.get(engine_id)
            if seq is None:  # finished here already (stop string or abort)
                continue
            self._process_event(seq, list(new_token_ids), finish_reason, stop_token, per_seq, now)
            touched[seq.parent.request_id] = seq.parent
        outputs = []
        for request in touched.values():
            if request.finished:
                request.metrics.finished_time = now
                del self._requests[request.request_id]
            elif finished_only:
                continue
            outputs.append(request.output())
        return outputs

    def _abandon_plan(self, plan: Any) -> None:
        """After a step failed between schedule() and update() (an error in the model or the
        sampler, Ctrl-C): aborts the plan's requests, whose KV cache for the step is in an
        unknown state, and closes the plan so that the engine goes on with the others. Safe
        to repeat (an interrupted abandon is finished by the next step)."""
        engine_ids = list(plan.request_ids)
        num_sampled = len(plan.logits_indices)
        failed = {seq.parent.request_id for e in engine_ids if (seq := self._seqs.get(e))}
        self.failed_request_ids.extend(sorted(failed))
        self.abort_request(failed)
        if failed:
            logger.warning("step failed; aborted its %d request(s)", len(failed))
        # Encoder outputs the plan freed (of requests that go on) would otherwise stay.
        self.runner.free_encoder_outputs(plan.freed_encoder_outputs)
        # The aborted requests' tokens are ignored; the update only closes the plan.
        self.core.update(np.zeros(num_sampled, dtype=np.int32))
        self._open_plan = None

    def _note_scheduled(self, plan: Any, now: float) -> None:
        computed = plan.num_computed_tokens
        for i, engine_id in enumerate(plan.request_ids):
            seq = self._seqs.get(engine_id)
            if seq is None:
                continue
            request = seq.parent
            if request.metrics.first_scheduled_time is None:
                request.metrics.first_scheduled_time = now
            if request.num_cached_tokens is None:
                request.num_cached_tokens = int(computed[i])

    def _execute(self, plan: Any):
        """Runs the model and samples; returns (sampled ids for the core, per engine id the
        sampled token's log-probability and its top-logprob entries)."""
        hidden = self.runner.execute_model(plan, self._mm_input)
        request_ids = plan.request_ids
        sampled_seqs = [self._seqs[request_ids[i]] for i in plan.sampled_seq_indices.tolist()]
        rows = plan.logits_indices.astype(np.int64)
        prompt_rows, prompt_targets = self._prompt_logprob_rows(plan)
        all_rows = np.concatenate([rows, *[r for r, _, _ in prompt_rows]]) if prompt_rows else rows
        index = torch.from_numpy(all_rows).to(hidden.device)
        logits = self.runner.compute_logits(hidden.index_select(0, index))
        num_sampled = len(rows)

        per_seq: dict[str, tuple[float, dict[int, Logprob] | None]] = {}
        sampled = np.empty(0, dtype=np.int32)
        if num_sampled:
            meta = SamplingMetadata.build(
                [
                    SamplingRow(
                        s.params,
                        s.parent.processed.prompt_token_ids,
                        s.output_token_ids,
                        s.generator,
                    )
                    for s in sampled_seqs
                ],
                vocab_size=logits.shape[1],
                device=logits.device,
            )
            out = self.sampler(logits[:num_sampled], meta)
            sampled = out.sampled_token_ids.to(torch.int32).cpu().numpy()
            chosen = out.sampled_logprobs.cpu().tolist()
            tops = out.logprobs.tolists() if out.logprobs is not None else None
            for i, seq in enumerate(sampled_seqs):
                entries = None
                if tops is not None and seq.params.logprobs is not None:
                    context = seq.output_token_ids[-_TOKEN_TEXT_CONTEXT:]
                    if len(context) < _TOKEN_TEXT_CONTEXT:
                        prompt = seq.parent.processed.prompt_token_ids
                        context = prompt[len(context) - _TOKEN_TEXT_CONTEXT :] + context
                    entries = self._logprob_entries(
                        tops[0][i],
                        tops[1][i],
                        tops[2][i],
                        seq.params.logprobs,
                        context,
                        seq.params.skip_special_tokens,
                    )
                per_seq[seq.engine_id] = (chosen[i], entries)
        if prompt_rows:
            self._record_prompt_logprobs(logits[num_sampled:], prompt_rows, prompt_targets)
        return sampled, per_seq

    def _prompt_logprob_rows(self, plan: Any):
        """For requests asking for prompt logprobs: which rows of this step's hidden states
        predict prompt tokens not yet recorded. Returns ([(rows, request, positions)], targets)."""
        found = []
        targets: list[int] = []
        starts = plan.query_start_loc
        computed = plan.num_computed_tokens
        for i, engine_id in enumerate(plan.request_ids):
            seq = self._seqs.get(engine_id)
            if seq is None or not seq.wants_prompt_logprobs:
                continue
            request = seq.parent
            prompt_ids = request.processed.prompt_token_ids
            first = int(computed[i])
            count = int(starts[i + 1] - starts[i])
            # Row p predicts prompt token p + 1; the last prompt row is the sampling row.
            positions = [
                p
                for p in range(first, min(first + count, len(prompt_ids) - 1))
                if request.prompt_logprobs[p + 1] is None
            ]
            if not positions:
                continue
            rows = np.asarray([int(starts[i]) + p - first for p in positions], dtype=np.int64)
            found.append((rows, request, positions))
            targets += [prompt_ids[p + 1] for p in positions]
        return found, targets

    def _record_prompt_logprobs(self, logits: torch.Tensor, found, targets: list[int]) -> None:
        k = max(r.params.prompt_logprobs for _, r, _ in found)
        token_ids = torch.tensor(targets, dtype=torch.int64, device=logits.device)
        ids, values, ranks = gather_logprobs(logits, token_ids, k).tolists()
        row = 0
        for _, request, positions in found:
            wanted = request.params.prompt_logprobs
            prompt_ids = request.processed.prompt_token_ids
            for p in positions:
                context = prompt_ids[max(0, p + 1 - _TOKEN_TEXT_CONTEXT) : p + 1]
                request.prompt_logprobs[p + 1] = self._logprob_entries(
                    ids[row],
                    values[row],
                    ranks[row],
                    wanted,
                    context,
                    request.params.skip_special_tokens,
                )
                row += 1

    def _logprob_entries(
        self,
        ids: list[int],
        values: list[float],
        rank: int,
        k: int,
        context: Sequence[int],
        skip_special_tokens: bool,
    ) -> dict[int, Logprob]:
        """{chosen token: its logprob and rank, then the top-k tokens with ranks 1..k}; each
        with the text it adds after `context`, the tokens before its position (special tokens
        add nothing when the sequence skips them in its text)."""
        chosen = ids[0]
        top = [(t, v, r) for r, (t, v) in enumerate(zip(ids[1 : 1 + k], values[1 : 1 + k]), 1)]
        texts = self._token_texts(context, [chosen] + [t for t, _, _ in top], skip_special_tokens)
        entries = {chosen: Logprob(values[0], rank, texts[chosen])}
        for t, v, r in top:
            if t not in entries:
                entries[t] = Logprob(v, r, texts[t])
        return entries

    def _token_texts(
        self, context: Sequence[int], token_ids: list[int], skip_special_tokens: bool
    ) -> dict[int, str]:
        """The text each token adds when it follows `context`, as vLLM reports it: decoded
        alone, a SentencePiece token loses its word-initial space ("▁scene" -> "scene"), so
        the tokens would not add up to the text."""
        context = list(context)
        out: dict[int, str] = {}

        def decode(ids: list[int]) -> str:
            return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

        base = decode(context) if context else ""
        for t in token_ids:
            if t in out:
                continue
            full = decode(context + [t]) if context else None
            if full is not None and full.startswith(base):
                out[t] = full[len(base) :]
            else:
                out[t] = self._decode_token(t, skip_special_tokens)
        return out

    def _decode_token(self, token_id: int, skip_special_tokens: bool) -> str:
        key = (token_id, skip_special_tokens)
        text = self._token_text.get(key)
        if text is None:
            text = self.tokenizer.decode([token_id], skip_special_tokens=skip_special_tokens)
            self._token_text[key] = text
        return text

    def _process_event(
        self,
        seq: _Sequence,
        new_token_ids: list[int],
        finish_reason: str | None,
        stop_token: int | None,
        per_seq: dict,
        now: float,
    ) -> None:
        request = seq.parent
        if new_token_ids:
            if request.metrics.first_token_time is None:
                request.metrics.first_token_time = now
            request.metrics.last_token_time = now
        step_logprobs = per_seq.get(seq.engine_id)
        for token_id in new_token_ids:
            seq.output_token_ids.append(token_id)
            if step_logprobs is not None:
                seq.cumulative_logprob += step_logprobs[0]
                if seq.logprobs is not None:
                    seq.logprobs.append(step_logprobs[1] or {})
                step_logprobs = None

        if finish_reason == "stop" and stop_token is not None:
            # As vLLM: the EOS token is checked first, and its stop has no stop_reason even
            # when stop_token_ids lists it too.
            eos = stop_token == self.eos_token_id and not seq.params.ignore_eos
            seq.stop_reason = (
                None if eos or stop_token not in self._stop_token_ids(seq.params) else stop_token
            )
        if seq.detokenizer is not None:
            text_ids = new_token_ids
            if (
                finish_reason == "stop"
                and stop_token is not None
                and not seq.params.include_stop_str_in_output
                and text_ids
                and text_ids[-1] == stop_token
            ):
                # the stop token ends the completion without being part of its text
                text_ids = text_ids[:-1]
            new_text = seq.detokenizer.add_tokens(text_ids)
            if len(seq.output_token_ids) >= seq.params.min_tokens:
                stop_str = seq.detokenizer.check_stop(len(new_text))
                if stop_str is not None:
                    if finish_reason is None:
                        self.core.finish_request(seq.engine_id, "stop")
                    finish_reason, seq.stop_reason = "stop", stop_str

        if finish_reason is not None:
            # The text was cut at a stop string; otherwise show what a full decode shows.
            if seq.detokenizer is not None and not isinstance(seq.stop_reason, str):
                seq.detokenizer.flush()
            seq.finish_reason = finish_reason
            del self._seqs[seq.engine_id]
            self.runner.drop_request(seq.engine_id)
