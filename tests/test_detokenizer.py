"""Incremental detokenizer against a byte-level BPE trained here: deltas concatenate to the full decode, never
emit half a character, and cut stop strings that span token boundaries."""

from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from vlmserve.engine.detokenizer import DetokenizerDelta, IncrementalDetokenizer

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "The café serves crème brûlée and a naïve résumé.",
    "中文分词测试，我们喜欢中文和汉字。",
    "Emoji time: 😀 🎉 🚀 👍🏽 and more 😀😀.",
    "Mixed: déjà vu 中文 😀 hello world, STOP here.",
    "Numbers 12345 and symbols #$%&*()[]{}",
    "Ünïcödé façade — “quotes” and ‘more’ …",
] * 20


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def stream(
    tok: Tokenizer, ids: list[int], chunks: list[int] | None = None, finish: bool = True, **kwargs: object
) -> tuple[list[DetokenizerDelta], IncrementalDetokenizer]:
    """Feed `ids` in chunks of the given sizes (1 by default), finishing with the last chunk."""
    detok = IncrementalDetokenizer(
        tok, kwargs.pop("prompt", tok.encode("<|im_start|>assistant\n").ids), **kwargs
    )  # type: ignore[arg-type]
    sizes = chunks or [1] * len(ids)
    deltas, pos = [], 0
    for i, size in enumerate(sizes):
        last = i == len(sizes) - 1
        deltas.append(detok.update(ids[pos : pos + size], finished=finish and last))
        pos += size
        if deltas[-1].stop_string is not None:
            break
    return deltas, detok


def random_chunks(rng: random.Random, n: int) -> list[int]:
    sizes = []
    while n > 0:
        sizes.append(min(rng.randint(1, 4), n))
        n -= sizes[-1]
    return sizes


def test_tokenizer_splits_multibyte_characters(tokenizer: Tokenizer) -> None:
    # The point of the fixture: some tokens decode to half a character on their own.
    ids = list(range(tokenizer.get_vocab_size()))
    assert any(tokenizer.decode([i]).endswith("\ufffd") for i in ids)
    assert any(len(tokenizer.encode(ch).ids) > 1 for ch in "😀🎉🚀👍")


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_random_ids_concatenate_to_full_decode(tokenizer: Tokenizer, skip_special_tokens: bool) -> None:
    rng = random.Random(0)
    vocab = tokenizer.get_vocab_size()
    for _ in range(300):
        ids = [rng.randrange(vocab) for _ in range(rng.randint(1, 30))]
        chunks = random_chunks(rng, len(ids)) if rng.random() < 0.5 else None
        deltas, detok = stream(tokenizer, ids, chunks, skip_special_tokens=skip_special_tokens)
        text = "".join(d.text for d in deltas)
        assert text == tokenizer.decode(ids, skip_special_tokens=skip_special_tokens), ids
        assert deltas[-1].output_text == text == detok.output_text


def test_valid_text_never_emits_a_replacement_char(tokenizer: Tokenizer) -> None:
    rng = random.Random(1)
    for _ in range(200):
        line = rng.choice(CORPUS)
        start = rng.randrange(len(line))
        text = line[start : start + rng.randint(1, 40)]
        ids = tokenizer.encode(text).ids
        deltas, _ = stream(tokenizer, ids)
        assert all("\ufffd" not in d.text for d in deltas), (text, [d.text for d in deltas])
        assert "".join(d.text for d in deltas) == text


def test_partial_character_is_held_until_complete(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("🦀").ids  # not in the corpus: split into byte-level pieces
    assert len(ids) > 1
    deltas, _ = stream(tokenizer, ids, finish=False)
    assert [d.text for d in deltas[:-1]] == [""] * (len(ids) - 1)
    assert deltas[-1].text == "🦀"


def test_incomplete_tail_is_flushed_at_finish(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("ab🦀").ids[:-1]  # ends inside the emoji
    deltas, _ = stream(tokenizer, ids)
    assert "".join(d.text for d in deltas) == tokenizer.decode(ids)
    assert deltas[-1].output_text == tokenizer.decode(ids)


def test_work_per_token_does_not_grow_with_the_output(
    tokenizer: Tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Tokens go through tokenizers' incremental decoder one at a time; a whole decode runs only for the prompt
    # context and for bytes still held at the end: a few tokens, never the output so far.
    lengths: list[int] = []
    decode = IncrementalDetokenizer._decode

    def counting(self: IncrementalDetokenizer, ids: list[int]) -> str:
        lengths.append(len(ids))
        return decode(self, ids)

    monkeypatch.setattr(IncrementalDetokenizer, "_decode", counting)
    ids = tokenizer.encode(" ".join(CORPUS[:6]) * 3).ids
    detok = IncrementalDetokenizer(tokenizer, [1, 2, 3])
    text = "".join(detok.update([i]).text for i in ids) + detok.update([], finished=True).text
    assert text == tokenizer.decode(ids)
    assert len(ids) > 100
    assert len(lengths) <= 2 and max(lengths) <= 8, lengths


@pytest.mark.parametrize("chunked", [False, True])
def test_stop_string_split_across_tokens_is_cut(tokenizer: Tokenizer, chunked: bool) -> None:
    text = "hello world, STOP here and more"
    ids = tokenizer.encode(text).ids
    rng = random.Random(2)
    chunks = random_chunks(rng, len(ids)) if chunked else None
    deltas, detok = stream(tokenizer, ids, chunks, stop=("STOP",))
    emitted = "".join(d.text for d in deltas)
    assert emitted == "hello world, "
    assert deltas[-1].stop_string == "STOP"
    assert deltas[-1].output_text == "hello world, "
    assert all(d.stop_string is None for d in deltas[:-1])
    assert all("S" not in d.text for d in deltas)  # no part of the stop string ever leaks
    assert detok.update(tokenizer.encode(" more").ids).text == ""  # nothing after the stop


def test_stop_string_included_when_asked(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("déjà vu 中文 😀 end").ids
    deltas, _ = stream(tokenizer, ids, stop=("中文",), include_stop_str_in_output=True)
    assert "".join(d.text for d in deltas) == "déjà vu 中文"
    assert deltas[-1].stop_string == "中文"


def test_earliest_of_several_stop_strings_wins(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("abc def ghi").ids
    deltas, _ = stream(tokenizer, ids, stop=("ghi", "def", "c d"))
    assert "".join(d.text for d in deltas) == "ab"
    assert deltas[-1].stop_string == "c d"


def test_only_a_possible_stop_prefix_is_held_back(tokenizer: Tokenizer) -> None:
    detok = IncrementalDetokenizer(tokenizer, [], stop=("STOP",))
    assert detok.update(tokenizer.encode("abc ").ids).text == "abc "  # nothing here can start "STOP"
    assert detok.update(tokenizer.encode("ST").ids).text == ""  # could be the start of "STOP"
    delta = detok.update(tokenizer.encode("AY").ids)
    assert delta.text == "STAY"
    assert delta.stop_string is None
    assert detok.update([], finished=True).output_text == "abc STAY"


def test_held_back_prefix_is_flushed_when_finished(tokenizer: Tokenizer) -> None:
    deltas, _ = stream(tokenizer, tokenizer.encode("the end ST").ids, stop=("STOP",))
    assert "".join(d.text for d in deltas) == "the end ST"
    assert deltas[-1].stop_string is None


def test_stop_string_at_the_very_start(tokenizer: Tokenizer) -> None:
    deltas, _ = stream(tokenizer, tokenizer.encode("STOP now").ids, stop=("STOP",))
    assert "".join(d.text for d in deltas) == ""
    assert deltas[-1].stop_string == "STOP"
    assert deltas[-1].output_text == ""


def test_special_tokens_skipped_or_kept(tokenizer: Tokenizer) -> None:
    end = tokenizer.token_to_id("<|im_end|>")
    ids = [*tokenizer.encode("hi 中文").ids, end]
    skipped, _ = stream(tokenizer, ids, skip_special_tokens=True)
    kept, _ = stream(tokenizer, ids, skip_special_tokens=False)
    assert "".join(d.text for d in skipped) == "hi 中文"
    assert "".join(d.text for d in kept) == "hi 中文<|im_end|>"


def test_prompt_ending_inside_a_character_is_not_used_as_context(tokenizer: Tokenizer) -> None:
    half_emoji = tokenizer.encode("🦀").ids[:-1]
    ids = tokenizer.encode("ok").ids
    deltas, _ = stream(tokenizer, ids, prompt=half_emoji)
    assert "".join(d.text for d in deltas) == "ok"
