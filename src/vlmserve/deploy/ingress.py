"""The ingress deployment: the OpenAI app of `vlmserve serve`, routing by model id to server deployments.

`OpenAiIngress` builds, at replica start, the very FastAPI app of api/server.py (`build_app`: routes, errors,
auth, body limit, metrics) over one `RemoteModelServer` per model. A RemoteModelServer stands in for a
ModelServer: it offers the same methods the routes call, and forwards the work to the model's `LLMServer`
deployment through its DeploymentHandle:

    prepare_chat   -> nothing yet: the prompt is built in the replica that runs it (one hop, images fetched
                      and preprocessed next to the engine), by `start`
    start          -> handle.options(stream=True).chat / .generate; the first item is awaited so that a
                      request error still becomes its HTTP status before a stream begins. A chat carries
                      its image's affinity key, by which the deployment's router (deploy/router.py) picks
                      the replica that has the image cached. Its deltas then come on this ingress's delta
                      channel to that replica (one `deltas` stream per replica, one Ray item per engine
                      step for all requests; deploy/server.py), or on its own stream when no channel was
                      open at the replica yet (which has this ingress open one)
    prepare_completions -> handle.prepare_completions (token ids only)
    tokenize       -> handle.tokenize (images are fetched and sized in the replica)
    detokenize     -> the model's tokenizer, here
    token_texts, prompt_text -> the model's tokenizer, fetched once from a replica at startup
    stats, is_alive -> summed over every replica by a periodic broadcast (for /metrics and /health), plus
                      the router's placement counters

A replica that dies before a request produced output is retried on another replica (nothing was sent to
the client yet); one that dies mid-stream ends the stream with an engine error, like an engine failure.
Ray Serve's queue limit (max_queued_requests) becomes a 503 with Retry-After in OpenAI's error shape.

Does not know: how engines run, deployment options (builder.py), routes (api/).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import itertools
import logging
import uuid
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator
from tokenizers import Tokenizer

from vlmserve import envs
from vlmserve.api.errors import EngineError, ServiceUnavailableError
from vlmserve.api.logprobs import TokenTexts
from vlmserve.api.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    TokenizeRequest,
    TokenizeResponse,
)
from vlmserve.api.server import build_app
from vlmserve.api.serving import check_token_ids
from vlmserve.deploy.router import REPLICA_PIN_KWARG, ROUTING_KEY_KWARG, affinity_key, routing_stats
from vlmserve.deploy.server import ChannelTicket, ModelInfo, RemoteAPIError, ReplicaState, StreamStart
from vlmserve.engine.client import EngineHealth
from vlmserve.engine.inputs import EngineRequest
from vlmserve.engine.outputs import CompletionDelta

logger = logging.getLogger(__name__)

# How often the ingress reads every replica's engine stats (for /metrics and /health).
STATS_REFRESH_S = 5.0
STATS_TIMEOUT_S = 5.0
# A request whose replica died before it produced anything is sent again, at most this many times.
MAX_ATTEMPTS = 3
RETRY_BACKOFF_S = 0.5

CHANNEL_OPEN_TIMEOUT_S = 30.0
# A request's own stream can end before the last of its deltas, sent on the channel, arrived: wait this long.
CHANNEL_GRACE_S = 10.0
# Deltas that came on a channel before their request's relay asked for them (bounded: a relay that never
# comes, its request cancelled meanwhile, must not keep them forever).
MAX_EARLY = 4096

# Engine stats that are fractions: averaged over replicas; every other stat is a count and is summed.
_MEAN_STATS = frozenset({"kv_cache_usage", "encoder_cache_usage"})
# Engine stats where the worst replica is what matters: their maximum.
_MAX_STATS = frozenset({"seconds_since_progress"})


@dataclass(frozen=True)
class PendingChat:
    """A chat request whose prompt the replica builds when `start` sends it."""

    body: ChatCompletionRequest
    request_id: str


class RemoteModelServer:
    """The ModelServer surface the routes use, for a model served by a Ray Serve deployment."""

    def __init__(self, handle: DeploymentHandle, info: ModelInfo) -> None:
        self.model_id = info.model_id
        self.created = info.card.created
        self._card = info.card
        self._handle = handle
        self._stream = handle.options(stream=True)
        self._tokenizer = Tokenizer.from_str(info.tokenizer_json)
        self.token_texts = TokenTexts(self._tokenizer)
        self._replicas: list[ReplicaState] = []
        # Delta channels (one per replica, see _Channel): requests are numbered on them.
        self._channel_id = uuid.uuid4().hex
        self._numbers = itertools.count()
        self._channels: dict[str, _Channel] = {}
        self._queues: dict[int, asyncio.Queue[CompletionDelta | BaseException]] = {}
        self._early: dict[int, list[CompletionDelta]] = {}

    # --- state ------------------------------------------------------------------------------------------

    @property
    def is_alive(self) -> bool:
        # No replica (scaled to zero, or all being replaced) is not death: Ray Serve starts one on demand.
        return not self._replicas or any(r.alive for r in self._replicas)

    def health(self) -> EngineHealth:
        # A stalled replica fails Ray Serve's health check and is replaced there (deploy/server.py).
        if self.is_alive:
            return EngineHealth("ok")
        return EngineHealth("dead", "no replica of this model has a running engine")

    def stats(self) -> dict[str, float]:
        total: dict[str, float] = {}
        for replica in self._replicas:
            for key, value in replica.stats.items():
                if key in _MAX_STATS:
                    total[key] = max(total.get(key, 0.0), float(value))
                else:
                    total[key] = total.get(key, 0.0) + float(value)
        for key in _MEAN_STATS & total.keys():
            total[key] /= len(self._replicas)
        # How the ingress's image-aware router placed requests (deploy/router.py), next to the engines'
        # encoder and prefix cache hits that the placement is for.
        return total | routing_stats(self._handle.deployment_name)

    async def refresh(self) -> None:
        """Read every replica's engine state (Ray's broadcast skips replicas that are starting)."""
        results = await self._handle.broadcast("replica_state").results_async(
            timeout_s=STATS_TIMEOUT_S, return_exceptions=True
        )
        self._replicas = [r for r in results if isinstance(r, ReplicaState)]

    def model_card(self) -> ModelCard:
        return self._card

    async def aclose(self) -> None:
        """Nothing to release here: the engines live (and stop) in the server replicas."""

    # --- requests ---------------------------------------------------------------------------------------

    async def prepare_chat(self, body: ChatCompletionRequest, request_id: str) -> PendingChat:
        return PendingChat(body, request_id)

    async def prepare_completions(self, body: CompletionRequest, request_id: str) -> list[EngineRequest]:
        result: list[EngineRequest] = await self._call("prepare_completions", body, request_id)
        return result

    async def tokenize(self, body: TokenizeRequest) -> TokenizeResponse:
        result: TokenizeResponse = await self._call("tokenize", body)
        return result

    def detokenize(self, tokens: list[int]) -> str:
        check_token_ids(tokens, self._tokenizer.get_vocab_size(with_added_tokens=True), "tokens")
        return self._tokenizer.decode(tokens, skip_special_tokens=False)

    async def _call(self, method: str, *args: Any) -> Any:
        """A replica's answer to one (non-streaming) call, retried on another replica if this one died."""
        attempt = 0
        while True:
            attempt += 1
            try:
                result = await getattr(self._handle, method).remote(*args)
            except (BackPressureError, DeploymentUnavailableError) as e:
                raise _unavailable(self.model_id, e) from e
            except RayActorError as e:
                if attempt == MAX_ATTEMPTS:
                    raise _unavailable(self.model_id, e) from e
                await asyncio.sleep(RETRY_BACKOFF_S)
                continue
            if isinstance(result, RemoteAPIError):
                raise result.to_exception()
            return result

    async def start(self, request: EngineRequest | PendingChat) -> AsyncGenerator[CompletionDelta, None]:
        """Send the request to a replica and wait for its first delta; return the stream of all of them."""
        if isinstance(request, PendingChat):
            request_id, n = request.request_id, request.body.n
        else:
            request_id, n = request.request_id, request.sampling_params.n
        # The router sends requests with the same image (and system prompt) to the same replica; the key is
        # hashed here once from the parsed body (the image's bytes as sent: nothing is decoded here).
        key = affinity_key(request.body) if isinstance(request, PendingChat) else None
        attempt = 0
        while True:
            attempt += 1
            ticket = ChannelTicket(self._channel_id, next(self._numbers))
            if isinstance(request, PendingChat):
                stream = self._stream.chat.remote(
                    request.body, request.request_id, **{ROUTING_KEY_KWARG: key}, channel=ticket
                )
            else:
                stream = self._stream.generate.remote(request, channel=ticket)
            try:
                first = await anext(stream)
                if isinstance(first, StreamStart):
                    if first.on_channel:
                        return self._relay_channel(first.replica_id, ticket.number, stream, request_id, n)
                    self._open_channel(first.replica_id)  # for the requests after this one
                    first = await anext(stream)
            except StopAsyncIteration:
                raise EngineError(
                    f"The replica of {self.model_id} ended the request without output."
                ) from None
            except (BackPressureError, DeploymentUnavailableError) as e:
                raise _unavailable(self.model_id, e) from e
            except RayActorError as e:
                if attempt == MAX_ATTEMPTS:
                    raise _unavailable(self.model_id, e) from e
                logger.warning("replica of %s died before answering %s; retrying", self.model_id, request_id)
                await asyncio.sleep(RETRY_BACKOFF_S)
                continue
            except BaseException:
                stream.cancel()  # cancelled while waiting (the client left): stop the replica's work too
                raise
            if isinstance(first, RemoteAPIError):
                raise first.to_exception()
            return _relay(first, stream, request_id, n)

    def prompt_text(self, request: EngineRequest) -> str:
        return self._tokenizer.decode(list(request.prompt_token_ids), skip_special_tokens=False)

    # --- delta channels ---------------------------------------------------------------------------------

    def _open_channel(self, replica_id: str) -> None:
        if replica_id not in self._channels:
            channel = self._channels[replica_id] = _Channel(replica_id)
            # In a context of its own, not the request's that opened it: Ray Serve cancels the calls a
            # request made (read from its context) when the request is cancelled, and the channel serves
            # every request on the replica, not only the one whose client may leave.
            channel.task = asyncio.create_task(self._read_channel(channel), context=contextvars.Context())

    async def _read_channel(self, channel: _Channel) -> None:
        stream = self._stream.deltas.remote(self._channel_id, **{REPLICA_PIN_KWARG: channel.replica_id})
        try:
            # The replica answers [] at once; a replica that left meanwhile never will (the router holds a
            # call pinned to it): give up, its requests stream on their own streams.
            async with asyncio.timeout(CHANNEL_OPEN_TIMEOUT_S):  # not wait_for: it can drop a cancellation
                opened_on = await anext(stream)
            if opened_on != channel.replica_id:
                # The deployment's router ignored the pin (a request_router_config of the user's own): this
                # is that replica's channel now, or a second one to it (closed; the first one serves).
                if self._channels.get(channel.replica_id) is channel:
                    del self._channels[channel.replica_id]
                if opened_on in self._channels:
                    return
                channel.replica_id = opened_on
                self._channels[opened_on] = channel
            async for items in stream:
                for number, delta in items:
                    queue = self._queues.get(number)
                    if queue is not None:
                        queue.put_nowait(delta)
                        continue
                    if len(self._early) >= MAX_EARLY:
                        del self._early[next(iter(self._early))]
                    self._early.setdefault(number, []).append(delta)
        except Exception as e:
            # The replica died (or the call failed): its requests' relays end with an error.
            logger.warning(
                "the delta channel of %s to replica %s failed: %s", self.model_id, channel.replica_id, e
            )
            for number in channel.numbers:
                queue = self._queues.get(number)
                if queue is not None:
                    queue.put_nowait(e)
        finally:
            if self._channels.get(channel.replica_id) is channel:
                del self._channels[channel.replica_id]
            stream.cancel()

    async def _relay_channel(
        self, replica_id: str, number: int, stream: DeploymentResponseGenerator, request_id: str, n: int
    ) -> AsyncGenerator[CompletionDelta, None]:
        """The deltas of a request whose replica sends them on this ingress's channel; its own stream is
        watched for its end (or the replica's death) and cancelled to abort it."""
        queue: asyncio.Queue[CompletionDelta | BaseException] = asyncio.Queue()
        for delta in self._early.pop(number, []):
            queue.put_nowait(delta)
        self._queues[number] = queue
        channel = self._channels.get(replica_id)
        if channel is not None:
            channel.numbers.add(number)
        watcher = asyncio.create_task(_watch(stream, queue))
        finished: set[int] = set()
        ended = False
        try:
            while len(finished) < n:
                try:
                    # asyncio.timeout, not wait_for: on Python 3.11 wait_for can drop a cancellation.
                    async with asyncio.timeout(CHANNEL_GRACE_S if ended else None):
                        item = await queue.get()
                except TimeoutError:
                    item = EngineError(f"the replica ended {request_id} without its last output")
                if item is _STREAM_END:
                    ended = True
                    continue
                if isinstance(item, BaseException):
                    logger.warning("the replica serving %s failed mid-stream: %s", request_id, item)
                    for delta in _replica_lost(request_id, n, finished):
                        yield delta
                    return
                assert isinstance(item, CompletionDelta)
                if item.finished:
                    finished.add(item.index)
                yield item
        finally:
            del self._queues[number]
            if channel is not None:
                channel.numbers.discard(number)
            if len(finished) < n:
                stream.cancel()  # the client went away: abort the engine request
            watcher.cancel()


class _Channel:
    """This ingress's delta channel to one replica (LLMServer.deltas): the reader task and the numbers of
    the requests whose deltas come on it. A request uses it when it was open at the replica when the
    request started (StreamStart.on_channel); the replica closes it when idle, and a request that finds it
    closed streams on its own and has the ingress open it again."""

    def __init__(self, replica_id: str) -> None:
        self.replica_id = replica_id
        self.numbers: set[int] = set()
        self.task: asyncio.Task[None] | None = None


# Put in a request's queue when its own stream ended (its last deltas may still be on the channel).
_STREAM_END: Any = object()


async def _watch(stream: DeploymentResponseGenerator, queue: asyncio.Queue[Any]) -> None:
    try:
        async for _ in stream:
            pass
    except asyncio.CancelledError:
        raise
    except Exception as e:  # the replica died, or the request failed there
        queue.put_nowait(e)
        return
    queue.put_nowait(_STREAM_END)


def _unavailable(model_id: str, error: Exception) -> ServiceUnavailableError:
    if isinstance(error, BackPressureError):
        return ServiceUnavailableError(
            f"Too many requests are waiting for {model_id} (its deployment's max_queued_requests); retry later.",
            code="queue_full",
        )
    # Ray's description of the failure (actor ids, pids, node addresses) goes to the log, not to clients.
    logger.warning("no replica of %s can take a request: %s", model_id, error)
    return ServiceUnavailableError(
        f"No replica of {model_id} can take the request now; retry later.", code="engine_dead"
    )


async def _relay(
    first: CompletionDelta,
    stream: DeploymentResponseGenerator,
    request_id: str,
    n: int,
) -> AsyncGenerator[CompletionDelta, None]:
    finished: set[int] = set()
    try:
        delta = first
        while True:
            if delta.finished:
                finished.add(delta.index)
            yield delta
            try:
                delta = await anext(stream)
            except StopAsyncIteration:
                return
            except RayActorError as e:
                # The replica died mid-stream: end every open choice the way an engine failure does. Ray's
                # description of the dead actor (ids, pids, node addresses) goes to the log, not to the client.
                logger.warning("the replica serving %s died mid-stream: %s", request_id, e)
                for delta in _replica_lost(request_id, n, finished):
                    yield delta
                return
    finally:
        if len(finished) < n:
            stream.cancel()  # the client went away (or the stream broke): abort the engine request


class OpenAiIngress:
    """The ingress replica: `__serve_build_asgi_app__` builds the FastAPI app once the models answer."""

    def __init__(self, llm_deployments: Mapping[str, DeploymentHandle]) -> None:
        self._handles = dict(llm_deployments)
        self._servers: list[RemoteModelServer] = []
        self._refresher: asyncio.Task[None] | None = None

    async def __serve_build_asgi_app__(self) -> FastAPI:
        # Waits until every model has a running replica: the ingress reports ready only when it can serve.
        infos = await asyncio.gather(*(h.model_info.remote() for h in self._handles.values()))
        self._servers = [RemoteModelServer(h, i) for h, i in zip(self._handles.values(), infos, strict=True)]
        await asyncio.gather(*(s.refresh() for s in self._servers))
        self._refresher = asyncio.create_task(self._refresh_forever())
        api_keys = [k.strip() for k in (envs.VLMSERVE_API_KEY or "").split(",") if k.strip()]
        # The routes only use the ModelServer methods RemoteModelServer provides (see the module docstring).
        servers: list[Any] = self._servers
        return build_app(servers, api_keys=api_keys, shutdown_servers=False)

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(STATS_REFRESH_S)
            for server in self._servers:
                try:
                    await server.refresh()
                except Exception:
                    logger.warning("could not read the replica stats of %s", server.model_id, exc_info=True)

    async def __del__(self) -> None:
        refresher = getattr(self, "_refresher", None)
        if refresher is not None:
            refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await refresher


def ingress_class() -> type:
    """OpenAiIngress as a Ray Serve ASGI ingress (its app is built at replica start, not at import)."""
    return serve.ingress()(OpenAiIngress)


def _replica_lost(request_id: str, n: int, finished: set[int]) -> list[CompletionDelta]:
    """An error delta for each of the request's `n` choices not finished yet (added to `finished`): the
    replica serving it stopped mid-stream, as an engine failure ends them."""
    message = f"The replica serving {request_id} stopped mid-stream; retry the request."
    open_choices = [i for i in range(n) if i not in finished]
    finished.update(open_choices)
    return [CompletionDelta(request_id, i, "", [], None, "error", error=message) for i in open_choices]
