"""The model registry: which families vlmserve serves and how config.json picks one.

Owns the table from config.json's `architectures` (and, when that is missing, `model_type`) to a
`ModelFamily`: its config parser, its model class and its image processor defaults (used where
preprocessor_config.json leaves a field out). An unknown architecture is an error that lists the supported
ones. Adding a family is one model file and one entry in FAMILIES.

What needs no entry: the M-RoPE variant is the model class's (Qwen3-VL's rotary interleaves the axes, as its
config.json's rope_scaling.mrope_interleaved says; the positions of a prompt with still images are the same
for every family), and the chat template is the checkpoint's own, rendered by the shared processor.

Does not read files (models/loader.py and models/processor.py do) and does not build anything itself.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from vlmserve.models import qwen2_5_vl, qwen2_vl, qwen3_vl

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ModelFamily:
    name: str  # for messages: "Qwen2.5-VL"
    architectures: tuple[str, ...]  # config.json "architectures" values
    model_types: tuple[str, ...]  # config.json "model_type" values
    parse_config: Callable[[dict[str, Any]], Any]
    model_class: Callable[[Any], torch.nn.Module]
    # Image processor values where preprocessor_config.json leaves a field out: the family's own (its vision
    # tower's patch size, the mean / std it was trained with).
    image_defaults: Mapping[str, Any] = field(default_factory=dict)


FAMILIES: tuple[ModelFamily, ...] = (
    ModelFamily(
        name="Qwen2.5-VL",
        architectures=qwen2_5_vl.ARCHITECTURES,
        model_types=("qwen2_5_vl",),
        parse_config=qwen2_5_vl.Qwen2_5_VLConfig.from_dict,
        model_class=qwen2_5_vl.Qwen2_5_VLForConditionalGeneration,
        image_defaults={"patch_size": 14, "image_mean": OPENAI_CLIP_MEAN, "image_std": OPENAI_CLIP_STD},
    ),
    ModelFamily(
        name="Qwen2-VL",
        architectures=qwen2_vl.ARCHITECTURES,
        model_types=("qwen2_vl",),
        parse_config=qwen2_vl.Qwen2VLConfig.from_dict,
        model_class=qwen2_vl.Qwen2VLForConditionalGeneration,
        image_defaults={"patch_size": 14, "image_mean": OPENAI_CLIP_MEAN, "image_std": OPENAI_CLIP_STD},
    ),
    ModelFamily(
        name="Qwen3-VL",
        architectures=qwen3_vl.ARCHITECTURES,
        model_types=("qwen3_vl",),
        parse_config=qwen3_vl.Qwen3VLConfig.from_dict,
        model_class=qwen3_vl.Qwen3VLForConditionalGeneration,
        image_defaults={"patch_size": 16, "image_mean": (0.5, 0.5, 0.5), "image_std": (0.5, 0.5, 0.5)},
    ),
    ModelFamily(
        name="Qwen3-VL-MoE",
        architectures=qwen3_vl.MOE_ARCHITECTURES,
        model_types=("qwen3_vl_moe",),
        parse_config=qwen3_vl.Qwen3VLConfig.from_dict,
        model_class=qwen3_vl.Qwen3VLMoeForConditionalGeneration,
        image_defaults={"patch_size": 16, "image_mean": (0.5, 0.5, 0.5), "image_std": (0.5, 0.5, 0.5)},
    ),
)


def supported_architectures() -> list[str]:
    return [a for f in FAMILIES for a in f.architectures]


def family_for_config(cfg: Mapping[str, Any]) -> ModelFamily:
    """The family of a parsed config.json: by `architectures`, else by `model_type`."""
    archs = cfg.get("architectures") or []
    for fam in FAMILIES:
        if any(a in fam.architectures for a in archs):
            return fam
    if not archs:
        model_type = cfg.get("model_type")
        for fam in FAMILIES:
            if model_type in fam.model_types:
                return fam
    raise ValueError(
        f"unsupported architecture {archs or cfg.get('model_type')!r} in config.json; "
        f"vlmserve supports: {', '.join(supported_architectures())}"
    )
