"""HF transformers pieces used as the reference in tests.

NOTE: HF's AutoProcessor cannot be built here: Qwen2_5_VLProcessor also loads a video processor, which needs
torchvision (not installed). The reference is HF's own Qwen2_5_VLProcessor restricted to its image processor
and tokenizer, so the image and text code paths are still HF's.

The image processor is always HF's PIL one, the reference vlmserve's CPU preprocessing is bit-exact with: where
torchvision is installed (a GPU box), AutoImageProcessor picks HF's torchvision processor instead, whose
resize differs from PIL's by one level in a fraction of a percent of the values.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import Qwen2_5_VLProcessor as _HFQwen2_5_VLProcessor

try:
    from transformers import Qwen2VLImageProcessorPil as HFPilImageProcessor
except ImportError:  # transformers releases before the PIL / torchvision split: the slow processor is PIL's
    from transformers import Qwen2VLImageProcessor as HFPilImageProcessor


class HFImageTextProcessor(_HFQwen2_5_VLProcessor):
    """HF's Qwen2.5-VL processor without its video processor, with HF's PIL image processor."""

    @classmethod
    def get_attributes(cls) -> list[str]:
        return ["image_processor", "tokenizer"]

    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs: Any) -> HFImageTextProcessor:
        processor = super().from_pretrained(path, **kwargs)
        processor.image_processor = HFPilImageProcessor.from_pretrained(path)
        return processor


def hf_image_text_processor_class(family: str) -> type:
    """HF's processor class of a model family (see models/registry.py), restricted like HFImageTextProcessor
    to its tokenizer and HF's PIL image processor."""
    import transformers

    base = {
        "qwen2_5_vl": _HFQwen2_5_VLProcessor,
        "qwen2_vl": transformers.Qwen2VLProcessor,
        "qwen3_vl": transformers.Qwen3VLProcessor,
        "qwen3_vl_moe": transformers.Qwen3VLProcessor,
    }[family]

    class Restricted(base):  # type: ignore[misc, valid-type]
        @classmethod
        def get_attributes(cls) -> list[str]:
            return ["image_processor", "tokenizer"]

        @classmethod
        def from_pretrained(cls, path: str | Path, **kwargs: Any) -> Any:
            processor = super().from_pretrained(path, **kwargs)
            processor.image_processor = HFPilImageProcessor.from_pretrained(path)
            return processor

    Restricted.__name__ = f"HFImageText{base.__name__}"
    return Restricted
