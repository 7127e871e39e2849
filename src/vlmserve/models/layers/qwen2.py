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

from vlmserve.models.layers import fused
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
        qkv = self.qkv_proj(x)
        v = qkv[:, self.q_size + self.kv_size :].view(t, self.num_kv_heads, self.head_dim)
        if self.qk_norm and fused.use_fused(qkv) and self.q_norm.weight.dtype == qkv.dtype:
            # both norms and the rotary in one launch instead of four (Qwen3's decode step is launch-bound)
            qk = qkv[:, : self.q_size + self.kv_size].view(
                t, self.num_heads + self.num_kv_heads, self.head_dim
            )
            qk = fused.qk_norm_rotary(
                qk, self.q_norm.weight, self.k_norm.weight, self.num_heads, self.q_norm.eps, cos, sin
            )
            q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
        elif self.qk_norm:
            q, k = qkv[:, : self.q_size + self.kv_size].split([self.q_size, self.kv_size], dim=-1)
            q = apply_rotary(self.q_norm(q.reshape(t, self.num_heads, self.head_dim)), cos, sin)
            k = apply_rotary(self.k_norm(k.reshape(t, self.num_kv_heads, self.head_dim)), cos, sin)
        else:  # q's and k's heads lie side by side in the projection's output: one rotary over both
            qk = qkv[:, : self.q_size + self.kv_size].view(
                t, self.num_heads + self.num_kv_heads, self.head_dim
            )
            q, k = apply_rotary(qk, cos, sin).split([self.num_heads, self.num_kv_heads], dim=1)
        out = attn(self.layer_idx, q, k, v)  # (T, Hq, D)
        return self.o_proj(out.reshape(t, self.q_size))


class DecoderLayer(nn.Module):
    """Pre-norm residual block around the given attention and MLP (a family passes its own variants).

    The residual stream is carried as (residual, delta): a layer returns its MLP's output and the residual
    before it instead of their sum, so each residual add happens inside the next norm's kernel (`add_forward`)
    with the same rounding as the plain sum. The first layer gets delta=None (the embeddings are the residual);
    the model's final norm adds the last delta."""

    def __init__(self, cfg: Qwen2TextConfig, self_attn: nn.Module, mlp: nn.Module) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.self_attn = self_attn
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.mlp = mlp

    def forward(
        self,
        residual: torch.Tensor,
        delta: torch.Tensor | None,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attn: AttentionBackend,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(residual, delta) -> (residual, delta) of the next layer; the hidden state is their sum."""
        if delta is None:
            h = self.input_layernorm(residual)
        else:
            residual, h = self.input_layernorm.add_forward(delta, residual)
        residual, h = self.post_attention_layernorm.add_forward(self.self_attn(h, cos, sin, attn), residual)
        return residual, self.mlp(h)


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
        residual, delta = embeds, None
        for layer in self.layers:
            residual, delta = layer(residual, delta, cos, sin, attn)
        return self.norm.add_forward(delta, residual)[1]
