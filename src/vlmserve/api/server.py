"""The OpenAI-compatible app: `build_app(servers)` wires routes, errors, auth, the body cap and metrics.

Routes: POST /v1/chat/completions, POST /v1/completions, GET /v1/models(/{id}), GET /health, /version,
/metrics. The app routes each request to the `ModelServer` named by its `model` field (404 for an unknown
id; the first server when the field is left out), so the same factory serves one model for `vlmserve
serve` and can serve several for a deployment. It never constructs engines: callers hand it ready
ModelServers, which the app shuts down when its lifespan ends (uvicorn: after SIGTERM has drained the
in-flight requests, within timeout_graceful_shutdown).

Does not know: command-line flags (cli/), how engines are built (ModelServer.from_engine_args).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import uvicorn
from fastapi import FastAPI, Request
from starlette.responses import JSONResponse, Response

from vlmserve import __version__
from vlmserve.api.chat import create_chat_completion
from vlmserve.api.completions import create_completion
from vlmserve.api.errors import NotFoundError, error_response, install_error_handlers
from vlmserve.api.loop_monitor import EventLoopMonitor
from vlmserve.api.metrics import CONTENT_TYPE, ServerMetrics
from vlmserve.api.middleware import (
    DEFAULT_BODY_READ_TIMEOUT_S,
    DEFAULT_MAX_REQUEST_BODY_BYTES,
    APIKeyMiddleware,
    BodySizeLimitMiddleware,
)
from vlmserve.api.playground import router as playground_routes
from vlmserve.api.protocol import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList
from vlmserve.api.routes import router as extra_routes
from vlmserve.api.serving import ModelServer
from vlmserve.api.streaming import until_disconnect

logger = logging.getLogger(__name__)

DEFAULT_GRACEFUL_SHUTDOWN_S = 30.0


def build_app(
    servers: ModelServer | Sequence[ModelServer],
    *,
    api_keys: Sequence[str] = (),
    max_request_body_bytes: int = DEFAULT_MAX_REQUEST_BODY_BYTES,
    body_read_timeout: float = DEFAULT_BODY_READ_TIMEOUT_S,
    shutdown_servers: bool = True,
    playground: bool = True,
) -> FastAPI:
    """An app serving `servers` (routed by model id). With `api_keys`, /v1 routes need one of them as a
    bearer token. A body larger than `max_request_body_bytes` gets 413, one whose next piece takes longer
    than `body_read_timeout` seconds 408. `shutdown_servers`: stop their engines when the app's lifespan
    ends. `playground`: serve the playground page at `/`."""
    server_list = [servers] if isinstance(servers, ModelServer) else list(servers)
    if not server_list:
        raise ValueError("build_app needs at least one ModelServer")
    by_id: dict[str, ModelServer] = {}
    for server in server_list:
        if server.model_id in by_id:
            raise ValueError(
                f"two ModelServers share the model id {server.model_id!r}; model ids must be unique"
            )
        by_id[server.model_id] = server
    metrics = ServerMetrics()
    for server in server_list:
        metrics.add_model(server.model_id, server.stats)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loop_monitor = EventLoopMonitor(metrics.event_loop_lag)
        loop_monitor.start()
        app.state.loop_monitor = loop_monitor
        yield
        await loop_monitor.stop()
        if shutdown_servers:
            for server in server_list:
                logger.info("shutting down the engine of %s", server.model_id)
                await server.aclose()

    app = FastAPI(title="vlmserve", version=__version__, lifespan=lifespan)
    app.state.servers = by_id
    app.state.metrics = metrics
    install_error_handlers(app)
    # The last added middleware runs first: auth rejects a request before its body is read.
    app.add_middleware(
        BodySizeLimitMiddleware, max_bytes=max_request_body_bytes, read_timeout=body_read_timeout
    )
    app.add_middleware(APIKeyMiddleware, api_keys=list(api_keys))

    def resolve(model: str | None) -> ModelServer:
        if model is None:
            return server_list[0]
        server = by_id.get(model)
        if server is None:
            raise NotFoundError(
                f"The model `{model}` does not exist. Available models: {', '.join(sorted(by_id))}.",
                param="model",
                code="model_not_found",
            )
        return server

    app.state.resolve = resolve
    app.include_router(extra_routes)
    if playground:
        app.include_router(playground_routes)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        server = resolve(body.model)
        work = create_chat_completion(server, body, metrics, request.headers.get("x-request-id"))
        return await until_disconnect(request, work)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        server = resolve(body.model)
        work = create_completion(server, body, metrics, request.headers.get("x-request-id"))
        return await until_disconnect(request, work)

    @app.get("/v1/models")
    async def list_models() -> ModelList:
        return ModelList(data=[s.model_card() for s in server_list])

    @app.get("/v1/models/{model_id:path}")
    async def retrieve_model(model_id: str) -> ModelCard:
        return resolve(model_id).model_card()

    @app.get("/health")
    async def health() -> Response:
        states = {s.model_id: s.health() for s in server_list}
        dead = [m for m, h in states.items() if h.status == "dead"]
        if dead:
            return error_response(
                503, f"The engine of {', '.join(dead)} is not running.", "server_error", None, "engine_dead"
            )
        stalled = {m: h for m, h in states.items() if h.status == "stalled"}
        if stalled:
            message = "; ".join(f"The engine of {m} is stalled: {h.reason}" for m, h in stalled.items())
            return error_response(503, message, "server_error", None, "engine_stalled")
        return Response(status_code=200)

    @app.get("/version")
    async def version() -> JSONResponse:
        return JSONResponse({"version": __version__})

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    return app


def run_server(
    app: FastAPI,
    host: str,
    port: int,
    *,
    log_level: str = "info",
    timeout_graceful_shutdown: float = DEFAULT_GRACEFUL_SHUTDOWN_S,
) -> None:
    """Serve `app` with uvicorn until SIGINT / SIGTERM: then stop accepting, let in-flight requests and
    streams finish (at most `timeout_graceful_shutdown` seconds), and shut the engines down (lifespan)."""
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        lifespan="on",
        timeout_graceful_shutdown=int(timeout_graceful_shutdown),
    )
    uvicorn.Server(config).run()
