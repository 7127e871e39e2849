"""Sparse mixture-of-experts MLP (Qwen3-VL-MoE): a top-k router with normalised weights and SwiGLU experts.

Tokens are routed to `top_k` of `num_experts` experts; each (token, expert) pair is one row of work. Both
paths sort those rows by expert so that every expert multiplies one contiguous slice of rows:
- `moe_reference` (CPU, and anything with autograd on): a torch loop over the experts that received rows.
- `fused_moe_triton` (CUDA, inference): the rows are laid out in blocks of BLOCK_M rows that each belong to
  one expert (`align_rows`, torch ops on the device, no host sync, so CUDA graphs can capture it), then one
  grouped-GEMM launch per projection computes every block against its expert's weights: gate and up with
  SiLU-and-mul in its epilogue for all experts in one launch, down (times the routing weight) in a second,
  then a sum over the k rows of each token. No Python loop over experts.

Expert weights live stacked as (experts, out, in), the layout of a linear layer's weight: gate_up_proj
(E, 2 * I, H) holding [gate | up], down_proj (E, H, I). Does not know checkpoint layouts (the model file
converts) or which layers are sparse (the model's config says).
"""

from __future__ import annotations

import torch
from torch import nn

from vlmserve.models.layers.activation import silu_and_mul
from vlmserve.models.layers.parallel import ShardRead, TensorParallel

try:
    import triton
    import triton.language as tl

    TRITON = True
except ImportError:  # CPU-only installs: the torch reference is used
    TRITON = False


class Experts(nn.Module):
    """Stacked expert weights; under tensor parallelism each rank holds every expert's slice [start, start +
    intermediate_size) of the intermediate dimension (so gate/up are column- and down row-parallel)."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, start: int = 0) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        self.start = start

    def checkpoint_read(self, param: str, shard: int | None, shape: tuple[int, ...]) -> ShardRead:
        """Our layout is (E, 2I, H) / (E, H, I); released checkpoints store (E, H, 2I) / (E, I, H). The
        intermediate dimension is the one whose full size matches; [gate | up] reads this rank's rows of each
        half."""
        n = self.down_proj.shape[2]  # I on this rank
        hidden = self.down_proj.shape[1]
        if param == "gate_up_proj":
            dim = 1 if shape[2] == hidden else 2
            full = shape[dim] // 2
            return dim, [(self.start, self.start + n), (full + self.start, full + self.start + n)]
        dim = 2 if shape[1] == hidden else 1
        return dim, [(self.start, self.start + n)]


class SparseMoE(nn.Module):
    """x (T, H) -> (T, H): route each token to its top-k experts, weights renormalised to sum to 1."""

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        num_experts: int,
        top_k: int,
        tp: TensorParallel | None = None,
    ) -> None:
        super().__init__()
        self.top_k = top_k
        self.tp = tp
        self.gate = nn.Linear(hidden_size, num_experts, bias=False)  # the router: replicated
        if tp is None:
            self.experts = Experts(num_experts, hidden_size, intermediate_size)
        else:
            n = tp.split(intermediate_size, "moe_intermediate_size")
            self.experts = Experts(num_experts, hidden_size, n, tp.rank * n)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(T, H) -> routing weights (T, k) in x's dtype and expert ids (T, k): int64, or int32 from the GPU
        kernel (`route_topk`)."""
        logits = self.gate(x)  # (T, E)
        if TRITON and logits.is_cuda and not torch.is_grad_enabled():
            return route_topk(logits, self.top_k)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights.to(logits.dtype), ids

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = self.route(x)
        out = fused_moe(x, self.experts.gate_up_proj, self.experts.down_proj, weights, ids)
        if self.tp is not None:  # each rank summed its slice of every expert's intermediate dimension
            out = self.tp.all_reduce(out)
        return out


def fused_moe(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
) -> torch.Tensor:
    """x (T, H); w13 (E, 2I, H); w2 (E, H, I); topk_weights, topk_ids (T, k) -> (T, H)."""
    if TRITON and x.is_cuda and not torch.is_grad_enabled():
        return fused_moe_triton(x, w13, w2, topk_weights, topk_ids)
    return moe_reference(x, w13, w2, topk_weights, topk_ids)


def moe_reference(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
) -> torch.Tensor:
    """The torch path: rows sorted by expert, one pair of matmuls per expert that received rows."""
    k = topk_ids.shape[1]
    flat = topk_ids.flatten()  # (T*k,) expert of each (token, slot) row
    order = torch.argsort(flat, stable=True)
    tokens = order // k  # (T*k,) token of each sorted row
    counts = torch.bincount(flat, minlength=w13.shape[0]).tolist()
    rows = x[tokens]  # (T*k, H), grouped by expert
    out = torch.empty_like(rows)
    start = 0
    for e, n in enumerate(counts):
        if n:
            seg = rows[start : start + n]
            out[start : start + n] = silu_and_mul(seg @ w13[e].t()) @ w2[e].t()
            start += n
    out = out * topk_weights.flatten()[order, None]
    return torch.zeros_like(x).index_add_(0, tokens, out)


# ------------------------------------------------------------------------------------------ GPU kernel

# Up to this many (token, expert) rows, each row is its own block (see fused_moe_triton).
ONE_ROW_MAX = 32


def align_rows(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Lay out the T*k (token, slot) rows in blocks of `block_m` rows of one expert each.

    Returns sorted_rows (R,) int32: the flat row index (token * k + slot) at each position, padding set to
    T*k; and block_expert (R / block_m,) int32: each block's expert, -1 for blocks past the last expert's.
    R = T*k + E*(block_m - 1) rounded up to block_m is an upper bound that depends only on T, so the shapes
    (and a CUDA graph) do not depend on the routing."""
    m = topk_ids.numel()
    dev = topk_ids.device
    flat = topk_ids.flatten().long()
    counts = torch.zeros(num_experts, dtype=torch.int64, device=dev)
    counts.scatter_add_(0, flat, torch.ones_like(flat))  # bincount without a host sync
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = torch.cumsum(padded, 0)
    padded_start = padded_end - padded
    order = torch.argsort(flat, stable=True)
    sorted_experts = flat[order]
    count_start = torch.cumsum(counts, 0) - counts
    rank = torch.arange(m, device=dev) - count_start[sorted_experts]
    total = -(-(m + num_experts * (block_m - 1)) // block_m) * block_m
    sorted_rows = torch.full((total,), m, dtype=torch.int32, device=dev)
    sorted_rows[padded_start[sorted_experts] + rank] = order.to(torch.int32)
    block_start = torch.arange(0, total, block_m, device=dev)
    block_expert = torch.searchsorted(padded_end, block_start, right=True)
    block_expert = torch.where(block_expert < num_experts, block_expert, -1).to(torch.int32)
    return sorted_rows, block_expert


if TRITON:

    @triton.jit
    def _route_topk_kernel(logits_ptr, w_ptr, ids_ptr, E, stride_l, TOP_K: tl.constexpr, BLOCK_K: tl.constexpr,
                           BLOCK_E: tl.constexpr):  # fmt: skip
        # One token: its TOP_K largest logits (the lowest index first among equals), then their softmax, which
        # is the full softmax's top k renormalised to sum to 1 (exp(l_i) / sum_all over sum_sel exp(l_j) /
        # sum_all). Replaces softmax, topk, sum, divide and the weights' cast here, and the ids' int32 cast in
        # fused_moe_triton: six launches per MoE layer at decode.
        t = tl.program_id(0)
        e = tl.arange(0, BLOCK_E)
        logits = tl.load(logits_ptr + t * stride_l + e, mask=e < E, other=float("-inf")).to(tl.float32)
        slot = tl.arange(0, BLOCK_K)
        vals = tl.full((BLOCK_K,), float("-inf"), tl.float32)
        ids = tl.zeros((BLOCK_K,), tl.int32)
        for j in tl.static_range(TOP_K):
            best = tl.max(logits, 0)
            idx = tl.min(tl.where(logits == best, e, BLOCK_E), 0)
            vals = tl.where(slot == j, best, vals)
            ids = tl.where(slot == j, idx, ids)
            logits = tl.where(e == idx, float("-inf"), logits)
        p = tl.exp(vals - tl.max(vals, 0))  # unused slots: exp(-inf) = 0
        p = p / tl.sum(p, 0)
        ok = slot < TOP_K
        tl.store(w_ptr + t * TOP_K + slot, p.to(w_ptr.dtype.element_ty), mask=ok)
        tl.store(ids_ptr + t * TOP_K + slot, ids, mask=ok)

    @triton.jit
    def _grouped_gemm_kernel(
        a_ptr,
        w_ptr,
        c_ptr,
        sorted_rows_ptr,
        block_expert_ptr,
        scale_ptr,
        num_rows,
        n_out,
        k_in,
        top_k,
        stride_am,
        stride_we,
        stride_wn,
        stride_cm,
        A_BY_TOKEN: tl.constexpr,
        GATED: tl.constexpr,
        SCALE: tl.constexpr,
        ONE_ROW: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        """C[row] = A[row's input] @ W[expert].T (times the row's routing weight when SCALE), for the
        BLOCK_M sorted rows of this program's block and BLOCK_N output columns. A's row is the token
        (row // top_k) when A_BY_TOKEN, else the row itself. GATED: W holds [gate | up] (2 * n_out rows) and
        C = silu(A @ gate.T) * (A @ up.T), both products from the same A tiles (no (rows, 2 * n_out)
        intermediate, no separate activation launch). ONE_ROW: block b is the single row b, of expert
        block_expert[b] (small batches: no sorting, each row streams its expert's weights)."""
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        expert = tl.load(block_expert_ptr + pid_m)
        if expert < 0:
            return
        if ONE_ROW:
            offs = tl.arange(0, BLOCK_M)
            rows = pid_m + offs * 0
            valid = offs == 0
        else:
            offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
            rows = tl.load(sorted_rows_ptr + offs_m)
            valid = rows < num_rows
        if A_BY_TOKEN:
            a_rows = rows // top_k
        else:
            a_rows = rows
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + a_rows[:, None].to(tl.int64) * stride_am + offs_k[None, :]
        w_ptrs = w_ptr + expert.to(tl.int64) * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None]
        n_mask = offs_n[None, :] < n_out
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, k_in, BLOCK_K):
            k_mask = offs_k + k0 < k_in
            a = tl.load(a_ptrs, mask=valid[:, None] & k_mask[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_mask[:, None] & n_mask, other=0.0)
            acc += tl.dot(a, w)
            if GATED:
                w_up = tl.load(w_ptrs + n_out * stride_wn, mask=k_mask[:, None] & n_mask, other=0.0)
                up += tl.dot(a, w_up)
            a_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        if GATED:
            acc = acc / (1.0 + tl.exp(-acc)) * up
        if SCALE:
            scale = tl.load(scale_ptr + rows, mask=valid, other=0.0).to(tl.float32)
            acc = acc * scale[:, None]
        c_ptrs = c_ptr + rows[:, None].to(tl.int64) * stride_cm + offs_n[None, :]
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=valid[:, None] & (offs_n[None, :] < n_out))

    def _grouped_gemm(
        a: torch.Tensor,
        w: torch.Tensor,
        out: torch.Tensor,
        sorted_rows: torch.Tensor,
        block_expert: torch.Tensor,
        scale: torch.Tensor | None,
        top_k: int,
        a_by_token: bool,
        gated: bool,
        block_m: int,
        one_row: bool,
        tiles: dict[str, int] | None,
    ) -> None:
        num_rows, n_out = out.shape
        k_in = w.shape[2]
        # Few rows (decode): narrow output tiles, more programs streaming weights at once.
        cfg = (
            {"BLOCK_N": 32, "BLOCK_K": 128, "num_warps": 4, "num_stages": 4}
            if one_row
            else {"BLOCK_N": 64, "BLOCK_K": 64}
        )
        cfg.update(tiles or {})
        grid = (block_expert.numel(), triton.cdiv(n_out, cfg["BLOCK_N"]))
        _grouped_gemm_kernel[grid](
            a,
            w,
            out,
            sorted_rows,
            block_expert,
            scale if scale is not None else out,
            num_rows,
            n_out,
            k_in,
            top_k,
            a.stride(0),
            w.stride(0),
            w.stride(1),
            out.stride(0),
            A_BY_TOKEN=a_by_token,
            GATED=gated,
            SCALE=scale is not None,
            ONE_ROW=one_row,
            BLOCK_M=block_m,
            **cfg,
        )


def route_topk(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, E) router logits on a GPU -> weights (T, k) in the logits' dtype and expert ids (T, k) int32: the
    top k of the softmax renormalised (what SparseMoE.route computes in torch), one launch."""
    t, e = logits.shape
    weights = torch.empty(t, top_k, dtype=logits.dtype, device=logits.device)
    ids = torch.empty(t, top_k, dtype=torch.int32, device=logits.device)
    if t:
        _route_topk_kernel[(t,)](
            logits, weights, ids, e, logits.stride(0), TOP_K=top_k,
            BLOCK_K=triton.next_power_of_2(top_k), BLOCK_E=triton.next_power_of_2(e), num_warps=4,
        )  # fmt: skip
    return weights, ids


def fused_moe_triton(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    tiles: dict[str, int] | None = None,
) -> torch.Tensor:
    """The GPU path: rows aligned to per-expert blocks, one grouped-GEMM launch per projection. Up to
    ONE_ROW_MAX rows (decode at a few sequences) each row is its own block: no alignment kernels, and rows
    rarely share an expert (one token's k experts are distinct), so little weight is read twice."""
    t, k = topk_ids.shape
    num_experts, two_i, hidden = w13.shape
    one_row = t * k <= ONE_ROW_MAX
    if one_row:
        block_m = 16  # tl.dot's smallest tile; one row of it is used
        sorted_rows, block_expert = topk_ids, topk_ids.flatten().to(torch.int32)
    else:
        # Small batches (decode) put few rows on each expert: small blocks waste less padding.
        block_m = 16 if t * k <= 32 * num_experts else 64
        sorted_rows, block_expert = align_rows(topk_ids, num_experts, block_m)
    x = x.contiguous()
    w13, w2 = w13.contiguous(), w2.contiguous()
    act = torch.empty(t * k, two_i // 2, dtype=x.dtype, device=x.device)  # (T*k, I) in flat row order
    _grouped_gemm(x, w13, act, sorted_rows, block_expert, None, k, True, True, block_m, one_row, tiles)
    down = torch.empty(t * k, hidden, dtype=x.dtype, device=x.device)
    weights = topk_weights.flatten().contiguous()
    _grouped_gemm(act, w2, down, sorted_rows, block_expert, weights, k, False, False, block_m, one_row, tiles)
    return down.view(t, k, hidden).sum(dim=1)
