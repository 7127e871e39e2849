"""POST /v1/chat/completions: a prepared engine request in, `chat.completion` JSON or its SSE stream out.

Streams look exactly like OpenAI's: one chunk per choice with `delta.role = "assistant"` and empty content,
then content deltas (each carrying its choice's index), a chunk with `finish_reason` per choice, a usage
chunk with empty `choices` when stream_options.include_usage is set, then `data: [DONE]`. An engine failure
mid-stream becomes an SSE event in OpenAI's error shape, followed by `data: [DONE]`.

Does not know: how the prompt was built (serving.py), routing, auth.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator

from starlette.responses import Response

from vlmserve.api.errors import error_json
from vlmserve.api.logprobs import chat_logprobs
from vlmserve.api.metrics import RequestTracker, ServerMetrics
from vlmserve.api.protocol import (
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatResponseMessage,
    ChatStreamChoice,
    ContentChunks,
    DeltaMessage,
    UsageInfo,
    chunk_json,
)
from vlmserve.api.serving import DeltaStream, ModelServer, new_request_id
from vlmserve.api.streaming import DONE, Collected, SSEResponse, sse
from vlmserve.api.tools import ToolCallStream, ToolPlan, finish_reason, output_plan, parse_tool_calls


async def create_chat_completion(
    server: ModelServer, body: ChatCompletionRequest, metrics: ServerMetrics, client_request_id: str | None
) -> Response:
    tracker = metrics.track(server.model_id)
    request_id = new_request_id("chatcmpl", body.request_id or client_request_id)
    engine_request = await server.prepare_chat(body, request_id)
    deltas = await server.start(engine_request)
    plan = output_plan(body)
    if body.stream:
        return SSEResponse(_stream(server, body, request_id, deltas, tracker, plan), streams=[deltas])
    return await _complete(server, body, request_id, deltas, tracker, plan)


def _top_k(body: ChatCompletionRequest) -> int:
    return body.top_logprobs or 0


async def _complete(
    server: ModelServer,
    body: ChatCompletionRequest,
    request_id: str,
    deltas: DeltaStream,
    tracker: RequestTracker,
    plan: ToolPlan,
) -> Response:
    collected = Collected()
    try:
        async for delta in deltas:
            tracker.on_delta(delta)
            collected.add(delta.index, delta, first_of_prompt=delta.index == 0)
    finally:
        await deltas.aclose()
        tracker.close(body.n)
    collected.raise_error()
    choices = []
    for index in range(body.n):
        c = collected.choices[index]
        logprobs = None
        if body.logprobs:
            logprobs = ChatLogprobs(content=chat_logprobs(c.logprobs, server.token_texts, _top_k(body)))
        content: str | None = c.text
        calls = []
        if plan.parse:
            content, calls = parse_tool_calls(c.text, plan.parallel)
        choices.append(
            ChatChoice(
                index=index,
                message=ChatResponseMessage(content=content, tool_calls=calls),
                logprobs=logprobs,
                finish_reason=finish_reason(c.finish_reason, plan, bool(calls)),
                stop_reason=c.stop_reason,
            )
        )
    response = ChatCompletionResponse(
        id=request_id,
        model=server.model_id,
        choices=choices,
        usage=UsageInfo.of(
            collected.num_prompt_tokens,
            collected.num_output_tokens,
            collected.num_cached_tokens,
            collected.num_image_tokens,
            collected.num_cached_image_tokens,
        ),
    )
    return Response(response.model_dump_json(), media_type="application/json")


async def _stream(
    server: ModelServer,
    body: ChatCompletionRequest,
    request_id: str,
    deltas: DeltaStream,
    tracker: RequestTracker,
    plan: ToolPlan,
) -> AsyncGenerator[str, None]:
    created = int(time.time())
    parsers = [ToolCallStream(parallel=plan.parallel) for _ in range(body.n)] if plan.parse else None
    include_usage = body.include_usage
    output_tokens = [0] * body.n
    prompt_tokens = cached_tokens = image_tokens = cached_image_tokens = 0

    def chunk(choices: list[ChatStreamChoice], usage: UsageInfo | None = None) -> str:
        message = ChatCompletionChunk(
            id=request_id, created=created, model=server.model_id, choices=choices, usage=usage
        )
        return sse(chunk_json(message, include_usage=include_usage or usage is not None))

    content = ContentChunks(
        lambda index, text: ChatCompletionChunk(
            id=request_id,
            created=created,
            model=server.model_id,
            choices=[ChatStreamChoice(index=index, delta=DeltaMessage(content=text))],
        ),
        include_usage,
    )
    continuous_usage = include_usage and body.continuous_usage

    try:
        for index in range(body.n):
            yield chunk([ChatStreamChoice(index=index, delta=DeltaMessage(role="assistant", content=""))])
        async for delta in deltas:
            tracker.on_delta(delta)
            if delta.finish_reason == "error":
                message = f"The engine failed while generating: {delta.error or 'unknown error'}"
                yield sse(error_json(message, "server_error", None, "engine_error"))
                yield DONE
                return
            output_tokens[delta.index] = max(output_tokens[delta.index], delta.num_output_tokens)
            if delta.index == 0 and delta.num_prompt_tokens:
                prompt_tokens, cached_tokens = delta.num_prompt_tokens, delta.num_cached_tokens
                image_tokens, cached_image_tokens = delta.num_image_tokens, delta.num_cached_image_tokens
            fast = not delta.finished and not continuous_usage and not (body.logprobs and delta.logprobs)
            if fast and parsers is None:  # tool calls are read from the text: not on the fast path
                yield sse(content.json(delta.index, delta.text))  # the common case, per token
                continue
            logprobs = None
            if body.logprobs and delta.logprobs:
                logprobs = ChatLogprobs(
                    content=chat_logprobs(delta.logprobs, server.token_texts, _top_k(body))
                )
            text: str | None = delta.text
            tool_calls = None
            reason = delta.finish_reason
            if parsers is not None:
                parser = parsers[delta.index]
                text, calls = parser.feed(delta.text, final=delta.finished)
                tool_calls = calls or None
                reason = finish_reason(reason, plan, parser.called)
            choice = ChatStreamChoice(
                index=delta.index,
                delta=DeltaMessage(
                    content=text if text or (not delta.finished and tool_calls is None) else None,
                    tool_calls=tool_calls,
                ),
                logprobs=logprobs,
                finish_reason=reason,
                stop_reason=delta.stop_reason,
            )
            usage = None
            if include_usage and body.continuous_usage:
                usage = UsageInfo.of(
                    prompt_tokens, sum(output_tokens), cached_tokens, image_tokens, cached_image_tokens
                )
            yield chunk([choice], usage)
        if include_usage:
            yield chunk(
                [],
                UsageInfo.of(
                    prompt_tokens, sum(output_tokens), cached_tokens, image_tokens, cached_image_tokens
                ),
            )
        yield DONE
    finally:
        await deltas.aclose()
        tracker.close(body.n)
