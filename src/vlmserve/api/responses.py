"""POST /v1/responses: OpenAI's Responses API, mapped onto the chat path (same prompt building, images,
engine request), answered as a `response` object or its typed SSE events.

`instructions` becomes a system message and `input` the messages after it (`input_text` / `output_text` parts
as text, `input_image` parts as image_url parts with their `detail`); max_output_tokens, temperature and top_p
map onto their chat names, and vLLM's sampling extensions (top_k, seed, ignore_eos, ...) pass through. An
error about a chat field is reported under its Responses name (`messages[1]` -> `input[0]`,
`max_completion_tokens` -> `max_output_tokens`).

A stream is the event sequence the openai SDK expects: response.created, response.in_progress,
response.output_item.added, response.content_part.added, response.output_text.delta (one per engine delta),
response.output_text.done, response.content_part.done, response.output_item.done, then response.completed
(or response.incomplete when max_output_tokens ended it, response.failed when the engine failed). Each is
`event: <type>` + `data: <json>` with a growing sequence_number; there is no `[DONE]`, as at OpenAI.

Stateless: nothing is stored, so previous_response_id / conversation / background get a 400.

Does not know: how the prompt is built (serving.py), routing, auth.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import AsyncGenerator
from typing import Any

from pydantic import ValidationError
from starlette.responses import Response

from vlmserve.api.errors import APIError, InvalidRequestError, validation_error
from vlmserve.api.metrics import RequestTracker, ServerMetrics
from vlmserve.api.protocol import ChatCompletionRequest, SamplingFields
from vlmserve.api.responses_protocol import (
    IncompleteDetails,
    InputTokensDetails,
    OutputMessage,
    OutputText,
    ResponseErrorInfo,
    ResponseObject,
    ResponsesRequest,
    ResponseUsage,
)
from vlmserve.api.serving import DeltaStream, ModelServer, new_request_id
from vlmserve.api.streaming import Collected, SSEResponse
from vlmserve.engine.outputs import CompletionDelta

# Chat fields a Responses request may also carry (vLLM's sampling extensions and image bounds).
_PASSED_THROUGH = (set(SamplingFields.model_fields) | {"mm_processor_kwargs", "chat_template_kwargs"}) - {
    "model",
    "stream",
    "stream_options",
    "n",
    "temperature",
    "top_p",
    "user",
    "request_id",
}


async def create_response(
    server: ModelServer, body: ResponsesRequest, metrics: ServerMetrics, client_request_id: str | None
) -> Response:
    chat, offset = to_chat_request(body)
    response_id = new_request_id("resp", body.request_id or client_request_id)
    tracker = metrics.track(server.model_id)
    try:
        engine_request = await server.prepare_chat(chat, response_id)
        deltas = await server.start(engine_request)
    except APIError as e:
        e.param = _responses_param(e.param, offset)
        raise
    message_id = f"msg_{uuid.uuid4().hex}"
    if body.stream:
        return SSEResponse(_stream(server, body, response_id, message_id, deltas, tracker), streams=[deltas])
    return await _complete(server, body, response_id, message_id, deltas, tracker)


def to_chat_request(body: ResponsesRequest) -> tuple[ChatCompletionRequest, int]:
    """The chat request a Responses request means, and how many messages precede `input` (instructions)."""
    if body.previous_response_id is not None:
        raise InvalidRequestError(
            "previous_response_id is not supported: this server is stateless and stores no responses "
            "(store: false). Send the earlier turns in 'input' instead.",
            param="previous_response_id",
        )
    if body.conversation is not None:
        raise InvalidRequestError(
            "'conversation' is not supported: this server is stateless; send the earlier turns in 'input'.",
            param="conversation",
        )
    if body.background:
        raise InvalidRequestError(
            "background responses are not supported (nothing is stored to poll); drop 'background'.",
            param="background",
        )
    if body.tools and body.tool_choice != "none":
        raise InvalidRequestError(
            "Tool calling is not supported by this server; drop 'tools'.", param="tools"
        )
    response_format = _response_format(body)
    messages: list[dict[str, Any]] = []
    if body.instructions is not None:
        messages.append({"role": "system", "content": body.instructions})
    offset = len(messages)
    if isinstance(body.input, str):
        messages.append({"role": "user", "content": body.input})
    else:
        for item in body.input:
            content: str | list[dict[str, Any]]
            if isinstance(item.content, str):
                content = item.content
            else:
                content = []
                for part in item.content:
                    if part.type == "input_image":
                        detail = "high" if part.detail == "original" else part.detail
                        content.append(
                            {"type": "image_url", "image_url": {"url": part.image_url, "detail": detail}}
                        )
                    else:
                        content.append({"type": "text", "text": part.text})
            messages.append({"role": item.role, "content": content})
    extras = {k: v for k, v in (body.model_extra or {}).items() if k in _PASSED_THROUGH}
    try:
        chat = ChatCompletionRequest(
            model=body.model,
            messages=messages,
            max_completion_tokens=body.max_output_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            user=body.user,
            response_format=response_format,
            **extras,
        )
    except ValidationError as e:
        error = validation_error(e.errors())
        error.param = _responses_param(error.param, offset)
        raise error from e
    return chat, offset


def _response_format(body: ResponsesRequest) -> dict[str, Any] | None:
    """text.format as chat's response_format: Responses flattens json_schema's name, schema and strict into
    the format object itself."""
    fmt = body.text.format if body.text is not None else None
    kind = fmt.type if fmt is not None else "text"
    if fmt is None or kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        extra = fmt.model_extra or {}
        spec = {k: extra[k] for k in ("name", "schema", "strict") if k in extra}
        return {"type": "json_schema", "json_schema": spec}
    raise InvalidRequestError(
        f"text.format {kind!r} is not supported; use 'text', 'json_object' or 'json_schema'.",
        param="text.format",
    )


def _responses_param(param: str | None, offset: int) -> str | None:
    """A chat parameter path under its Responses name: messages[i] -> input[i - offset]."""
    if param is None:
        return None
    if param == "max_completion_tokens":
        return "max_output_tokens"
    if param.startswith("response_format"):
        # response_format.json_schema.schema -> text.format.schema (Responses has no json_schema level)
        return "text.format" + param.removeprefix("response_format").replace(".json_schema", "", 1)
    match = re.match(r"messages\[(\d+)\](.*)", param)
    if match is None:
        return param
    index = int(match.group(1)) - offset
    if index < 0:
        return "instructions"
    return f"input[{index}]{match.group(2)}"


def _usage(collected: Collected) -> ResponseUsage:
    return ResponseUsage(
        input_tokens=collected.num_prompt_tokens,
        input_tokens_details=InputTokensDetails(
            cached_tokens=collected.num_cached_tokens,
            image_tokens=collected.num_image_tokens,
            cached_image_tokens=collected.num_cached_image_tokens,
        ),
        output_tokens=collected.num_output_tokens,
        total_tokens=collected.num_prompt_tokens + collected.num_output_tokens,
    )


def _response(
    server: ModelServer, body: ResponsesRequest, response_id: str, created_at: int, **fields: Any
) -> ResponseObject:
    return ResponseObject(
        id=response_id,
        created_at=created_at,
        model=server.model_id,
        instructions=body.instructions,
        max_output_tokens=body.max_output_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        user=body.user,
        metadata=body.metadata or {},
        **fields,
    )


def _final_status(collected: Collected) -> tuple[str, IncompleteDetails | None]:
    if collected.choices[0].finish_reason == "length":
        return "incomplete", IncompleteDetails(reason="max_output_tokens")
    return "completed", None


async def _complete(
    server: ModelServer,
    body: ResponsesRequest,
    response_id: str,
    message_id: str,
    deltas: DeltaStream,
    tracker: RequestTracker,
) -> Response:
    collected = Collected()
    try:
        async for delta in deltas:
            tracker.on_delta(delta)
            collected.add(0, delta, first_of_prompt=True)
    finally:
        await deltas.aclose()
        tracker.close(1)
    collected.raise_error()
    status, incomplete = _final_status(collected)
    message = OutputMessage(
        id=message_id,
        status="completed" if status == "completed" else "incomplete",
        content=[OutputText(text=collected.choices[0].text)],
    )
    response = _response(
        server,
        body,
        response_id,
        int(time.time()),
        status=status,
        output=[message],
        incomplete_details=incomplete,
        usage=_usage(collected),
    )
    return Response(response.model_dump_json(), media_type="application/json")


async def _stream(
    server: ModelServer,
    body: ResponsesRequest,
    response_id: str,
    message_id: str,
    deltas: DeltaStream,
    tracker: RequestTracker,
) -> AsyncGenerator[str, None]:
    created_at = int(time.time())
    sequence = 0

    def event(kind: str, **data: Any) -> str:
        nonlocal sequence
        payload = {"type": kind, "sequence_number": sequence, **data}
        sequence += 1
        return f"event: {kind}\ndata: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"

    def response(status: str, **fields: Any) -> dict[str, Any]:
        return _response(server, body, response_id, created_at, status=status, **fields).model_dump(
            mode="json"
        )

    where = {"item_id": message_id, "output_index": 0, "content_index": 0}
    collected = Collected()
    try:
        yield event("response.created", response=response("in_progress"))
        yield event("response.in_progress", response=response("in_progress"))
        item = OutputMessage(id=message_id, status="in_progress")
        yield event("response.output_item.added", output_index=0, item=item.model_dump(mode="json"))
        yield event("response.content_part.added", **where, part=OutputText(text="").model_dump(mode="json"))
        delta: CompletionDelta
        async for delta in deltas:
            tracker.on_delta(delta)
            if delta.finish_reason == "error":
                error = ResponseErrorInfo(
                    code="server_error",
                    message=f"The engine failed while generating: {delta.error or 'unknown error'}",
                )
                yield event("response.failed", response=response("failed", error=error))
                return
            collected.add(0, delta, first_of_prompt=True)
            if delta.text:
                yield event("response.output_text.delta", **where, delta=delta.text, logprobs=[])
        text = collected.choices[0].text if collected.choices else ""
        status, incomplete = _final_status(collected)
        part = OutputText(text=text)
        yield event("response.output_text.done", **where, text=text, logprobs=[])
        yield event("response.content_part.done", **where, part=part.model_dump(mode="json"))
        done = OutputMessage(
            id=message_id, status="completed" if status == "completed" else "incomplete", content=[part]
        )
        yield event("response.output_item.done", output_index=0, item=done.model_dump(mode="json"))
        final = response(status, output=[done], incomplete_details=incomplete, usage=_usage(collected))
        yield event(f"response.{status}", response=final)
    finally:
        await deltas.aclose()
        tracker.close(1)
