"""Gated activations on fused projections."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vlmserve.models.layers import fused


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """(..., 2 * I) holding [gate | up] -> (..., I) silu(gate) * up."""
    if fused.use_fused(x):
        return fused.silu_and_mul(x)
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up
