"""Incremental detokenization of one output stream: token ids in, valid text deltas and stop strings out.

Owns the text of one request's output: which part has been emitted, which part is held back, and whether a
stop string has appeared. It does not know requests, the scheduler or the wire format; the engine feeds it the
tokens the scheduler appended and finishes the request when a stop string is reported.

Technique (vLLM's prefix/read offsets): keep a small window of token ids. `prefix_offset..read_offset` is text
already emitted, kept only as context (tokenizers whose decoding of a token depends on its neighbours, e.g. a
leading-space marker, need it); `read_offset..` is new. Each step decodes the window, not the whole sequence,
so the cost per token does not grow with the output. Text that ends in U+FFFD is held back: with byte-level
BPE a character split across tokens decodes as U+FFFD until its last byte arrives. Stop strings are searched in
the accumulated text across token boundaries; the tail that could still be the start of a stop string is held
back, so a stop string is never emitted, even in part (unless include_stop_str_in_output).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from tokenizers import Tokenizer

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
        self._ids = context  # the window; everything before it is dropped
        self._read_offset = len(context)  # window[:read_offset] is context already turned into text
        self._prefix_text = prefix_text  # decode(window[:read_offset])
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
        self._ids.extend(new_token_ids)
        new_text = self._decode_window(flush=finished)
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

    def _decode_window(self, flush: bool) -> str:
        """Text of the tokens after read_offset, or "" while it ends inside a character (unless flushing)."""
        full_text = self._decode(self._ids)
        if len(full_text) <= len(self._prefix_text):
            return ""
        if full_text.endswith(_REPLACEMENT_CHAR) and not flush:
            return ""
        new_text = full_text[len(self._prefix_text) :]
        # The emitted tokens become the context: the window slides, so it stays a few tokens long.
        self._ids = self._ids[self._read_offset :]
        self._read_offset = len(self._ids)
        self._prefix_text = self._decode(self._ids)
        return new_text

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
