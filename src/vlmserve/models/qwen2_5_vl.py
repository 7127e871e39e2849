"""Qwen2.5-VL in native PyTorch, read top to bottom.

    config -> vision tower (patch embedding, 2-D rotary, window / full attention blocks, 2x2 patch merger)
           -> language model (Qwen2: GQA with qkv bias, multimodal RoPE, RMSNorm, SwiGLU) -> logits

The model computes; it does not schedule, sample or own a KV cache. Tokens of many sequences arrive packed
as one (T, hidden) batch; causal attention with whatever KV cache the caller uses goes through the
`AttentionBackend` passed to `forward`. Parameter names follow the released checkpoints (`visual.*`,
`model.*`, `lm_head.*`), except that q/k/v and gate/up projections are fused; `load_weights`
(models/layers/weights.py, shared with the other families) maps the checkpoint's separate tensors into the
fused ones.
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
from vlmserve.models.layers.mlp import GatedMLP
from vlmserve.models.layers.norm import RMSNorm
from vlmserve.models.layers.parallel import TensorParallel
from vlmserve.models.layers.qwen2 import Qwen2Model
from vlmserve.models.layers.vision import PatchEmbed, VisionAttention, vision_rotary
from vlmserve.models.layers.vlm import VisionLanguageModel

ARCHITECTURES = ("Qwen2_5_VLForConditionalGeneration",)


# ----------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class VisionConfig:
    depth: int = 32
    hidden_size: int = 1280
    intermediate_size: int = 3420
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    window_size: int = 112
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    out_hidden_size: int = 3584
    tokens_per_second: int = 2
    rope_theta: float = 10000.0


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    rms_norm_eps: float = 1e-5  # transformers' default when config.json omits it
    rope_theta: float = 1_000_000.0
    mrope_section: tuple[int, ...] = (16, 24, 24)
    max_position_embeddings: int = 128000
    tie_word_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass(frozen=True)
class Qwen2_5_VLConfig:
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
    def from_dict(cls, cfg: dict[str, Any]) -> Qwen2_5_VLConfig:
        """Parse config.json as released (text fields at the top level) or as transformers 5 saves it
        (text fields under "text_config")."""
        archs = cfg.get("architectures") or []
        if not any(a in ARCHITECTURES for a in archs):
            raise ValueError(
                f"unsupported architecture {archs or cfg.get('model_type')!r} in config.json; "
                f"vlmserve supports: {', '.join(ARCHITECTURES)}"
            )
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
        vis_rope = vis.get("rope_parameters") or {}
        vis_fields = {k: vis[k] for k in VisionConfig.__dataclass_fields__ if k in vis}
        if "rope_theta" in vis_rope:
            vis_fields["rope_theta"] = vis_rope["rope_theta"]
        if "fullatt_block_indexes" in vis_fields:
            vis_fields["fullatt_block_indexes"] = tuple(vis_fields["fullatt_block_indexes"])
        eos = text.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        ids = {k: text[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id") if k in text}
        if "vision_end_token_id" in text:
            ids["vision_end_token_id"] = text["vision_end_token_id"]
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


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.norm1 = RMSNorm(cfg.hidden_size, eps=1e-6)
        self.norm2 = RMSNorm(cfg.hidden_size, eps=1e-6)
        self.attn = VisionAttention(cfg.hidden_size, cfg.num_heads)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, bias=True)

    def forward(
        self, x: torch.Tensor, seqs: VarlenGroups, cos: torch.Tensor, sin: torch.Tensor
    ) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), seqs, cos, sin)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """Each 2x2 group of neighbouring patches (adjacent rows in the patch order) -> one LM token."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.merged_dim = cfg.hidden_size * cfg.spatial_merge_size**2
        self.ln_q = RMSNorm(cfg.hidden_size, eps=1e-6)
        self.mlp = nn.Sequential(
            nn.Linear(self.merged_dim, self.merged_dim),
            nn.GELU(),
            nn.Linear(self.merged_dim, cfg.out_hidden_size),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.ln_q(x).view(-1, self.merged_dim))


@dataclass
class VisionLayout:
    """Everything about a batch of images that depends only on their grids, not on pixel values."""

    window_index: torch.Tensor  # (N / unit,) merge-unit order used inside the tower (window-major)
    reverse_index: torch.Tensor  # (N / unit,) back to raster order for the LM
    windows: VarlenGroups  # window boundaries in patches, window order
    images: VarlenGroups  # image (frame) boundaries in patches
    pos_hw: torch.Tensor  # (N, 2) (row, col) of each patch, window order


def vision_layout(grids: list[tuple[int, int, int]], cfg: VisionConfig, device: torch.device) -> VisionLayout:
    """Patch order, windows and 2-D positions for images with grids (t, h, w) in patches.

    Patches arrive from the processor grouped by merge unit: each run of merge**2 consecutive patches is one
    2x2 block, blocks in raster order. Window attention regroups the blocks into windows of
    (window_size / patch_size / merge)**2 blocks, raster order inside each window.
    """
    m = cfg.spatial_merge_size
    unit = m * m
    win = cfg.window_size // m // cfg.patch_size  # window side, in merged blocks
    window_index, window_lens, pos, frame_lens = [], [], [], []
    base = 0
    for t, h, w in grids:
        bh, bw = h // m, w // m
        blocks = torch.arange(t * bh * bw).view(t, bh, bw)
        pad_h, pad_w = -bh % win, -bw % win
        padded = F.pad(blocks, (0, pad_w, 0, pad_h), value=-1)
        nh, nw = (bh + pad_h) // win, (bw + pad_w) // win
        windows = padded.view(t, nh, win, nw, win).permute(0, 1, 3, 2, 4).reshape(t * nh * nw, win * win)
        keep = windows >= 0
        window_index.append(windows[keep] + base)
        lens = keep.sum(-1)
        window_lens.append(lens[lens > 0] * unit)
        # (row, col) of each patch in processor order: block (r, c), then the m x m cell inside it.
        rows = torch.arange(h).view(bh, m, 1, 1).expand(bh, m, bw, m).permute(0, 2, 1, 3).reshape(-1)
        cols = torch.arange(w).view(1, 1, bw, m).expand(bh, m, bw, m).permute(0, 2, 1, 3).reshape(-1)
        pos.append(torch.stack([rows, cols], dim=-1).repeat(t, 1))
        frame_lens += [h * w] * t
        base += t * bh * bw
    widx = torch.cat(window_index)
    pos_hw = torch.cat(pos).view(-1, unit, 2)[widx].view(-1, 2)
    return VisionLayout(
        window_index=to_device(widx, device),
        reverse_index=to_device(torch.argsort(widx), device),
        windows=VarlenGroups(torch.cat(window_lens).tolist(), device),
        images=VarlenGroups(frame_lens, device),
        pos_hw=to_device(pos_hw, device),
    )


class VisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(
            cfg.in_channels, cfg.temporal_patch_size, cfg.patch_size, cfg.hidden_size, bias=False
        )
        self.blocks = nn.ModuleList([VisionBlock(cfg) for _ in range(cfg.depth)])
        self.merger = PatchMerger(cfg)
        self.head_dim = cfg.hidden_size // cfg.num_heads

    def rotary(self, pos_hw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 2) patch (row, col) -> cos, sin (N, head_dim): the first half of the rotary slots follow the
        row, the second half the column."""
        return vision_rotary(pos_hw, self.head_dim, self.cfg.rope_theta)

    def forward(self, patches: torch.Tensor, grids: list[tuple[int, int, int]]) -> torch.Tensor:
        """patches (N, C*T*P*P) for all images, grids [(t, h, w)] -> (N / merge**2, out_hidden)."""
        layout = vision_layout(grids, self.cfg, patches.device)
        unit = self.cfg.spatial_merge_size**2
        x = self.patch_embed(patches)  # (N, hidden)
        n = x.shape[0]
        x = x.view(n // unit, unit, -1)[layout.window_index].view(n, -1)  # window order
        cos, sin = self.rotary(layout.pos_hw)
        full = set(self.cfg.fullatt_block_indexes)
        for i, block in enumerate(self.blocks):
            # NOTE: full attention is per image: image boundaries, while the patches are in window order.
            # That is sound because windows never straddle images, so each image's patches stay contiguous.
            x = block(x, layout.images if i in full else layout.windows, cos, sin)
        return self.merger(x)[layout.reverse_index]  # (N / unit, out_hidden), raster order


# ------------------------------------------------------------------------------------------ the model


class Qwen2_5_VLForConditionalGeneration(VisionLanguageModel):
    FAMILY = "Qwen2.5-VL"

    def __init__(self, cfg: Qwen2_5_VLConfig, tp: TensorParallel | None = None) -> None:
        super().__init__(cfg, VisionTransformer(cfg.vision), Qwen2Model(cfg.text, tp), tp)
