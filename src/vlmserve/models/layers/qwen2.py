"""The Qwen2 language model: GQA attention with qkv bias, sectioned multimodal RoPE, RMSNorm, SwiGLU.

Qwen2-VL and Qwen2.5-VL use the very same language model; their family files own their configs, vision towers
and the wrapper, and build this one. Qwen3-VL builds its own model from this file's attention (with its q/k
norms) and decoder block (with its mixture of experts on sparse layers). Parameter names follow the released checkpoints under `model.*`
(`layers.N.self_attn.qkv_proj` with q/k/v fused, `layers.N.mlp.gate_up_proj`).

Does not know: vision, the KV cache (the attention backend passed per step owns it), sampling.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from vlmserve.models.layers.attention import AttentionBackend
from vlmserve.models.layers.mlp import GatedMLP
from vlmserve.models.layers.norm import RMSNorm
from vlmserve.models.layers.parallel import (
    TensorParallel,
    embedding,
    kv_heads_per_rank,
    qkv_linear,
    row_linear,
)
from vlmserve.models.layers.rotary import MRotaryEmbedding, apply_rotary


class Qwen2TextConfig(Protocol):
    """What the language model reads of a family's text config."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    rms_norm_eps: float
    rope_theta: float
    mrope_section: tuple[int, ...]
    max_position_embeddings: int

    @property
    def head_dim(self) -> int: ...


class Attention(nn.Module):
    """With `tp`, this rank's query heads and the KV heads they read (models/layers/parallel.py).

    Qwen2's is the default (bias on q/k/v only); Qwen3's passes its biases and `qk_norm` (an RMSNorm over each
    head of q and of k, before the rotary)."""

    def __init__(
        self,
        cfg: Qwen2TextConfig,
        layer_idx: int,
        tp: TensorParallel | None = None,
        qkv_bias: bool = True,
        o_bias: bool = False,
        qk_norm: bool = False,
    ) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.num_heads = heads if tp is None else tp.split(heads, "num_attention_heads")
        self.num_kv_heads = kv_heads if tp is None else kv_heads_per_rank(kv_heads, tp)
        self.head_dim = cfg.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = qkv_linear(cfg.hidden_size, heads, kv_heads, self.head_dim, qkv_bias, tp)
        self.o_proj = row_linear(heads * self.head_dim, cfg.hidden_size, o_bias, tp)
        self.qk_norm = qk_norm
        if qk_norm:
            self.q_norm = RMSNorm(self.head_dim, eps=cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, eps=cfg.rms_norm_eps)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn: AttentionBackend
    ) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(t, self.num_heads, self.head_dim)  # (T, Hq, D)
        k = k.reshape(t, self.num_kv_heads, self.head_dim)  # (T, Hkv, D)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        out = attn(self.layer_idx, q, k, v)  # (T, Hq, D)
        return self.o_proj(out.reshape(t, self.q_size))


class DecoderLayer(nn.Module):
    """Pre-norm residual block around the given attention and MLP (a family passes its own variants)."""

    def __init__(self, cfg: Qwen2TextConfig, self_attn: nn.Module, mlp: nn.Module) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.self_attn = self_attn
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.mlp = mlp

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn: AttentionBackend
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attn)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen2Model(nn.Module):
    def __init__(self, cfg: Qwen2TextConfig, tp: TensorParallel | None = None) -> None:
        super().__init__()
        self.embed_tokens = embedding(cfg.vocab_size, cfg.hidden_size, tp)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, Attention(cfg, i, tp), GatedMLP(cfg.hidden_size, cfg.intermediate_size, tp=tp))
            for i in range(cfg.num_hidden_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.rotary = MRotaryEmbedding(
            cfg.head_dim, cfg.rope_theta, list(cfg.mrope_section), cfg.max_position_embeddings
        )

    def forward(self, embeds: torch.Tensor, positions: torch.Tensor, attn: AttentionBackend) -> torch.Tensor:
        """embeds (T, hidden); positions (3, T) multimodal or (T,) text-only -> (T, hidden) final-normed."""
        cos, sin = self.rotary(positions)  # (T, D) each, computed once for all layers
        x = embeds
        for layer in self.layers:
            x = layer(x, cos, sin, attn)
        return self.norm(x)
