"""Qwen2-VL in native PyTorch, read top to bottom.

    config -> vision tower (patch embedding, 2-D rotary, full-attention LayerNorm blocks with a quick-GELU
              MLP, 2x2 patch merger) -> language model (Qwen2: GQA with qkv bias, sectioned multimodal RoPE,
              RMSNorm, SwiGLU) -> logits

Unlike Qwen2.5-VL, every vision block attends over its whole image (no windows, so the patches stay in the
processor's order) and the vision tower uses LayerNorm and a plain fc1 -> act -> fc2 MLP. The model computes;
it does not schedule, sample or own a KV cache (see qwen2_5_vl.py for the contract with the runner).
Parameter names follow the released checkpoints (`visual.*`, `model.*`, `lm_head.*`) with q/k/v and gate/up
fused.
The language model is Qwen2's, shared with the other Qwen2-based family (models/layers/qwen2.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vlmserve.devices import to_device
from vlmserve.models.layers.attention import VarlenGroups
from vlmserve.models.layers.parallel import TensorParallel
from vlmserve.models.layers.qwen2 import Qwen2Model
from vlmserve.models.layers.vision import PatchEmbed, VisionAttention, patch_positions, vision_rotary
from vlmserve.models.layers.vlm import VisionLanguageModel

ARCHITECTURES = ("Qwen2VLForConditionalGeneration",)


# ----------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class VisionConfig:
    depth: int = 32
    embed_dim: int = 1280
    mlp_ratio: float = 4.0
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    hidden_act: str = "quick_gelu"
    out_hidden_size: int = 3584  # config.json's vision_config.hidden_size: the LM's width
    rope_theta: float = 10000.0

    @property
    def intermediate_size(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    rms_norm_eps: float = 1e-5
    rope_theta: float = 1_000_000.0
    mrope_section: tuple[int, ...] = (16, 24, 24)
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass(frozen=True)
class Qwen2VLConfig:
    text: TextConfig
    vision: VisionConfig
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    torch_dtype: str = "bfloat16"
    eos_token_ids: tuple[int, ...] = ()
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> Qwen2VLConfig:
        """Parse config.json as released (text fields at the top level) or as transformers 5 saves it
        (text fields under "text_config")."""
        text = dict(cfg)
        text.update(cfg.get("text_config") or {})
        rope = text.get("rope_scaling") or text.get("rope_parameters") or {}
        tie = bool(cfg.get("tie_word_embeddings", False) or text.get("tie_word_embeddings", False))
        text_fields = {k: text[k] for k in TextConfig.__dataclass_fields__ if k in text}
        text_fields.pop("tie_word_embeddings", None)
        if "rope_theta" in rope:
            text_fields["rope_theta"] = rope["rope_theta"]
        if "mrope_section" in rope:
            text_fields["mrope_section"] = tuple(rope["mrope_section"])
        vis = dict(cfg.get("vision_config") or {})
        if "in_chans" in vis and "in_channels" not in vis:
            vis["in_channels"] = vis["in_chans"]
        if "hidden_size" in vis:
            vis["out_hidden_size"] = vis["hidden_size"]
        vis_fields = {k: vis[k] for k in VisionConfig.__dataclass_fields__ if k in vis}
        vis_rope = vis.get("rope_parameters") or {}
        if "rope_theta" in vis_rope:
            vis_fields["rope_theta"] = vis_rope["rope_theta"]
        eos = text.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        ids = {
            k: text[k]
            for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
            if k in text
        }
        return cls(
            text=TextConfig(**text_fields, tie_word_embeddings=tie),
            vision=VisionConfig(**vis_fields),
            torch_dtype=str(
                cfg.get("torch_dtype") or cfg.get("dtype") or text.get("torch_dtype") or "bfloat16"
            ),
            eos_token_ids=eos_ids,
            raw=cfg,
            **ids,
        )


# --------------------------------------------------------------------------------------- vision tower

ACTIVATIONS = {
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
}


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        if cfg.hidden_act not in ACTIVATIONS:
            raise ValueError(
                f"vision_config.hidden_act {cfg.hidden_act!r} is not supported; use one of {sorted(ACTIVATIONS)}"
            )
        self.act = ACTIVATIONS[cfg.hidden_act]
        self.fc1 = nn.Linear(cfg.embed_dim, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.norm2 = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.attn = VisionAttention(cfg.embed_dim, cfg.num_heads)
        self.mlp = VisionMLP(cfg)

    def forward(
        self, x: torch.Tensor, seqs: VarlenGroups, cos: torch.Tensor, sin: torch.Tensor
    ) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), seqs, cos, sin)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """Each 2x2 group of neighbouring patches (adjacent rows in the patch order) -> one LM token."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.merged_dim = cfg.embed_dim * cfg.spatial_merge_size**2
        self.ln_q = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.mlp = nn.Sequential(
            nn.Linear(self.merged_dim, self.merged_dim),
            nn.GELU(),
            nn.Linear(self.merged_dim, cfg.out_hidden_size),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.ln_q(x).view(-1, self.merged_dim))


class VisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(
            cfg.in_channels, cfg.temporal_patch_size, cfg.patch_size, cfg.embed_dim, bias=False
        )
        self.blocks = nn.ModuleList([VisionBlock(cfg) for _ in range(cfg.depth)])
        self.merger = PatchMerger(cfg)

    def forward(self, patches: torch.Tensor, grids: list[tuple[int, int, int]]) -> torch.Tensor:
        """patches (N, C*T*P*P) for all images, grids [(t, h, w)] -> (N / merge**2, out_hidden)."""
        x = self.patch_embed(patches)  # (N, embed_dim), processor order throughout
        pos_hw = to_device(patch_positions(grids, self.cfg.spatial_merge_size), x.device)  # (N, 2)
        cos, sin = vision_rotary(pos_hw, self.cfg.embed_dim // self.cfg.num_heads, self.cfg.rope_theta)
        frames = VarlenGroups([h * w for t, h, w in grids for _ in range(t)], x.device)
        for block in self.blocks:
            x = block(x, frames, cos, sin)
        return self.merger(x)  # (N / unit, out_hidden)


# ------------------------------------------------------------------------------------------ the model


class Qwen2VLForConditionalGeneration(VisionLanguageModel):
    FAMILY = "Qwen2-VL"

    def __init__(self, cfg: Qwen2VLConfig, tp: TensorParallel | None = None) -> None:
        super().__init__(cfg, VisionTransformer(cfg.vision), Qwen2Model(cfg.text, tp), tp)
