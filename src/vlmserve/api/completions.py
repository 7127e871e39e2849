"""POST /v1/completions: prompts (text or token ids, one or a batch) in, `text_completion` JSON or SSE out.

Prompt p's choice i is `choices[p * n + i]`, as in OpenAI's API. The prompts of a batch run concurrently and
their stream chunks interleave; a stream ends with a usage chunk (stream_options.include_usage) and
`data: [DONE]`.

Does not know: tokenization (serving.py), routing, auth.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator
from dataclasses import replace

from starlette.responses import Response

from vlmserve.api.errors import error_json
from vlmserve.api.logprobs import completion_logprobs
from vlmserve.api.metrics import RequestTracker, ServerMetrics
from vlmserve.api.protocol import (
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    UsageInfo,
    chunk_json,
)
from vlmserve.api.serving import DeltaStream, ModelServer, new_request_id
from vlmserve.api.streaming import DONE, Collected, SSEResponse, merge, sse
from vlmserve.engine.inputs import EngineRequest
from vlmserve.engine.outputs import CompletionDelta


async def create_completion(
    server: ModelServer, body: CompletionRequest, metrics: ServerMetrics, client_request_id: str | None
) -> Response:
    tracker = metrics.track(server.model_id)
    request_id = new_request_id("cmpl", body.request_id or client_request_id)
    engine_requests = await server.prepare_completions(body, request_id)
    streams: list[DeltaStream] = []
    try:
        for request in engine_requests:
            streams.append(await server.start(request))
    except BaseException:
        for stream in streams:  # the batch is all or nothing: abort the prompts already started
            await stream.aclose()
        raise
    prompts = [server.prompt_text(r) for r in engine_requests] if body.echo else None
    deltas = merge(streams)
    if body.stream:
        events = _stream(server, body, request_id, deltas, tracker, prompts, len(engine_requests))
        return SSEResponse(events, streams=[deltas, *streams])
    return await _complete(server, body, request_id, engine_requests, deltas, tracker, prompts)


async def _complete(
    server: ModelServer,
    body: CompletionRequest,
    request_id: str,
    engine_requests: list[EngineRequest],
    deltas: AsyncGenerator[tuple[int, CompletionDelta], None],
    tracker: RequestTracker,
    prompts: list[str] | None,
) -> Response:
    n = body.n
    collected = Collected()
    try:
        async for prompt_index, delta in deltas:
            tracker.on_delta(_renumbered(delta, prompt_index, n))
            collected.add(prompt_index * n + delta.index, delta, first_of_prompt=delta.index == 0)
    finally:
        await deltas.aclose()
        tracker.close(n * len(engine_requests))
    collected.raise_error()
    choices = []
    for index in range(n * len(engine_requests)):
        c = collected.choices[index]
        prefix = prompts[index // n] if prompts is not None else ""
        logprobs = None
        if body.logprobs is not None:
            logprobs, _ = completion_logprobs(c.logprobs, server.token_texts, body.logprobs, len(prefix))
        choices.append(
            CompletionChoice(
                index=index,
                text=prefix + c.text,
                logprobs=logprobs,
                finish_reason=c.finish_reason,
                stop_reason=c.stop_reason,
            )
        )
    response = CompletionResponse(
        id=request_id,
        model=server.model_id,
        choices=choices,
        usage=UsageInfo.of(
            collected.num_prompt_tokens, collected.num_output_tokens, collected.num_cached_tokens
        ),
    )
    return Response(response.model_dump_json(), media_type="application/json")


def _renumbered(delta: CompletionDelta, prompt_index: int, n: int) -> CompletionDelta:
    """The delta with its index in the whole batch, so that per-choice metrics do not mix prompts."""
    if prompt_index == 0:
        return delta
    return replace(delta, index=prompt_index * n + delta.index)


async def _stream(
    server: ModelServer,
    body: CompletionRequest,
    request_id: str,
    deltas: AsyncGenerator[tuple[int, CompletionDelta], None],
    tracker: RequestTracker,
    prompts: list[str] | None,
    num_prompts: int,
) -> AsyncGenerator[str, None]:
    created = int(time.time())
    n = body.n
    include_usage = body.include_usage
    output_tokens: dict[int, int] = {}
    prompt_tokens: dict[int, tuple[int, int]] = {}  # prompt index -> (prompt tokens, cached tokens)
    offsets: dict[int, int] = {}  # choice index -> text offset of its next token (logprobs.text_offset)

    def usage() -> UsageInfo:
        return UsageInfo.of(
            sum(p for p, _ in prompt_tokens.values()),
            sum(output_tokens.values()),
            sum(c for _, c in prompt_tokens.values()),
        )

    def chunk(choice: CompletionChoice | None, with_usage: bool = False) -> str:
        message = CompletionResponse(
            id=request_id,
            created=created,
            model=server.model_id,
            choices=[choice] if choice is not None else [],
            usage=usage() if with_usage else None,
        )
        return sse(chunk_json(message, include_usage=include_usage))

    try:
        if prompts is not None:
            for p, text in enumerate(prompts):
                for i in range(n):
                    offsets[p * n + i] = len(text)
                    yield chunk(CompletionChoice(index=p * n + i, text=text))
        async for prompt_index, delta in deltas:
            index = prompt_index * n + delta.index
            tracker.on_delta(_renumbered(delta, prompt_index, n))
            if delta.finish_reason == "error":
                message = f"The engine failed while generating: {delta.error or 'unknown error'}"
                yield sse(error_json(message, "server_error", None, "engine_error"))
                yield DONE
                return
            output_tokens[index] = max(output_tokens.get(index, 0), delta.num_output_tokens)
            if delta.index == 0 and delta.num_prompt_tokens:
                prompt_tokens[prompt_index] = (delta.num_prompt_tokens, delta.num_cached_tokens)
            logprobs = None
            if body.logprobs is not None and delta.logprobs:
                logprobs, offsets[index] = completion_logprobs(
                    delta.logprobs, server.token_texts, body.logprobs, offsets.get(index, 0)
                )
            choice = CompletionChoice(
                index=index,
                text=delta.text,
                logprobs=logprobs,
                finish_reason=delta.finish_reason,
                stop_reason=delta.stop_reason,
            )
            yield chunk(choice, with_usage=include_usage and body.continuous_usage)
        if include_usage:
            yield chunk(None, with_usage=True)
        yield DONE
    finally:
        await deltas.aclose()
        tracker.close(n * num_prompts)
