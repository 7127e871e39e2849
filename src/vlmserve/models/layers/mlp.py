"""The gated SiLU MLP of the Qwen language models, on one fused [gate | up] projection."""

from __future__ import annotations

import torch
from torch import nn

from vlmserve.models.layers.activation import silu_and_mul
from vlmserve.models.layers.weights import merged_linear


class GatedMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False) -> None:
        super().__init__()
        self.gate_up_proj = merged_linear(hidden_size, [intermediate_size, intermediate_size], bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))
