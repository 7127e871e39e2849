"""OpenAI wire formats: the request bodies we accept and the JSON we answer with, as pydantic models.

Owns the shapes of /v1/chat/completions, /v1/completions and /v1/models (responses and stream chunks exactly
as OpenAI writes them, plus vLLM's extension fields), the error body, and the value checks a schema can make
on its own (types, ranges that do not depend on the model). Request models accept and ignore unknown fields,
as OpenAI does, so clients that send newer fields keep working.

Does not know: the engine, the model's limits (context length, image bounds: serving.py checks those), how a
field maps onto SamplingParams, HTTP status codes.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# ------------------------------------------------------------------------------------------ errors


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


# ------------------------------------------------------------------------------------------ request parts


class RequestModel(BaseModel):
    """Base of every request body: unknown fields are accepted and ignored, like OpenAI's API does."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())


class StreamOptions(RequestModel):
    include_usage: bool = False
    # vLLM: a usage object on every chunk, not only in the final one.
    continuous_usage_stats: bool = False


class MMProcessorKwargs(BaseModel):
    """Per-request image resizing bounds (vLLM's `mm_processor_kwargs`); must lie within the server's."""

    model_config = ConfigDict(extra="forbid")

    min_pixels: int | None = Field(None, gt=0)
    max_pixels: int | None = Field(None, gt=0)


class ImageURL(RequestModel):
    url: str
    # A pixel budget for this image: "low" a small fixed number of image tokens, "high" the server's max_pixels,
    # "auto" (or none) the request's mm_processor_kwargs or the server's default (serving.py).
    detail: Literal["auto", "low", "high"] | None = None


class ContentPart(RequestModel):
    """One part of a message's content. A single model (not a union per type) so that a wrong part gets one
    error naming its `type`, not one error per union member."""

    type: str
    text: str | None = None
    image_url: ImageURL | str | None = None

    @model_validator(mode="after")
    def _fields_for_type(self) -> ContentPart:
        if self.type == "text":
            if self.text is None:
                raise ValueError("a content part of type 'text' needs a 'text' field")
        elif self.type == "image_url":
            if self.image_url is None:
                raise ValueError(
                    "a content part of type 'image_url' needs an 'image_url' field: {\"url\": \"...\"}"
                )
        else:
            raise ValueError(
                f"content part type {self.type!r} is not supported; supported: 'text', 'image_url'"
            )
        return self

    @property
    def url(self) -> str:
        """The image URL of an image_url part."""
        return self.image_url.url if isinstance(self.image_url, ImageURL) else str(self.image_url)


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text, as OpenAI sends and expects it


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class FunctionDefinition(RequestModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON Schema object
    strict: bool | None = None


class ChatTool(RequestModel):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class ChatMessage(RequestModel):
    # "developer" is OpenAI's newer name for the system role; "tool" carries a tool result back.
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant turn that called tools

    @model_validator(mode="after")
    def _content_required(self) -> ChatMessage:
        # Only an assistant message may omit content (OpenAI: when it carries tool calls instead).
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a message with role {self.role!r} needs 'content'")
        return self


# ------------------------------------------------------------------------------------------ requests


class SamplingFields(RequestModel):
    """Fields shared by chat and text completions (OpenAI's, then vLLM's extensions)."""

    model: str | None = None  # None: the server's only (first) model, as in vLLM
    n: int = 1
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # OpenAI's ranges (temperature above 2 is a 400 there); vLLM's extensions below keep vLLM's.
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, ge=0.0, le=1.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # vLLM extensions
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    # Structured outputs: OpenAI's response_format, vLLM's structured_outputs and its older guided_* fields.
    # Parsed and checked by serving.py (which names the field of a bad constraint).
    response_format: Any = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: Any = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_decoding_backend: str | None = None
    request_id: str | None = Field(None, max_length=256, description="vLLM: a caller-chosen request id")

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def continuous_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.continuous_usage_stats


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: int | None = None  # deprecated by OpenAI in favour of max_completion_tokens
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[ChatTool] | None = None
    tool_choice: Any = None  # "none" | "auto" | "required" | {"type": "function", "function": {"name": ...}}
    parallel_tool_calls: bool | None = None
    # vLLM extensions
    mm_processor_kwargs: MMProcessorKwargs | None = None
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None


class CompletionRequest(SamplingFields):
    # One prompt or a batch of them, as text or as token ids.
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16  # OpenAI's default for /v1/completions
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None


class TokenizeRequest(RequestModel):
    """vLLM's POST /tokenize: a text `prompt`, or chat `messages` (images included) rendered as
    /v1/chat/completions would render them. Exactly one of the two. `add_special_tokens` is accepted for
    vLLM's clients; the prompt is tokenized as the engine's requests are (Qwen2.5-VL adds no BOS)."""

    model: str | None = None
    prompt: str | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)] | None = None
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None
    mm_processor_kwargs: MMProcessorKwargs | None = None
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _prompt_or_messages(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("send either 'prompt' (text) or 'messages' (chat), not both and not neither")
        return self


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None
    # Extensions: how many of `tokens` are image placeholders, in all and per image (in prompt order).
    image_tokens: int = 0
    image_token_counts: list[int] = Field(default_factory=list)


class DetokenizeRequest(RequestModel):
    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


# ------------------------------------------------------------------------------------------ responses


def _now() -> int:
    return int(time.time())


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0
    # The prompt's text and image placeholder tokens (OpenAI's names), and the image tokens the prefix cache
    # held (an extension; part of cached_tokens): what an image costs, before and after caching.
    text_tokens: int = 0
    image_tokens: int = 0
    cached_image_tokens: int = 0


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None

    @classmethod
    def of(
        cls, prompt: int, completion: int, cached: int, image: int = 0, cached_image: int = 0
    ) -> UsageInfo:
        return cls(
            prompt_tokens=prompt,
            completion_tokens=completion,
            total_tokens=prompt + completion,
            prompt_tokens_details=PromptTokensDetails(
                cached_tokens=cached,
                text_tokens=prompt - image,
                image_tokens=image,
                cached_image_tokens=cached_image,
            ),
        )


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatLogprobToken(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatLogprobToken] | None = None


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    refusal: str | None = None
    tool_calls: list[ToolCall] = Field(default_factory=list)


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None  # vLLM: the stop token id or stop string that ended the choice


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo
    system_fingerprint: str | None = None


class DeltaFunctionCall(BaseModel):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(BaseModel):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall | None = None


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=_now)
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None


class CompletionLogprobs(BaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class CompletionResponse(BaseModel):
    """A /v1/completions answer; its stream chunks have the same shape (object "text_completion")."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    system_fingerprint: str | None = None
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=_now)
    owned_by: str = "vlmserve"
    root: str | None = None  # vLLM: the checkpoint the model id serves
    parent: str | None = None
    max_model_len: int | None = None  # vLLM extension


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard] = Field(default_factory=list)


def chunk_json(chunk: ChatCompletionChunk | CompletionResponse, *, include_usage: bool) -> str:
    """A stream chunk as OpenAI writes it: `delta` without unset keys, `usage` only when the client asked
    for it with stream_options.include_usage (then null on every chunk but the last)."""
    data = chunk.model_dump(mode="json")
    if isinstance(chunk, ChatCompletionChunk):
        for choice in data["choices"]:
            choice["delta"] = {k: v for k, v in choice["delta"].items() if v is not None}
            for call in choice["delta"].get("tool_calls", ()):
                # Tool call deltas carry only what they add (OpenAI: id/type/name once, then arguments).
                for key in [k for k, v in call.items() if v is None]:
                    del call[key]
                if call.get("function") is not None:
                    call["function"] = {k: v for k, v in call["function"].items() if v is not None}
    if not include_usage:
        data.pop("usage", None)
    return _dumps(data)


def _dumps(data: Any) -> str:
    # ensure_ascii=False: text stays as UTF-8 (what OpenAI sends), and JSON strings are shorter.
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"))


# A text that JSON-encodes to itself in quotes (no escapes, ensure_ascii off): where a chunk's text goes.
_TEXT_SLOT = "\ue000vlmserve-text\ue000"


class ContentChunks:
    """The JSON of a stream's plain content chunks (one choice, text only: no logprobs, finish reason or
    usage), written from a template made once per choice index: the chunk before and after its text, built by
    `chunk_json` itself, so the bytes are exactly those of the general path. Per token this is one
    `json.dumps` of the text instead of building and dumping a pydantic model (most of a stream's cost in the
    front at high concurrency)."""

    def __init__(self, make: Callable[[int, str], ChatCompletionChunk], include_usage: bool) -> None:
        self._make = make  # (choice index, text) -> the chunk
        self._include_usage = include_usage
        self._parts: dict[int, tuple[str, str]] = {}

    def json(self, index: int, text: str) -> str:
        parts = self._parts.get(index)
        if parts is None:
            template = chunk_json(self._make(index, _TEXT_SLOT), include_usage=self._include_usage)
            before, after = template.split(f'"{_TEXT_SLOT}"')
            parts = self._parts[index] = (before, after)
        return parts[0] + _dumps(text) + parts[1]
