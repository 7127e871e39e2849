"""Attention primitives the model files call.

- `varlen_attention`: bidirectional attention over packed variable-length sequences (the vision tower's
  windows and images): one variable-length flash call on a GPU in half precision (`flash_varlen`, also what
  the GPU's paged prefill uses), else one mask-free SDPA call per distinct sequence length.
- `AttentionBackend`: what the language model's attention layers call for causal attention with a KV cache.
  The model never knows how the cache is laid out; the runner passes a backend per forward (paged KV on the
  engine path, a contiguous per-sequence cache on the reference path below).
"""

from __future__ import annotations

import itertools
from typing import Protocol

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from vlmserve.devices import to_device


class VarlenGroups:
    """A packed batch of independent sequences (lengths known on the host).

    On a GPU in half precision: one variable-length flash-attention call over cumulative sequence starts
    (no padding, no mask, no gathers). Otherwise: the sequences grouped by length, one mask-free SDPA call
    per distinct length. Never synchronises with the device.
    """

    def __init__(self, lengths: list[int], device: torch.device | str) -> None:
        self.lengths = [n for n in lengths if n > 0]
        self.device = torch.device(device)
        self.max_len = max(self.lengths)
        self.cu_seqlens: torch.Tensor | None = None  # (S + 1,) int32 sequence starts, on a CUDA device
        if self.device.type == "cuda":
            self.cu_seqlens = to_device(
                torch.tensor([0, *itertools.accumulate(self.lengths)], dtype=torch.int32), device
            )
        self._groups: list[tuple[int, torch.Tensor | None]] | None = None

    @property
    def groups(self) -> list[tuple[int, torch.Tensor | None]]:
        """(length, row indices of all sequences of that length, in order; None when that is every row)."""
        if self._groups is None:
            if len(set(self.lengths)) == 1:
                self._groups = [(self.lengths[0], None)]
            else:
                by_len: dict[int, list[int]] = {}
                start = 0
                for n in self.lengths:
                    by_len.setdefault(n, []).extend(range(start, start + n))
                    start += n
                self._groups = [(n, to_device(torch.tensor(rows), self.device)) for n, rows in by_len.items()]
        return self._groups


def flash_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_q: torch.Tensor,
    cu_k: torch.Tensor,
    max_q: int,
    max_k: int,
    scale: float,
    causal: bool,
) -> torch.Tensor:
    """Flash attention over packed sequences: q (Tq, Hq, D), k and v (Tk, Hkv, D) (grouped-query aware), cu_q /
    cu_k (S + 1,) int32 sequence starts. Causal masks align bottom right (query i of a sequence with more keys
    than queries sees the keys up to its own position). fp16 / bf16 on CUDA only. -> (Tq, Hq, D)."""
    return torch.ops.aten._flash_attention_forward(
        q, k, v, cu_q, cu_k, max_q, max_k, 0.0, causal, False, scale=scale
    )[0]


def varlen_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seqs: VarlenGroups, scale: float
) -> torch.Tensor:
    """q, k, v (N, H, D) packed; each sequence attends only to itself (bidirectional). Returns (N, H, D)."""
    if seqs.cu_seqlens is not None and q.dtype in (torch.float16, torch.bfloat16):
        cu, n = seqs.cu_seqlens, seqs.max_len
        return flash_varlen(q, k, v, cu, cu, n, n, scale, causal=False)
    _, heads, dim = q.shape
    out = torch.empty_like(q) if len(seqs.groups) > 1 else None
    for length, rows in seqs.groups:
        qg, kg, vg = (t if rows is None else t[rows] for t in (q, k, v))
        s = qg.shape[0] // length
        qb, kb, vb = (t.view(s, length, heads, dim).transpose(1, 2) for t in (qg, kg, vg))  # (S, H, L, D)
        res = F.scaled_dot_product_attention(qb, kb, vb, scale=scale).transpose(1, 2).reshape(-1, heads, dim)
        if out is None:
            return res
        out[rows] = res
    return out


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
    # NOTE: 4-D (batch of one): the fused flash / memory-efficient kernels take only 4-D inputs; 3-D ones
    # fall back to the math path, which on GPU also upcasts bf16 to float32.
    qh = q.transpose(0, 1)[None]  # (1, Hq, Tq, D)
    kh = k.transpose(0, 1)[None]  # (1, Hkv, Tk, D)
    vh = v.transpose(0, 1)[None]
    # On CPU, SDPA reads each KV head for its query heads itself (enable_gqa), saving a copy of K and V per
    # query head; the CUDA path keeps the explicit copy its fused kernels are proven with.
    gqa = hkv != hq and not q.is_cuda
    if hkv != hq and not gqa:
        kh = kh.repeat_interleave(hq // hkv, dim=1)
        vh = vh.repeat_interleave(hq // hkv, dim=1)
    if tq == 1:
        out = F.scaled_dot_product_attention(qh, kh, vh, scale=scale, enable_gqa=gqa)
    elif tq == tk:
        out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale, enable_gqa=gqa)
    else:
        # Query i sits at absolute position tk - tq + i and sees keys up to it: a causal mask aligned to the
        # bottom right, which the fused kernels take as a flag (an explicit boolean mask would send SDPA to
        # its float32 math fallback on GPU).
        mask = causal_lower_right(tq, tk)
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale, enable_gqa=gqa)
    return out[0].transpose(0, 1)
