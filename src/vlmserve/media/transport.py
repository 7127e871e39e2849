"""An httpx client that connects only to addresses the SSRF guard has vetted.

Owns: `PinnedAsyncClient` and the pieces under it: an httpcore connection pool whose network backend looks
the requested host up in the pins of the current task (set by `pinned_to`) and connects to those addresses,
never resolving the name itself. A connect to a host that was not pinned fails closed. TLS still uses the
URL's hostname (SNI and certificate check), and connections are pooled per hostname like in any client.

Does not know: the policy that decided the addresses (ssrf.py), redirects or size limits (fetch.py).

NOTE: httpx 0.28 cannot take a network backend, so this module maps the few httpcore calls and errors itself
(the same mapping httpx's own transport does) instead of patching httpx internals: a private attribute
renamed in a future httpx would silently fall back to the client resolving DNS again.
"""

from __future__ import annotations

import contextlib
import contextvars
import typing
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from types import MappingProxyType

import httpcore
import httpx

# host -> addresses to connect to, for the current task. asyncio copies context into every task, so
# concurrent fetches (asyncio.gather / TaskGroup) never see each other's pins.
_PINS: contextvars.ContextVar[Mapping[str, tuple[str, ...]]] = contextvars.ContextVar(
    "vlmserve_media_pins", default=MappingProxyType({})
)

# httpcore error -> the httpx error a caller of an httpx client expects; subclasses before their bases.
_ERROR_MAP: tuple[tuple[type[Exception], type[httpx.TransportError]], ...] = (
    (httpcore.ConnectTimeout, httpx.ConnectTimeout),
    (httpcore.ReadTimeout, httpx.ReadTimeout),
    (httpcore.WriteTimeout, httpx.WriteTimeout),
    (httpcore.PoolTimeout, httpx.PoolTimeout),
    (httpcore.TimeoutException, httpx.TimeoutException),
    (httpcore.ConnectError, httpx.ConnectError),
    (httpcore.ReadError, httpx.ReadError),
    (httpcore.WriteError, httpx.WriteError),
    (httpcore.NetworkError, httpx.NetworkError),
    (httpcore.RemoteProtocolError, httpx.RemoteProtocolError),
    (httpcore.LocalProtocolError, httpx.LocalProtocolError),
    (httpcore.ProtocolError, httpx.ProtocolError),
    (httpcore.UnsupportedProtocol, httpx.UnsupportedProtocol),
)


class UnvettedHostError(httpcore.ConnectError):
    """A connection to a host that no vetting pinned; a bug in the caller, refused rather than resolved."""


@contextlib.contextmanager
def pinned_to(host: str, addresses: tuple[str, ...]) -> Iterator[None]:
    """Within this block (and this task), connections to `host` go to `addresses` only."""
    token = _PINS.set(MappingProxyType({**_PINS.get(), host: addresses}))
    try:
        yield
    finally:
        _PINS.reset(token)


class _PinnedNetworkBackend(httpcore.AsyncNetworkBackend):
    def __init__(self, inner: httpcore.AsyncNetworkBackend) -> None:
        self._inner = inner

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        addresses = _PINS.get().get(host)
        if not addresses:
            raise UnvettedHostError(f"refusing to connect to {host!r}: its address was not vetted")
        # Try the vetted addresses in resolver order (e.g. ::1 before 127.0.0.1); only a refused or
        # unreachable address moves on, a timeout does not (the total deadline would be spent twice).
        last_error: httpcore.ConnectError | None = None
        for address in addresses:
            try:
                return await self._inner.connect_tcp(
                    address, port, timeout=timeout, local_address=local_address, socket_options=socket_options
                )
            except httpcore.ConnectError as exc:
                last_error = exc
        assert last_error is not None
        raise last_error

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise UnvettedHostError("unix sockets are never used for image fetches")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


@contextlib.contextmanager
def _httpx_errors(request: httpx.Request) -> Iterator[None]:
    try:
        yield
    except Exception as exc:
        for core_type, httpx_type in _ERROR_MAP:
            if isinstance(exc, core_type):
                raise httpx_type(str(exc) or type(exc).__name__, request=request) from exc
        raise


class _ResponseStream(httpx.AsyncByteStream):
    def __init__(self, stream: typing.AsyncIterable[bytes], request: httpx.Request) -> None:
        self._stream = stream
        self._request = request

    async def __aiter__(self) -> AsyncIterator[bytes]:
        with _httpx_errors(self._request):
            async for part in self._stream:
                yield part

    async def aclose(self) -> None:
        aclose = getattr(self._stream, "aclose", None)
        if aclose is not None:
            with _httpx_errors(self._request):
                await aclose()


class _PinnedTransport(httpx.AsyncBaseTransport):
    def __init__(self, network_backend: httpcore.AsyncNetworkBackend, max_connections: int) -> None:
        self._pool = httpcore.AsyncConnectionPool(
            # trust_env=False: SSL_CERT_FILE & co. from the environment do not change what we trust.
            ssl_context=httpx.create_ssl_context(trust_env=False),
            max_connections=max_connections,
            max_keepalive_connections=max_connections,
            keepalive_expiry=5.0,
            network_backend=_PinnedNetworkBackend(network_backend),
        )

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        assert isinstance(request.stream, httpx.AsyncByteStream)
        core_request = httpcore.Request(
            method=request.method,
            url=httpcore.URL(
                scheme=request.url.raw_scheme,
                host=request.url.raw_host,
                port=request.url.port,
                target=request.url.raw_path,
            ),
            headers=request.headers.raw,
            content=request.stream,
            extensions=request.extensions,
        )
        with _httpx_errors(request):
            core_response = await self._pool.handle_async_request(core_request)
        assert isinstance(core_response.stream, typing.AsyncIterable)
        return httpx.Response(
            status_code=core_response.status,
            headers=core_response.headers,
            stream=_ResponseStream(core_response.stream, request),
            extensions=core_response.extensions,
        )

    async def aclose(self) -> None:
        await self._pool.aclose()


class PinnedAsyncClient(httpx.AsyncClient):
    """An httpx.AsyncClient whose every connection goes to an address pinned with `pinned_to`.

    It never resolves names, ignores proxy and certificate environment variables (a proxy would resolve
    the name again, out of our sight) and never follows redirects itself. Share one only between loaders
    with the same network policy: pooled connections are reused per hostname.
    """

    def __init__(
        self,
        *,
        timeout_s: float,
        user_agent: str,
        max_connections: int = 64,
        network_backend: httpcore.AsyncNetworkBackend | None = None,
    ) -> None:
        super().__init__(
            transport=_PinnedTransport(network_backend or httpcore.AnyIOBackend(), max_connections),
            timeout=httpx.Timeout(timeout_s),
            headers={"User-Agent": user_agent},
            follow_redirects=False,
            trust_env=False,
        )
