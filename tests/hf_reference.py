"""HF transformers pieces used as the reference in tests.

NOTE: HF's AutoProcessor cannot be built here: Qwen2_5_VLProcessor also loads a video processor, which needs
torchvision (not installed). The reference is HF's own Qwen2_5_VLProcessor restricted to its image processor
and tokenizer, so the image and text code paths are still HF's.
"""

from __future__ import annotations

from transformers import Qwen2_5_VLProcessor as _HFQwen2_5_VLProcessor


class HFImageTextProcessor(_HFQwen2_5_VLProcessor):
    """HF's Qwen2.5-VL processor without its video processor."""

    @classmethod
    def get_attributes(cls) -> list[str]:
        return ["image_processor", "tokenizer"]
