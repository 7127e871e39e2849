"""One replica of a model's server deployment: the `ModelServer` of `vlmserve serve`, behind Ray calls.

`LLMServer` builds the same ModelServer (engine, processor, media loader) that `vlmserve serve` builds and
exposes what the ingress needs over Ray Serve handle calls:

    chat(body, request_id, routing_key, channel)
                                        stream: prompt building (images are fetched and preprocessed here,
                                        next to the engine), then the request's CompletionDeltas
    prepare_completions(body, rid)      /v1/completions prompts -> EngineRequests (text only, small)
    tokenize(body)                      /tokenize (images fetched and sized here, like chat's)
    generate(engine_request, channel)   stream: the request's CompletionDeltas
    deltas(channel_id)                  stream: an ingress's delta channel (below)
    model_info() / replica_state()      model card + tokenizer for the ingress; engine liveness + stats
    check_health()                      Ray Serve's health check: a dead engine gets the replica replaced

An API error raised before the first delta (bad request, queue full) travels as a `RemoteAPIError` item
instead of an exception: Ray would wrap the exception and lose its status, parameter and code.

How deltas travel. Every Ray streaming item costs both ends a task report, a (de)serialisation and Ray
Serve's bookkeeping; one item per token per stream made that the Ray path's main cost at load. So an ingress
opens one `deltas` stream per replica (its channel) and a request that names it (a ChannelTicket) first
yields `StreamStart`, then puts its deltas in the channel's outbox: every delta of a step, all requests
together, leaves as one item, when the engine step ends (tokens still stream one step at a time). The
request's own stream stays open until the request ends, so Ray Serve still counts it as ongoing
(max_ongoing_requests, autoscaling) and cancelling it (the client left) still aborts the request. A request
that finds no open channel (the first, or after the channel closed when idle) streams its deltas on its own
stream, one item each, as does every request when a stream batching interval is set
(LLMConfig.experimental_configs.stream_batching_interval_ms, as in Ray Serve LLM): then the first delta goes
at once and later ones are merged over each interval.

Does not know: HTTP, routing between models, Ray deployment options (builder.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field

from vlmserve.api.errors import APIError
from vlmserve.api.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    TokenizeRequest,
    TokenizeResponse,
)
from vlmserve.api.serving import ModelServer
from vlmserve.config import EngineArgs
from vlmserve.engine.inputs import EngineRequest
from vlmserve.engine.outputs import CompletionDelta
from vlmserve.memory import freeze_startup_heap, limit_malloc_arenas

logger = logging.getLogger(__name__)

# An ingress's delta channel closes after this long without a request on it (and is opened again on demand).
CHANNEL_IDLE_S = 2.0


@dataclass(frozen=True)
class RemoteAPIError:
    """An `APIError` in a form that crosses a Ray call intact (status, type, parameter, code, headers)."""

    status_code: int
    error_type: str
    message: str
    param: str | None = None
    code: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def capture(cls, error: APIError) -> RemoteAPIError:
        return cls(
            error.status_code, error.error_type, error.message, error.param, error.code, dict(error.headers)
        )

    def to_exception(self) -> APIError:
        error = APIError(self.message, param=self.param, code=self.code, headers=self.headers)
        # Instance attributes shadow APIError's class-level defaults; response() reads them.
        error.status_code = self.status_code
        error.error_type = self.error_type
        return error


@dataclass(frozen=True)
class StreamStart:
    """First item of a chat / generate stream that named a delta channel: the request started on replica
    `replica_id`; with `on_channel` its deltas travel on that channel (not on this stream, which then only
    ends when the request does), else on this stream as usual."""

    replica_id: str
    on_channel: bool


@dataclass(frozen=True)
class ChannelTicket:
    """Which ingress channel a request's deltas may go to, and the request's number on it."""

    channel_id: str
    number: int


class _Outbox:
    """The deltas waiting for one ingress's channel stream, as (request number, delta) in engine order."""

    def __init__(self) -> None:
        self.items: list[tuple[int, CompletionDelta]] = []
        self.wakeup = asyncio.Event()
        self.active = 0  # requests sending here: the channel stays open while any runs
        self.closed = False

    def put(self, number: int, delta: CompletionDelta) -> None:
        if self.closed:
            raise ChannelClosedError("the ingress's delta channel closed mid-request")
        self.items.append((number, delta))
        self.wakeup.set()


class ChannelClosedError(RuntimeError):
    """The channel a request's deltas went to is gone (its ingress went away): the request is aborted."""


@dataclass(frozen=True)
class ModelInfo:
    """What the ingress needs to know about a model once, at startup."""

    model_id: str
    card: ModelCard
    # tokenizer.json as text: the ingress decodes token ids (logprobs, echo) without the checkpoint's files.
    tokenizer_json: str


@dataclass(frozen=True)
class ReplicaState:
    alive: bool
    stats: dict[str, float]
    pid: int
    # Requests whose deltas went on an ingress's channel, and on their own stream.
    channel_requests: int = 0
    stream_requests: int = 0


class LLMServer:
    """A Ray Serve replica serving one model id with its own engine."""

    def __init__(self, engine_args: EngineArgs, stream_batching_interval_s: float = 0.0) -> None:
        self.stream_batching_interval_s = stream_batching_interval_s
        # channel id -> the outbox of that ingress's open `deltas` stream
        self._outboxes: dict[str, _Outbox] = {}
        self._replica_id: str | None = None
        self._channel_requests = self._stream_requests = 0
        # A replica is a serving process, as `vlmserve serve` is: cap malloc arenas before the engine's
        # threads allocate (memory.py). A library user's process keeps its own settings.
        limit_malloc_arenas()
        started = time.perf_counter()
        self.server = ModelServer.from_engine_args(engine_args)
        # What the replica holds from here to its end (the processor, Ray's and the app's objects) leaves the
        # cyclic collector's reach, as in `vlmserve serve`'s front (memory.py).
        freeze_startup_heap()
        logger.info(
            "replica of %s ready in %.1fs (device %s)",
            self.server.model_id,
            time.perf_counter() - started,
            self.server.config.device,
        )

    # --- control ---------------------------------------------------------------------------------------

    def model_info(self) -> ModelInfo:
        return ModelInfo(
            model_id=self.server.model_id,
            card=self.server.model_card(),
            tokenizer_json=self.server.processor.tokenizer.to_str(),
        )

    def replica_state(self) -> ReplicaState:
        return ReplicaState(
            alive=self.server.is_alive,
            stats=self.server.stats(),
            pid=os.getpid(),
            channel_requests=self._channel_requests,
            stream_requests=self._stream_requests,
        )

    def check_health(self) -> None:
        """Called by Ray Serve every health_check_period_s; raising makes Ray replace this replica."""
        health = self.server.health()
        if not health.ok:
            state = "not running" if health.status == "dead" else health.status
            raise RuntimeError(f"the engine of {self.server.model_id} is {state}: {health.reason}")

    async def __del__(self) -> None:
        # Ray Serve awaits this on graceful shutdown, after in-flight requests drained (or timed out).
        server = getattr(self, "server", None)  # absent when the constructor failed
        if server is not None:
            await server.aclose()

    # --- requests --------------------------------------------------------------------------------------

    async def chat(
        self,
        body: ChatCompletionRequest,
        request_id: str,
        routing_key: str | None = None,
        channel: ChannelTicket | None = None,
    ) -> AsyncGenerator[CompletionDelta | StreamStart | RemoteAPIError, None]:
        # routing_key is for the ingress's router (deploy/router.py), which reads it from the call; unused here.
        del routing_key
        try:
            request = await self.server.prepare_chat(body, request_id)
            deltas = await self.server.start(request)
        except APIError as e:
            yield RemoteAPIError.capture(e)
            return
        async for item in self._send(deltas, channel):
            yield item

    async def prepare_completions(
        self, body: CompletionRequest, request_id: str
    ) -> list[EngineRequest] | RemoteAPIError:
        try:
            return await self.server.prepare_completions(body, request_id)
        except APIError as e:
            return RemoteAPIError.capture(e)

    async def tokenize(self, body: TokenizeRequest) -> TokenizeResponse | RemoteAPIError:
        try:
            return await self.server.tokenize(body)
        except APIError as e:
            return RemoteAPIError.capture(e)

    async def generate(
        self, request: EngineRequest, channel: ChannelTicket | None = None
    ) -> AsyncGenerator[CompletionDelta | StreamStart | RemoteAPIError, None]:
        # The arrival time was taken on the ingress's monotonic clock, which means nothing in this process.
        request = dataclasses.replace(request, arrival_time=time.monotonic())
        try:
            deltas = await self.server.start(request)
        except APIError as e:
            yield RemoteAPIError.capture(e)
            return
        async for item in self._send(deltas, channel):
            yield item

    async def deltas(
        self, channel_id: str, replica_pin: str | None = None
    ) -> AsyncGenerator[str | list[tuple[int, CompletionDelta]], None]:
        """The delta channel of one ingress: every delta of its requests here that chose the channel, one
        item per batch of whatever is ready (one engine step's deltas, all requests together) instead of one
        Ray item per delta per request. Ends when no such request ran for CHANNEL_IDLE_S (an open channel
        counts as an ongoing request for Ray Serve's autoscaler) or when cancelled.

        replica_pin is for the ingress's router (deploy/router.py): it sends this call to that replica."""
        del replica_pin
        if channel_id in self._outboxes:
            # This ingress has its channel here already (its router did not pin this call): end at once.
            yield self._own_replica_id()
            return
        outbox = self._outboxes[channel_id] = _Outbox()
        try:
            # Opened: from now on, requests naming this channel send their deltas here. The first item says
            # which replica this is (a router other than the image-aware one may not honour replica_pin).
            yield self._own_replica_id()
            while True:
                if outbox.items:
                    items, outbox.items = outbox.items, []
                    yield items
                    continue
                if outbox.closed:
                    return
                outbox.wakeup.clear()
                try:
                    async with asyncio.timeout(CHANNEL_IDLE_S):  # not wait_for: see _forward
                        await outbox.wakeup.wait()
                except TimeoutError:
                    if outbox.active == 0 and not outbox.items:
                        return
        finally:
            outbox.closed = True
            if self._outboxes.get(channel_id) is outbox:
                del self._outboxes[channel_id]

    def _own_replica_id(self) -> str:
        if self._replica_id is None:
            from ray import serve

            self._replica_id = serve.get_replica_context().replica_id.unique_id
        return self._replica_id

    async def _send(
        self, deltas: AsyncGenerator[CompletionDelta, None], channel: ChannelTicket | None
    ) -> AsyncGenerator[CompletionDelta | StreamStart, None]:
        """A started request's deltas: on this stream, or (a channel is open and no stream window is set)
        into the channel's outbox while this stream stays open, so that Ray Serve counts the request as
        ongoing and a cancelled stream still aborts it."""
        if channel is None:
            self._stream_requests += 1
            async for delta in _forward(deltas, self.stream_batching_interval_s):
                yield delta
            return
        outbox = self._outboxes.get(channel.channel_id)
        if outbox is None or self.stream_batching_interval_s > 0:
            yield StreamStart(self._own_replica_id(), on_channel=False)
            self._stream_requests += 1
            async for delta in _forward(deltas, self.stream_batching_interval_s):
                yield delta
            return
        # Counted before the first yield (a suspension point): an idle channel must not close in between.
        outbox.active += 1
        self._channel_requests += 1
        try:
            yield StreamStart(self._own_replica_id(), on_channel=True)
            async for delta in deltas:
                outbox.put(channel.number, delta)
        finally:
            outbox.active -= 1
            outbox.wakeup.set()  # an idle channel may close now
            await deltas.aclose()


async def _forward(
    deltas: AsyncGenerator[CompletionDelta, None], interval_s: float = 0.0
) -> AsyncGenerator[CompletionDelta, None]:
    # Closing `deltas` aborts the engine request; that happens here when Ray cancels this stream (the
    # ingress's client went away) as well as when it ends.
    if interval_s <= 0:
        try:
            async for delta in deltas:
                yield delta
        finally:
            await deltas.aclose()
        return
    # Windowed: a task moves deltas into a queue as they come, and this side waits on the queue with a
    # deadline (waiting on the stream itself with a timeout would cancel it).
    queue: asyncio.Queue[CompletionDelta | BaseException | None] = asyncio.Queue()

    async def pump() -> None:
        try:
            async for delta in deltas:
                queue.put_nowait(delta)
            queue.put_nowait(None)
        except Exception as e:
            queue.put_nowait(e)

    task = asyncio.create_task(pump())
    loop = asyncio.get_running_loop()
    first = True
    try:
        while True:
            item = await queue.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            batch = [item]
            if not first:
                deadline = loop.time() + interval_s
                while not batch[-1].finished and (left := deadline - loop.time()) > 0:
                    # NOTE: asyncio.timeout, not wait_for: on Python 3.11 a cancellation (Ray's, when the
                    # client leaves) that lands as a delta arrives makes wait_for return the delta and drop
                    # the cancellation, and the engine request runs to its end for nobody.
                    try:
                        async with asyncio.timeout(left):
                            item = await queue.get()
                    except TimeoutError:
                        break
                    if item is None or isinstance(item, BaseException):
                        queue.put_nowait(item)  # the end (or a failure): handled once this batch is out
                        break
                    batch.append(item)
            first = False
            for delta in merge_deltas(batch):
                yield delta
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await deltas.aclose()


def merge_deltas(deltas: list[CompletionDelta]) -> list[CompletionDelta]:
    """Consecutive deltas as one per choice: the text, token ids and logprobs joined, the rest (finish
    reason, counts, error) from the latest. Choices keep the order of their first delta."""
    merged: dict[int, CompletionDelta] = {}
    for d in deltas:
        m = merged.get(d.index)
        if m is None:
            merged[d.index] = dataclasses.replace(
                d, token_ids=list(d.token_ids), logprobs=None if d.logprobs is None else list(d.logprobs)
            )
            continue
        m.text += d.text
        m.token_ids += d.token_ids
        if d.logprobs is not None:
            m.logprobs = (m.logprobs or []) + d.logprobs
        m.finish_reason, m.stop_reason, m.error = d.finish_reason, d.stop_reason, d.error or m.error
        m.num_prompt_tokens, m.num_cached_tokens = d.num_prompt_tokens, d.num_cached_tokens
        m.num_output_tokens = d.num_output_tokens
        m.num_image_tokens, m.num_cached_image_tokens = d.num_image_tokens, d.num_cached_image_tokens
    return list(merged.values())
