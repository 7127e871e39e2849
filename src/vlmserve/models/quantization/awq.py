"""AWQ 4-bit weights (AutoAWQ's GEMM checkpoints, as Qwen releases its -AWQ models).

A checkpoint stores, per linear with K inputs and N outputs and groups of g inputs:
    qweight (K, N/8) int32    eight 4-bit values of one input row, output columns in AutoAWQ's pack order
    qzeros  (K/g, N/8) int32  4-bit zero points, packed the same way
    scales  (K/g, N) float16
and the float weight is W[k, n] = (q[k, n] - z[k/g, n]) * s[k/g, n], used as x @ W.

In memory the layout is output-major, so that a shard of a fused projection is a row range like a float
weight's, and a GEMV reads each output row's bytes contiguously:
    qweight (N, K/2) uint8    input k of row n in byte k/2, the low nibble for even k
    qzeros  (N, K/g) uint8
    scales  (N, K/g) float16
The GPU kernel (kernels.py) dequantizes in registers; the CPU reference dequantizes the whole weight, then
multiplies in the activations' dtype.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vlmserve.models.quantization.base import (
    QuantizationError,
    QuantizationMethod,
    QuantizedLinear,
    Weights,
    frozen,
    split_name,
)

# Nibble i of a packed int32 holds column AWQ_ORDER[i] of its group of eight (AutoAWQ's packing order, chosen
# for its CUDA kernel's dequantization); column j sits at nibble AWQ_REVERSE_ORDER[j].
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)


def unpack_awq(packed: torch.Tensor) -> torch.Tensor:
    """(R, C/8) int32 in AutoAWQ order -> (R, C) uint8 values 0..15, columns in natural order."""
    shifts = torch.tensor([4 * i for i in AWQ_REVERSE_ORDER], dtype=torch.int32, device=packed.device)
    vals = (packed.to(torch.int32)[:, :, None] >> shifts) & 0xF  # (R, C/8, 8)
    return vals.reshape(packed.shape[0], -1).to(torch.uint8)


def pack_rows(q: torch.Tensor) -> torch.Tensor:
    """(N, K) values 0..15 -> (N, K/2) uint8, the low nibble for even k."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_rows(packed: torch.Tensor) -> torch.Tensor:
    """(N, K/2) uint8 -> (N, K) uint8 values 0..15."""
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(packed.shape[0], -1)


def dequantize(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group: int) -> torch.Tensor:
    """Our layout -> (N, K) float32."""
    q = unpack_rows(qweight).float()  # (N, K)
    z = qzeros.float().repeat_interleave(group, dim=1)  # (N, K)
    return (q - z) * scales.float().repeat_interleave(group, dim=1)


def quantize(weight: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, K) float -> our layout, asymmetric 4-bit per group of inputs (AWQ's round-to-nearest step)."""
    n, k = weight.shape
    w = weight.float().reshape(n, k // group, group)
    lo, hi = w.amin(-1), w.amax(-1)  # (N, K/g)
    scales = ((hi - lo).clamp(min=1e-5) / 15).half()
    s = scales.float()
    zeros = (-torch.round(lo / s)).clamp(0, 15)
    q = (torch.round(w / s[..., None]) + zeros[..., None]).clamp(0, 15).reshape(n, k)
    return pack_rows(q), zeros.to(torch.uint8), scales


class AwqLinear(QuantizedLinear):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: nn.Parameter | None,
        group: int,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        if in_features % group or in_features % 2:
            raise QuantizationError(
                f"AWQ group size {group} does not divide this layer's {in_features} inputs; the checkpoint's "
                "quantization_config.group_size must divide every quantized layer's in_features"
            )
        self.in_features, self.out_features, self.group = in_features, out_features, group
        groups = in_features // group
        self.qweight = frozen(torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.qzeros = frozen(torch.empty(out_features, groups, dtype=torch.uint8, device=device))
        self.scales = frozen(torch.empty(out_features, groups, dtype=torch.float16, device=device))
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            from vlmserve.models.quantization import kernels

            return kernels.awq_linear(x, self.qweight, self.qzeros, self.scales, self.group, self.bias)
        w = dequantize(self.qweight, self.qzeros, self.scales, self.group).to(x.dtype)
        return F.linear(x, w, self.bias)

    def init_random(self, weight: torch.Tensor) -> None:
        q, z, s = quantize(weight, self.group)
        self.qweight.copy_(q)
        self.qzeros.copy_(z)
        self.scales.copy_(s)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group={self.group}, bias={self.bias is not None}"


class AwqMethod(QuantizationMethod):
    name = "awq"

    def __init__(self, group: int = 128, ignore: tuple[str, ...] = ()) -> None:
        super().__init__(ignore)
        self.group = group

    def describe(self) -> str:
        return f"awq (GEMM, 4-bit, group {self.group})"

    def make_linear(self, linear: nn.Linear) -> AwqLinear:
        return AwqLinear(
            linear.in_features, linear.out_features, linear.bias, self.group, linear.weight.device
        )

    def convert(self, weights: Weights, is_quantized: Callable[[str], bool]) -> Iterator[tuple[str, Any]]:
        kept: dict[str, dict[str, torch.Tensor]] = {}  # AWQ tensors of modules we run in float
        for name, tensor in weights:
            prefix, leaf = split_name(name)
            if leaf not in ("qweight", "qzeros", "scales"):
                if leaf == "weight" and is_quantized(prefix):
                    raise QuantizationError(
                        f"{name} is a float weight, but the checkpoint's quantization_config quantizes {prefix} "
                        "with AWQ (qweight / qzeros / scales): is the checkpoint complete?"
                    )
                yield name, tensor
                continue
            if leaf == "qweight":  # (K, N/8) int32 -> (N, K/2) uint8
                ours = pack_rows(unpack_awq(tensor).t())
            elif leaf == "qzeros":  # (K/g, N/8) int32 -> (N, K/g) uint8
                ours = unpack_awq(tensor).t().contiguous()
            else:  # scales (K/g, N) -> (N, K/g) float16
                ours = tensor.t().to(torch.float16).contiguous()
            if is_quantized(prefix):
                yield name, ours
                continue
            part = kept.setdefault(prefix, {})
            part[leaf] = ours
            if len(part) == 3:
                del kept[prefix]
                yield (
                    f"{prefix}.weight",
                    dequantize(part["qweight"], part["qzeros"], part["scales"], self.group),
                )
        if kept:
            raise QuantizationError(
                f"AWQ tensors without the rest of their module: {', '.join(sorted(kept)[:3])} "
                "(each quantized linear has qweight, qzeros and scales)"
            )
