"""Triton kernels for the small ops of a layer, each one launch instead of several.

At decode batch sizes a layer's time is weight reads plus a long tail of tiny elementwise kernels (RMSNorm is
~7 of them, rotary ~7 per tensor, SiLU-and-mul 2 with an intermediate); fusing each into one launch removes
most of that tail, and in prefill each reads and writes its tensors once. Same math as the torch versions in
norm.py / rotary.py / activation.py (float32 inside, input dtype out) and checked against them in
tests/test_gpu_kernels.py. Only used for CUDA tensors; `AVAILABLE` is False where Triton is missing.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl

    AVAILABLE = True
except ImportError:  # CPU-only installs: the torch paths are used
    AVAILABLE = False


def use_fused(x: torch.Tensor) -> bool:
    """The kernels have no backward, so they run only where no gradient is recorded (serving runs under
    inference_mode); with autograd on (training) the torch ops are used, else gradients would silently stop
    at every norm."""
    return AVAILABLE and x.is_cuda and not torch.is_grad_enabled()


if AVAILABLE:

    @triton.jit
    def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, stride_x, stride_out, n_cols, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.rsqrt(tl.sum(x * x, 0) / n_cols + eps)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0)
        # As the reference: normalise in float32, cast to the input dtype, then multiply by the weight.
        y = (x * rstd).to(out_ptr.dtype.element_ty).to(tl.float32) * w.to(tl.float32)
        tl.store(out_ptr + row * stride_out + cols, y.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _add_rms_norm_kernel(x_ptr, r_ptr, w_ptr, sum_ptr, out_ptr, stride_x, stride_r, stride_sum, stride_out,
                             n_cols, eps, BLOCK: tl.constexpr):  # fmt: skip
        # sum = x + r rounded to the input dtype (as the unfused add), then the RMSNorm of that rounded sum.
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        r = tl.load(r_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        s = (x + r).to(sum_ptr.dtype.element_ty)
        tl.store(sum_ptr + row * stride_sum + cols, s, mask=mask)
        s = s.to(tl.float32)
        rstd = tl.rsqrt(tl.sum(s * s, 0) / n_cols + eps)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0)
        y = (s * rstd).to(out_ptr.dtype.element_ty).to(tl.float32) * w.to(tl.float32)
        tl.store(out_ptr + row * stride_out + cols, y.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _rotary_kernel(
        x_ptr,
        cos_ptr,
        sin_ptr,
        out_ptr,
        wq_ptr,  # NORM: q's (D,) norm weight, for heads below Q_HEADS
        wk_ptr,  # NORM: k's, for the others
        stride_xt,
        stride_xh,
        stride_ot,
        stride_oh,
        stride_c,
        HEADS,
        Q_HEADS,
        eps,
        NORM: tl.constexpr,  # Qwen3: each head RMS-normalised (then times its weight) before the rotation
        HALF: tl.constexpr,
        BLOCK_H: tl.constexpr,  # HEADS rounded up to a power of two
        BLOCK: tl.constexpr,  # HALF rounded up to a power of two (the vision tower's head dim is 80)
    ):
        # One program per token, all its heads at once: cos / sin are read once, and a vision tower's
        # thousands of patches do not become tens of thousands of tiny programs.
        t = tl.program_id(0)
        h = tl.arange(0, BLOCK_H)[:, None]
        d = tl.arange(0, BLOCK)[None, :]
        dm = d < HALF
        ok = (h < HEADS) & dm
        dt = out_ptr.dtype.element_ty
        base = x_ptr + t * stride_xt + h * stride_xh + d
        x1 = tl.load(base, mask=ok, other=0.0).to(tl.float32)
        x2 = tl.load(base + HALF, mask=ok, other=0.0).to(tl.float32)
        if NORM:
            # RMSNorm's roundings: normalised in float32, cast, times the weight, cast (what the rotation of
            # the separate kernels would read)
            rstd = tl.rsqrt((tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1)) / (2 * HALF) + eps)[:, None]
            is_q = h < Q_HEADS
            w1 = tl.where(is_q, tl.load(wq_ptr + d, mask=dm), tl.load(wk_ptr + d, mask=dm)).to(tl.float32)
            w2 = tl.where(is_q, tl.load(wq_ptr + HALF + d, mask=dm), tl.load(wk_ptr + HALF + d, mask=dm)).to(
                tl.float32
            )
            x1 = ((x1 * rstd).to(dt).to(tl.float32) * w1).to(dt).to(tl.float32)
            x2 = ((x2 * rstd).to(dt).to(tl.float32) * w2).to(dt).to(tl.float32)
        cos = tl.load(cos_ptr + t * stride_c + d, mask=dm)  # the two halves of cos / sin are equal
        sin = tl.load(sin_ptr + t * stride_c + d, mask=dm)
        out = out_ptr + t * stride_ot + h * stride_oh + d
        tl.store(out, (x1 * cos - x2 * sin).to(dt), mask=ok)
        tl.store(out + HALF, (x2 * cos + x1 * sin).to(dt), mask=ok)

    @triton.jit
    def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_out, n_cols, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_cols
        gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(x_ptr + row * stride_x + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
        # As the reference (F.silu, then a multiply): silu rounded to the input dtype before the product.
        act = (gate * tl.sigmoid(gate)).to(out_ptr.dtype.element_ty).to(tl.float32)
        tl.store(out_ptr + row * stride_out + cols, (act * up).to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """(..., H) -> (..., H): one program per row."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    out = torch.empty(x2.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    if x2.shape[0]:
        _rms_norm_kernel[(x2.shape[0],)](
            x2,
            weight,
            out,
            x2.stride(0),
            out.stride(0),
            shape[-1],
            eps,
            BLOCK=triton.next_power_of_2(shape[-1]),
        )
    return out.view(shape)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + residual, rms_norm(x + residual)) for (..., H) inputs of one dtype, in one pass: one program per
    row."""
    shape = x.shape
    x2, r2 = x.reshape(-1, shape[-1]), residual.reshape(-1, shape[-1])
    total = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    out = torch.empty(x2.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    if x2.shape[0]:
        _add_rms_norm_kernel[(x2.shape[0],)](
            x2, r2, weight, total, out, x2.stride(0), r2.stride(0), total.stride(0), out.stride(0), shape[-1],
            eps, BLOCK=triton.next_power_of_2(shape[-1]),
        )  # fmt: skip
    return total.view(shape), out.view(shape)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (T, H, D) (any strides with a unit last stride); cos, sin (T, D) float32 -> (T, H, D) contiguous."""
    return _rotary(x, cos, sin)


def qk_norm_rotary(
    x: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    q_heads: int,
    eps: float,
    cos: torch.Tensor,
    sin: torch.Tensor,
) -> torch.Tensor:
    """x (T, Hq + Hkv, D) q's heads then k's (any strides with a unit last stride), weights (D,) of x's dtype;
    cos, sin (T, D) float32 -> (T, Hq + Hkv, D) contiguous: rotary(rms_norm(head)) per head, one launch."""
    return _rotary(x, cos, sin, (q_weight, k_weight, q_heads, eps))


def _rotary(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    norm: tuple[torch.Tensor, torch.Tensor, int, float] | None = None,
) -> torch.Tensor:
    t, h, d = x.shape
    out = torch.empty((t, h, d), dtype=x.dtype, device=x.device)
    wq, wk, q_heads, eps = norm if norm is not None else (x, x, h, 0.0)  # x: pointers the kernel never reads
    if t:
        _rotary_kernel[(t,)](
            x, cos, sin, out, wq, wk, x.stride(0), x.stride(1), out.stride(0), out.stride(1), cos.stride(0), h,
            q_heads, eps, NORM=norm is not None, HALF=d // 2, BLOCK_H=triton.next_power_of_2(h),
            BLOCK=triton.next_power_of_2(d // 2),
        )  # fmt: skip
    return out


SILU_BLOCK = 1024


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """(..., 2 * I) [gate | up] (unit last stride) -> (..., I) silu(gate) * up, in one pass over x."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    n = shape[-1] // 2
    out = torch.empty((x2.shape[0], n), dtype=x.dtype, device=x.device)
    if x2.shape[0]:
        _silu_and_mul_kernel[(x2.shape[0], triton.cdiv(n, SILU_BLOCK))](
            x2, out, x2.stride(0), out.stride(0), n, BLOCK=SILU_BLOCK
        )
    return out.view(*shape[:-1], n)
