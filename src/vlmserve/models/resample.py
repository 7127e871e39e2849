"""PIL's resize in torch: the same pixels as `Image.resize` for 8-bit RGB images, computed on any device.

Pillow resamples in two separable passes; which runs first depends on its version (`vertical_first`). Each
pass is a fixed-point convolution (Pillow's Resample.c): per output pixel, filter weights normalised in double
precision and rounded to 22 fractional bits (`precompute_coeffs`, `normalize_coeffs_8bpc`), an int32 sum that
starts at one half, shifted down and clipped to 0..255, so the first pass's output is 8-bit before the second
pass reads it.
Here the weights are computed with numpy in float64, in Pillow's order of operations, and the sums in int32
on the pixels' device: bit-identical pixels (tests/test_processor.py). A float resample (torch's antialiased
`interpolate`, torchvision's) is not: it keeps the first pass's overshoot unclipped and rounds once, so it
differs from PIL by one level on ~14% of a photo's pixels and by up to 20+ at hard edges.

Owns: the resampling arithmetic. Does not know: target sizes (image_processor.py's `smart_resize`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import numpy as np
import PIL
import torch
from PIL import Image

PRECISION_BITS = 32 - 8 - 2  # Pillow's: 8 bits of result, 2 for the filters' negative lobes and overshoot


def _bicubic(x: np.ndarray) -> np.ndarray:
    a = -0.5
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def _bilinear(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    return np.where(x < 1.0, 1.0 - x, 0.0)


def _box(x: np.ndarray) -> np.ndarray:
    return np.where((x > -0.5) & (x <= 0.5), 1.0, 0.0)


# Pillow's filters (function, support) by their Image.Resampling value. Hamming and Lanczos use sin / cos,
# whose last bit may differ between libms, so they stay with PIL on the host.
FILTERS: dict[int, tuple[Callable[[np.ndarray], np.ndarray], float]] = {
    Image.Resampling.BICUBIC: (_bicubic, 2.0),
    Image.Resampling.BILINEAR: (_bilinear, 1.0),
    Image.Resampling.BOX: (_box, 0.5),
}


_PILLOW_MAJOR = int(PIL.__version__.split(".")[0])


def vertical_first(
    height: int, width: int, out_h: int, out_w: int, pillow_major: int = _PILLOW_MAJOR
) -> bool:
    """Whether Pillow runs the vertical pass first for this resize. Pillow 13's ImagingResampleInner: when
    the height shrinks by more than twice as many pixels as the width does. Before 13, `Image.resize`: only
    for an image more than 100 times taller than wide whose height shrinks."""
    if pillow_major >= 13:
        return height - out_h > 0 and height - out_h > (width - out_w) * 2
    return height > width * 100 and out_h < height


@functools.lru_cache(maxsize=512)
def coefficients(in_size: int, out_size: int, resample: int) -> tuple[np.ndarray, np.ndarray]:
    """(source index, int32 weight) per output pixel and tap, both (out_size, taps): Pillow's
    precompute_coeffs + normalize_coeffs_8bpc for a whole-image box. Taps past a pixel's window have weight 0
    (and a clamped index)."""
    fn, base_support = FILTERS[resample]
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = base_support * filterscale
    taps = math.ceil(support) * 2 + 1
    center = (np.arange(out_size) + 0.5) * scale
    xmin = np.maximum(np.trunc(center - support + 0.5), 0).astype(np.int64)  # C's (int): toward zero
    xmax = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), in_size) - xmin
    x = np.arange(taps)
    w = fn(((x[None, :] + xmin[:, None]) - center[:, None] + 0.5) * (1.0 / filterscale))
    w = np.where(x[None, :] < xmax[:, None], w, 0.0)
    total = np.zeros(out_size)
    for t in range(taps):  # summed in Pillow's order (numpy's sum is pairwise)
        total = total + w[:, t]
    w = np.where(total[:, None] != 0.0, w / np.where(total == 0.0, 1.0, total)[:, None], w)
    one = float(1 << PRECISION_BITS)
    fixed = np.where(w < 0, np.trunc(-0.5 + w * one), np.trunc(0.5 + w * one)).astype(np.int32)
    index = np.minimum(xmin[:, None] + x[None, :], in_size - 1)
    return index, fixed


# Device copies of the tables for the sizes seen last: a few hundred KB each at most (12 MP -> 1 MP: 15 taps),
# so a few MB of device memory however many image sizes a server sees.
@functools.lru_cache(maxsize=32)
def _coefficients_on(
    in_size: int, out_size: int, resample: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    index, fixed = coefficients(in_size, out_size, resample)
    return torch.from_numpy(index).to(device), torch.from_numpy(fixed).to(device)


# Elements of one gathered (lines, outputs, taps, channels) int32 block: 64 MB. A 1280x720 image's passes
# are one block each; a 12 MP photo's horizontal pass (15 taps) is about ten.
_BLOCK_ELEMENTS = 1 << 24


def _pass(pixels: torch.Tensor, dim: int, out_size: int, resample: int) -> torch.Tensor:
    """One 8-bit pass of Pillow's resample along `dim` (0: vertical, 1: horizontal) of (H, W, C) uint8:
    every tap of every output gathered at once (a few kernels per block of lines, not per tap)."""
    index, fixed = _coefficients_on(pixels.shape[dim], out_size, resample, pixels.device)
    taps = index.shape[1]
    lines_dim = 1 - dim  # the dimension the pass leaves alone
    lines = pixels.shape[lines_dim]
    per_line = out_size * taps * pixels.shape[2]
    step = max(1, _BLOCK_ELEMENTS // per_line)
    shape = list(pixels.shape)
    shape[dim] = out_size
    out = torch.empty(shape, dtype=torch.uint8, device=pixels.device)
    for start in range(0, lines, step):
        block = pixels.narrow(lines_dim, start, min(step, lines - start))
        if dim == 1:  # (lines, out, taps, C) * (out, taps, 1), summed over taps
            acc = (block[:, index].to(torch.int32) * fixed[:, :, None]).sum(2, dtype=torch.int32)
        else:  # (out, taps, lines, C) * (out, taps, 1, 1)
            acc = (block[index].to(torch.int32) * fixed[:, :, None, None]).sum(1, dtype=torch.int32)
        acc.add_(1 << (PRECISION_BITS - 1)).bitwise_right_shift_(PRECISION_BITS).clamp_(0, 255)
        out.narrow(lines_dim, start, acc.shape[lines_dim]).copy_(acc)
    return out


def pil_resize(pixels: torch.Tensor, size: tuple[int, int], resample: int) -> torch.Tensor:
    """(H, W, C) uint8 on any device -> (size[0], size[1], C) uint8 equal to PIL's
    `Image.fromarray(pixels).resize((size[1], size[0]), resample)`: PIL itself for pixels on the CPU (its C
    loops beat torch's gathers there), `torch_resize` on an accelerator."""
    if resample not in FILTERS:
        raise ValueError(f"resample={resample} is not one of {sorted(int(r) for r in FILTERS)}")
    if pixels.device.type == "cpu":
        image = Image.fromarray(pixels.numpy()).resize((size[1], size[0]), Image.Resampling(resample))
        return torch.from_numpy(np.array(image, dtype=np.uint8))
    return torch_resize(pixels, size, resample)


def torch_resize(pixels: torch.Tensor, size: tuple[int, int], resample: int) -> torch.Tensor:
    """`pil_resize` in torch ops, on the pixels' device."""
    height, width = pixels.shape[:2]
    out_h, out_w = size
    passes = [(1, out_w), (0, out_h)]
    if vertical_first(height, width, out_h, out_w):
        passes.reverse()
    for dim, out_size in passes:
        if pixels.shape[dim] != out_size:
            pixels = _pass(pixels, dim, out_size, resample)
    return pixels
