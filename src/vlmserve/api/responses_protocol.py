"""OpenAI's Responses API wire formats (POST /v1/responses): the request we accept, the `response` object and
its typed stream events, as pydantic models the openai SDK parses (`client.responses.create`).

The server is stateless (`store: false` semantics): a response is never kept, so `previous_response_id` and
`conversation` are refused instead of silently ignored. Ranges are OpenAI's (temperature 0..2, top_p 0..1,
max_output_tokens >= 16).

Does not know: how the request becomes a prompt (responses.py maps it onto a chat request), the engine.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator

from vlmserve.api.protocol import RequestModel

# OpenAI refuses a smaller max_output_tokens.
MIN_OUTPUT_TOKENS = 16


class InputContentPart(RequestModel):
    """One part of an input message: input_text, input_image, or output_text (an earlier assistant turn)."""

    type: str
    text: str | None = None
    image_url: str | None = None
    file_id: str | None = None
    # "original" (keep the image's own size at OpenAI) is the largest budget here too: the server's max.
    detail: Literal["low", "high", "auto", "original"] | None = None

    @model_validator(mode="after")
    def _fields_for_type(self) -> InputContentPart:
        if self.type in ("input_text", "output_text"):
            if self.text is None:
                raise ValueError(f"a content part of type {self.type!r} needs a 'text' field")
        elif self.type == "input_image":
            if self.file_id is not None:
                raise ValueError(
                    "input_image by 'file_id' is not supported (no file storage); send 'image_url'"
                )
            if self.image_url is None:
                raise ValueError(
                    "a content part of type 'input_image' needs an 'image_url' (URL or data URL)"
                )
        else:
            raise ValueError(
                f"content part type {self.type!r} is not supported; supported: 'input_text', 'input_image', "
                "'output_text'"
            )
        return self


class InputMessage(RequestModel):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[InputContentPart]


class TextFormat(RequestModel):
    type: str = "text"


class TextConfig(RequestModel):
    format: TextFormat | None = None


class ResponsesRequest(RequestModel):
    model: str | None = None
    input: str | list[InputMessage]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=MIN_OUTPUT_TOKENS)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, ge=0.0, le=1.0)
    stream: bool = False
    store: bool | None = None
    previous_response_id: str | None = None
    conversation: Any = None
    background: bool | None = None
    text: TextConfig | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    user: str | None = None
    metadata: dict[str, str] | None = None
    request_id: str | None = Field(None, max_length=256, description="vLLM: a caller-chosen request id")


# ------------------------------------------------------------------------------------------ responses


class OutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = Field(default_factory=list)
    logprobs: list[Any] = Field(default_factory=list)


class OutputMessage(BaseModel):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    status: Literal["in_progress", "completed", "incomplete"]
    content: list[OutputText] = Field(default_factory=list)


class InputTokensDetails(BaseModel):
    cached_tokens: int = 0
    cache_write_tokens: int = 0
    # Extensions, as in chat's usage.prompt_tokens_details.
    image_tokens: int = 0
    cached_image_tokens: int = 0


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class ResponseUsage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails = Field(default_factory=OutputTokensDetails)
    total_tokens: int


class ResponseErrorInfo(BaseModel):
    code: str
    message: str


class IncompleteDetails(BaseModel):
    reason: Literal["max_output_tokens", "content_filter"]


class ResponseObject(BaseModel):
    id: str
    object: Literal["response"] = "response"
    created_at: int = Field(default_factory=lambda: int(time.time()))
    status: Literal["completed", "failed", "in_progress", "incomplete"]
    model: str
    output: list[OutputMessage] = Field(default_factory=list)
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    parallel_tool_calls: bool = False
    tool_choice: str = "none"
    tools: list[Any] = Field(default_factory=list)
    text: dict[str, Any] = Field(default_factory=lambda: {"format": {"type": "text"}})
    store: bool = False
    previous_response_id: None = None
    error: ResponseErrorInfo | None = None
    incomplete_details: IncompleteDetails | None = None
    usage: ResponseUsage | None = None
    user: str | None = None
    metadata: dict[str, str] = Field(default_factory=dict)

    @property
    def output_text(self) -> str:
        return "".join(part.text for item in self.output for part in item.content)
