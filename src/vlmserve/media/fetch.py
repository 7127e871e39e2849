"""http(s) image fetching: redirects followed by hand and re-vetted, bodies streamed under a byte cap.

Owns: URL checks (scheme, host), one vetted and pinned request per hop (ssrf.vet_host + transport.pinned_to),
the redirect limit, status and Content-Encoding checks, the byte cap (Content-Length first, then counted
while streaming, aborting as soon as it is exceeded), and turning network errors into MediaError.

Does not know: the address policy itself (ssrf.py), how bytes become pixels (decode.py).
"""

from __future__ import annotations

import asyncio

import httpx

from vlmserve.media import ssrf
from vlmserve.media.config import MediaConfig
from vlmserve.media.errors import MediaError, describe_url
from vlmserve.media.transport import PinnedAsyncClient, pinned_to

_HTTP_SCHEMES = ("http", "https")
_REQUEST_HEADERS = {
    "Accept": "image/*, */*;q=0.5",
    # Images are compressed already; asking for identity means a well-behaved server sends the bytes as
    # stored, and anything else is refused below rather than inflated (a gzip/brotli bomb).
    "Accept-Encoding": "identity",
}


def parse_http_url(url: str) -> httpx.URL:
    """An http(s) URL with a host, or MediaError."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, ValueError) as exc:
        raise MediaError(f"the image URL is not valid ({exc})") from None
    if parsed.scheme not in _HTTP_SCHEMES:
        raise MediaError(f"URL scheme {parsed.scheme!r} is not supported for images; use http(s)://")
    if not parsed.raw_host:
        raise MediaError("the image URL has no host")
    return parsed


async def fetch_http(url: str, client: PinnedAsyncClient, config: MediaConfig) -> bytes:
    """GET `url` and return its body, following up to config.max_redirects redirects."""
    try:
        async with asyncio.timeout(config.fetch_total_timeout_s):
            return await _fetch_with_redirects(parse_http_url(url), client, config)
    except TimeoutError:
        raise MediaError(
            f"fetching the image took longer than fetch_total_timeout_s={config.fetch_total_timeout_s} s"
        ) from None


async def _fetch_with_redirects(url: httpx.URL, client: PinnedAsyncClient, config: MediaConfig) -> bytes:
    for hop in range(config.max_redirects + 1):
        host = url.raw_host.decode("ascii")  # exactly what the connection pool will ask the backend for
        try:
            vetted = await ssrf.vet_host(host, url.port or (443 if url.scheme == "https" else 80), config)
        except MediaError as exc:
            if hop == 0:
                raise
            raise MediaError(f"the server redirected to {describe_url(str(url))}: {exc.reason}") from None
        with pinned_to(vetted.host, vetted.addresses):
            body_or_location = await _get(url, client, config)
        if isinstance(body_or_location, bytes):
            return body_or_location
        # Every hop is checked like the first: a public host may redirect to an internal one.
        try:
            url = parse_http_url(str(url.join(body_or_location)))
        except (MediaError, httpx.InvalidURL, ValueError) as exc:
            reason = exc.reason if isinstance(exc, MediaError) else f"not a valid URL ({exc})"
            raise MediaError(f"the server redirected to {describe_url(body_or_location)}: {reason}") from None
    raise MediaError(
        f"too many redirects (more than max_redirects={config.max_redirects}); link the image's final URL"
    )


async def _get(url: httpx.URL, client: PinnedAsyncClient, config: MediaConfig) -> bytes | str:
    """The body of a 2xx answer, or the Location of a redirect."""
    try:
        # The timeout is passed per request so that this config, not the (maybe shared) client, decides.
        timeout = httpx.Timeout(config.fetch_timeout_s)
        async with client.stream("GET", url, headers=_REQUEST_HEADERS, timeout=timeout) as response:
            if response.has_redirect_location:
                return response.headers["Location"]
            if not response.is_success:
                raise MediaError(
                    f"the image server answered HTTP {response.status_code} {response.reason_phrase}"
                )
            encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
            if encoding not in ("", "identity"):
                raise MediaError(
                    f"the image server sent the body with Content-Encoding {encoding!r} although none was "
                    f"requested; serve the image file as is"
                )
            return await _read_capped(response, config.max_image_bytes)
    except httpx.TimeoutException as exc:
        raise MediaError(
            f"the image server did not answer within fetch_timeout_s={config.fetch_timeout_s} s "
            f"({type(exc).__name__})"
        ) from None
    except httpx.HTTPError as exc:
        raise MediaError(f"fetching the image failed ({type(exc).__name__}: {exc})") from None


async def _read_capped(response: httpx.Response, max_bytes: int) -> bytes:
    declared = response.headers.get("Content-Length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise _too_large(int(declared), max_bytes)
    body = bytearray()
    # aiter_raw: the bytes as received (Content-Encoding was checked above), so the cap is on what we store.
    async for chunk in response.aiter_raw():
        body += chunk
        if len(body) > max_bytes:
            # Leaving the `stream` block closes the connection; the rest of the body is never read.
            raise _too_large(len(body), max_bytes, at_least=True)
    return bytes(body)


def _too_large(size: int, max_bytes: int, at_least: bool = False) -> MediaError:
    amount = f"more than {max_bytes}" if at_least else str(size)
    return MediaError(
        f"the image at the URL is {amount} bytes, over the limit of {max_bytes} bytes (max_image_bytes); "
        f"link a smaller or more compressed image",
        status_code=413,
    )
