"""The gated SiLU MLP of the Qwen language models, on one fused [gate | up] projection (sharded under tensor
parallelism: models/layers/parallel.py)."""

from __future__ import annotations

import torch
from torch import nn

from vlmserve.models.layers.activation import silu_and_mul
from vlmserve.models.layers.parallel import TensorParallel, gate_up_linear, row_linear


class GatedMLP(nn.Module):
    """With `tp`, each rank holds a slice of the intermediate dimension (column-parallel gate/up,
    row-parallel down with one all-reduce)."""

    def __init__(
        self, hidden_size: int, intermediate_size: int, bias: bool = False, tp: TensorParallel | None = None
    ) -> None:
        super().__init__()
        self.gate_up_proj = gate_up_linear(hidden_size, intermediate_size, bias, tp)
        self.down_proj = row_linear(intermediate_size, hidden_size, bias, tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))
