"""The engine's token logprobs in OpenAI's two formats, with each token's text and exact bytes.

Chat:        {"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}]}
Completions: {"tokens", "token_logprobs", "top_logprobs": [{token: logprob}], "text_offset"}

A token's bytes come from the vocabulary itself (byte-level BPE maps every byte to a printable character),
not from decoding the id alone: a token holding half of a UTF-8 character has no text of its own, and the
bytes are how a client reassembles it (OpenAI's reason for the field).

Does not know: sampling, HTTP, which request the logprobs belong to.
"""

from __future__ import annotations

import functools

from tokenizers import Tokenizer, decoders

from vlmserve.api.protocol import ChatLogprobToken, CompletionLogprobs, TopLogprob
from vlmserve.engine.outputs import TokenLogprob


@functools.cache
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: printable character -> the byte it stands for."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = list(printable)
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


class TokenTexts:
    """Text and bytes of single token ids, cached (the vocabulary never changes)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._byte_level = isinstance(tokenizer.decoder, decoders.ByteLevel)
        self._added = {i: t.content for i, t in tokenizer.get_added_tokens_decoder().items()}
        self._cache: dict[int, tuple[str, bytes]] = {}

    def get(self, token_id: int) -> tuple[str, bytes]:
        cached = self._cache.get(token_id)
        if cached is None:
            cached = self._cache[token_id] = self._compute(token_id)
        return cached

    def _compute(self, token_id: int) -> tuple[str, bytes]:
        if token_id in self._added:
            text = self._added[token_id]
            return text, text.encode()
        piece = self._tokenizer.id_to_token(token_id)
        if piece is None:  # outside the vocabulary (a padded embedding row): show the id
            text = f"<|token_{token_id}|>"
            return text, text.encode()
        if self._byte_level:
            table = _byte_decoder()
            if all(c in table for c in piece):
                raw = bytes(table[c] for c in piece)
                return raw.decode("utf-8", errors="replace"), raw
        text = self._tokenizer.decode([token_id], skip_special_tokens=False)
        return text, text.encode()


def chat_logprobs(entries: list[TokenLogprob], texts: TokenTexts, top_k: int) -> list[ChatLogprobToken]:
    out = []
    for e in entries:
        text, raw = texts.get(e.token_id)
        top = []
        for token_id, logprob in e.top[:top_k]:
            t, b = texts.get(token_id)
            top.append(TopLogprob(token=t, logprob=logprob, bytes=list(b)))
        out.append(ChatLogprobToken(token=text, logprob=e.logprob, bytes=list(raw), top_logprobs=top))
    return out


def completion_logprobs(
    entries: list[TokenLogprob], texts: TokenTexts, top_k: int, text_offset: int
) -> tuple[CompletionLogprobs, int]:
    """Logprobs of consecutive tokens whose text starts at `text_offset` in the choice's text; also returns
    the offset after them, for the next delta of the same choice."""
    result = CompletionLogprobs()
    for e in entries:
        text, _ = texts.get(e.token_id)
        result.tokens.append(text)
        result.token_logprobs.append(e.logprob)
        result.text_offset.append(text_offset)
        top: dict[str, float] = {}
        for token_id, logprob in e.top[:top_k]:
            top.setdefault(texts.get(token_id)[0], logprob)
        result.top_logprobs.append(top)
        text_offset += len(text)
    return result, text_offset
