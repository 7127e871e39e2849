"""Images as the vision encoder takes them, exactly like HF's Qwen2-VL image processor (its PIL backend, our
reference): the resize arithmetic (`smart_resize`), RGB conversion, rescale + normalise + patchify, and the
content hash that keys the encoder and prefix caches.

The resize is PIL's arithmetic, run either by PIL on the host or by `pil_resize` (resample.py) in torch on
the engine's device, where a 1280x720 image takes a fraction of a millisecond instead of ~25 ms of one host
core. Which one an engine uses is its `image_resize` setting; on the device path the decoded image reaches
the engine whole and the front does no per-pixel work but the hash.

Owns: one image in, pixels / patches / grid / hash out. Does not know: prompts, tokens or positions
(processor.py, mrope.py), how images are fetched or decoded (media/), or where patches run (the engine
decides whether it resizes and patchifies on its device). The numbers match HF bit for bit
(tests/test_processor.py), on either path.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from PIL import Image

from vlmserve.models.resample import FILTERS, pil_resize

# Defaults of HF's Qwen2VLImageProcessor, used where preprocessor_config.json leaves a field out.
DEFAULT_MIN_PIXELS = 56 * 56
DEFAULT_MAX_PIXELS = 28 * 28 * 1280
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_ASPECT_RATIO = 200
# Images of up to this many pixels reach the engine as decoded when it resizes on its device; larger ones are
# resized on the host first. A 16 M-pixel image is 48 MB to copy; its resize's transient buffers (the
# gathered int32 blocks of resample.py, up to 64 MB each) are freed before the vision tower runs.
DEVICE_RESIZE_MAX_PIXELS = 16_777_216


@dataclass(frozen=True)
class ImageProcessorConfig:
    """What preprocessor_config.json says about turning an image into patches."""

    min_pixels: int = DEFAULT_MIN_PIXELS
    max_pixels: int = DEFAULT_MAX_PIXELS
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD
    rescale_factor: float = 1 / 255
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    do_convert_rgb: bool = True
    resample: int = Image.Resampling.BICUBIC

    @classmethod
    def from_dict(
        cls, cfg: Mapping[str, Any], defaults: Mapping[str, Any] | None = None
    ) -> ImageProcessorConfig:
        """Read both layouts: flat min_pixels / max_pixels (released checkpoints) and the "size" dict
        (transformers 5.x). Like HF's Qwen2VLImageProcessor, the flat fields win when both are present.
        `defaults` (the model family's, from models/registry.py) fill fields the file leaves out."""
        cfg = {**(defaults or {}), **cfg}
        size = cfg.get("size") or {}
        min_pixels = size.get("shortest_edge", size.get("min_pixels", DEFAULT_MIN_PIXELS))
        max_pixels = size.get("longest_edge", size.get("max_pixels", DEFAULT_MAX_PIXELS))
        if cfg.get("min_pixels") is not None:
            min_pixels = cfg["min_pixels"]
        if cfg.get("max_pixels") is not None:
            max_pixels = cfg["max_pixels"]
        out = cls(
            min_pixels=int(min_pixels),
            max_pixels=int(max_pixels),
            patch_size=int(cfg.get("patch_size", 14)),
            temporal_patch_size=int(cfg.get("temporal_patch_size", 2)),
            merge_size=int(cfg.get("merge_size", 2)),
            image_mean=_three_floats(cfg.get("image_mean", OPENAI_CLIP_MEAN), "image_mean"),
            image_std=_three_floats(cfg.get("image_std", OPENAI_CLIP_STD), "image_std"),
            rescale_factor=float(cfg.get("rescale_factor", 1 / 255)),
            do_resize=bool(cfg.get("do_resize", True)),
            do_rescale=bool(cfg.get("do_rescale", True)),
            do_normalize=bool(cfg.get("do_normalize", True)),
            do_convert_rgb=bool(cfg.get("do_convert_rgb", True)),
            resample=int(cfg.get("resample", Image.Resampling.BICUBIC)),
        )
        _check_pixel_range(out.min_pixels, out.max_pixels, out.patch_size * out.merge_size)
        return out


def _three_floats(value: Any, name: str) -> tuple[float, float, float]:
    values = [float(value)] * 3 if isinstance(value, int | float) else [float(v) for v in value]
    if len(values) != 3:
        raise ValueError(f"preprocessor_config.json: {name} must have 3 values (R, G, B), got {value!r}.")
    return values[0], values[1], values[2]


def _check_pixel_range(min_pixels: int, max_pixels: int, factor: int) -> None:
    if min_pixels <= 0 or max_pixels < min_pixels:
        raise ValueError(
            f"Invalid pixel range min_pixels={min_pixels}, max_pixels={max_pixels}: "
            "need 0 < min_pixels <= max_pixels."
        )
    if max_pixels < factor * factor:
        raise ValueError(
            f"max_pixels={max_pixels} is below one merged patch ({factor}x{factor}={factor * factor} pixels); "
            f"use max_pixels >= {factor * factor}."
        )


# ------------------------------------------------------------------------------------------ resizing


def check_aspect_ratio(width: int, height: int) -> None:
    """ValueError for an image more than MAX_ASPECT_RATIO times longer than it is wide (or the reverse)."""
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        raise ValueError(
            f"The image is {width}x{height}, an aspect ratio of {ratio:.1f}:1; the model takes images up to "
            f"{MAX_ASPECT_RATIO}:1. Crop or pad it to a less extreme shape."
        )


def smart_resize(
    height: int,
    width: int,
    factor: int = 28,
    min_pixels: int = DEFAULT_MIN_PIXELS,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> tuple[int, int]:
    """The size Qwen2.5-VL resizes an image to: both sides multiples of `factor`, the pixel count within
    [min_pixels, max_pixels], the aspect ratio kept as closely as possible. Same arithmetic as HF's
    `smart_resize` (including Python's round-half-to-even), so the same image gets the same grid."""
    if height <= 0 or width <= 0:
        raise ValueError(f"Image size {width}x{height} is empty; images need at least 1x1 pixels.")
    check_aspect_ratio(width, height)
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def convert_rgb(image: Image.Image) -> Image.Image:
    """RGB the way HF's convert_to_rgb does it: anything with transparency (an alpha band, or a palette /
    greyscale image with a transparency entry) is composited onto white first; everything else is a plain
    `convert("RGB")`; an RGB image without transparency comes back as it is (no copy)."""
    if image.mode == "RGB" and image.info.get("transparency") is None:
        return image
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


# ------------------------------------------------------------------------------------------ preprocessing


class ImageProcessor:
    """Resize, patchify and hash images for one checkpoint's image settings."""

    def __init__(self, config: ImageProcessorConfig) -> None:
        self.config = config
        self._lut = torch.from_numpy(self._normalization_table(config))  # (3, 256) float32
        self._lut_on: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
        # Everything besides the resized pixels that decides the encoder input, for pixels_hash.
        self._hash_salt = repr(replace(config, min_pixels=0, max_pixels=0)).encode()

    def _pixel_range(self, min_pixels: int | None, max_pixels: int | None) -> tuple[int, int]:
        lo = self.config.min_pixels if min_pixels is None else int(min_pixels)
        hi = self.config.max_pixels if max_pixels is None else int(max_pixels)
        _check_pixel_range(lo, hi, self.config.patch_size * self.config.merge_size)
        return lo, hi

    def resized_size(
        self, height: int, width: int, min_pixels: int | None = None, max_pixels: int | None = None
    ) -> tuple[int, int]:
        """(height, width) an image of this size is resized to."""
        lo, hi = self._pixel_range(min_pixels, max_pixels)
        c = self.config
        if not c.do_resize:
            return height, width
        return smart_resize(height, width, factor=c.patch_size * c.merge_size, min_pixels=lo, max_pixels=hi)

    def num_image_tokens(
        self, height: int, width: int, min_pixels: int | None = None, max_pixels: int | None = None
    ) -> int:
        """How many prompt tokens (<|image_pad|>) an image of this size becomes, without preprocessing it."""
        h, w = self.resized_size(height, width, min_pixels, max_pixels)
        c = self.config
        return (h // c.patch_size) * (w // c.patch_size) // c.merge_size**2

    @staticmethod
    def _normalization_table(c: ImageProcessorConfig) -> np.ndarray:
        # Pixels are uint8, so rescale + normalise is a (3, 256) lookup table. Built with HF's exact arithmetic
        # (float64 multiply then float32; float32 subtract and divide), a lookup gives bit-identical values.
        values = np.arange(256, dtype=np.uint8)
        if c.do_rescale:
            scaled = (values.astype(np.float64) * c.rescale_factor).astype(np.float32)
        else:
            scaled = values.astype(np.float32)
        table = np.stack([scaled] * 3)  # (3, 256)
        if c.do_normalize:
            mean = np.array(c.image_mean, dtype=np.float32)[:, None]
            std = np.array(c.image_std, dtype=np.float32)[:, None]
            table = (table - mean) / std
        return np.ascontiguousarray(table, dtype=np.float32)

    def preprocess_image(
        self, image: Image.Image, min_pixels: int | None = None, max_pixels: int | None = None
    ) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """Resize, rescale, normalise and patchify one image like HF's Qwen2VLImageProcessor (PIL backend).

        Returns pixel_values (grid_t*grid_h*grid_w, C*T*P*P) float32 and grid_thw = (1, grid_h, grid_w), in
        patches of `patch_size` pixels. min_pixels / max_pixels override the checkpoint's range for this call.
        """
        pixels, grid = self.resize_image(image, min_pixels, max_pixels)
        return self.patchify(pixels), grid

    def resize_image(
        self, image: Image.Image, min_pixels: int | None = None, max_pixels: int | None = None
    ) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """`preprocess_image` up to the resized pixels: ((H, W, 3) uint8, grid_thw); `patchify` does the rest,
        on whatever device the pixels are."""
        pixels, grid, _ = self._pixels(image, min_pixels, max_pixels, resize_on_device=False)
        return pixels, grid

    def prepare(
        self,
        image: Image.Image,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        *,
        resize_on_device: bool = False,
    ) -> tuple[torch.Tensor, tuple[int, int, int], str]:
        """One image -> ((H, W, 3) uint8 pixels, grid_thw, content hash), what an engine request carries.

        The pixels are resized here with PIL, unless `resize_on_device` (and the checkpoint's filter is one
        resample.py has, and the image has at most DEVICE_RESIZE_MAX_PIXELS): then they are the decoded image
        as it is, and `encoder_input` resizes them on the engine's device to the same pixels."""
        pixels, grid, size = self._pixels(image, min_pixels, max_pixels, resize_on_device)
        resized = tuple(pixels.shape[:2]) == size
        return pixels, grid, self.pixels_hash(pixels, resize_to=None if resized else size)

    def _pixels(
        self, image: Image.Image, min_pixels: int | None, max_pixels: int | None, resize_on_device: bool
    ) -> tuple[torch.Tensor, tuple[int, int, int], tuple[int, int]]:
        """(pixels, grid_thw, the (height, width) the encoder takes) for `prepare` and `resize_image`."""
        c = self.config
        if c.do_convert_rgb:
            image = convert_rgb(image)
        elif image.mode != "RGB":
            raise ValueError(
                f"Image mode {image.mode!r} is not RGB and preprocessor_config.json sets do_convert_rgb=false; "
                "convert the image to RGB first or set do_convert_rgb to true."
            )
        width, height = image.size
        resized_h, resized_w = self.resized_size(height, width, min_pixels, max_pixels)
        factor = c.patch_size * c.merge_size
        if resized_h % factor or resized_w % factor:
            raise ValueError(
                f"Image size {width}x{height} is not a multiple of {factor} and preprocessor_config.json sets "
                "do_resize=false; resize the image to multiples of patch_size*merge_size or enable do_resize."
            )
        grid = (1, resized_h // c.patch_size, resized_w // c.patch_size)
        leave_to_device = (
            resize_on_device and c.resample in FILTERS and width * height <= DEVICE_RESIZE_MAX_PIXELS
        )
        if (resized_h, resized_w) != (height, width) and not leave_to_device:
            image = image.resize((resized_w, resized_h), resample=Image.Resampling(c.resample))
        pixels = torch.from_numpy(np.array(image, dtype=np.uint8))  # (H, W, 3), a writable copy
        return pixels, grid, (resized_h, resized_w)

    def encoder_input(
        self, pixels: torch.Tensor, grid_thw: tuple[int, int, int], dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """(H, W, 3) uint8 pixels from `prepare` -> the encoder's patches, on the pixels' device: resized
        there first when they are not yet the grid's size (`resize_on_device`), then `patchify`."""
        size = (grid_thw[1] * self.config.patch_size, grid_thw[2] * self.config.patch_size)
        if tuple(pixels.shape[:2]) != size:
            pixels = pil_resize(pixels, size, self.config.resample)
        return self.patchify(pixels, dtype)

    def patchify(self, pixels: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Resized (H, W, 3) uint8 pixels -> (grid_h * grid_w, C*T*P*P) patches on the pixels' device: rescale +
        normalise by table lookup (bit-identical to HF's float32 arithmetic), then HF's patch order. In another
        `dtype` (the model's), the table is rounded once: the same values as float32 patches cast to it."""
        c = self.config
        key = (pixels.device, dtype)
        lut = self._lut_on.get(key)
        if lut is None:
            lut = self._lut_on[key] = self._lut.to(pixels.device).flatten().to(dtype)
        height, width, _ = pixels.shape
        p, m, t = c.patch_size, c.merge_size, c.temporal_patch_size
        grid_h, grid_w = height // p, width // p
        # HF's patch order: merge windows row-major, then the m x m patches inside a window, each patch
        # flattened as (C, T, P, P) with the single frame repeated T times. Reordered while still uint8 (a
        # quarter of the bytes), then one table lookup; channel c reads lut[256 c : 256 (c + 1)].
        ordered = pixels.view(grid_h // m, m, p, grid_w // m, m, p, 3).permute(0, 3, 1, 4, 6, 2, 5)
        offsets = torch.arange(0, 3 * 256, 256, device=pixels.device).view(3, 1, 1)
        patches = lut.take(ordered.long() + offsets)  # (gh/m, gw/m, m, m, C, P, P); take: a flat gather
        patches = patches.unsqueeze(5).expand(*patches.shape[:5], t, p, p)
        return patches.reshape(grid_h * grid_w, 3 * t * p * p)  # copies into a contiguous tensor

    def image_hash(
        self, image: Image.Image, min_pixels: int | None = None, max_pixels: int | None = None
    ) -> str:
        """Content hash of an image as this processor would preprocess it (`pixels_hash` of its resized pixels)."""
        return self.prepare(image, min_pixels, max_pixels)[2]

    def pixels_hash(self, pixels: torch.Tensor, resize_to: tuple[int, int] | None = None) -> str:
        """Content hash of (H, W, 3) uint8 pixels as the encoder will take them: resized pixels, or decoded
        pixels and the size the device resizes them to (`resize_to`). The same hash means the same encoder
        input, whatever file, mode or palette the pixels came from.

        SHA-256, truncated to 128 bits: server CPUs of the last years hash it in hardware (x86's SHA
        extensions, ARMv8's crypto extensions), 2.5x faster than blake2b there (2.0 vs 5.4 ms for a 1288x728
        image on the 2-core machine), and every image of every request goes through it on the serving front."""
        h = hashlib.sha256(self._hash_salt)
        if resize_to is not None:
            h.update(f"resized to {resize_to}|".encode())
        h.update(f"{tuple(pixels.shape)}|".encode())
        h.update(pixels.contiguous().numpy())
        return h.hexdigest()[:32]
