"""GPU GEMMs for quantized weights: FP8 (W8A8, activations quantized per token / per token-group on the fly)
and AWQ int4 (W4A16, weights dequantized in registers, never as a full-size copy).

    fp8_linear   a Triton GEMM that quantizes activations in registers (per row and 128 columns), for
                 block and per-channel scales; at prefill sizes with per-channel scales on Hopper+,
                 torch._scaled_mm (cuBLASLt, row-wise scales: activations per token)
    awq_linear   Triton: a tiled GEMM for M > GEMV_MAX_ROWS, a GEMV (no tensor cores, every weight byte read
                 once per row) for decode at batch 1-4, where bandwidth is everything

Every path is plain device work with no host synchronisation, so CUDA graphs capture it; the first call of a
shape compiles its kernel, which the graph capture's warm-up run does. The torch references they are tested
against (tests/test_quantization_gpu.py) are `fp8_linear_reference` and `awq_linear_reference`.
Only used for CUDA tensors.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from vlmserve.models.layers.fused import AVAILABLE as TRITON
from vlmserve.models.quantization import awq as awq_layout
from vlmserve.models.quantization.fp8 import FP8, FP8_MAX, MIN_SCALE

if TRITON:
    import triton
    import triton.language as tl

# Up to this many rows the AWQ GEMV runs (one weight read per output row and input row).
GEMV_MAX_ROWS = 4


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


# --- FP8 -----------------------------------------------------------------------------------------------

if TRITON:

    @triton.jit
    def _fp8_gemm_kernel(
        x_ptr,  # (M, K) activations, bf16 / fp16 / fp32
        b_ptr,  # (N, K) fp8
        bs_ptr,  # (N, G) float32 weight scales
        bias_ptr,
        c_ptr,  # (M, N)
        M,
        N,
        K,
        GROUP_K,  # columns per weight scale (block_k; K for per-channel scales)
        stride_xm,
        stride_bn,
        stride_bsn,
        stride_cm,
        HAS_BIAS: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,  # divides GROUP_K; also the activation scale group (ACT_GROUP)
    ):
        # Activations are quantized here, per row and BLOCK_K columns, in registers: no separate
        # quantization kernels (at decode they would outnumber the GEMMs) and no FP8 copy of x in memory.
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        m_ok = offs_m < M
        n_ok = offs_n < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + offs_k
            k_ok = k < K
            x_mask = m_ok[:, None] & k_ok[None, :]
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :], mask=x_mask, other=0.0)
            x = x.to(tl.float32)
            # The scale as quantize_activations computes it (448: e4m3's largest value; 1e-12: MIN_SCALE).
            a_s = tl.maximum(tl.max(tl.abs(x), axis=1) / 448.0, 1e-12)  # (BLOCK_M,)
            a = tl.clamp(x / a_s[:, None], -448.0, 448.0).to(tl.float8e4nv)
            b_mask = n_ok[:, None] & k_ok[None, :]
            b = tl.load(b_ptr + offs_n[:, None] * stride_bn + k[None, :], mask=b_mask, other=0.0)
            b_s = tl.load(bs_ptr + offs_n * stride_bsn + k0 // GROUP_K, mask=n_ok, other=0.0)
            acc += tl.dot(a, tl.trans(b)) * a_s[:, None] * b_s[None, :]
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        c = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :]
        tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


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
    x2: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, block_k: int, bias: torch.Tensor | None
) -> torch.Tensor:
    m, k = x2.shape
    n = weight.shape[0]
    group_k = k if scale.shape[1] == 1 else block_k
    tile_k = triton_act_group(scale, block_k)
    if tile_k < 32:
        raise ValueError(f"FP8 block size {block_k} along K: the Triton kernel needs a multiple of 32")
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(m, n, dtype=x2.dtype, device=x2.device)
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64
    block_n = 64 if m <= 16 else 128
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _fp8_gemm_kernel[grid](
        x2,
        weight,
        scale,
        bias if bias is not None else out,
        out,
        m,
        n,
        k,
        group_k,
        x2.stride(0),
        weight.stride(0),
        scale.stride(0),
        out.stride(0),
        HAS_BIAS=bias is not None,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=tile_k,
        num_warps=4,
    )
    return out


# Rows up to which the fused Triton kernel runs even where _scaled_mm applies: its activation quantization
# costs no extra launches, which at decode batch sizes weighs more than cuBLASLt's better tiles.
SCALED_MM_MIN_ROWS = 64


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


@functools.cache
def _capability(index: int | None) -> tuple[int, int]:
    return tuple(torch.cuda.get_device_capability(index))


def fp8_scaled_mm(
    x2: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    xq, xs = quantize_activations(x2, x2.shape[1])  # (M, K), (M, 1): per token
    out = torch._scaled_mm(
        xq.contiguous(),
        weight.t(),  # (K, N) column-major, as cuBLASLt wants the second operand
        scale_a=xs,
        scale_b=scale.view(1, -1),
        out_dtype=x2.dtype,
    )
    return out if bias is None else out + bias


def fp8_backend(x2: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> str:
    """'scaled_mm' for per-channel weights at prefill sizes on Hopper+, else 'triton' (or 'torch' without
    Triton). NOTE: a heuristic, to be replaced by per-shape measurements on the target GPU."""
    if x2.shape[0] >= SCALED_MM_MIN_ROWS and scaled_mm_applies(x2, weight, scale):
        return "scaled_mm"
    return "triton" if TRITON else "torch"


def fp8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    block_k: int,
    bias: torch.Tensor | None,
    backend: str = "auto",
) -> torch.Tensor:
    """x (..., K) @ dequant(weight (N, K), scale (N, Kb)).T + bias -> (..., N) in x's dtype.
    backend: auto | scaled_mm | triton (tests pin one)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if x2.shape[0] == 0:
        return x.new_empty(*shape[:-1], weight.shape[0])
    if backend == "auto":
        backend = fp8_backend(x2, weight, scale)
    if backend == "scaled_mm":
        out = fp8_scaled_mm(x2, weight, scale, bias)
    elif backend == "triton":
        out = fp8_triton(x2, weight, scale, block_k, bias)
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
        out_ptr,  # (M, N)
        M,
        N,
        K,
        stride_xm,
        stride_qn,
        stride_zn,
        stride_sn,
        stride_om,
        GROUP: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,  # divides GROUP: one zero / scale per row and K tile
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        m_ok = offs_m < M
        n_ok = offs_n < N
        shift = (offs_k % 2) * 4
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + offs_k
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :], mask=m_ok[:, None], other=0.0)
            # Each byte is loaded for both of its nibbles; the second load hits the cache.
            packed = tl.load(
                qw_ptr + offs_n[:, None] * stride_qn + (k // 2)[None, :], mask=n_ok[:, None], other=0
            )
            q = (packed >> shift[None, :]) & 0xF  # (BLOCK_N, BLOCK_K)
            g = k0 // GROUP
            z = tl.load(qz_ptr + offs_n * stride_zn + g, mask=n_ok, other=0)
            s = tl.load(s_ptr + offs_n * stride_sn + g, mask=n_ok, other=0.0).to(tl.float32)
            w = ((q.to(tl.float32) - z.to(tl.float32)[:, None]) * s[:, None]).to(x_ptr.dtype.element_ty)
            acc += tl.dot(x, tl.trans(w))
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        out = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])

    @triton.jit
    def _awq_gemv_kernel(
        x_ptr,  # (M, K), M <= GEMV_MAX_ROWS
        qw_ptr,
        qz_ptr,
        s_ptr,
        bias_ptr,
        out_ptr,
        N,
        K,
        stride_xm,
        stride_qn,
        stride_zn,
        stride_sn,
        stride_om,
        GROUP: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,  # divides GROUP
    ):
        # One program per (input row, BLOCK_N output rows): multiply-adds in float32 and a row reduction,
        # no tensor cores (a 1-row MMA would waste them); the weight bytes stream once.
        row = tl.program_id(0)
        pid_n = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        n_ok = offs_n < N
        shift = (offs_k % 2) * 4
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + offs_k
            x = tl.load(x_ptr + row * stride_xm + k).to(tl.float32)  # (BLOCK_K,)
            packed = tl.load(
                qw_ptr + offs_n[:, None] * stride_qn + (k // 2)[None, :], mask=n_ok[:, None], other=0
            )
            q = ((packed >> shift[None, :]) & 0xF).to(tl.float32)
            g = k0 // GROUP
            z = tl.load(qz_ptr + offs_n * stride_zn + g, mask=n_ok, other=0).to(tl.float32)
            s = tl.load(s_ptr + offs_n * stride_sn + g, mask=n_ok, other=0.0).to(tl.float32)
            # sum_k (q - z) * s * x = s * (sum_k q * x - z * sum_k x): the zero point leaves the inner loop.
            acc += s * (tl.sum(q * x[None, :], axis=1) - z * tl.sum(x, axis=0))
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * stride_om + offs_n, acc.to(out_ptr.dtype.element_ty), mask=n_ok)


def awq_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    group: int,
    bias: torch.Tensor | None,
    backend: str = "auto",
) -> torch.Tensor:
    """x (..., K) @ dequant(qweight (N, K/2), qzeros, scales).T + bias -> (..., N) in x's dtype.
    backend: auto | gemm | gemv (tests pin one)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    m, k = x2.shape
    n = qweight.shape[0]
    block_k = _pow2_divisor(group, 128)
    if not TRITON or block_k < 16 or x2.dtype == torch.float32:
        # Float32 activations (tl.dot would run them as tf32) or a group no power-of-two tile divides.
        return awq_linear_reference(x, qweight, qzeros, scales, group, bias)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(m, n, dtype=x2.dtype, device=x2.device)
    if m == 0:
        return out.view(*shape[:-1], n)
    has_bias = bias is not None
    bias_arg = bias if has_bias else out
    gemv = backend == "gemv" or (backend == "auto" and m <= GEMV_MAX_ROWS)
    if gemv:
        # Enough programs to fill a GPU's SMs on narrow layers (o_proj), each streaming whole weight rows.
        block_n = 16 if n <= 8192 else 32
        _awq_gemv_kernel[(m, triton.cdiv(n, block_n))](
            x2,
            qweight,
            qzeros,
            scales,
            bias_arg,
            out,
            n,
            k,
            x2.stride(0),
            qweight.stride(0),
            qzeros.stride(0),
            scales.stride(0),
            out.stride(0),
            GROUP=group,
            HAS_BIAS=has_bias,
            BLOCK_N=block_n,
            BLOCK_K=block_k,
            num_warps=4,
        )
    else:
        block_m = 16 if m <= 16 else 32 if m <= 32 else 64
        block_n = 64 if m <= 32 else 128
        grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
        _awq_gemm_kernel[grid](
            x2,
            qweight,
            qzeros,
            scales,
            bias_arg,
            out,
            m,
            n,
            k,
            x2.stride(0),
            qweight.stride(0),
            qzeros.stride(0),
            scales.stride(0),
            out.stride(0),
            GROUP=group,
            HAS_BIAS=has_bias,
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            BLOCK_K=block_k,
            num_warps=4,
        )
    return out.view(*shape[:-1], n)
