"""The plain records of an image inside a prompt, shared by the layer that makes them (models/processor.py)
and the layers that carry and run them (engine/, runner/, models/generate.py).

Plain data, no torch import: the tensors ride along as values. It lives outside models/ and engine/ so that
both may import it without models/ importing the engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple


class EncoderInput(NamedTuple):
    """What the vision encoder takes for one image. A NamedTuple: `values` is also `[0]`, `grid_thw` `[1]`."""

    # A torch.Tensor: (H, W, 3) uint8 pixels when `as_pixels` (the runner patchifies them on its device,
    # resizing them first to the grid's size when they are not yet), else (grid_t * grid_h * grid_w,
    # C*T*P*P) float32 patches.
    values: Any
    grid_thw: tuple[int, int, int]  # in patches of patch_size pixels
    as_pixels: bool = False


@dataclass(frozen=True)
class ImageFeature:
    """One image inside a prompt.

    Its placeholder occupies prompt_token_ids[offset : offset + length] (all <|image_pad|>); the vision
    encoder turns `data` into exactly `length` embedding rows that replace those placeholders.
    """

    mm_hash: str  # content hash of the image *as preprocessed*: same hash <=> same encoder output
    offset: int
    length: int
    data: EncoderInput | Any  # the encoder's input; schedulers and caches never read it
