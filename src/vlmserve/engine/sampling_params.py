"""Per-request sampling parameters: plain data, validated once at construction.

The API layer maps OpenAI / vLLM request fields onto this; the scheduler reads the stopping fields; the
runner's sampler reads the rest. No torch here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

# Top-k / top-logprobs beyond this make no sense for serving and cost a full sort per step.
MAX_LOGPROBS = 20
# Larger than any vocabulary: a top_k above it is the same as none.
MAX_TOP_K = 2**31 - 1


@dataclass(frozen=True)
class StructuredOutputsParams:
    """A constraint on a request's output (vLLM's `StructuredOutputsParams`): exactly one of a JSON schema,
    any JSON object, a regular expression, a choice of strings, or a grammar (Lark / EBNF, llguidance's
    dialect). The grammar engine (engine/structured.py) turns it into per-step token masks.

    `json` is kept as compact JSON text whatever the caller passed (a dict or a string), so the params stay
    plain, hashable, picklable data; key order is kept (the output writes properties in schema order).
    """

    json: str | None = None
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None
    json_object: bool = False

    def __init__(
        self,
        json: str | dict[str, Any] | None = None,
        regex: str | None = None,
        choice: list[str] | tuple[str, ...] | None = None,
        grammar: str | None = None,
        json_object: bool = False,
    ) -> None:
        for name, value in (("regex", regex), ("grammar", grammar)):
            if value is not None and not isinstance(value, str):
                raise ValueError(f"structured_outputs.{name} must be a string, got {type(value).__name__}")
        if isinstance(choice, str):
            raise ValueError("structured_outputs.choice must be a list of strings, got one string")
        object.__setattr__(self, "json", _canonical_json(json))
        object.__setattr__(self, "regex", regex)
        object.__setattr__(self, "choice", None if choice is None else tuple(choice))
        object.__setattr__(self, "grammar", grammar)
        object.__setattr__(self, "json_object", bool(json_object))
        given = [k for k in ("json", "regex", "choice", "grammar") if getattr(self, k) is not None]
        given += ["json_object"] if self.json_object else []
        if len(given) != 1:
            raise ValueError(
                "structured_outputs must set exactly one of json, regex, choice, grammar, json_object; "
                f"got {given or 'none'}"
            )
        if self.choice is not None and (not self.choice or not all(isinstance(c, str) for c in self.choice)):
            raise ValueError("structured_outputs.choice must be a non-empty list of strings")

    @property
    def kind(self) -> str:
        """Which constraint this is: "json", "regex", "choice", "grammar" or "json_object"."""
        for name in ("json", "regex", "choice", "grammar"):
            if getattr(self, name) is not None:
                return name
        return "json_object"


def _canonical_json(value: str | dict[str, Any] | None) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"structured_outputs.json is not valid JSON: {e}") from e
    if not isinstance(value, dict | bool):
        raise ValueError(f"structured_outputs.json must be a JSON Schema object, got {type(value).__name__}")
    # Key order kept: JSON-schema property order is the order the output writes them in.
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    max_tokens: int | None = 16  # None: up to max_model_len
    min_tokens: int = 0
    ignore_eos: bool = False
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    include_stop_str_in_output: bool = False
    # None: no logprobs. k >= 0: the sampled token's logprob plus the k most likely tokens' logprobs,
    # all from the raw model distribution (before temperature, penalties and truncation).
    logprobs: int | None = None
    skip_special_tokens: bool = True
    # Constrain the output to a JSON schema, regex, choice or grammar (token masks from engine/structured.py).
    structured_outputs: StructuredOutputsParams | None = None
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        if self.top_k == -1 or self.top_k > MAX_TOP_K:
            # Keeping the top k >= the vocabulary keeps every token: no top-k, as -1 says (and an int64).
            object.__setattr__(self, "top_k", 0)
        checks: list[tuple[bool, str]] = [
            (self.n >= 1, f"n must be >= 1, got {self.n}"),
            (self.temperature >= 0.0, f"temperature must be >= 0, got {self.temperature}"),
            (0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.top_k >= 0, f"top_k must be -1, 0 (disabled) or a positive integer, got {self.top_k}"),
            (0.0 <= self.min_p <= 1.0, f"min_p must be in [0, 1], got {self.min_p}"),
            (
                -2.0 <= self.presence_penalty <= 2.0,
                f"presence_penalty must be in [-2, 2], got {self.presence_penalty}",
            ),
            (
                -2.0 <= self.frequency_penalty <= 2.0,
                f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}",
            ),
            (self.repetition_penalty > 0.0, f"repetition_penalty must be > 0, got {self.repetition_penalty}"),
            (
                self.max_tokens is None or self.max_tokens >= 1,
                f"max_tokens must be >= 1, got {self.max_tokens}",
            ),
            (self.min_tokens >= 0, f"min_tokens must be >= 0, got {self.min_tokens}"),
            (
                self.max_tokens is None or self.min_tokens <= self.max_tokens,
                f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})",
            ),
            (
                self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS,
                f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}",
            ),
            (all(s for s in self.stop), "stop strings must be non-empty"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def reads_output_tokens(self) -> bool:
        """Whether sampling a token looks at the values of the request's earlier output tokens (penalties
        count them, a grammar's mask depends on them), so the next token cannot be sampled before the last one
        is known. min_tokens needs only their number, which is known before their values (pending tokens
        count), so it does not: clients that ask for a fixed length (ignore_eos with min_tokens, as
        benchmarks do) keep the asynchronous loop's overlap."""
        return (
            self.structured_outputs is not None
            or self.repetition_penalty != 1.0
            or self.frequency_penalty != 0.0
            or self.presence_penalty != 0.0
        )
