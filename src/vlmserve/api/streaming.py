"""Server-sent events and client disconnects: the plumbing under streamed and long-running responses.

Owns: the SSE framing (`data: {json}\\n\\n`, the final `data: [DONE]\\n\\n`), a StreamingResponse that always
closes its event generator and the engine streams under it (so an engine request is aborted the moment its
client goes away, not when the garbage collector gets to it, nor only at max_tokens when the client stopped
reading without leaving), running a handler until the client disconnects
(for the time before a response exists), merging the delta streams of a batch of prompts, and collecting a
request's deltas into whole choices for non-streamed answers.

Does not know: OpenAI shapes (beyond the SSE framing), the engine (beyond its plain CompletionDelta).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import anyio
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Message, Send

from vlmserve.api.errors import EngineError, InvalidRequestError
from vlmserve.engine.outputs import CompletionDelta, TokenLogprob

logger = logging.getLogger(__name__)

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)

DONE = "data: [DONE]\n\n"
# nginx buffers proxied responses unless told not to, which would hold every token back until the end.
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
# 499 (nginx's "client closed request"): nobody receives it, but it marks the access log line.
CLIENT_CLOSED_REQUEST = 499


def sse(data: str) -> str:
    return f"data: {data}\n\n"


class ClosableStream(Protocol[T_co]):
    """An async iterator with aclose(): async generators, and serving.DeltaStream."""

    def __aiter__(self) -> AsyncIterator[T_co]: ...

    def __anext__(self) -> Awaitable[T_co]: ...

    def aclose(self) -> Awaitable[None]: ...


class SSEResponse(StreamingResponse):
    """text/event-stream that closes its event generator and the engine streams under it however the
    response ends (finished, client gone, server shutting down), so that the engine requests are aborted
    right away rather than when the garbage collector gets to them. The streams are closed explicitly
    because a generator that never started (the client left before the first event) runs no `finally`.

    A client that stops reading without closing its connection would otherwise hold its engine requests
    (and their KV blocks) until they ran to max_tokens: a send that cannot complete for
    `stalled_client_timeout_s` (the client's receive window and the server's send buffer are full) ends
    the stream and aborts them."""

    media_type = "text/event-stream"
    stalled_client_timeout_s: float = 30.0

    def __init__(
        self, content: AsyncGenerator[str, None], streams: Sequence[ClosableStream[Any]] = ()
    ) -> None:
        super().__init__(content, headers=SSE_HEADERS)
        self._generator = content
        self._streams = list(streams)

    async def stream_response(self, send: Send) -> None:
        # One watcher per stream, not a cancel scope per send: a scope costs more than the rest of a token's
        # trip through the front, and a stream sends one message per token.
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        sending_since: list[float | None] = [None]
        stalled = False

        async def timed_send(message: Message) -> None:
            sending_since[0] = loop.time()
            await send(message)
            sending_since[0] = None

        async def watch() -> None:
            nonlocal stalled
            interval = min(1.0, self.stalled_client_timeout_s / 4)
            while True:
                await asyncio.sleep(interval)
                since = sending_since[0]
                if since is not None and loop.time() - since > self.stalled_client_timeout_s:
                    stalled = True
                    assert task is not None
                    task.cancel()
                    return

        watcher = asyncio.create_task(watch())
        try:
            await super().stream_response(timed_send)
        except asyncio.CancelledError:
            if not stalled:
                raise
            assert task is not None
            task.uncancel()
            # NOTE: uvicorn then closes the connection, and logs (at ERROR) that the response was left
            # incomplete: RELIABILITY.md lists it.
            logger.warning(
                "the client has read nothing for %g s; ending its stream and aborting its request",
                self.stalled_client_timeout_s,
            )
        finally:
            watcher.cancel()
            # Shielded: on disconnect this runs inside a cancelled scope, where any await would re-raise.
            with anyio.CancelScope(shield=True):
                await self._generator.aclose()
                for stream in self._streams:
                    await stream.aclose()


async def _wait_for_disconnect(request: Request) -> None:
    # The body has been read by now, so the next ASGI message is http.disconnect, whenever the client goes
    # away (uvicorn also sends it once the response is complete).
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def until_disconnect(request: Request, work: Awaitable[Response]) -> Response:
    """Run `work` (a handler's coroutine) but cancel it when the client disconnects first.

    Until a handler returns its response, nothing else watches the connection: a non-streamed request, or a
    streamed one still waiting for its first token, would otherwise keep its engine request running for a
    client that is gone. Cancelling the handler aborts the engine request (ModelServer.start).
    """
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:  # the server is shutting down this request
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return Response(status_code=CLIENT_CLOSED_REQUEST)


@dataclass
class _End:
    error: BaseException | None = None


async def merge(streams: Sequence[ClosableStream[T]]) -> AsyncGenerator[tuple[int, T], None]:
    """Items of several streams as they arrive, tagged with the stream's index. Closing the merged stream
    closes every input stream."""
    if len(streams) == 1:
        try:
            async for item in streams[0]:
                yield 0, item
        finally:
            await streams[0].aclose()
        return

    queue: asyncio.Queue[tuple[int, T | _End]] = asyncio.Queue()

    async def pump(index: int, stream: ClosableStream[T]) -> None:
        end = _End()
        try:
            async for item in stream:
                await queue.put((index, item))
        except Exception as e:
            end.error = e
        finally:
            queue.put_nowait((index, end))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            index, item = await queue.get()
            if isinstance(item, _End):
                if item.error is not None:
                    raise item.error
                remaining -= 1
                continue
            yield index, item
    finally:
        for task in tasks:
            task.cancel()
        with anyio.CancelScope(shield=True):
            await asyncio.gather(*tasks, return_exceptions=True)
            for stream in streams:
                await stream.aclose()


# ------------------------------------------------------------------------------------------ non-streamed results


@dataclass
class CollectedChoice:
    """Everything one choice produced, gathered from its deltas."""

    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_output_tokens: int = 0
    error: str | None = None
    error_kind: str | None = None


@dataclass
class Collected:
    choices: dict[int, CollectedChoice] = field(default_factory=dict)
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    num_image_tokens: int = 0
    num_cached_image_tokens: int = 0

    def add(self, index: int, delta: CompletionDelta, first_of_prompt: bool) -> None:
        choice = self.choices.setdefault(index, CollectedChoice())
        choice.text += delta.text
        if delta.logprobs:
            choice.logprobs += delta.logprobs
        if delta.finished:
            choice.finish_reason = delta.finish_reason
            choice.stop_reason = delta.stop_reason
            choice.num_output_tokens = delta.num_output_tokens
            choice.error = delta.error
            choice.error_kind = delta.error_kind
            if first_of_prompt:
                # Choice 0 of a prompt: its siblings reuse its prompt blocks, so its hit is the request's.
                self.num_cached_tokens += delta.num_cached_tokens
                self.num_prompt_tokens += delta.num_prompt_tokens
                self.num_image_tokens += delta.num_image_tokens
                self.num_cached_image_tokens += delta.num_cached_image_tokens

    @property
    def num_output_tokens(self) -> int:
        return sum(c.num_output_tokens for c in self.choices.values())

    @property
    def error(self) -> str | None:
        return next(
            (c.error or "engine error" for c in self.choices.values() if c.finish_reason == "error"), None
        )

    def raise_error(self) -> None:
        """Raise the failure of a choice that ended in error, if any: the client's (a constraint that could
        not be followed, 400) or the engine's (500)."""
        failed = next((c for c in self.choices.values() if c.finish_reason == "error"), None)
        if failed is None:
            return
        if failed.error_kind == "constraint":
            raise InvalidRequestError(
                f"The output constraint could not be followed: {failed.error}", code="invalid_constraint"
            )
        raise EngineError(f"The engine failed while generating: {failed.error or 'engine error'}")
