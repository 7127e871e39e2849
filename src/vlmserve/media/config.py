"""Limits and network policy for loading request images.

Owns: `MediaConfig`, a frozen dataclass built once at startup (from CLI flags / LLMConfig by the layer that
parses them) and the checks that its values make sense. Does not know: where the values come from.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from vlmserve import __version__

DEFAULT_MAX_IMAGE_BYTES = 20 * 1024 * 1024

# 64 M pixels: an 8000x8000 image or a 50 MP camera photo (8192x6144) fits; 108 MP phone photos do not and get
# an error telling the user to downscale. Decoded that is 192 MB as RGB, 256 MB as RGBA, and about twice
# that at the peak of a mode conversion, so a handful of concurrent worst-case images stay well inside a
# server's memory. Qwen2.5-VL's processor resizes every image to at most 12.8 M pixels anyway (max_pixels
# 12845056), so larger sources only cost memory. It is also below Pillow's own decompression-bomb warning
# threshold (PIL.Image.MAX_IMAGE_PIXELS, 89.5 M), so Pillow never warns about an image we accept.
DEFAULT_MAX_IMAGE_PIXELS = 64_000_000


@dataclass(frozen=True)
class MediaConfig:
    """How request images may be loaded: which sources are allowed and how big they may be."""

    # Local files (plain absolute paths or file:// URLs) are read only from inside this directory, after
    # resolving symlinks and `..`. None refuses every local file.
    allowed_local_media_path: Path | None = None
    # Hostnames whose URLs may be fetched even when they resolve to private, loopback or otherwise
    # non-public addresses: exact names ("images.internal", "127.0.0.1") or "*.suffix" for any subdomain of
    # suffix ("*.corp.example" matches "a.corp.example", not "corp.example"). Public hosts need no entry.
    allowed_media_domains: tuple[str, ...] = ()
    # Fetch from any address, private networks included (turns the SSRF guard off).
    allow_private_network: bool = False
    # Limit for connecting and for each read of an http(s) fetch.
    fetch_timeout_s: float = 10.0
    # Limit for a whole http(s) fetch (resolution, redirects and body): without it a server that trickles a
    # byte every few seconds would hold the request for hours without tripping the per-read timeout.
    fetch_total_timeout_s: float = 30.0
    # Encoded size limit, the same for http bodies, data: URL payloads (after base64 decoding) and files.
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    # Decoded size limit (width * height), checked from the image header before any pixel is decoded.
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    max_redirects: int = 3
    user_agent: str = field(default=f"vlmserve/{__version__}")

    def __post_init__(self) -> None:
        for name in ("fetch_timeout_s", "fetch_total_timeout_s"):
            value = getattr(self, name)
            if not value > 0:
                raise ValueError(f"MediaConfig.{name}={value!r} must be a positive number of seconds.")
        if self.max_image_bytes <= 0:
            raise ValueError(
                f"MediaConfig.max_image_bytes={self.max_image_bytes!r} must be positive "
                f"(default {DEFAULT_MAX_IMAGE_BYTES} = 20 MiB)."
            )
        pillow_limit = Image.MAX_IMAGE_PIXELS
        if self.max_image_pixels <= 0 or (pillow_limit is not None and self.max_image_pixels > pillow_limit):
            raise ValueError(
                f"MediaConfig.max_image_pixels={self.max_image_pixels!r} must be between 1 and Pillow's "
                f"decompression-bomb limit PIL.Image.MAX_IMAGE_PIXELS={pillow_limit}; Pillow itself refuses "
                f"larger images (default {DEFAULT_MAX_IMAGE_PIXELS})."
            )
        if self.max_redirects < 0:
            raise ValueError(f"MediaConfig.max_redirects={self.max_redirects!r} must be 0 or more.")
        if not isinstance(self.allowed_media_domains, tuple):
            raise ValueError(
                f"MediaConfig.allowed_media_domains must be a tuple of hostnames, "
                f"got {type(self.allowed_media_domains).__name__}."
            )
        for domain in self.allowed_media_domains:
            if not _is_host_pattern(domain):
                raise ValueError(
                    f"MediaConfig.allowed_media_domains entry {domain!r} is not a hostname; write an exact "
                    f"host ('images.internal', '10.0.0.5') or '*.suffix' ('*.corp.example'), without scheme, "
                    f"port or path."
                )
        if self.allowed_local_media_path is not None and not self.allowed_local_media_path.is_absolute():
            raise ValueError(
                f"MediaConfig.allowed_local_media_path={str(self.allowed_local_media_path)!r} must be an "
                f"absolute directory path."
            )


def _is_host_pattern(domain: str) -> bool:
    """An exact hostname / IP literal, or "*.suffix"; no scheme, port, path or inner wildcard."""
    pattern = domain.removeprefix("*.")
    if not pattern or "*" in pattern or "/" in pattern:
        return False
    try:
        ipaddress.ip_address(pattern.strip("[]"))
    except ValueError:
        return ":" not in pattern  # a colon outside an IPv6 literal is a port
    return not domain.startswith("*.")
