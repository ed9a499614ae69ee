"""Incremental detokenisation and stop strings.

Decoding token by token is wrong for byte-level BPE (a character split over several tokens)
and for SentencePiece-style tokenizers (a leading space depends on the previous token). As in
vLLM, each step decodes a short window of tokens starting at ``prefix_offset`` and emits only
the text past what the window up to ``read_offset`` already produced; while the newest text
ends in U+FFFD (an incomplete UTF-8 sequence) nothing is emitted and the offsets stay put.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

# Tokens of the prompt's tail decoded with the first generated tokens, so that the first
# generated token gets its leading space exactly as in a full decode.
_PROMPT_CONTEXT_TOKENS = 5
_REPLACEMENT_CHAR = "\ufffd"


def _backend_decode(tokenizer: Any, skip_special_tokens: bool) -> Callable[[list[int]], str] | None:
    """The ``tokenizers`` library's own decode, when it returns exactly what
    ``tokenizer.decode`` does: a fast tokenizer whose class keeps transformers' ``decode`` and
    ``_decode`` (which call it and then, only with ``clean_up_tokenization_spaces``, post-process
    the text). Skips transformers' per-call argument handling, which costs more than the decode
    itself for the few tokens of an incremental window; None when that is not known to be
    equivalent."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not getattr(tokenizer, "is_fast", False):
        return None
    if getattr(tokenizer, "clean_up_tokenization_spaces", True):
        return None
    try:
        from transformers import PreTrainedTokenizerFast
    except ImportError:
        return None
    cls = type(tokenizer)
    if not isinstance(tokenizer, PreTrainedTokenizerFast) or (
        cls.decode is not PreTrainedTokenizerFast.decode
        or cls._decode is not PreTrainedTokenizerFast._decode
    ):
        return None

    def decode(ids: list[int]) -> str:
        return backend.decode(ids, skip_special_tokens=skip_special_tokens)

    return decode


class IncrementalDetokenizer:
    """Turns one sequence's generated token ids into text, and finds stop strings in it.

    Args:
        tokenizer: a Hugging Face tokenizer (``decode``).
        prompt_token_ids: the prompt; its tail gives the first token its context.
        skip_special_tokens, spaces_between_special_tokens: as in ``tokenizer.decode``.
        stop: stop strings; include_stop_str_in_output keeps a matched one in the text.
    """

    def __init__(
        self,
        tokenizer: Any,
        prompt_token_ids: list[int],
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
        stop: list[str] | None = None,
        include_stop_str_in_output: bool = False,
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.spaces_between_special_tokens = spaces_between_special_tokens
        self.stop = list(stop or [])
        self.include_stop_str_in_output = include_stop_str_in_output
        context = list(prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:])
        # token_ids holds the prompt context followed by the generated tokens.
        self.token_ids: list[int] = context
        self.prefix_offset = 0
        self.read_offset = len(context)
        self.output_text = ""
        # Longest suffix that could be the start of a stop string: held back from streaming.
        self._stop_holdback = max((len(s) for s in self.stop), default=1) - 1
        # (Fast tokenizers ignore spaces_between_special_tokens.)
        self._fast_decode = _backend_decode(tokenizer, skip_special_tokens)

    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        if self._fast_decode is not None:
            return self._fast_decode(ids)
        kwargs = {"skip_special_tokens": self.skip_special_tokens}
        if not self.spaces_between_special_tokens:
            kwargs["spaces_between_special_tokens"] = False
        return self.tokenizer.decode(ids, **kwargs)

    def add_tokens(self, new_token_ids: list[int]) -> str:
        """Append tokens; returns the text they completed (possibly empty)."""
        start_len = len(self.output_text)
        for token_id in new_token_ids:
            self.token_ids.append(token_id)
            prefix_text = self._decode(self.token_ids[self.prefix_offset : self.read_offset])
            new_text = self._decode(self.token_ids[self.prefix_offset :])
            if len(new_text) > len(prefix_text) and not new_text.endswith(_REPLACEMENT_CHAR):
                self.output_text += new_text[len(prefix_text) :]
                self.prefix_offset = self.read_offset
                self.read_offset = len(self.token_ids)
        return self.output_text[start_len:]

    def flush(self) -> str:
        """At the end of the sequence: emits text still held back for an incomplete
        character (as U+FFFD, as a full decode shows it); returns it."""
        if self.read_offset == len(self.token_ids):
            return ""
        prefix_text = self._decode(self.token_ids[self.prefix_offset : self.read_offset])
        new_text = self._decode(self.token_ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.token_ids)
        tail = new_text[len(prefix_text) :] if len(new_text) > len(prefix_text) else ""
        self.output_text += tail
        return tail

    def check_stop(self, num_new_chars: int) -> str | None:
        """Looks for a stop string ending in the last ``num_new_chars`` characters of the text.
        When one is found, the text is truncated (before the stop string, or after it when it
        is kept) and the stop string is returned."""
        if not self.stop or num_new_chars == 0:
            return None
        text = self.output_text
        best: tuple[int, str] | None = None
        for stop_str in self.stop:
            begin = max(0, len(text) - num_new_chars - len(stop_str) + 1)
            index = text.find(stop_str, begin)
            if index != -1 and (best is None or index < best[0]):
                best = (index, stop_str)
        if best is None:
            return None
        index, stop_str = best
        end = index + len(stop_str) if self.include_stop_str_in_output else index
        self.output_text = text[:end]
        return stop_str

    def streamed_text(self, finished: bool) -> str:
        """The text safe to show so far: while running, a suffix that may still become a stop
        string is held back."""
        if finished or self._stop_holdback == 0:
            return self.output_text
        return self.output_text[: max(0, len(self.output_text) - self._stop_holdback)]
