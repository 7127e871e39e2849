"""Safe image decoding: bytes from an untrusted client -> a fully loaded 8-bit RGB PIL image.

Owns: the format allow-list, the pixel limit (checked from the header before any pixel is decoded), the
first frame of animations, EXIF orientation, and conversion of every pixel mode to RGB:
  - transparency (RGBA, LA, PA, P or L/RGB with a transparent colour) is composited onto white, exactly as
    HF transformers' `convert_to_rgb` does for the Qwen2-VL image processors, so the reference sees the same
    pixels whether it is given our image or the original;
  - 16-bit integer images (I;16*, and I, which Pillow's PNG/PGM/TIFF decoders fill with 16-bit samples) are
    scaled to 8 bits (v / 257, rounded) instead of Pillow's clipping, which turns most of such an image white;
  - float images (F) are taken as 0..1 when every sample lies there (the usual convention), else as 0..255.
Everything here is blocking and CPU-bound; callers run it in a worker thread.

Does not know: where the bytes came from, which request they belong to.

NOTE: Pillow's global ImageFile.LOAD_TRUNCATED_IMAGES must stay False (its default): it would turn a
truncated upload into a silently grey-padded image instead of an error.
"""

from __future__ import annotations

import functools
import io
import logging

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from vlmserve.media.errors import MediaError

logger = logging.getLogger(__name__)

# What browsers and the OpenAI API accept, plus BMP and TIFF. Pillow can open ~40 more formats, some through
# rarely audited decoders and EPS through a Ghostscript subprocess; an upload must not reach those.
ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF", "AVIF")

_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})


@functools.cache
def _open_formats() -> tuple[str, ...]:
    """The allowed formats this Pillow build can open (AVIF needs a build with libavif)."""
    Image.init()
    return tuple(name for name in ALLOWED_FORMATS if name in Image.OPEN)


def _check_pixels(size: tuple[int, int], max_pixels: int) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise MediaError(f"the image has zero width or height ({width}x{height})")
    if width * height > max_pixels:
        raise MediaError(
            f"the image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels} "
            f"pixels (max_image_pixels); downscale it before sending",
            status_code=413,
        )


def _bomb(exc: Image.DecompressionBombError, max_pixels: int) -> MediaError:
    return MediaError(
        f"the image is too large to decode safely ({exc}); the limit is {max_pixels} pixels "
        f"(max_image_pixels), downscale it before sending",
        status_code=413,
    )


def decode_image(data: bytes, *, max_pixels: int) -> Image.Image:
    """Decode `data` into a new, fully loaded RGB image, or raise MediaError saying what is wrong with it."""
    if not data:
        raise MediaError("the image is empty (0 bytes)")
    formats = _open_formats()
    try:
        image = Image.open(io.BytesIO(data), formats=formats)
    except Image.DecompressionBombError as exc:
        raise _bomb(exc, max_pixels) from None
    except UnidentifiedImageError:
        raise MediaError(
            f"the data is not an image in a supported format ({', '.join(formats)}), "
            f"or it is corrupt or truncated"
        ) from None
    except Exception as exc:  # a plugin rejecting a malformed header raises almost anything
        raise MediaError(f"could not read the image header ({type(exc).__name__}: {exc})") from None

    rgb = None
    try:
        _check_pixels(image.size, max_pixels)
        try:
            image.seek(0)  # the first frame of an animated GIF / WebP / multi-page TIFF
            # Decode now, inside this guard: Pillow decodes lazily and a corrupt or truncated body only
            # fails at the first pixel access, which would otherwise be deep inside preprocessing.
            image.load()
        except Image.DecompressionBombError as exc:
            raise _bomb(exc, max_pixels) from None
        except Exception as exc:
            raise MediaError(
                f"the {image.format} image is corrupt or truncated ({type(exc).__name__}: {exc})"
            ) from None
        _check_pixels(image.size, max_pixels)  # some decoders only know the final size after loading
        try:
            ImageOps.exif_transpose(image, in_place=True)
        except Exception:
            # A broken EXIF block only loses the orientation hint; browsers show such images as stored.
            logger.debug("ignoring unreadable EXIF orientation", exc_info=True)
        rgb = to_rgb(image)
        return rgb
    finally:
        if rgb is not image:  # a converted copy (or an error): the decoded original is done with
            image.close()


def to_rgb(image: Image.Image) -> Image.Image:
    """`image` as 8-bit RGB (see the module docstring for how each mode is mapped): a new image, or `image`
    itself when it already is RGB without a transparent colour (the common JPEG case skips a copy)."""
    if image.mode == "RGB" and image.info.get("transparency") is None:
        return image
    if image.mode in _SIXTEEN_BIT_MODES or image.mode == "F":
        image = _high_depth_to_8bit(image)
        if image.mode == "L":
            return image.convert("RGB")
    try:
        if image.mode in _ALPHA_MODES or image.info.get("transparency") is not None:
            # Same as transformers.image_transforms.convert_to_rgb: alpha over an opaque white background.
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(background, rgba).convert("RGB")
        return image.convert("RGB")
    except ValueError as exc:
        raise MediaError(f"the image's pixel mode {image.mode!r} is not supported ({exc})") from None


def _high_depth_to_8bit(image: Image.Image) -> Image.Image:
    """16/32-bit greyscale -> "L" (or "LA" when a transparent grey value is set), scaled, not clipped."""
    values = np.asarray(image)  # (H, W) uint16 for I;16*, int32 for I, float32 for F
    if image.mode == "F":
        finite = np.where(np.isfinite(values), values, 0.0).astype(np.float32)  # NaN / inf samples -> 0
        scale = 255.0 if finite.size == 0 or float(finite.max()) <= 1.0 else 1.0
        grey = np.clip(np.rint(finite * scale), 0, 255).astype(np.uint8)
    else:
        wide = np.clip(values, 0, 65535).astype(np.uint32)
        grey = ((wide + 128) // 257).astype(np.uint8)  # == round(v * 255 / 65535): 257 is odd, no ties
    grey_image = Image.fromarray(grey)  # (H, W) uint8 -> mode "L"
    transparency = image.info.get("transparency")
    if isinstance(transparency, int | float):
        alpha = np.where(values == transparency, 0, 255).astype(np.uint8)  # (H, W)
        return Image.merge("LA", (grey_image, Image.fromarray(alpha)))
    return grey_image
