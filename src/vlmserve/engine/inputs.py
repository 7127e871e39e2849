"""What a caller hands the engine for one request, after tokenization and image preprocessing.

Plain data; the multimodal payload is opaque here (its record, `ImageFeature`, is in vlmserve/multimodal.py,
where the processor that fills it may import it too). No torch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from vlmserve.engine.sampling_params import SamplingParams
from vlmserve.multimodal import ImageFeature

__all__ = ["EngineRequest", "ImageFeature"]


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
