"""What a caller hands the engine for one request, after tokenization and image preprocessing.

Plain data; the multimodal payload is opaque here (the runner knows what it holds). No torch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from vlmserve.engine.sampling_params import SamplingParams


@dataclass(frozen=True)
class ImageFeature:
    """One image inside a prompt.

    Its placeholder occupies prompt_token_ids[offset : offset + length] (all <|image_pad|>); the vision
    encoder turns `data` into exactly `length` embedding rows that replace those placeholders.
    """

    mm_hash: str  # content hash of the image *as preprocessed*: same hash <=> same encoder output
    offset: int
    length: int
    data: Any  # the runner's encoder input, e.g. (pixel_values, grid_thw)


@dataclass
class EngineRequest:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    images: list[ImageFeature] = field(default_factory=list)
    # Multimodal RoPE: (3, len(prompt)) positions for the prompt, opaque here (a tensor); a token at index
    # i >= len(prompt) has position i + mrope_delta on all three axes. None means plain 1-D positions.
    mrope_positions: Any = None
    mrope_delta: int = 0
    arrival_time: float = field(default_factory=time.monotonic)
