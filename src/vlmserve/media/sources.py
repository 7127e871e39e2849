"""Image bytes from data: URLs and from local files, with size limits and path containment.

Owns: parsing `data:[<mediatype>][;base64],<payload>` (size checked before base64 decoding), and reading a
local file given as an absolute path or file:// URL only from inside the operator's allowed directory.
Both are plain blocking functions; the loader runs them in a worker thread.

Does not know: http(s) (fetch.py), image formats (decode.py), which image of a request this is.
"""

from __future__ import annotations

import base64
import binascii
import os
import stat
import urllib.parse
from pathlib import Path

from vlmserve.media.errors import MediaError

_LOCAL_DISABLED = (
    "local image files are disabled on this server; an operator can allow files under a directory with "
    "--allowed-local-media-path DIR (MediaConfig.allowed_local_media_path)"
)
# Types a client plausibly labels image bytes with; the decoder sniffs the real format anyway.
_ACCEPTED_DATA_TYPES = ("", "application/octet-stream")


def _too_large(what: str, size: int, max_bytes: int, approx: bool = False) -> MediaError:
    about = "about " if approx else ""
    return MediaError(
        f"{what} is {about}{size} bytes, over the limit of {max_bytes} bytes (max_image_bytes); "
        f"send a smaller or more compressed image",
        status_code=413,
    )


def decode_data_url(url: str, max_bytes: int) -> bytes:
    """The bytes of a base64 data: URL; MediaError for other encodings, bad base64 or too many bytes."""
    header, comma, payload = url[len("data:") :].partition(",")
    if not comma:
        raise MediaError(
            "data: URL has no ',' between its header and payload; expected data:image/png;base64,..."
        )
    params = [part.strip() for part in header.split(";")]
    if [param.lower() for param in params] == ["base64"]:
        params = ["", "base64"]  # "data:base64,..." is a common slip for "data:;base64,..."
    media_type = params[0].lower()
    if len(params) < 2 or params[-1].lower() != "base64":
        raise MediaError(
            "data: URL is not base64-encoded; only data:<image type>;base64,<payload> is supported"
        )
    if not (media_type.startswith("image/") or media_type in _ACCEPTED_DATA_TYPES):
        raise MediaError(f"data: URL has media type {media_type!r}, expected an image/* type")

    # Every 4 base64 characters decode to at most 3 bytes: refuse before allocating the decoded copy.
    estimate = len(payload) // 4 * 3
    if estimate > max_bytes:
        raise _too_large("the data: URL payload", estimate, max_bytes, approx=True)

    if "%" in payload:  # some clients percent-encode '+', '/' and '=' inside the URL
        payload = urllib.parse.unquote(payload)
    compact = "".join(payload.split())  # line-wrapped base64 (e.g. from `base64` on the command line)
    if "-" in compact or "_" in compact:
        compact = compact.translate(str.maketrans("-_", "+/"))  # URL-safe alphabet
    compact += "=" * (-len(compact) % 4)  # tolerate stripped padding
    try:
        data = base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise MediaError(f"data: URL payload is not valid base64 ({exc})") from None
    if len(data) > max_bytes:
        raise _too_large("the data: URL payload", len(data), max_bytes)
    return data


def _local_path(url: str) -> str:
    """The filesystem path of an absolute path or a file:// URL (file:///p or file://localhost/p)."""
    if url.startswith("/"):
        return url
    parts = urllib.parse.urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise MediaError(
            f"file:// URL names host {parts.netloc!r}; only local files (file:///absolute/path) are supported"
        )
    path = urllib.parse.unquote(parts.path)
    if not path.startswith("/"):
        raise MediaError("file:// URL must hold an absolute path, e.g. file:///data/images/cat.png")
    return path


def read_local_file(url: str, allowed_root: Path | None, max_bytes: int) -> bytes:
    """Read an absolute path or file:// URL if, after resolving symlinks and `..`, it lies inside
    `allowed_root` (itself already resolved); None refuses every local file."""
    if allowed_root is None:
        raise MediaError(_LOCAL_DISABLED)
    path = _local_path(url)
    if "\x00" in path:
        raise MediaError("local path contains a NUL character")
    # Resolve without requiring existence, and check containment first: a path outside the root is
    # refused the same way whether it exists or not, so the answer cannot be used to probe the filesystem.
    real = Path(os.path.realpath(path))
    if not real.is_relative_to(allowed_root):
        raise MediaError(
            f"local path {path!r} is outside the directory allowed for images (--allowed-local-media-path); "
            f"symlinks and '..' are resolved before this check"
        )
    # O_NOFOLLOW: a symlink swapped in after the check is refused, not followed; O_NONBLOCK: opening a FIFO
    # does not hang the worker thread (fstat below refuses it).
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
    try:
        fd = os.open(real, flags)
    except FileNotFoundError:
        raise MediaError(f"local file {path!r} does not exist") from None
    except OSError as exc:
        raise MediaError(f"local file {path!r} cannot be opened ({exc.strerror})") from None
    try:
        info = os.fstat(fd)  # of what was opened, not of the path: no race with a rename
        if not stat.S_ISREG(info.st_mode):
            raise MediaError(f"local path {path!r} is not a regular file")
        if info.st_size > max_bytes:
            raise _too_large(f"local file {path!r}", info.st_size, max_bytes)
    except BaseException:
        os.close(fd)
        raise
    with os.fdopen(fd, "rb") as file:
        data = file.read(max_bytes + 1)  # +1: a file that grew since fstat is still caught
    if len(data) > max_bytes:
        raise _too_large(f"local file {path!r}", len(data), max_bytes, approx=True)
    return data
