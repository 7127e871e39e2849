"""Attention primitives the model files call.

- `varlen_attention`: bidirectional attention over packed variable-length sequences (the vision tower's
  windows and images). Plain torch: sequences are padded into one batch with a key mask, one SDPA call.
- `AttentionBackend`: what the language model's attention layers call for causal attention with a KV cache.
  The model never knows how the cache is laid out; the runner passes a backend per forward (paged KV on the
  engine path, a contiguous per-sequence cache on the reference path below).
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F


def varlen_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, scale: float
) -> torch.Tensor:
    """q, k, v (N, H, D) packed; cu_seqlens (S + 1,) boundaries. Each sequence attends only to itself.

    Returns (N, H, D).
    """
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    lengths = [n for n in lengths if n > 0]
    n_tok, heads, dim = q.shape
    if len(set(lengths)) == 1:
        # All sequences the same length (one image, or every window full): a reshape, no padding.
        s, n = len(lengths), lengths[0]
        qb, kb, vb = (t.view(s, n, heads, dim).transpose(1, 2) for t in (q, k, v))  # (S, H, n, D)
        out = F.scaled_dot_product_attention(qb, kb, vb, scale=scale)
        return out.transpose(1, 2).reshape(n_tok, heads, dim)
    max_len = max(lengths)
    s = len(lengths)
    starts = torch.tensor([0, *lengths[:-1]], device=q.device).cumsum(0)  # (S,)
    lens = torch.tensor(lengths, device=q.device)
    offs = torch.arange(max_len, device=q.device)
    valid = offs[None, :] < lens[:, None]  # (S, L)
    idx = (starts[:, None] + offs[None, :]).clamp(max=n_tok - 1)  # (S, L) gather index, padded rows repeat
    qb, kb, vb = (t[idx].transpose(1, 2) for t in (q, k, v))  # (S, H, L, D)
    mask = valid[:, None, None, :]  # (S, 1, 1, L): padded keys masked out
    out = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, scale=scale)  # (S, H, L, D)
    return out.transpose(1, 2)[valid]  # (N, H, D)


class AttentionBackend(Protocol):
    """Causal self-attention with a KV cache for one language-model forward.

    q (T, Hq, D), k and v (T, Hkv, D) are the new tokens of every sequence in the batch, packed; the backend
    stores k and v in its cache and returns (T, Hq, D).
    """

    def __call__(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor: ...


class ContiguousKVCache:
    """Reference backend: one sequence, its KV cache in growing per-layer tensors.

    Slow and simple on purpose: the oracle that the engine's paged path is checked against.
    """

    def __init__(self, num_layers: int, scale: float) -> None:
        self.scale = scale
        self.k: list[torch.Tensor | None] = [None] * num_layers
        self.v: list[torch.Tensor | None] = [None] * num_layers

    @property
    def num_cached(self) -> int:
        return 0 if self.k[0] is None else self.k[0].shape[0]

    def __call__(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        past_k, past_v = self.k[layer_idx], self.v[layer_idx]
        k_all = k if past_k is None else torch.cat([past_k, k])
        v_all = v if past_v is None else torch.cat([past_v, v])
        self.k[layer_idx], self.v[layer_idx] = k_all, v_all
        return causal_attention(q, k_all, v_all, self.scale)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q (Tq, Hq, D) are the last Tq positions of k, v (Tk, Hkv, D). Grouped-query aware. -> (Tq, Hq, D)."""
    tq, hq, _ = q.shape
    tk, hkv, _ = k.shape
    qh = q.transpose(0, 1)  # (Hq, Tq, D)
    kh = k.transpose(0, 1)  # (Hkv, Tk, D)
    vh = v.transpose(0, 1)
    if hkv != hq:
        kh = kh.repeat_interleave(hq // hkv, dim=0)
        vh = vh.repeat_interleave(hq // hkv, dim=0)
    if tq == 1:
        out = F.scaled_dot_product_attention(qh, kh, vh, scale=scale)
    elif tq == tk:
        out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale)
    else:
        # Query i sits at absolute position tk - tq + i and sees keys up to it.
        rows = torch.arange(tk - tq, tk, device=q.device)[:, None]
        mask = torch.arange(tk, device=q.device)[None, :] <= rows  # (Tq, Tk)
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale)
    return out.transpose(0, 1)
