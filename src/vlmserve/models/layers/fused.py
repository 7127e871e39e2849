"""Triton kernels for the small ops of a layer, each one launch instead of several.

At decode batch sizes a layer's time is weight reads plus a long tail of tiny elementwise kernels (RMSNorm is
~7 of them, rotary ~7 per tensor); fusing each into one launch removes most of that tail. Same math as the
torch versions in norm.py / rotary.py (float32 inside, input dtype out) and checked against them in
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
    def _rotary_kernel(
        x_ptr,
        cos_ptr,
        sin_ptr,
        out_ptr,
        stride_xt,
        stride_xh,
        stride_ot,
        stride_oh,
        stride_c,
        HALF: tl.constexpr,
        BLOCK: tl.constexpr,  # HALF rounded up to a power of two (the vision tower's head dim is 80)
    ):
        t = tl.program_id(0)
        h = tl.program_id(1)
        d = tl.arange(0, BLOCK)
        ok = d < HALF
        base = x_ptr + t * stride_xt + h * stride_xh
        x1 = tl.load(base + d, mask=ok).to(tl.float32)
        x2 = tl.load(base + HALF + d, mask=ok).to(tl.float32)
        cos = tl.load(cos_ptr + t * stride_c + d, mask=ok)  # the two halves of cos / sin are equal
        sin = tl.load(sin_ptr + t * stride_c + d, mask=ok)
        out = out_ptr + t * stride_ot + h * stride_oh
        tl.store(out + d, (x1 * cos - x2 * sin).to(out_ptr.dtype.element_ty), mask=ok)
        tl.store(out + HALF + d, (x2 * cos + x1 * sin).to(out_ptr.dtype.element_ty), mask=ok)


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


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (T, H, D) (any strides with a unit last stride); cos, sin (T, D) float32 -> (T, H, D) contiguous."""
    t, h, d = x.shape
    out = torch.empty((t, h, d), dtype=x.dtype, device=x.device)
    if t:
        _rotary_kernel[(t, h)](
            x,
            cos,
            sin,
            out,
            x.stride(0),
            x.stride(1),
            out.stride(0),
            out.stride(1),
            cos.stride(0),
            HALF=d // 2,
            BLOCK=triton.next_power_of_2(d // 2),
        )
    return out
