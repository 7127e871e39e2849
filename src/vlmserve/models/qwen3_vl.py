"""Qwen3-VL (dense and MoE) in native PyTorch, read top to bottom.

    config -> vision tower (patch embedding with bias, learned position embeddings interpolated to the image
              grid, 2-D rotary, full-attention LayerNorm blocks with a GELU(tanh) MLP, 2x2 patch merger, and
              DeepStack mergers on some intermediate blocks)
           -> language model (Qwen3: GQA, RMSNorm on q and k per head, interleaved multimodal RoPE, SwiGLU MLP
              or a sparse MoE block) with the DeepStack features added to the image tokens' hidden states
              after each of the first layers -> logits

DeepStack and the runner: `encode_images` returns, per image token, the final merger's row and each DeepStack
merger's row side by side, (tokens, (1 + n_deepstack) * hidden), so the encoder cache and the prefix-cache
bookkeeping keep treating one image as one block of rows. `embed` then returns (T, (1 + n_deepstack) * hidden)
when the step holds image rows (text rows carry zeros in the DeepStack columns, which adding changes nothing)
and `forward` splits it. A step without images (decode, CUDA graphs) stays (T, hidden).

Parameter names follow the released checkpoints (`model.visual.*`, `model.language_model.*`, `lm_head.*`),
mapped to `visual.*` / `model.*`, with q/k/v and gate/up fused. MoE experts are stored as released, stacked per
layer as (experts, in, out); `convert_tensor` transposes them into (experts, out, in).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vlmserve.devices import to_device
from vlmserve.models.layers.attention import AttentionBackend, VarlenGroups
from vlmserve.models.layers.mlp import GatedMLP
from vlmserve.models.layers.moe import SparseMoE
from vlmserve.models.layers.norm import RMSNorm
from vlmserve.models.layers.parallel import (
    TensorParallel,
    embedding,
)
from vlmserve.models.layers.qwen2 import Attention, DecoderLayer
from vlmserve.models.layers.rotary import MRotaryEmbedding
from vlmserve.models.layers.vision import PatchEmbed, VisionAttention, patch_positions, vision_rotary
from vlmserve.models.layers.vlm import VisionLanguageModel

ARCHITECTURES = ("Qwen3VLForConditionalGeneration",)
MOE_ARCHITECTURES = ("Qwen3VLMoeForConditionalGeneration",)


# ----------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class VisionConfig:
    depth: int = 27
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 16
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    hidden_act: str = "gelu_pytorch_tanh"
    out_hidden_size: int = 4096
    num_position_embeddings: int = 2304
    deepstack_visual_indexes: tuple[int, ...] = (8, 16, 24)
    rope_theta: float = 10000.0


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 151936
    hidden_size: int = 4096
    intermediate_size: int = 12288
    num_hidden_layers: int = 36
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int = 128
    rms_norm_eps: float = 1e-6
    rope_theta: float = 5_000_000.0
    mrope_section: tuple[int, ...] = (24, 20, 20)
    mrope_interleaved: bool = True
    max_position_embeddings: int = 262144
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    # Mixture of experts (Qwen3-VL-MoE); num_experts = 0 is the dense model.
    num_experts: int = 0
    num_experts_per_tok: int = 8
    moe_intermediate_size: int = 768
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()

    def is_sparse(self, layer_idx: int) -> bool:
        return (
            self.num_experts > 0
            and layer_idx not in self.mlp_only_layers
            and (layer_idx + 1) % self.decoder_sparse_step == 0
        )


@dataclass(frozen=True)
class Qwen3VLConfig:
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
    def from_dict(cls, cfg: dict[str, Any]) -> Qwen3VLConfig:
        """Parse config.json as released: text fields under "text_config" (RoPE under rope_scaling or
        rope_parameters), vision fields under "vision_config", token ids at the top level."""
        text = dict(cfg.get("text_config") or {})
        if "num_local_experts" in text and "num_experts" not in text:  # how transformers 5 saves it
            text["num_experts"] = text["num_local_experts"]
        rope = text.get("rope_scaling") or text.get("rope_parameters") or {}
        text_fields: dict[str, Any] = {k: text[k] for k in TextConfig.__dataclass_fields__ if k in text}
        text_fields["tie_word_embeddings"] = bool(
            cfg.get("tie_word_embeddings", False) or text.get("tie_word_embeddings", False)
        )
        for key in ("rope_theta", "mrope_interleaved"):
            if key in rope:
                text_fields[key] = rope[key]
        if "mrope_section" in rope:
            text_fields["mrope_section"] = tuple(rope["mrope_section"])
        text_fields["mlp_only_layers"] = tuple(text_fields.get("mlp_only_layers") or ())
        if text_fields.get("head_dim") is None:
            text_fields["head_dim"] = text["hidden_size"] // text["num_attention_heads"]
        if text_fields.get("num_key_value_heads") is None:
            text_fields["num_key_value_heads"] = text_fields["num_attention_heads"]
        vis = dict(cfg.get("vision_config") or {})
        vis_fields = {k: vis[k] for k in VisionConfig.__dataclass_fields__ if k in vis}
        vis_fields["deepstack_visual_indexes"] = tuple(vis_fields.get("deepstack_visual_indexes", ()))
        if "rope_theta" in (vis.get("rope_parameters") or {}):
            vis_fields["rope_theta"] = vis["rope_parameters"]["rope_theta"]
        # generation_config.json's eos (the loader puts it at the top level) wins over text_config's.
        eos = cfg.get("eos_token_id", text.get("eos_token_id"))
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        ids = {
            k: cfg[k]
            for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
            if k in cfg
        }
        return cls(
            text=TextConfig(**text_fields),
            vision=VisionConfig(**vis_fields),
            torch_dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or text.get("dtype") or "bfloat16"),
            eos_token_ids=eos_ids,
            raw=cfg,
            **ids,
        )


# --------------------------------------------------------------------------------------- vision tower


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        if cfg.hidden_act not in ("gelu_pytorch_tanh", "gelu"):
            raise ValueError(
                f"vision_config.hidden_act {cfg.hidden_act!r} is not supported; use gelu_pytorch_tanh or gelu"
            )
        self.approximate = "tanh" if cfg.hidden_act == "gelu_pytorch_tanh" else "none"
        self.linear_fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.linear_fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_fc2(F.gelu(self.linear_fc1(x), approximate=self.approximate))


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=1e-6)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=1e-6)
        self.attn = VisionAttention(cfg.hidden_size, cfg.num_heads)
        self.mlp = VisionMLP(cfg)

    def forward(
        self, x: torch.Tensor, seqs: VarlenGroups, cos: torch.Tensor, sin: torch.Tensor
    ) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), seqs, cos, sin)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """Each 2x2 group of neighbouring patches -> one LM-width row. The final merger normalises each patch
    before grouping; the DeepStack mergers (postshuffle) normalise the grouped row."""

    def __init__(self, cfg: VisionConfig, postshuffle: bool) -> None:
        super().__init__()
        self.merged_dim = cfg.hidden_size * cfg.spatial_merge_size**2
        self.postshuffle = postshuffle
        self.norm = nn.LayerNorm(self.merged_dim if postshuffle else cfg.hidden_size, eps=1e-6)
        self.linear_fc1 = nn.Linear(self.merged_dim, self.merged_dim)
        self.linear_fc2 = nn.Linear(self.merged_dim, cfg.out_hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.postshuffle:
            x = self.norm(x.view(-1, self.merged_dim))
        else:
            x = self.norm(x).view(-1, self.merged_dim)
        return self.linear_fc2(F.gelu(self.linear_fc1(x)))


def interpolation_taps(
    grids: list[tuple[int, int, int]], merge: int, side: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bilinear (align_corners) resampling of a side x side position table to each image's grid, as 4 taps
    per patch in the processor's patch order: indices (N, 4) into the flattened table, weights (N, 4)."""
    pos = to_device(patch_positions(grids, merge), device)  # (N, 2)
    sizes = to_device(
        torch.tensor([(h, w) for _, h, w in grids]).repeat_interleave(
            torch.tensor([t * h * w for t, h, w in grids]), 0
        ),
        device,
    )  # (N, 2) each patch's image grid (h, w)
    src = pos.float() * (side - 1) / torch.clamp(sizes - 1, min=1)  # (N, 2) source coordinates
    floor = torch.floor(src)
    offsets = torch.arange(2, device=device)
    taps = (floor.long()[..., None] + offsets).clamp(0, side - 1)  # (N, 2 axes, 2 taps)
    weights = (1 - (src[..., None] - floor[..., None] - offsets).abs()).clamp(min=0)
    indices = (taps[:, 0, :, None] * side + taps[:, 1, None, :]).reshape(-1, 4)
    return indices, (weights[:, 0, :, None] * weights[:, 1, None, :]).reshape(-1, 4)


class VisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(
            cfg.in_channels, cfg.temporal_patch_size, cfg.patch_size, cfg.hidden_size, bias=True
        )
        self.pos_embed = nn.Embedding(cfg.num_position_embeddings, cfg.hidden_size)
        self.side = int(cfg.num_position_embeddings**0.5)
        self.blocks = nn.ModuleList([VisionBlock(cfg) for _ in range(cfg.depth)])
        self.merger = PatchMerger(cfg, postshuffle=False)
        self.deepstack_merger_list = nn.ModuleList(
            [PatchMerger(cfg, postshuffle=True) for _ in cfg.deepstack_visual_indexes]
        )

    def forward(self, patches: torch.Tensor, grids: list[tuple[int, int, int]]) -> torch.Tensor:
        """patches (N, C*T*P*P), grids [(t, h, w)] -> (N / merge**2, (1 + n_deepstack) * out_hidden):
        the final merger's rows, then each DeepStack merger's, side by side."""
        x = self.patch_embed(patches)  # (N, hidden), processor order throughout
        idx, w = interpolation_taps(grids, self.cfg.spatial_merge_size, self.side, x.device)
        x = x + (self.pos_embed(idx) * w[..., None]).sum(1).to(x.dtype)
        pos_hw = to_device(patch_positions(grids, self.cfg.spatial_merge_size), x.device)
        cos, sin = vision_rotary(pos_hw, self.cfg.hidden_size // self.cfg.num_heads, self.cfg.rope_theta)
        frames = VarlenGroups([h * w for t, h, w in grids for _ in range(t)], x.device)
        deepstack = []
        for i, block in enumerate(self.blocks):
            x = block(x, frames, cos, sin)
            if i in self.cfg.deepstack_visual_indexes:
                merger = self.deepstack_merger_list[self.cfg.deepstack_visual_indexes.index(i)]
                deepstack.append(merger(x))
        return torch.cat([self.merger(x), *deepstack], dim=-1)


# ------------------------------------------------------------------------------------- language model


def decoder_layer(cfg: TextConfig, layer_idx: int, tp: TensorParallel | None) -> DecoderLayer:
    """Qwen2's block with Qwen3's attention (q/k RMSNorm per head, the config's biases) and, on sparse
    layers, the mixture of experts."""
    attention = Attention(
        cfg, layer_idx, tp, qkv_bias=cfg.attention_bias, o_bias=cfg.attention_bias, qk_norm=True
    )
    mlp: nn.Module
    if cfg.is_sparse(layer_idx):
        mlp = SparseMoE(
            cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts, cfg.num_experts_per_tok, tp
        )
    else:
        mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, tp=tp)
    return DecoderLayer(cfg, attention, mlp)


class Qwen3Model(nn.Module):
    def __init__(self, cfg: TextConfig, tp: TensorParallel | None = None) -> None:
        super().__init__()
        self.embed_tokens = embedding(cfg.vocab_size, cfg.hidden_size, tp)
        self.layers = nn.ModuleList([decoder_layer(cfg, i, tp) for i in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.rotary = MRotaryEmbedding(
            cfg.head_dim,
            cfg.rope_theta,
            list(cfg.mrope_section),
            cfg.max_position_embeddings,
            interleaved=cfg.mrope_interleaved,
        )

    def forward(
        self,
        embeds: torch.Tensor,
        positions: torch.Tensor,
        attn: AttentionBackend,
        deepstack: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """embeds (T, hidden); positions (3, T) or (T,); deepstack (T, n, hidden) added to the hidden states
        after layers 0 .. n-1 (zeros on text rows) -> (T, hidden) final-normed."""
        cos, sin = self.rotary(positions)  # (T, D) each, computed once for all layers
        residual, delta = embeds, None
        for i, layer in enumerate(self.layers):
            residual, delta = layer(residual, delta, cos, sin, attn)
            if deepstack is not None and i < deepstack.shape[1]:
                # The layer's hidden state, then the features added to it (the same two roundings as HF's).
                residual, delta = residual + delta, deepstack[:, i]
        return self.norm.add_forward(delta, residual)[1]


# ------------------------------------------------------------------------------------------ the model


class Qwen3VLForConditionalGeneration(VisionLanguageModel):
    """Each image's encoder output rows are (1 + n_deepstack) * hidden wide: the merged features, then the
    DeepStack features that `forward` adds into the first language-model layers."""

    FAMILY = "Qwen3-VL"

    def __init__(self, cfg: Qwen3VLConfig, tp: TensorParallel | None = None) -> None:
        super().__init__(cfg, VisionTransformer(cfg.vision), Qwen3Model(cfg.text, tp), tp)

    def embed(
        self,
        token_ids: torch.Tensor,
        image_embeds: torch.Tensor | None = None,
        image_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """token_ids (T,) -> (T, hidden); with images, (T, (1 + n_deepstack) * hidden) whose rows where
        image_mask is set are image_embeds' rows in order, the other rows the token embedding and zeros."""
        x = self.model.embed_tokens(token_ids)
        if image_embeds is None or image_mask is None:
            return x
        width = image_embeds.shape[-1]
        if width != x.shape[-1]:
            x = F.pad(x, (0, width - x.shape[-1]))
        return x.masked_scatter(image_mask[:, None], image_embeds.to(x.dtype))

    def forward(self, embeds: torch.Tensor, positions: torch.Tensor, attn: AttentionBackend) -> torch.Tensor:
        hidden = self.config.text.hidden_size
        if embeds.shape[-1] == hidden:
            return self.model(embeds, positions, attn)
        t = embeds.shape[0]
        deepstack = embeds[:, hidden:].view(t, -1, hidden)  # (T, n_deepstack, hidden)
        return self.model(embeds[:, :hidden], positions, attn, deepstack)

    def convert_tensor(self, name: str, tensor: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
        # Released MoE checkpoints stack experts as (E, in, out); ours are (E, out, in). Like HF, a tensor
        # that already has our shape is taken as it is.
        if ".mlp.experts." in name and tensor.dim() == 3 and tensor.shape != param.shape:
            return tensor.transpose(1, 2)
        return tensor


class Qwen3VLMoeForConditionalGeneration(Qwen3VLForConditionalGeneration):
    FAMILY = "Qwen3-VL-MoE"
