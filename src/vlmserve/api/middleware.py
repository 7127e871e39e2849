"""Two pure ASGI middlewares that run before any route: API-key auth and the request-body guard (size
cap and read timeout).

Pure ASGI (not Starlette's BaseHTTPMiddleware) so that they never buffer a body or a streamed response,
and so that the size cap can count bytes as they arrive instead of trusting Content-Length.

Does not know: routes, models, the engine. Both answer in OpenAI's error shape (errors.error_json).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
from collections.abc import Iterable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from vlmserve.api.errors import error_json

logger = logging.getLogger(__name__)

DEFAULT_MAX_REQUEST_BODY_BYTES = 64 * 2**20  # a few base64 images of max_image_bytes, plus the text
# Longest wait for the next piece of a request body (nginx's client_body_timeout has the same meaning).
DEFAULT_BODY_READ_TIMEOUT_S = 30.0


async def _send_error(
    send: Send, status: int, body: str, headers: Iterable[tuple[bytes, bytes]] = ()
) -> None:
    raw = body.encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(raw)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": raw, "more_body": False})


class APIKeyMiddleware:
    """With keys configured, every /v1 request needs `Authorization: Bearer <one of the keys>`.

    Paths outside /v1 (/health, /version, /metrics) stay open, as in vLLM, so that probes and scrapers need
    no secret. With no keys configured any bearer token (or none) is accepted, which is what clients that
    insist on a key expect (`api_key="FAKE_KEY"`).
    """

    def __init__(self, app: ASGIApp, api_keys: Iterable[str]) -> None:
        self.app = app
        # Kept as SHA-256 digests: comparing fixed-size digests does not reveal a key's length either.
        self._keys = [_digest(k.encode()) for k in api_keys if k]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self._keys or not scope["path"].startswith("/v1"):
            await self.app(scope, receive, send)
            return
        if scope["method"] == "OPTIONS":  # CORS preflights carry no credentials
            await self.app(scope, receive, send)
            return
        token = _bearer_token(scope)
        if token is None:
            message = (
                "Missing API key: send it as 'Authorization: Bearer <key>' (the openai client's api_key)."
            )
        elif self._matches(token):
            await self.app(scope, receive, send)
            return
        else:
            # Never echo or log the key that was sent.
            message = "Incorrect API key provided."
        await _send_error(
            send,
            401,
            error_json(message, "authentication_error", None, "invalid_api_key"),
            [(b"www-authenticate", b"Bearer")],
        )

    def _matches(self, token: bytes) -> bool:
        # Compare against every key without stopping at the first match, so the time taken does not reveal
        # which key (or how much of one) matched.
        digest = _digest(token)
        matched = False
        for key in self._keys:
            matched |= hmac.compare_digest(digest, key)
        return matched


def _digest(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()


def _bearer_token(scope: Scope) -> bytes | None:
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, token = value.partition(b" ")
            if scheme.lower() == b"bearer" and token.strip():
                return token.strip()
            return None
    return None


class _BodyTooLarge(Exception):
    pass


class _BodyTimeout(Exception):
    pass


class BodySizeLimitMiddleware:
    """Guards reading the request body: 413 when it exceeds `max_bytes` (at once from Content-Length, else
    while counting a streamed body, without reading the rest), and 408 when the client lets `read_timeout`
    seconds pass without sending the next piece of it, so that a client trickling (or never sending) its body
    cannot hold a connection and a handler forever. Once the body is complete, reads (a streaming response's
    wait for a disconnect) pass through untouched."""

    def __init__(
        self,
        app: ASGIApp,
        max_bytes: int = DEFAULT_MAX_REQUEST_BODY_BYTES,
        read_timeout: float = DEFAULT_BODY_READ_TIMEOUT_S,
    ) -> None:
        if max_bytes < 1:
            raise ValueError(f"max_request_body_bytes must be >= 1, got {max_bytes}")
        if not read_timeout > 0:
            raise ValueError(f"body_read_timeout must be > 0 seconds, got {read_timeout}")
        self.app = app
        self.max_bytes = max_bytes
        self.read_timeout = read_timeout

    def _error(self) -> str:
        return error_json(
            f"The request body is larger than this server's limit of {self.max_bytes} bytes "
            "(--max-request-body-bytes); send smaller or fewer images, or link them by URL instead of "
            "inlining them as base64.",
            "invalid_request_error",
            None,
            "request_too_large",
        )

    def _timeout_error(self) -> str:
        return error_json(
            f"The request body did not arrive: nothing came for {self.read_timeout:g} s while reading it. "
            "Send the whole body without pausing.",
            "invalid_request_error",
            None,
            "request_timeout",
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await _send_error(send, 413, self._error(), [(b"connection", b"close")])
            return

        received = 0
        body_done = False
        failure: tuple[int, str] | None = None  # the answer that replaces the app's once a read failed
        response_started = False

        async def guarded_receive() -> Message:
            nonlocal received, body_done, failure
            if body_done:
                return await receive()
            try:
                async with asyncio.timeout(self.read_timeout):  # no Task per chunk, unlike wait_for
                    message = await receive()
            except TimeoutError:
                failure = (408, self._timeout_error())
                raise _BodyTimeout from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                body_done = not message.get("more_body", False)
                if received > self.max_bytes:
                    failure = (413, self._error())
                    raise _BodyTooLarge
            else:
                body_done = True  # http.disconnect: nothing more will come
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal response_started
            if failure is not None:
                # Whatever the app answers after its body read failed (FastAPI turns it into a 400) is
                # replaced by our answer below.
                return
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        try:
            await self.app(scope, guarded_receive, guarded_send)
        except Exception:
            if failure is None:
                raise
        if failure is not None and not response_started:
            if failure[0] == 408:
                logger.info("request body read timed out after %g s; answered 408", self.read_timeout)
            await _send_error(send, failure[0], failure[1], [(b"connection", b"close")])


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
