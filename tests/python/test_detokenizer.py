"""Incremental detokenisation and stop strings with real (locally built) tokenizers."""

from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from aphrodite.transformers_utils.detokenizer import IncrementalDetokenizer, _backend_decode

TEXTS = [
    "hello world, héllo wörld",
    "你好世界 and 🙂🙃 emoji ✓",
    "naïve café — ok",
]


def _byte_level_tokenizer() -> PreTrainedTokenizerFast:
    # Few merges: most multi-byte characters stay split over several byte tokens.
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(["hello world the quick brown fox"] * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def _sentencepiece_like_tokenizer() -> PreTrainedTokenizerFast:
    # LLaMA-style: "▁" marks spaces, unknown characters fall back to <0xXX> byte tokens, and
    # the decoder strips the leading space of a sequence.
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for piece in ["▁", *"abcdefghijklmnopqrstuvwxyz,.—", "▁h", "▁he", "▁w", "▁wo"]:
        vocab.setdefault(piece, len(vocab))
    merges = [("▁", "h"), ("▁h", "e"), ("▁", "w"), ("▁w", "o")]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


TOKENIZERS = {
    "byte_level": _byte_level_tokenizer(),
    "sentencepiece": _sentencepiece_like_tokenizer(),
}


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
@pytest.mark.parametrize("text", TEXTS)
def test_incremental_matches_full_decode(name, text):
    tokenizer = TOKENIZERS[name]
    prompt = tokenizer.encode("hello", add_special_tokens=True)
    generated = tokenizer.encode(" " + text, add_special_tokens=False)
    assert len(generated) > len(text.split()), "characters should span several tokens"
    detok = IncrementalDetokenizer(tokenizer, prompt)
    pieces = [detok.add_tokens([t]) for t in generated]
    assert all("\ufffd" not in p for p in pieces)
    full = tokenizer.decode(prompt + generated, skip_special_tokens=True)
    prefix = tokenizer.decode(prompt, skip_special_tokens=True)
    assert detok.output_text == full[len(prefix) :]
    assert "".join(pieces) == detok.output_text
    # some character really was split over several tokens (pending text was held back)
    assert any(p == "" for p in pieces)


def test_special_tokens_are_skipped_or_kept():
    tokenizer = TOKENIZERS["byte_level"]
    ids = tokenizer.encode("hello world", add_special_tokens=False) + [tokenizer.eos_token_id]
    skip = IncrementalDetokenizer(tokenizer, [], skip_special_tokens=True)
    skip.add_tokens(ids)
    keep = IncrementalDetokenizer(tokenizer, [], skip_special_tokens=False)
    keep.add_tokens(ids)
    assert skip.output_text == "hello world"
    assert keep.output_text == "hello world</s>"


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_split_over_tokens(include):
    tokenizer = TOKENIZERS["byte_level"]
    ids = tokenizer.encode("the quick 🙂 brown fox", add_special_tokens=False)
    detok = IncrementalDetokenizer(
        tokenizer, [], stop=["🙂 b", "zzz"], include_stop_str_in_output=include
    )
    hit_at = None
    for i, t in enumerate(ids):
        new = detok.add_tokens([t])
        if detok.check_stop(len(new)):
            hit_at = i
            break
    assert hit_at is not None
    assert detok.output_text == ("the quick 🙂 b" if include else "the quick ")
    # it stopped at the first token that completed the stop string, not later
    prefix_text = tokenizer.decode(ids[: hit_at + 1])
    assert "🙂 b" in prefix_text and "🙂 b" not in tokenizer.decode(ids[:hit_at])


def test_streamed_text_holds_back_a_possible_stop_string():
    tokenizer = TOKENIZERS["byte_level"]
    detok = IncrementalDetokenizer(tokenizer, [], stop=["fox!"])
    detok.add_tokens(tokenizer.encode("the quick fo", add_special_tokens=False))
    assert detok.check_stop(len(detok.output_text)) is None
    assert detok.streamed_text(finished=False) == "the quick"  # len("fox!") - 1 held back
    assert detok.streamed_text(finished=True) == "the quick fo"


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_backend_decode_equals_tokenizer_decode(name, skip_special_tokens):
    tokenizer = TOKENIZERS[name]
    fast = _backend_decode(tokenizer, skip_special_tokens)
    assert fast is not None, "these fast tokenizers take the direct path"
    rng = random.Random(0)
    vocab = len(tokenizer)
    for _ in range(300):
        ids = [rng.randrange(vocab) for _ in range(rng.randint(1, 8))]
        assert fast(ids) == tokenizer.decode(ids, skip_special_tokens=skip_special_tokens), ids


def test_backend_decode_only_where_equivalent():
    base = TOKENIZERS["byte_level"]
    cleaning = PreTrainedTokenizerFast(
        tokenizer_object=base.backend_tokenizer, clean_up_tokenization_spaces=True
    )
    assert _backend_decode(cleaning, True) is None

    class Custom(PreTrainedTokenizerFast):
        def decode(self, token_ids, skip_special_tokens=False, **kwargs):
            return "custom"

    custom = Custom(tokenizer_object=base.backend_tokenizer)
    assert _backend_decode(custom, True) is None
    detok = IncrementalDetokenizer(custom, [])
    detok.add_tokens(base.encode("hello", add_special_tokens=False))
    assert detok.output_text.startswith("custom")  # its own decode is the one used


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
def test_incremental_text_is_the_same_on_both_decode_paths(name):
    tokenizer = TOKENIZERS[name]
    prompt = tokenizer.encode("hello", add_special_tokens=True)
    generated = tokenizer.encode(" " + " ".join(TEXTS), add_special_tokens=False)
    direct = IncrementalDetokenizer(tokenizer, prompt)
    general = IncrementalDetokenizer(tokenizer, prompt)
    general._fast_decode = None  # through tokenizer.decode
    assert direct._fast_decode is not None
    for t in generated:
        assert direct.add_tokens([t]) == general.add_tokens([t])
    assert direct.flush() == general.flush()
    assert direct.output_text == general.output_text
