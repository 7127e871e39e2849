"""Paged attention in plain torch: correct on any device, the reference for faster kernels.

The KV cache of each layer is a pair of (num_blocks, block_size, Hkv, D) tensors. A sequence's tokens live in
the blocks of its block table, in order. Per forward, `PagedAttentionMetadata` says where each new token's
K/V goes (slot_mapping) and which cached tokens each sequence attends to.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from vlmserve.devices import to_device
from vlmserve.models.layers.attention import causal_attention
from vlmserve.runner.kv_quant import from_cache, gather, write_kv


@dataclass
class PagedAttentionMetadata:
    slot_mapping: torch.Tensor  # (T,) int64: block_id * block_size + offset of each new token
    query_lens: list[int]  # (B,) new tokens per sequence, packed in this order
    seq_lens: list[int]  # (B,) context length per sequence after this step (cached + new)
    block_tables: torch.Tensor  # (B, max_blocks) int64, padded with 0 (never read past seq_len)
    # Sequences with exactly one new token (decodes) go through one batched call.
    decode_rows: list[int]
    prefill_rows: list[int]
    host_block_tables: list[list[int]] | None = None  # the block tables as built on the host, if at hand


def token_slots(table: Sequence[int], start: int, end: int, block_size: int) -> np.ndarray:
    """Cache slots (block id * block_size + offset) of a sequence's tokens [start, end), given its block table."""
    idx = np.arange(start, end)
    return np.asarray(table, dtype=np.int64)[idx // block_size] * block_size + idx % block_size


def padded_block_tables(tables: Sequence[Sequence[int]], dtype: type = np.int64) -> np.ndarray:
    """(B, longest) block tables, padded with block 0 (never read: attention stops at each sequence's length)."""
    out = np.zeros((len(tables), max(len(t) for t in tables)), dtype=dtype)
    for i, t in enumerate(tables):
        out[i, : len(t)] = t
    return out


class TorchPagedAttention:
    """AttentionBackend over a paged KV cache, in torch ops."""

    def __init__(
        self, kv_caches: list[tuple[torch.Tensor, torch.Tensor]], meta: PagedAttentionMetadata, scale: float
    ) -> None:
        self.kv_caches = kv_caches
        self.meta = meta
        self.scale = scale
        m = meta
        self._decode_mask: torch.Tensor | None = None
        self.q_starts = [0]
        for n in m.query_lens:
            self.q_starts.append(self.q_starts[-1] + n)
        if m.decode_rows:
            dev = m.block_tables.device
            # Built from the host lists (never read back from the device): on a GPU, this runs while the
            # previous step may still be executing.
            lens_host = [m.seq_lens[r] for r in m.decode_rows]
            self.decode_max_len = max(lens_host)
            block_size = kv_caches[0][0].shape[1]
            self.decode_q_index = to_device(torch.tensor([self.q_starts[r] for r in m.decode_rows]), dev)
            self.decode_lens = to_device(torch.tensor(lens_host, dtype=torch.int32), dev)
            rows = to_device(torch.tensor(m.decode_rows), dev)
            self.decode_tables = m.block_tables[rows, : -(-self.decode_max_len // block_size)]  # (Bd, nb)

    def _decode(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        """Attention of the decode rows (one new token each): (Bd, Hq, D)."""
        _, _, hkv, dim = k_cache.shape
        hq = q.shape[1]
        bd = len(self.meta.decode_rows)
        # Grouped-query attention without copying K/V per query head: query head h reads KV head
        # h // (hq // hkv), so the group's query heads become the query rows of one call per KV head.
        qd = q[self.decode_q_index].view(bd, hkv, hq // hkv, dim)  # (Bd, Hkv, G, D)
        # index_select, not advanced indexing: the same gather, several times faster on CPU.
        tables = self.decode_tables.flatten()
        kd = gather(k_cache, tables).view(bd, -1, hkv, dim)[:, : self.decode_max_len]
        vd = gather(v_cache, tables).view(bd, -1, hkv, dim)[:, : self.decode_max_len]
        kd, vd = (from_cache(t.transpose(1, 2), q.dtype) for t in (kd, vd))  # (Bd, Hkv, S, D)
        if self._decode_mask is None:  # once per forward, not per layer
            # (Bd, 1, 1, S) key mask: positions past each sequence's length are padding.
            pos = torch.arange(self.decode_max_len, device=q.device)
            self._decode_mask = (pos[None, :] < self.decode_lens[:, None])[:, None, None, :]
        od = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=self._decode_mask, scale=self.scale)
        return od.reshape(bd, hq, dim)

    def __call__(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        k_cache, v_cache = self.kv_caches[layer_idx]  # (N, bs, Hkv, D)
        write_kv(k_cache, v_cache, self.meta.slot_mapping, k, v)
        out = torch.empty_like(q)  # (T, Hq, D)
        if self.meta.prefill_rows:
            self._prefill(q, k_cache, v_cache, out)
        if self.meta.decode_rows:
            out[self.decode_q_index] = self._decode(q, k_cache, v_cache)
        return out

    def _prefill(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor
    ) -> None:
        """Causal attention of the prefill rows (several new tokens each) into their rows of `out`."""
        _, block_size, hkv, dim = k_cache.shape
        m = self.meta
        for r in m.prefill_rows:
            s, e, seq_len = self.q_starts[r], self.q_starts[r + 1], m.seq_lens[r]
            table = m.block_tables[r, : -(-seq_len // block_size)]
            ks = gather(k_cache, table).view(-1, hkv, dim)[:seq_len]
            vs = gather(v_cache, table).view(-1, hkv, dim)[:seq_len]
            out[s:e] = causal_attention(q[s:e], from_cache(ks, q.dtype), from_cache(vs, q.dtype), self.scale)
