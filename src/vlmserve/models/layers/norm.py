"""RMSNorm, computed in float32 and cast back before the weight multiply (as the reference does); `add_forward`
fuses the residual add before it."""

from __future__ import annotations

import torch
from torch import nn

from vlmserve.models.layers import fused


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fused.use_fused(x):
            return fused.rms_norm(x, self.weight, self.eps)
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        # NOTE: the reference casts to the input dtype *before* multiplying by the weight; doing it after
        # changes bf16 results by one rounding step.
        return self.weight * x32.to(dtype)

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + residual, its norm): a residual add and the next norm in one kernel on the GPU."""
        if fused.use_fused(x) and x.dtype == residual.dtype:
            return fused.add_rms_norm(x, residual, self.weight, self.eps)
        total = x + residual
        return total, self(total)
