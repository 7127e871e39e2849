"""FP8 (e4m3) weights: block-scaled checkpoints, per-tensor / per-channel checkpoints, and online quantization.

One layout serves every FP8 format: `weight` (N, K) float8_e4m3fn and `weight_scale` (N, ceil(K / block_k))
float32, so that the float weight is `weight * weight_scale` with each scale covering one output row and
block_k input columns. Block-scaled checkpoints ([128, 128] blocks, `weight_scale_inv` as in DeepSeek-V3 and
Qwen3-VL-FP8) repeat each block's scale over its 128 rows; per-tensor and per-channel checkpoints
(compressed-tensors `weight_scale`, vLLM's per-tensor fp8) and online quantization have block_k = K. Per-row
scales cost 4 bytes per 128 weights (3% of an FP8 weight) and let a fused projection (q/k/v, gate/up) hold
shards whose row counts are no multiple of 128, each with its own scales, as plain row ranges.

Forward: on a GPU, activations are quantized to FP8 per token (per token and 128-column group with block
scales) and the GEMM runs in FP8 (kernels.py); on a CPU the weight is dequantized and multiplied in the
activations' dtype (the reference: weight-only, activations unquantized).
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

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
# A scale never below this: an all-zero row would otherwise divide by zero.
MIN_SCALE = 1e-12


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float -> (N, K) fp8 and (N, 1) float32 scales (amax of each row maps to FP8's largest value)."""
    w = weight.float()
    scale = (w.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp(min=MIN_SCALE)  # (N, 1)
    return (w / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def quantize_blocks(weight: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float -> (N, K) fp8 and (N, ceil(K / block_k)) float32 per-row scales, one scale per
    (block_n, block_k) block (the amax of each block maps to FP8's largest value), repeated over its rows."""
    n, k = weight.shape
    bn, bk = block
    nb, kb = -(-n // bn), -(-k // bk)
    w = F.pad(weight.float(), (0, kb * bk - k, 0, nb * bn - n)).view(nb, bn, kb, bk)
    scale = (w.abs().amax(dim=(1, 3)) / FP8_MAX).clamp(min=MIN_SCALE)  # (nb, kb)
    q = (w / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8).view(nb * bn, kb * bk)[:n, :k]
    return q, scale.repeat_interleave(bn, dim=0)[:n]


def dequantize(weight: torch.Tensor, scale: torch.Tensor, block_k: int) -> torch.Tensor:
    """(N, K) fp8, (N, Kb) scales -> (N, K) float32."""
    k = weight.shape[1]
    return weight.float() * scale.float().repeat_interleave(block_k, dim=1)[:, :k]


class Fp8Linear(QuantizedLinear):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: nn.Parameter | None,
        block: tuple[int, int] | None,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.block = block  # (rows, columns) per scale of a block-scaled checkpoint; None: per channel
        self.block_k = block[1] if block else in_features
        dev = device
        groups = -(-in_features // self.block_k)
        self.weight = frozen(torch.empty(out_features, in_features, dtype=FP8, device=dev))
        # Column-major: the GPU kernel reads, per K block, the scales of consecutive output rows (coalesced).
        self.weight_scale = frozen(torch.empty(groups, out_features, dtype=torch.float32, device=dev).t())
        self.bias = bias
        # The scales again as cuBLASLt's 128x128 block-scaled GEMM reads them (finalize), where they are
        # such blocks: its batch and prefill sizes' GEMM on Hopper. A buffer, so that .to() moves it; derived,
        # so not saved.
        self.cublas_block_scales: torch.Tensor | None
        self.register_buffer("cublas_block_scales", None, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            from vlmserve.models.quantization import kernels

            return kernels.fp8_linear(
                x,
                self.weight,
                self.weight_scale,
                self.block_k,
                self.bias,
                block_scales=self.cublas_block_scales,
            )
        w = dequantize(self.weight, self.weight_scale, self.block_k).to(x.dtype)
        return F.linear(x, w, self.bias)

    def init_random(self, weight: torch.Tensor) -> None:
        # As the checkpoint would hold it: one scale per block, or per channel (repeated over the row's
        # groups when block_k < K).
        q, scale = quantize_blocks(weight, self.block) if self.block else quantize_per_channel(weight)
        self.weight.copy_(q)
        self.weight_scale.copy_(scale.expand_as(self.weight_scale))

    def finalize(self) -> None:
        from vlmserve.models.quantization import kernels

        self.cublas_block_scales = kernels.cublas_block_scales(self.weight_scale, self.block_k)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, block_k={self.block_k}, bias={self.bias is not None}"


class Fp8Method(QuantizationMethod):
    """FP8 weights from an FP8 checkpoint (block-scaled or per-tensor / per-channel scales), or from a float
    checkpoint quantized per output channel while it loads (online)."""

    min_capability = (8, 9)
    gpu_feature = "FP8 support (Ada, Hopper or newer)"

    def __init__(
        self,
        name: str,
        block: tuple[int, int] | None = None,
        online: bool = False,
        ignore: tuple[str, ...] = (),
        scale_leaf: str | None = None,
    ) -> None:
        super().__init__(ignore)
        self.name = name
        self.block = block
        self.online = online
        # The checkpoint's name for the weight scales: block-scaled fp8 checkpoints say `weight_scale_inv`
        # (a multiplier despite the name), per-tensor ones and compressed-tensors `weight_scale`.
        self.scale_leaf = scale_leaf or ("weight_scale_inv" if block else "weight_scale")

    def describe(self) -> str:
        if self.online:
            return f"{self.name} (online, per-channel)"
        return f"{self.name} (block {list(self.block)})" if self.block else f"{self.name} (per-channel)"

    def make_linear(self, linear: nn.Linear) -> Fp8Linear:
        return Fp8Linear(
            linear.in_features, linear.out_features, linear.bias, self.block, linear.weight.device
        )

    def _scale_rows(self, scale: torch.Tensor, rows: int, prefix: str) -> torch.Tensor:
        """A checkpoint's scale tensor -> (rows, Kb) float32, one row per output channel."""
        s = scale.float()
        if self.block:
            if s.dim() != 2:
                raise QuantizationError(
                    f"{prefix}.{self.scale_leaf} has shape {tuple(s.shape)}; block-scaled FP8 stores one scale "
                    f"per {list(self.block)} block, a 2-D tensor"
                )
            return s.repeat_interleave(self.block[0], dim=0)[:rows].contiguous()
        if s.numel() == 1:  # per tensor
            return s.reshape(1, 1).expand(rows, 1).contiguous()
        if s.numel() == rows:  # per channel: (N, 1) or (N,)
            return s.reshape(rows, 1).contiguous()
        raise QuantizationError(
            f"{prefix}.{self.scale_leaf} has shape {tuple(s.shape)}; per-tensor FP8 has one scale, per-channel FP8 "
            f"one per output row ({rows})"
        )

    def convert(self, weights: Weights, is_quantized: Callable[[str], bool]) -> Iterator[tuple[str, Any]]:
        scale_leaf = self.scale_leaf
        pending: dict[str, dict[str, torch.Tensor]] = {}  # prefix -> the half of (weight, scale) seen so far
        for name, tensor in weights:
            prefix, leaf = split_name(name)
            if leaf == "input_scale":
                # Static activation scales: the GPU path quantizes activations per token instead (at least
                # as accurate); the CPU reference does not quantize them.
                continue
            fp8_weight = leaf == "weight" and tensor.dtype == FP8
            if not fp8_weight and leaf != scale_leaf:
                if leaf == "weight" and tensor.dtype.is_floating_point and is_quantized(prefix):
                    if not self.online:
                        raise QuantizationError(
                            f"{name} is stored in {tensor.dtype}, but the checkpoint's quantization_config "
                            f"quantizes {prefix} to FP8 (is the checkpoint complete?)"
                        )
                    q, scale = quantize_per_channel(tensor)
                    yield f"{prefix}.weight", q
                    yield f"{prefix}.weight_scale", scale
                else:
                    yield name, tensor
                continue
            part = pending.setdefault(prefix, {})
            part[leaf] = tensor
            if len(part) < 2:
                continue
            del pending[prefix]
            w = part["weight"]
            scale = self._scale_rows(part[scale_leaf], w.shape[0], prefix)
            block_k = self.block[1] if self.block else w.shape[1]
            if is_quantized(prefix):
                yield f"{prefix}.weight", w
                yield f"{prefix}.weight_scale", scale
            else:  # a module kept in float (vision tower, lm_head, a skipped layer) stored in FP8
                yield f"{prefix}.weight", dequantize(w, scale, block_k)
        if pending:
            lone = ", ".join(f"{p}.{next(iter(v))}" for p, v in list(pending.items())[:3])
            raise QuantizationError(
                f"{len(pending)} FP8 tensor(s) without their pair, e.g. {lone}: every FP8 `weight` needs its "
                f"`{scale_leaf}` (is the checkpoint complete, and its quantization_config the right one?)"
            )
