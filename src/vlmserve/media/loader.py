"""The media layer's entry point: the images of one request, loaded concurrently and safely.

Owns: `MediaLoader`, which picks the source by URL form (http(s)://, data:, absolute path or file://),
keeps blocking work (base64, file reads, decoding) off the event loop, runs a request's images
concurrently, and labels any failure with the image's index and URL.

Does not know: the OpenAI request schema (the HTTP layer extracts the URLs), tokenization or preprocessing.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from types import TracebackType

from PIL import Image

from vlmserve.media.config import MediaConfig
from vlmserve.media.decode import decode_image
from vlmserve.media.errors import MediaError
from vlmserve.media.fetch import fetch_http
from vlmserve.media.sources import decode_data_url, read_local_file
from vlmserve.media.transport import PinnedAsyncClient


class MediaLoader:
    """Loads request images under one MediaConfig; one per server, shared by all requests."""

    def __init__(self, config: MediaConfig, http_client: PinnedAsyncClient | None = None) -> None:
        """`http_client` shares a connection pool between loaders; by default the loader makes and owns one.

        It must be a PinnedAsyncClient: a plain httpx.AsyncClient resolves host names itself (and honours
        proxy environment variables), so the address it connects to would not be the one that was vetted.
        """
        if http_client is not None and not isinstance(http_client, PinnedAsyncClient):
            raise TypeError(
                f"MediaLoader(http_client=...) must be a vlmserve.media.PinnedAsyncClient, got "
                f"{type(http_client).__name__}: a plain httpx client resolves host names again after the "
                f"SSRF check (DNS rebinding)."
            )
        self.config = config
        self._local_root = _resolve_root(config.allowed_local_media_path)
        self._owns_client = http_client is None
        self._client = http_client or PinnedAsyncClient(
            timeout_s=config.fetch_timeout_s, user_agent=config.user_agent
        )

    async def load_image(self, url: str, index: int) -> Image.Image:
        """The image at `url` as a new, fully loaded RGB image with EXIF orientation applied.

        Raises MediaError naming `index` (the image's 0-based position in its request) and the URL.
        """
        try:
            data = await self._read(url.strip())
            return await asyncio.to_thread(decode_image, data, max_pixels=self.config.max_image_pixels)
        except MediaError as exc:
            exc.index = index
            exc.url = url
            raise

    async def load_images(self, urls: list[str]) -> list[Image.Image]:
        """All images of a request, fetched and decoded concurrently, in the order of `urls`.

        The first failure cancels the others and is raised as a MediaError naming the failing image; when
        several failed before cancellation took effect, the one with the lowest index is raised.
        """
        if not urls:
            return []
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(self.load_image(url, index)) for index, url in enumerate(urls)]
        except BaseExceptionGroup as failures:
            raise _first_failure(failures) from None
        return [task.result() for task in tasks]

    async def aclose(self) -> None:
        """Close the HTTP connection pool if this loader created it."""
        if self._owns_client:
            await self._client.aclose()

    async def __aenter__(self) -> MediaLoader:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def _read(self, url: str) -> bytes:
        scheme = url.partition(":")[0].lower() if ":" in url else ""
        if scheme in ("http", "https"):
            return await fetch_http(url, self._client, self.config)
        if scheme == "data":
            # base64 of a 20 MiB image takes tens of milliseconds: long enough to stall other requests.
            return await asyncio.to_thread(decode_data_url, url, self.config.max_image_bytes)
        if scheme == "file" or url.startswith("/"):
            return await asyncio.to_thread(
                read_local_file, url, self._local_root, self.config.max_image_bytes
            )
        if not url:
            raise MediaError("the image URL is empty")
        shown = f"URL scheme {scheme!r}" if scheme else "a relative path or bare name"
        raise MediaError(
            f"{shown} is not supported for images; use http(s)://..., data:image/<type>;base64,... or, "
            f"if the server allows local files, an absolute path or file:///..."
        )


def _resolve_root(root: Path | None) -> Path | None:
    if root is None:
        return None
    resolved = Path(os.path.realpath(root))
    if not resolved.is_dir():
        raise ValueError(
            f"MediaConfig.allowed_local_media_path={str(root)!r} is not an existing directory "
            f"(--allowed-local-media-path); create it or fix the path."
        )
    return resolved


def _first_failure(failures: BaseExceptionGroup) -> BaseException:
    """A bug (non-MediaError) first, so it reaches the logs as one; else the lowest-index MediaError."""
    leaves: list[BaseException] = []
    pending: list[BaseException] = [failures]
    while pending:
        error = pending.pop()
        if isinstance(error, BaseExceptionGroup):
            pending.extend(error.exceptions)
        else:
            leaves.append(error)
    unexpected = [error for error in leaves if not isinstance(error, MediaError)]
    if unexpected:
        return unexpected[0]
    media_errors = [error for error in leaves if isinstance(error, MediaError)]
    return min(media_errors, key=lambda error: error.index if error.index is not None else -1)
