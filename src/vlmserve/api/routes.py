"""The routes beyond chat and text completions: vLLM's /tokenize and /detokenize, and OpenAI's Responses API
(POST /v1/responses). `build_app` includes `router`; the routes find the model through the app's own resolver
(`app.state.resolve`), so they route by model id exactly as /v1/chat/completions does, for `vlmserve serve` and
the Ray app alike.

Does not know: how a prompt is built (serving.py), the Responses API's shapes (responses.py).
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from vlmserve.api.protocol import DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse
from vlmserve.api.responses import create_response
from vlmserve.api.responses_protocol import ResponsesRequest
from vlmserve.api.serving import ModelServer
from vlmserve.api.streaming import until_disconnect

router = APIRouter()


def _server(request: Request, model: str | None) -> ModelServer:
    server: ModelServer = request.app.state.resolve(model)
    return server


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request) -> TokenizeResponse:
    return await _server(request, body.model).tokenize(body)


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
    return DetokenizeResponse(prompt=_server(request, body.model).detokenize(body.tokens))


@router.post("/v1/responses")
async def responses(body: ResponsesRequest, request: Request) -> Response:
    server = _server(request, body.model)
    work = create_response(server, body, request.app.state.metrics, request.headers.get("x-request-id"))
    return await until_disconnect(request, work)
