"""GPU GEMMs for quantized weights: FP8 (W8A8, activations quantized per token / per token-group on the fly)
and AWQ int4 (W4A16, weights dequantized in registers, never as a full-size copy).

    fp8_linear   at decode sizes, a Triton GEMM on activations quantized per row and 128 columns by one
                 kernel beforehand, for block and per-channel scales; on Hopper from SCALED_MM_MIN_ROWS /
                 ROWWISE_MM_MIN_ROWS rows, torch._scaled_mm (cuBLASLt): 128x128 block scales with
                 activations per row and 128 columns, or per-channel scales with activations per row
    awq_linear   a Triton GEMM that unpacks the int4 weights in registers (a tile of packed bytes loaded once,
                 its two nibbles interleaved back into K order) and multiplies on the tensor cores

Decode is weight streaming: at a batch of a few rows a layer's output has few tiles (o_proj and down_proj of
a 7B: 56 tiles of 64 rows), far fewer programs than a GPU needs in flight to saturate its bandwidth. Both
kernels therefore split K across programs when the output has too few tiles (`_split_k`), each writing float32
partial sums that one small kernel adds up (plus bias, cast); with enough tiles they write the output directly.

Every path is plain device work with no host synchronisation, so CUDA graphs capture it; the first call of a
shape compiles its kernel, which the graph capture's warm-up run does. The torch references they are tested
against (tests/test_quantization_gpu.py) are `fp8_linear_reference` and `awq_linear_reference`.
Only used for CUDA tensors.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from vlmserve.models.layers.fused import AVAILABLE as TRITON
from vlmserve.models.quantization import awq as awq_layout
from vlmserve.models.quantization.fp8 import FP8, FP8_MAX, MIN_SCALE

if TRITON:
    import triton
    import triton.language as tl


# --- activation quantization (shared by the kernels and the reference) -------------------------------------


def quantize_activations(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, K) -> (M, K) fp8 and (M, ceil(K / group)) float32 scales, one per row and group of `group`
    columns (group >= K: per token)."""
    m, k = x.shape
    groups = -(-k // group)
    width = groups * group
    xf = x.float()
    if width != k:
        xf = F.pad(xf, (0, width - k))
    xg = xf.view(m, groups, group if groups > 1 else width)
    scale = (xg.abs().amax(-1) / FP8_MAX).clamp(min=MIN_SCALE)  # (M, G)
    q = (xg / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8).view(m, width)
    return q[:, :k], scale


def fp8_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    block_k: int,
    bias: torch.Tensor | None,
    act_group: int | None = None,
) -> torch.Tensor:
    """What fp8_linear computes, in float32 torch: activations quantized per row and `act_group` columns
    (None: per row, as for _scaled_mm; the Triton kernel's is triton_act_group), both operands dequantized."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    group = act_group or x2.shape[1]
    xq, xs = quantize_activations(x2, group)
    k = x2.shape[1]
    xd = xq.float() * xs.repeat_interleave(group, dim=1)[:, :k]
    wd = weight.float() * scale.float().repeat_interleave(block_k, dim=1)[:, :k]
    out = xd @ wd.t()
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype).view(*shape[:-1], -1)


def awq_linear_reference(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    group: int,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    out = x.float() @ awq_layout.dequantize(qweight, qzeros, scales, group).t()
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


# --- tiles and split-K ----------------------------------------------------------------------------------


@functools.cache
def _num_sms(index: int | None) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@dataclass(slots=True)
class Tiles:
    """A GEMM's launch shape: tile sizes, warps, pipeline stages and the K splits."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    splits: int = 1
    k_per_split: int = 0  # K columns per split, a multiple of block_k


def _tiles(
    m: int, n: int, k: int, block_k: int, device: torch.device, override: dict[str, int] | None
) -> Tiles:
    """Tiles by batch size: small M (decode) streams weights in narrow tiles split along K until there are
    about four programs per SM in flight; large M (prefill, big decode batches) uses tensor-core-sized tiles."""
    if m <= 16:
        t = Tiles(16, 64, block_k, 4, 4)
    elif m <= 64:
        t = Tiles(32 if m <= 32 else 64, 64, block_k, 4, 4)
    else:
        t = Tiles(64 if m <= 128 else 128, 128, block_k, 8 if m > 128 else 4, 3)
    for field, value in (override or {}).items():  # benchmarks and tests pin fields ("splits": 1 or more)
        if field != "splits":
            setattr(t, field, value)
    m_tiles, n_tiles, k_tiles = -(-m // t.block_m), -(-n // t.block_n), -(-k // t.block_k)
    want = (override or {}).get("splits")
    if want is None:
        target = 4 * _num_sms(device.index)
        want = 1 if m_tiles * n_tiles >= target // 2 else min(k_tiles, target // (m_tiles * n_tiles))
    per_split = -(-k_tiles // max(1, want))
    t.k_per_split = per_split * t.block_k
    t.splits = -(-k_tiles // per_split)
    return t


if TRITON:

    @triton.jit
    def _splitk_reduce_kernel(part_ptr, bias_ptr, out_ptr, M, N, SPLITS, stride_om, HAS_BIAS: tl.constexpr,
                              BLOCK: tl.constexpr):  # fmt: skip
        # out[m, n] = sum_s part[s, m, n] (+ bias[n]), one program per (row, BLOCK columns).
        row = tl.program_id(0)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < N
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for s in range(0, SPLITS):
            acc += tl.load(part_ptr + (s * M + row) * N + offs, mask=ok, other=0.0)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * stride_om + offs, acc.to(out_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _store_tile(acc, c_ptr, bias_ptr, offs_m, offs_n, M, N, stride_cm, pid_s, HAS_BIAS: tl.constexpr,
                    SPLIT: tl.constexpr):  # fmt: skip
        # A GEMM program's epilogue: its float32 (BLOCK_M, BLOCK_N) tile into split pid_s's partials, or (plus
        # the bias) into the output.
        ok = (offs_m < M)[:, None] & (offs_n < N)[None, :]
        if SPLIT:
            c = c_ptr + pid_s * M * N + offs_m[:, None] * N + offs_n[None, :]
        else:
            if HAS_BIAS:
                acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
            c = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :]
        tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=ok)


def _launch(
    kernel: Any,
    x2: torch.Tensor,
    n: int,
    t: Tiles,
    bias: torch.Tensor | None,
    weights: tuple,
    tail: tuple,
    dtype: torch.dtype | None = None,
    **meta: Any,
) -> torch.Tensor:
    """Run a GEMM kernel (x, *weights, bias, out, M, N, K, TILES_PER_SPLIT, stride_xm, stride_cm, *tail) over the
    grid (M tiles, N tiles, K splits): the output (in `dtype`, default x's) directly when there is one split,
    else float32 partials that `_splitk_reduce_kernel` adds up (with the bias)."""
    m = x2.shape[0]
    out = torch.empty(m, n, dtype=dtype or x2.dtype, device=x2.device)
    split = t.splits > 1
    part = torch.empty(t.splits, m, n, dtype=torch.float32, device=x2.device) if split else out
    has_bias = bias is not None
    grid = (triton.cdiv(m, t.block_m), triton.cdiv(n, t.block_n), t.splits)
    kernel[grid](
        x2, *weights, bias if has_bias and not split else out, part, m, n, x2.shape[1], t.k_per_split // t.block_k,
        x2.stride(0), out.stride(0), *tail,
        HAS_BIAS=has_bias and not split, SPLIT=split, BLOCK_M=t.block_m, BLOCK_N=t.block_n,
        BLOCK_K=t.block_k, num_warps=t.num_warps, num_stages=t.num_stages, **meta,
    )  # fmt: skip
    if split:
        block = 1024
        _splitk_reduce_kernel[(m, triton.cdiv(n, block))](
            part, bias if has_bias else out, out, m, n, t.splits, out.stride(0),
            HAS_BIAS=has_bias, BLOCK=block, num_warps=4,
        )  # fmt: skip
    return out


# --- FP8 -----------------------------------------------------------------------------------------------

if TRITON:

    @triton.jit
    def _quantize_tile(x):
        # (R, C) float32 -> e4m3 and one scale per row, as quantize_activations computes them (448: e4m3's
        # largest value; 1e-12: MIN_SCALE).
        a_s = tl.maximum(tl.max(tl.abs(x), axis=1) / 448.0, 1e-12)
        return tl.clamp(x / a_s[:, None], -448.0, 448.0).to(tl.float8e4nv), a_s

    @triton.jit
    def _quantize_act_kernel(x_ptr, q_ptr, s_ptr, M, K, stride_xm, stride_qm, stride_sm, stride_sg,
                             GROUP: tl.constexpr):  # fmt: skip
        # One program per (row, group of GROUP columns): the group's e4m3 values and scale; rows from M on
        # (padding) are zeros.
        row = tl.program_id(0)
        g = tl.program_id(1)
        k = g * GROUP + tl.arange(0, GROUP)
        ok = k < K
        x = tl.load(x_ptr + row * stride_xm + k, mask=ok & (row < M), other=0.0).to(tl.float32)
        a, a_s = _quantize_tile(x[None, :])
        tl.store(q_ptr + row * stride_qm + k, tl.reshape(a, (GROUP,)), mask=ok)
        tl.store(s_ptr + row * stride_sm + g * stride_sg + tl.arange(0, 1), a_s)

    @triton.jit
    def _quantize_rows_kernel(x_ptr, q_ptr, s_ptr, K, stride_xm, stride_qm, BLOCK: tl.constexpr):
        # One program per row, one scale for the whole row (per token): its absolute maximum in one pass
        # over K, then the e4m3 values in a second.
        row = tl.program_id(0)
        amax = tl.zeros((BLOCK,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK):
            k = k0 + tl.arange(0, BLOCK)
            x = tl.load(x_ptr + row * stride_xm + k, mask=k < K, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(x))
        a_s = tl.maximum(tl.max(amax, axis=0) / 448.0, 1e-12)
        for k0 in range(0, K, BLOCK):
            k = k0 + tl.arange(0, BLOCK)
            x = tl.load(x_ptr + row * stride_xm + k, mask=k < K, other=0.0).to(tl.float32)
            tl.store(
                q_ptr + row * stride_qm + k, tl.clamp(x / a_s, -448.0, 448.0).to(tl.float8e4nv), mask=k < K
            )
        tl.store(s_ptr + row + tl.arange(0, 1), a_s + tl.zeros((1,), dtype=tl.float32))

    @triton.jit
    def _fp8_gemm_kernel(
        x_ptr,  # (M, K) fp8 activations
        b_ptr,  # (N, K) fp8
        bs_ptr,  # (N, G) float32 weight scales
        bias_ptr,
        c_ptr,  # (M, N) output, or (SPLITS, M, N) float32 partials when SPLIT
        M,
        N,
        K,
        TILES_PER_SPLIT,  # K tiles (of BLOCK_K) per split
        stride_xm,
        stride_cm,
        stride_bn,
        stride_bsn,
        stride_bsk,
        GROUP_K,  # columns per weight scale (block_k; K for per-channel scales)
        xs_ptr,  # (M, cdiv(K, BLOCK_K)) float32 activation scales
        stride_xsm,
        HAS_BIAS: tl.constexpr,
        SPLIT: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,  # divides GROUP_K; also the activation scale group (ACT_GROUP)
    ):
        # Activations come quantized per row and BLOCK_K columns (quantize_act_groups): quantizing them in
        # here, in every N tile's program, cost more than the extra launch even at one row (the 7B's linears
        # at batch 1 on the H200: 2.77 ms a step in registers, 2.39 beforehand; benchmarks/RESULTS.md).
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        pid_s = tl.program_id(2)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        m_ok = offs_m < M
        n_ok = offs_n < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        # This split's K tiles; the last split's may run past K (masked: no memory traffic).
        for i in range(0, TILES_PER_SPLIT):
            k0 = (pid_s * TILES_PER_SPLIT + i) * BLOCK_K
            k = k0 + offs_k
            k_ok = k < K
            a = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :], mask=m_ok[:, None] & k_ok[None, :],
                        other=0.0)  # fmt: skip
            a_s = tl.load(xs_ptr + offs_m * stride_xsm + k0 // BLOCK_K, mask=m_ok & (k0 < K), other=0.0)
            b = tl.load(b_ptr + offs_n[:, None] * stride_bn + k[None, :], mask=n_ok[:, None] & k_ok[None, :],
                        other=0.0)  # fmt: skip
            b_s = tl.load(bs_ptr + offs_n * stride_bsn + (k0 // GROUP_K) * stride_bsk, mask=n_ok & (k0 < K),
                          other=0.0)  # fmt: skip
            acc += tl.dot(a, tl.trans(b)) * a_s[:, None] * b_s[None, :]
        _store_tile(acc, c_ptr, bias_ptr, offs_m, offs_n, M, N, stride_cm, pid_s, HAS_BIAS, SPLIT)


def quantize_rows(x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, K) -> (M, K) fp8 and (M, 1) float32 scales, one per row (token), by one Triton kernel: the same
    values as quantize_activations(x2, K), whose torch ops cost ~6 launches per linear."""
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    m, k = x2.shape
    xq = torch.empty(m, k, dtype=FP8, device=x2.device)
    xs = torch.empty(m, 1, dtype=torch.float32, device=x2.device)
    _quantize_rows_kernel[(m,)](x2, xq, xs, k, x2.stride(0), xq.stride(0), BLOCK=1024, num_warps=4)
    return xq, xs


def quantize_act_groups(
    x2: torch.Tensor, group: int, outer_major: bool = False, rows: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, K) -> (R, K) fp8 and (R, cdiv(K, group)) float32 scales, one per row and `group` columns, by one
    Triton kernel, R = `rows` (default M; rows past M are zeros); outer_major: the scales' stride is (1, R),
    as cuBLASLt's 1x128 block scaling reads them."""
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    m, k = x2.shape
    r = rows or m
    groups = triton.cdiv(k, group)
    xq = torch.empty(r, k, dtype=FP8, device=x2.device)
    xs = torch.empty(groups, r, dtype=torch.float32, device=x2.device).t() if outer_major else (
        torch.empty(r, groups, dtype=torch.float32, device=x2.device))  # fmt: skip
    _quantize_act_kernel[(r, groups)](
        x2, xq, xs, m, k, x2.stride(0), xq.stride(0), xs.stride(0), xs.stride(1), GROUP=group, num_warps=1
    )
    return xq, xs


# The Triton kernel's activation scale group: a K tile (128 columns, or less where a weight block is smaller).
ACT_GROUP = 128


def _pow2_divisor(n: int, most: int) -> int:
    """The largest power of two <= most that divides n."""
    d = most
    while d > 1 and n % d:
        d //= 2
    return d


def triton_act_group(scale: torch.Tensor, block_k: int) -> int:
    """The activation group (= K tile) the Triton kernel uses for these weight scales."""
    return ACT_GROUP if scale.shape[1] == 1 else _pow2_divisor(block_k, ACT_GROUP)


def fp8_triton(
    x2: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    block_k: int,
    bias: torch.Tensor | None,
    tiles: dict | None = None,
) -> torch.Tensor:
    m, k = x2.shape
    n = weight.shape[0]
    group_k = k if scale.shape[1] == 1 else block_k
    tile_k = triton_act_group(scale, block_k)
    if tile_k < 32:
        raise ValueError(f"FP8 block size {block_k} along K: the Triton kernel needs a multiple of 32")
    t = _tiles(m, n, k, tile_k, x2.device, tiles)
    if t.block_k != tile_k:
        raise ValueError(f"the FP8 kernel's K tile is its activation group ({tile_k}), got {t.block_k}")
    xq, xs = quantize_act_groups(x2, tile_k)
    tail = (weight.stride(0), scale.stride(0), scale.stride(1), group_k, xs, xs.stride(0))
    return _launch(_fp8_gemm_kernel, xq, n, t, bias, (weight, scale), tail, dtype=x2.dtype)


# Rows from which torch._scaled_mm (cuBLASLt) runs where it applies: below, the split-K Triton kernel streams
# the weights faster (narrow tiles, K split across programs); from here cuBLASLt's tiles win, more so the
# larger the batch (per-size figures: benchmarks/RESULTS.md). Block-scaled weights from 64 rows,
# per-channel ones from 128 (the 7B's linears per step on the H200, per-channel: 3.52 ms by Triton against 4.00
# by cuBLASLt at 64 rows, 5.08 against 3.86 at 128, 9.40 against 4.46 at 256).
SCALED_MM_MIN_ROWS = 64
ROWWISE_MM_MIN_ROWS = 128

# cuBLASLt's block-scaled FP8 GEMM: 128x128 weight blocks, activations in 1x128 groups (Hopper).
CUBLAS_BLOCK = 128


def scaled_mm_applies(x2: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> bool:
    """cuBLASLt's row-wise scaled FP8 GEMM: per-channel weight scales, bf16 output, dims multiples of 16,
    Hopper or newer."""
    n, k = weight.shape
    return (
        hasattr(torch, "_scaled_mm")
        and scale.shape[1] == 1
        and x2.dtype == torch.bfloat16
        and k % 16 == 0
        and n % 16 == 0
        and _capability(x2.device.index) >= (9, 0)
    )


def cublas_block_scales(scale: torch.Tensor, block_k: int) -> torch.Tensor | None:
    """Per-row weight scales (N, K/128) -> the (K/128, N/128) view of (N/128, K/128) that cuBLASLt's 128x128
    block scaling reads, or None where that GEMM does not apply: per-channel scales, other block sizes, N
    no multiple of 128, a number of K blocks no multiple of 4 (the scales' rows must be 16-byte aligned: the
    layout for the others, a padded stride, is not verified on a GPU yet), or rows of one 128-row block
    with different scales (a fused projection whose shards do not start on a 128-row boundary)."""
    n, groups = scale.shape
    if block_k != CUBLAS_BLOCK or n % CUBLAS_BLOCK or groups % 4:
        return None
    rows = scale.reshape(n // CUBLAS_BLOCK, CUBLAS_BLOCK, groups)
    if not bool((rows == rows[:, :1]).all()):
        return None
    return rows[:, 0].float().contiguous().t()


def block_scaled_mm_applies(
    x2: torch.Tensor, weight: torch.Tensor, block_scales: torch.Tensor | None
) -> bool:
    """cuBLASLt's block-scaled FP8 GEMM: 128x128 weight blocks (cublas_block_scales), bf16 output, K a
    multiple of 128, an H100/H200 (the scaling mode is Hopper's)."""
    return (
        block_scales is not None
        and TRITON
        and hasattr(torch, "_scaled_mm")
        and x2.dtype == torch.bfloat16
        and weight.shape[1] % CUBLAS_BLOCK == 0
        and _capability(x2.device.index) == (9, 0)
    )


@functools.cache
def _capability(index: int | None) -> tuple[int, int]:
    return tuple(torch.cuda.get_device_capability(index))


def fp8_scaled_mm(
    x2: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    block_scales: torch.Tensor | None = None,
) -> torch.Tensor:
    """torch._scaled_mm: with block_scales, activations per row and 128 columns against 128x128 weight
    blocks; without, activations per row against per-channel weight scales."""
    m = x2.shape[0]
    if block_scales is not None:
        # cuBLASLt's block scaling refuses row counts that are not multiples of 4 (probed on the H200): the
        # rows are padded with zeros to a multiple of 16 (as served and tested) and the padding's outputs
        # dropped.
        xq, xs = quantize_act_groups(x2, CUBLAS_BLOCK, outer_major=True, rows=-(-m // 16) * 16)
        scale_b = block_scales
    else:
        xq, xs = quantize_rows(x2)  # (M, K), (M, 1): per token
        scale_b = scale.view(1, -1)
    out = torch._scaled_mm(
        xq,
        weight.t(),  # (K, N) column-major, as cuBLASLt wants the second operand
        scale_a=xs,
        scale_b=scale_b,
        out_dtype=x2.dtype,
    )[:m]
    return out if bias is None else out + bias


def fp8_backend(
    x2: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, block_scales: torch.Tensor | None = None
) -> str:
    """'scaled_mm_block' / 'scaled_mm' where cuBLASLt's block-scaled / row-wise FP8 GEMM applies from
    SCALED_MM_MIN_ROWS / ROWWISE_MM_MIN_ROWS rows, else 'triton' (or 'torch' without Triton)."""
    rows = x2.shape[0]
    if rows >= SCALED_MM_MIN_ROWS and block_scaled_mm_applies(x2, weight, block_scales):
        return "scaled_mm_block"
    if rows >= ROWWISE_MM_MIN_ROWS and scaled_mm_applies(x2, weight, scale):
        return "scaled_mm"
    return "triton" if TRITON else "torch"


def fp8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    block_k: int,
    bias: torch.Tensor | None,
    backend: str = "auto",
    tiles: dict | None = None,
    block_scales: torch.Tensor | None = None,
) -> torch.Tensor:
    """x (..., K) @ dequant(weight (N, K), scale (N, Kb)).T + bias -> (..., N) in x's dtype.
    backend: auto | scaled_mm | scaled_mm_block | triton (tests pin one); tiles: the Triton launch shape
    (benchmarks); block_scales: the same scales as cublas_block_scales lays them out, where they are 128x128
    blocks (None: the block-scaled cuBLASLt GEMM is not used)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if x2.shape[0] == 0:
        return x.new_empty(*shape[:-1], weight.shape[0])
    if backend == "auto":
        backend = fp8_backend(x2, weight, scale, block_scales)
    if backend == "scaled_mm_block":
        if block_scales is None:
            raise ValueError("backend scaled_mm_block needs block_scales (cublas_block_scales)")
        out = fp8_scaled_mm(x2, weight, scale, bias, block_scales)
    elif backend == "scaled_mm":
        out = fp8_scaled_mm(x2, weight, scale, bias)
    elif backend == "triton":
        out = fp8_triton(x2, weight, scale, block_k, bias, tiles)
    else:  # CUDA without Triton: correct, not fast
        w = (weight.float() * scale.repeat_interleave(block_k, dim=1)[:, : x2.shape[1]]).to(x.dtype)
        out = F.linear(x2, w, bias)
    return out.view(*shape[:-1], -1)


# --- AWQ int4 ------------------------------------------------------------------------------------------

if TRITON:

    @triton.jit
    def _awq_gemm_kernel(
        x_ptr,  # (M, K) fp16 / bf16
        qw_ptr,  # (N, K/2) uint8, low nibble = even k
        qz_ptr,  # (N, K/GROUP) uint8
        s_ptr,  # (N, K/GROUP) fp16
        bias_ptr,
        c_ptr,  # (M, N) output, or (SPLITS, M, N) float32 partials when SPLIT
        M,
        N,
        K,
        TILES_PER_SPLIT,  # K tiles (of BLOCK_K) per split
        stride_xm,
        stride_cm,
        stride_qn,
        stride_zn,
        stride_sn,
        GROUP: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        SPLIT: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,  # divides GROUP: one zero / scale per row and K tile
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        pid_s = tl.program_id(2)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        offs_j = tl.arange(0, BLOCK_K // 2)
        m_ok = offs_m < M
        n_ok = offs_n < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        # This split's K tiles (K is a multiple of BLOCK_K); the last split's may run past K (masked).
        for i in range(0, TILES_PER_SPLIT):
            k0 = (pid_s * TILES_PER_SPLIT + i) * BLOCK_K
            in_k = k0 < K
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + (k0 + offs_k)[None, :],
                        mask=m_ok[:, None] & in_k, other=0.0)  # fmt: skip
            # The tile's packed bytes, each loaded once; nibbles interleaved back into K order (low = even k).
            w_ok = n_ok & in_k
            packed = tl.load(qw_ptr + offs_n[:, None] * stride_qn + (k0 // 2 + offs_j)[None, :],
                             mask=w_ok[:, None], other=0)  # fmt: skip
            q = tl.interleave(packed & 0xF, packed >> 4)  # (BLOCK_N, BLOCK_K)
            g = k0 // GROUP
            z = tl.load(qz_ptr + offs_n * stride_zn + g, mask=w_ok, other=0).to(tl.float32)
            s = tl.load(s_ptr + offs_n * stride_sn + g, mask=w_ok, other=0.0).to(tl.float32)
            w = ((q.to(tl.float32) - z[:, None]) * s[:, None]).to(x_ptr.dtype.element_ty)
            acc += tl.dot(x, tl.trans(w))
        _store_tile(acc, c_ptr, bias_ptr, offs_m, offs_n, M, N, stride_cm, pid_s, HAS_BIAS, SPLIT)


# Outputs from which AWQ at decode sizes (<= 16 rows) takes 32-column tiles instead of 64: twice the programs
# streaming at once. The 7B's gate_up (37,888 outputs) on the H200: 58 us against 64 at 1-16 rows; narrower
# outputs (3,584-4,608) were slower with them (benchmarks/decode_gemm_variants.py, RESULTS.md).
AWQ_NARROW_MIN_N = 16384


def awq_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    group: int,
    bias: torch.Tensor | None,
    tiles: dict | None = None,
) -> torch.Tensor:
    """x (..., K) @ dequant(qweight (N, K/2), qzeros, scales).T + bias -> (..., N) in x's dtype.
    tiles: the launch shape (benchmarks)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    m, k = x2.shape
    n = qweight.shape[0]
    block_k = _pow2_divisor(group, 128)
    if not TRITON or block_k < 32 or x2.dtype == torch.float32:
        # Float32 activations (tl.dot would run them as tf32) or a group no power-of-two tile divides.
        return awq_linear_reference(x, qweight, qzeros, scales, group, bias)
    if m == 0:
        return x2.new_empty(*shape[:-1], n)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    if tiles is None and m <= 16 and n >= AWQ_NARROW_MIN_N:
        tiles = {"block_n": 32}
    t = _tiles(m, n, k, block_k, x2.device, tiles)
    if group % t.block_k:
        raise ValueError(f"the AWQ kernel's K tile ({t.block_k}) must divide the group size ({group})")
    tail = (qweight.stride(0), qzeros.stride(0), scales.stride(0))
    out = _launch(_awq_gemm_kernel, x2, n, t, bias, (qweight, qzeros, scales), tail, GROUP=group)
    return out.view(*shape[:-1], n)
