"""The offline API: ``LLM(model=...)``, ``generate`` and ``chat``."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from tqdm.auto import tqdm

from aphrodite.endpoints.chat_utils import render_chat, resolve_chat_template
from aphrodite.engine import EngineArgs, LLMEngine
from aphrodite.inputs import PromptInputs
from aphrodite.multimodal import load_images
from aphrodite.outputs import RequestOutput
from aphrodite.sampling_params import SamplingParams


@contextlib.contextmanager
def _naming_prompt(index: int, count: int) -> Iterator[None]:
    """Notes which prompt of a batch an error is about (in the traceback)."""
    try:
        yield
    except Exception as e:
        if count > 1:
            e.add_note(f"(prompt {index} of the {count} given)")
        raise


ChatMessages = Sequence[Mapping[str, Any]]


class LLM:
    """A vision-language model for offline batched inference.

    Example::

        llm = LLM(model="llava-hf/llava-1.5-7b-hf")
        outputs = llm.generate({
            "prompt": "USER: <image>\\nWhat is the content of this image?\\nASSISTANT:",
            "multi_modal_data": {"image": PIL.Image.open("photo.jpg")},
        })
        print(outputs[0].outputs[0].text)

    Args:
        model: a checkpoint folder or a Hugging Face hub id (resolved from the local cache).
        tokenizer: another tokenizer folder or id.
        dtype, device, seed, max_model_len, max_num_seqs, max_num_batched_tokens,
        enable_prefix_caching, limit_mm_per_prompt and the rest: see EngineArgs.
    """

    def __init__(
        self,
        model: str,
        tokenizer: str | None = None,
        dtype: str = "auto",
        device: str = "auto",
        seed: int = 0,
        max_model_len: int | None = None,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int | None = None,
        enable_prefix_caching: bool = True,
        limit_mm_per_prompt: dict[str, int] | None = None,
        gpu_memory_utilization: float = 0.9,
        kv_cache_memory_gb: float | None = None,
        **kwargs: Any,
    ) -> None:
        args = EngineArgs(
            model=model,
            tokenizer=tokenizer,
            dtype=dtype,
            device=device,
            seed=seed,
            max_model_len=max_model_len,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            enable_prefix_caching=enable_prefix_caching,
            limit_mm_per_prompt=limit_mm_per_prompt,
            gpu_memory_utilization=gpu_memory_utilization,
            kv_cache_memory_gb=kv_cache_memory_gb,
            **kwargs,
        )
        self.llm_engine = LLMEngine.from_engine_args(args)

    def get_tokenizer(self) -> Any:
        return self.llm_engine.get_tokenizer()

    def get_default_sampling_params(self) -> SamplingParams:
        """What generate and chat use without sampling_params: SamplingParams' defaults with
        those the checkpoint's generation_config.json sets (temperature, top_p, top_k, min_p,
        repetition_penalty, max_new_tokens), as vLLM and HF generate apply them."""
        return SamplingParams(**self.llm_engine.model_config.generation_defaults)

    def generate(
        self,
        prompts: PromptInputs | Sequence[PromptInputs],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool | Callable[..., Any] = True,
    ) -> list[RequestOutput]:
        """Completes one prompt or a list of them; returns one RequestOutput per prompt, in the
        order of the prompts. Every prompt is validated before any is scheduled. Without
        sampling_params: :meth:`get_default_sampling_params`."""
        if isinstance(prompts, (str, Mapping)):
            prompts = [prompts]
        elif not isinstance(prompts, Sequence):
            raise TypeError(
                "prompts must be a prompt (a string or a dict) or a list of them, got "
                f"{type(prompts).__name__}"
            )
        return self._run(list(prompts), sampling_params, use_tqdm, add_special_tokens=True)

    def chat(
        self,
        messages: ChatMessages | Sequence[ChatMessages],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool | Callable[..., Any] = True,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> list[RequestOutput]:
        """Answers one conversation (a list of OpenAI-style messages) or a list of them.

        Message content is a string or a list of parts ({"type": "text", "text": ...},
        {"type": "image_url", "image_url": {"url": ...}}, {"type": "image", "image": img},
        {"type": "image_pil", "image_pil": img}); images are PIL images, http(s)/data:/file:
        URLs or local paths. The model's chat template (or chat_template: the template text or
        a path to a .jinja file) renders the prompt, exactly as the server does;
        chat_template_kwargs are extra template variables."""
        if not messages:
            raise ValueError("chat() needs at least one message")
        conversations = [messages] if isinstance(messages[0], Mapping) else list(messages)
        engine = self.llm_engine
        tokenizer = engine.get_tokenizer()
        template = resolve_chat_template(
            chat_template,
            engine.model_config.chat_template,
            how_to_pass="chat_template= (the template text or a path to a .jinja file) to chat()",
        )
        placeholder = "<image>"
        if engine.model_config.image_token_id is not None:
            placeholder = tokenizer.convert_ids_to_tokens(engine.model_config.image_token_id)
        prompts: list[PromptInputs] = []
        for conversation in conversations:
            text, sources = render_chat(
                template,
                conversation,
                image_placeholder=placeholder,
                tokenizer=tokenizer,
                add_generation_prompt=add_generation_prompt and not continue_final_message,
                continue_final_message=continue_final_message,
                extra=chat_template_kwargs,
            )
            prompt: dict[str, Any] = {"prompt": text}
            if sources:
                images = load_images(sources)
                prompt["multi_modal_data"] = {"image": images if len(images) > 1 else images[0]}
            prompts.append(prompt)
        # A prompt whose template wrote the BOS token itself must not get a second one (decided
        # per conversation: a template may write it for some conversations only).
        bos = getattr(tokenizer, "bos_token", None)
        add_special = [not (bos and p["prompt"].startswith(bos)) for p in prompts]
        return self._run(prompts, sampling_params, use_tqdm, add_special_tokens=add_special)

    def _run(
        self,
        prompts: list[PromptInputs],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None,
        use_tqdm: bool | Callable[..., Any],
        add_special_tokens: bool | Sequence[bool],
    ) -> list[RequestOutput]:
        if isinstance(add_special_tokens, bool):
            add_special_tokens = [add_special_tokens] * len(prompts)
        if sampling_params is None:
            params_list = [self.get_default_sampling_params()] * len(prompts)
        elif isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params] * len(prompts)
        elif isinstance(sampling_params, (Mapping, str)) or not isinstance(
            sampling_params, Sequence
        ):
            raise TypeError(
                "sampling_params must be a SamplingParams or a list of them (one per prompt), "
                f"got {type(sampling_params).__name__}"
            )
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompts):
                raise ValueError(
                    f"got {len(params_list)} sampling_params for {len(prompts)} prompts"
                )
        engine = self.llm_engine
        # Validate everything before anything is scheduled.
        processed = []
        for i, p in enumerate(prompts):
            with _naming_prompt(i, len(prompts)):
                processed.append(engine.process_prompt(p, add_special_tokens[i]))
        order: dict[str, int] = {}
        try:
            for i, (prompt, params) in enumerate(zip(processed, params_list)):
                request_id = engine.next_request_id()
                with _naming_prompt(i, len(prompts)):
                    engine.add_request(request_id, prompt, params)
                order[request_id] = i
            return self._run_engine(order, use_tqdm)
        except BaseException:
            engine.abort_request(list(order))
            raise

    def _run_engine(
        self, order: dict[str, int], use_tqdm: bool | Callable[..., Any]
    ) -> list[RequestOutput]:
        engine = self.llm_engine
        results: list[RequestOutput | None] = [None] * len(order)
        # use_tqdm may be a tqdm-like factory, as vLLM accepts.
        make_bar = use_tqdm if callable(use_tqdm) else tqdm
        bar = make_bar(
            total=len(order), desc="Processed prompts", dynamic_ncols=True, disable=not use_tqdm
        )
        prompt_tokens = output_tokens = 0
        try:
            while engine.has_unfinished_requests():
                for output in engine.step(finished_only=True):
                    if output.request_id not in order:
                        continue
                    results[order[output.request_id]] = output
                    prompt_tokens += len(output.prompt_token_ids)
                    output_tokens += sum(len(c.token_ids) for c in output.outputs)
                    elapsed = bar.format_dict["elapsed"] or 1e-9
                    bar.set_postfix_str(
                        f"input: {prompt_tokens / elapsed:.1f} toks/s, "
                        f"output: {output_tokens / elapsed:.1f} toks/s",
                        refresh=False,
                    )
                    bar.update(1)
        finally:
            bar.close()
        missing = [rid for rid, i in order.items() if results[i] is None]
        if missing:
            raise RuntimeError(f"the engine stopped without finishing requests {missing}")
        return results
