"""The one error type of the media layer, with a message a user can act on.

Owns: `MediaError` (reason, HTTP status, which image failed) and how an image URL is shown in messages
(shortened, never a whole data: payload). Does not know: how the HTTP layer turns it into a response body.
"""

from __future__ import annotations

# Long enough to recognise the URL, short enough that a log line or an error body stays readable.
_URL_SHOWN_CHARS = 100


def describe_url(url: str) -> str:
    """Show `url` in a message: data: URLs by their header and length, anything else cut to ~100 chars."""
    if url[:5].lower() == "data:":
        comma = url.find(",")
        header = url[: min(comma if comma != -1 else len(url), 60)]
        return f"{header},... ({len(url)} chars)"
    if len(url) <= _URL_SHOWN_CHARS:
        return url
    return url[:_URL_SHOWN_CHARS] + "..."


class MediaError(Exception):
    """An image of a request could not be used.

    `reason` says why and how to fix it; `status_code` is the HTTP status the server should answer with
    (400 for bad input, 413 when a size limit was exceeded); `index` is the position of the failing image
    among the request's images (0-based) and `url` its source, both filled in by `MediaLoader`.
    """

    def __init__(
        self,
        reason: str,
        *,
        status_code: int = 400,
        index: int | None = None,
        url: str | None = None,
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status_code = status_code
        self.index = index
        self.url = url

    @property
    def message(self) -> str:
        """The user-facing message: which image (index and shortened URL) and why it failed."""
        if self.index is None:
            return self.reason
        source = f" ({describe_url(self.url)})" if self.url else ""
        return f"image {self.index}{source}: {self.reason}"

    def __str__(self) -> str:
        return self.message
