"""Images of a trusted local caller (the offline `LLM`): a decoded PIL image, a path or file:// URL, or a
data: URL, read synchronously and decoded with the server's safe decoder (RGB, EXIF orientation, first frame).

No SSRF policy and no network: a library caller names its own files. The server never uses this module; it
fetches through `MediaLoader` (loader.py), asynchronously and under its media policy.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

from PIL import Image

from vlmserve.media.config import MediaConfig
from vlmserve.media.decode import decode_image, to_rgb


def load_local_image(source: Any, *, max_pixels: int | None = None) -> Image.Image:
    """`source` (a PIL image, a path / file:// URL, or a data: URL) as a fully loaded RGB image."""
    if isinstance(source, Image.Image):
        return to_rgb(source)
    if not isinstance(source, str):
        raise ValueError(f"unsupported image {source!r}: give a path, a file:// or data: URL, or a PIL image")
    limit = MediaConfig().max_image_pixels if max_pixels is None else max_pixels
    if source.startswith("data:"):
        data = base64.b64decode(source.split(",", 1)[1])
    else:
        data = Path(source.removeprefix("file://")).read_bytes()
    return decode_image(data, max_pixels=limit)
