"""Request images: fetch (http(s), data:, local files) safely, decode to RGB, enforce limits. No torch.

The HTTP layer builds one `MediaLoader(MediaConfig(...))` at startup, awaits `load_images(urls)` per request
(a `MediaError` carries the message, the failing image's index and the HTTP status to answer with) and
`aclose()` at shutdown.
"""

from vlmserve.media.config import MediaConfig
from vlmserve.media.decode import ALLOWED_FORMATS, decode_image, to_rgb
from vlmserve.media.errors import MediaError
from vlmserve.media.loader import MediaLoader
from vlmserve.media.transport import PinnedAsyncClient

__all__ = [
    "ALLOWED_FORMATS",
    "MediaConfig",
    "MediaError",
    "MediaLoader",
    "PinnedAsyncClient",
    "decode_image",
    "to_rgb",
]
