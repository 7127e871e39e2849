"""Incremental detokenization of one output stream: token ids in, valid text deltas and stop strings out.

Owns the text of one request's output: which part has been emitted, which part is held back, and whether a
stop string has appeared. It does not know requests, the scheduler or the wire format; the engine feeds it the
tokens the scheduler appended and finishes the request when a stop string is reported.

Technique: tokenizers' own incremental decoder (`DecodeStream`, in Rust), primed with the last prompt tokens
as context (tokenizers whose decoding of a token depends on its neighbours, e.g. a leading-space marker, need
it). It returns a token's text once it is complete (None while a character split across byte-level tokens
is still missing bytes), so the cost per token is constant and small: it runs for every token of every
running request, on the engine's step loop. On `finished`, bytes still held are flushed as U+FFFD. Stop strings are searched in
the accumulated text across token boundaries; the tail that could still be the start of a stop string is held
back, so a stop string is never emitted, even in part (unless include_stop_str_in_output).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

# Prompt tokens decoded as context before the first output token (vLLM uses the same number).
_PROMPT_CONTEXT_TOKENS = 5
_REPLACEMENT_CHAR = "\ufffd"


@dataclass(frozen=True)
class DetokenizerDelta:
    text: str  # new output text to emit; always whole characters, possibly empty
    stop_string: str | None = None  # the stop string found: the caller finishes the request with it
    # The complete output text, set on the last delta (a stop string was found or `finished` was passed).
    output_text: str | None = None


class IncrementalDetokenizer:
    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_token_ids: Sequence[int],
        skip_special_tokens: bool = True,
        stop: Sequence[str] = (),
        include_stop_str_in_output: bool = False,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._stop = tuple(stop)
        self._include_stop = include_stop_str_in_output
        # A match can start this far before the newest text (it must end inside it).
        self._max_stop_overlap = max((len(s) for s in self._stop), default=1) - 1
        context = list(prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:])
        prefix_text = self._decode(context)
        if prefix_text.endswith(_REPLACEMENT_CHAR):
            # The prompt ends inside a character: that context would glue prompt bytes onto the output.
            context, prefix_text = [], ""
        self._stream = DecodeStream(ids=context, skip_special_tokens=skip_special_tokens)
        self._held: list[int] = []  # tokens the stream has taken but not yet turned into text
        self._text = ""  # output text decoded so far (cut at a stop string)
        self._num_emitted = 0  # characters of _text already returned
        self._done = False

    @property
    def output_text(self) -> str:
        """The text emitted so far."""
        return self._text[: self._num_emitted]

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens) if ids else ""

    def update(self, new_token_ids: Sequence[int], finished: bool = False) -> DetokenizerDelta:
        """Add tokens; return the text that is now safe to emit. Pass finished=True with the last tokens (or
        alone) to flush everything held back. After a stop string or `finished`, further calls return nothing.
        """
        if self._done:
            return DetokenizerDelta("")
        new_text = self._decode_new(new_token_ids, flush=finished)
        stop_string = None
        if new_text:
            search_from = max(len(self._text) - self._max_stop_overlap, 0)
            self._text += new_text
            stop_string = self._find_stop(search_from)
        if stop_string is not None or finished:
            self._done = True
            end = len(self._text)
        else:
            end = max(len(self._text) - self._held_back(), self._num_emitted)
        delta = self._text[self._num_emitted : end]
        self._num_emitted = end
        return DetokenizerDelta(delta, stop_string, self._text if self._done else None)

    def _decode_new(self, new_token_ids: Sequence[int], flush: bool) -> str:
        """Text of the new tokens that is complete; with `flush`, also what is still held (as U+FFFD)."""
        pieces = []
        for token_id in new_token_ids:
            piece = self._stream.step(self._tokenizer, token_id)
            if piece is None:
                self._held.append(token_id)
            else:
                self._held.clear()
                pieces.append(piece)
        if flush and self._held:
            pieces.append(self._decode(self._held))
            self._held = []
        return "".join(pieces)

    def _find_stop(self, search_from: int) -> str | None:
        """Cut the text at the earliest stop string starting at or after search_from; return that string."""
        best: tuple[int, str] | None = None
        for stop in self._stop:
            index = self._text.find(stop, search_from)
            if index != -1 and (best is None or index < best[0]):
                best = (index, stop)
        if best is None:
            return None
        index, stop = best
        self._text = self._text[: index + len(stop) if self._include_stop else index]
        return stop

    def _held_back(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of some stop string."""
        longest = 0
        for stop in self._stop:
            for k in range(min(len(stop) - 1, len(self._text)), longest, -1):
                if self._text.endswith(stop[:k]):
                    longest = k
                    break
        return longest
