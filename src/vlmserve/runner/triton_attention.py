"""Paged decode attention in Triton (GPU), split over the sequence like flash-decoding.

One new query token per sequence attends to its whole paged KV history. Grid: (sequence, KV head,
partition). Each program loads the query heads that share its KV head (grouped-query attention: the group is
padded to 16 rows for tl.dot), walks its partition of the sequence BLOCK_N tokens at a time through the block
table, and writes an unnormalised partial result with its running max and sum; a small reduction merges the
partitions. Shapes are static given (batch, max partitions), so the kernel can live inside a CUDA graph:
sequence lengths and block tables are read from device memory, and partitions past a sequence's end return
at once without writing anything (the merge reads only the partitions a sequence's length covers), so a
generous partition count (max_model_len's) costs a launch slot per empty program, not memory traffic.

The partition length depends on the batch (`partition_for`): a few sequences need short partitions to give
every SM work (one W1 sequence in 256-token partitions is 20 programs on 132 SMs), many sequences fill the GPU
with long ones and fewer partials to merge.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
import triton
import triton.language as tl

from vlmserve.devices import to_device
from vlmserve.models.layers.attention import flash_varlen
from vlmserve.runner.attention import PagedAttentionMetadata, TorchPagedAttention, token_slots
from vlmserve.runner.kv_quant import FP8_KV, FP8_KV_SCALE, from_cache, gather, write_kv

PARTITION = 256  # tokens per program at larger batches
SMALL_BATCH_PARTITION = 64  # at (sequences x KV heads) <= SMALL_BATCH_PROGRAMS
SMALL_BATCH_PROGRAMS = 32
BLOCK_N = 64  # tokens per inner iteration (several pages gathered at once)


def partition_for(batch: int, kv_heads: int) -> int:
    """Tokens per program for a decode batch: short partitions when few (sequence, KV head) pairs would leave
    most SMs idle."""
    return SMALL_BATCH_PARTITION if batch * kv_heads <= SMALL_BATCH_PROGRAMS else PARTITION


@triton.jit(do_not_specialize=["stride_bt"])  # the eager path's table width changes from step to step
def _paged_decode_partial(
    q_ptr,  # (B, Hq, D)
    k_cache_ptr,  # (num_blocks, page, Hkv, D)
    v_cache_ptr,
    block_tables_ptr,  # (B, max_blocks) int32
    seq_lens_ptr,  # (B,) int32
    acc_ptr,  # (B, Hq, P, D) float32
    max_ptr,  # (B, Hq, P) float32
    sum_ptr,  # (B, Hq, P) float32
    scale,
    v_scale,  # the V cache's per-tensor scale (1.0 unless it is FP8 with another); K's is folded into scale
    stride_qb,
    stride_qh,
    stride_kslot,
    stride_kh,
    stride_bt,
    num_partitions,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PAGE: tl.constexpr,
    PART: tl.constexpr,
    BN: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    part = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + b)
    start = part * PART
    rows = tl.arange(0, GROUP_PAD)
    dims = tl.arange(0, HEAD_DIM)
    row_ok = rows < GROUP
    heads = kvh * GROUP + rows
    out_off = (b * tl.num_programs(1) * GROUP + heads) * num_partitions + part  # (GROUP_PAD,)
    if start >= seq_len:
        return  # the merge does not read partitions past the sequence's end
    q = tl.load(
        q_ptr + b * stride_qb + heads[:, None] * stride_qh + dims[None, :], mask=row_ok[:, None], other=0.0
    )  # (GROUP_PAD, D)
    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    end = tl.minimum(start + PART, seq_len)
    for n0 in range(start, end, BN):
        toks = n0 + tl.arange(0, BN)
        tok_ok = toks < end
        page = tl.load(block_tables_ptr + b * stride_bt + toks // PAGE, mask=tok_ok, other=0)
        slot = page.to(tl.int64) * PAGE + toks % PAGE
        kv_off = slot[:, None] * stride_kslot + kvh * stride_kh + dims[None, :]
        # An FP8 cache is converted in registers (its bytes are what the loop streams).
        k = tl.load(k_cache_ptr + kv_off, mask=tok_ok[:, None], other=0.0).to(q.dtype)  # (BN, D)
        s = tl.dot(q, tl.trans(k)) * scale  # (GROUP_PAD, BN)
        s = tl.where(tok_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_cache_ptr + kv_off, mask=tok_ok[:, None], other=0.0).to(q.dtype)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    tl.store(acc_ptr + out_off[:, None] * HEAD_DIM + dims[None, :], acc * v_scale, mask=row_ok[:, None])
    tl.store(max_ptr + out_off, m_i, mask=row_ok)
    tl.store(sum_ptr + out_off, l_i, mask=row_ok)


@triton.jit
def _merge_partitions(
    acc_ptr,  # (B * Hq, P, D) float32
    max_ptr,  # (B * Hq, P)
    sum_ptr,
    out_ptr,  # (B * Hq, D) in q's dtype
    seq_lens_ptr,  # (B,) int32
    num_heads,
    num_partitions,
    HEAD_DIM: tl.constexpr,
    P_PAD: tl.constexpr,
    PART: tl.constexpr,
):
    """out = sum_p e^(m_p - M) acc_p / sum_p e^(m_p - M) l_p over the partitions the sequence's length
    covers (the others were never written), one program per (sequence, head)."""
    row = tl.program_id(0)
    seq_len = tl.load(seq_lens_ptr + row // num_heads)
    parts = tl.arange(0, P_PAD)
    ok = parts < tl.minimum(tl.cdiv(seq_len, PART), num_partitions)
    m = tl.load(max_ptr + row * num_partitions + parts, mask=ok, other=float("-inf"))
    l_ = tl.load(sum_ptr + row * num_partitions + parts, mask=ok, other=0.0)
    w = tl.exp(m - tl.max(m, 0))  # masked partitions: e^-inf = 0 (every sequence has a token, M is finite)
    dims = tl.arange(0, HEAD_DIM)
    acc = tl.load(
        acc_ptr + (row * num_partitions + parts[:, None]) * HEAD_DIM + dims[None, :],
        mask=ok[:, None],
        other=0.0,
    )
    out = tl.sum(acc * w[:, None], 0) / tl.sum(l_ * w, 0)
    tl.store(out_ptr + row * HEAD_DIM + dims, out.to(out_ptr.dtype.element_ty))


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    max_seq_len: int,
) -> torch.Tensor:
    """q (B, Hq, D); caches (N, page, Hkv, D); block_tables (B, max_blocks) int32; seq_lens (B,) int32.

    max_seq_len (no sequence is longer) sets the partition count: fixed for a given batch size (max_model_len
    in the CUDA graphs and the eager steps alike), so serving compiles no new variants. Returns (B, Hq, D) in
    q's dtype.
    """
    bsz, hq, dim = q.shape
    _, page, hkv, _ = k_cache.shape
    group = hq // hkv
    part = partition_for(bsz, hkv)
    num_partitions = -(-max_seq_len // part)
    acc = torch.empty(bsz, hq, num_partitions, dim, device=q.device, dtype=torch.float32)
    mx = torch.empty(bsz, hq, num_partitions, device=q.device, dtype=torch.float32)
    sm = torch.empty_like(mx)
    kv_scale = FP8_KV_SCALE if k_cache.dtype == FP8_KV else 1.0
    _paged_decode_partial[(bsz, hkv, num_partitions)](
        q,
        k_cache,
        v_cache,
        block_tables,
        seq_lens,
        acc,
        mx,
        sm,
        scale * kv_scale,
        kv_scale,
        q.stride(0),
        q.stride(1),
        k_cache.stride(1),
        k_cache.stride(2),
        block_tables.stride(0),
        num_partitions,
        GROUP=group,
        GROUP_PAD=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=dim,
        PAGE=page,
        PART=part,
        BN=BLOCK_N,
        num_warps=4,
    )
    out = torch.empty_like(q)
    _merge_partitions[(bsz * hq,)](
        acc,
        mx,
        sm,
        out,
        seq_lens,
        hq,
        num_partitions,
        HEAD_DIM=dim,
        P_PAD=max(2, triton.next_power_of_2(num_partitions)),
        PART=part,
    )
    return out


class TritonDecodeAttention:
    """AttentionBackend for a batch where every sequence has exactly one new token (decode), graph-safe:
    every input is a device tensor of fixed shape."""

    def __init__(
        self,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        slot_mapping: torch.Tensor,  # (B,) int64
        block_tables: torch.Tensor,  # (B, max_blocks) int32
        seq_lens: torch.Tensor,  # (B,) int32
        scale: float,
        max_seq_len: int,
    ) -> None:
        self.kv_caches = kv_caches
        self.slot_mapping = slot_mapping
        self.block_tables = block_tables
        self.seq_lens = seq_lens
        self.scale = scale
        self.max_seq_len = max_seq_len

    def __call__(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        k_cache, v_cache = self.kv_caches[layer_idx]
        write_kv(k_cache, v_cache, self.slot_mapping, k, v)
        return paged_decode_attention(
            q, k_cache, v_cache, self.block_tables, self.seq_lens, self.scale, self.max_seq_len
        )


class TritonPagedAttention(TorchPagedAttention):
    """AttentionBackend for the GPU's eager steps (prefill chunks mixed with decodes): the decode rows go
    through the paged Triton kernel, which reads each history in place instead of gathering every decode
    row's whole KV into one padded copy per layer; the prefill rows (in half precision) go through one
    variable-length flash call over their gathered contexts, the torch backend's per-row path otherwise.

    `max_seq_len` is max_model_len (as in the CUDA graphs), not this step's longest sequence: the merge
    kernel's partition count is a compile-time constant, and one per step would compile new variants while
    serving."""

    def __init__(
        self,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        meta: PagedAttentionMetadata,
        scale: float,
        max_seq_len: int,
    ) -> None:
        super().__init__(kv_caches, meta, scale)
        self.max_seq_len = max_seq_len
        if meta.decode_rows:
            self.decode_tables_i32 = self.decode_tables.to(torch.int32)
        self._flash: tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor, int, int] | None = (
            None
        )
        half = kv_caches[0][0].dtype in (torch.float16, torch.bfloat16, FP8_KV)
        if meta.prefill_rows and half and meta.host_block_tables is not None:
            self._flash = self._flash_inputs(meta, kv_caches[0][0].shape[1], kv_caches[0][0].device)

    def _flash_inputs(
        self, meta: PagedAttentionMetadata, page: int, device: torch.device
    ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor, int, int]:
        """For one flash call over every prefill row: their query rows (None when that is every row), the
        cache slots of their whole contexts in order, and cumulative query / context starts."""
        assert meta.host_block_tables is not None
        rows = meta.prefill_rows
        q_rows = np.concatenate([np.arange(self.q_starts[r], self.q_starts[r + 1]) for r in rows])
        slots = np.concatenate(
            [token_slots(meta.host_block_tables[r], 0, meta.seq_lens[r], page) for r in rows]
        )
        q_lens = [meta.query_lens[r] for r in rows]
        k_lens = [meta.seq_lens[r] for r in rows]
        cu = torch.tensor(
            [[0, *itertools.accumulate(q_lens)], [0, *itertools.accumulate(k_lens)]], dtype=torch.int32
        )
        every_row = len(rows) == len(meta.query_lens)
        return (
            None if every_row else to_device(torch.from_numpy(q_rows), device),
            to_device(torch.from_numpy(slots), device),
            *to_device(cu, device),
            max(q_lens),
            max(k_lens),
        )

    def _prefill(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor
    ) -> None:
        """Every prefill row in one variable-length flash call (grouped-query aware, causal from the bottom
        right), over their contexts gathered once per layer, instead of a gather + SDPA per row."""
        same = q.dtype == k_cache.dtype or (k_cache.dtype == FP8_KV and q.dtype != torch.float32)
        if self._flash is None or not same:
            super()._prefill(q, k_cache, v_cache, out)
            return
        q_rows, slots, cu_q, cu_k, max_q, max_k = self._flash
        _, _, hkv, dim = k_cache.shape
        ks = from_cache(gather(k_cache.view(-1, hkv, dim), slots), q.dtype)
        vs = from_cache(gather(v_cache.view(-1, hkv, dim), slots), q.dtype)
        qp = q if q_rows is None else q.index_select(0, q_rows)
        res = flash_varlen(qp, ks, vs, cu_q, cu_k, max_q, max_k, self.scale, causal=True)
        if q_rows is None:
            out.copy_(res)
        else:
            out.index_copy_(0, q_rows, res)

    def _decode(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        return paged_decode_attention(
            q[self.decode_q_index],
            k_cache,
            v_cache,
            self.decode_tables_i32,
            self.decode_lens,
            self.scale,
            self.max_seq_len,
        )
