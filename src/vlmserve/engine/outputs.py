"""What the engine reports per request per step: plain data, consumed by the API layer. No torch."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # (token id, logprob), most likely first


@dataclass
class CompletionDelta:
    """New output of one choice since its last delta."""

    request_id: str  # the caller's id (shared by the n choices of one request)
    index: int  # which of the n choices
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None
    finish_reason: str | None  # None while running; "stop", "length", "abort" or "error" at the end
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    num_output_tokens: int = 0
    error: str | None = None
    # What failed, when finish_reason is "error": "constraint" (the request's output constraint could not be
    # followed: the client's to fix), None (the engine).
    error_kind: str | None = None
    # Of the prompt tokens: how many are image placeholders, and how many of those the prefix cache held.
    num_image_tokens: int = 0
    num_cached_image_tokens: int = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
