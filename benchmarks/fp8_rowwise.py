"""Per-channel FP8 at decode batch sizes: cuBLASLt's row-wise GEMM alone, the activation quantization in
front of it (torch ops before, one Triton kernel now), the whole linear by each backend, and bf16 cuBLAS; the
7B's four linears x 28 layers, CUDA-graph replays, ms per decode step.

    python benchmarks/fp8_rowwise.py        # on a Hopper GPU
"""

from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from quant_kernels import LAYERS, SHAPES, graph_time_us, rel

from vlmserve.models.quantization import kernels
from vlmserve.models.quantization.fp8 import quantize_per_channel


def candidates(x: torch.Tensor, w: torch.Tensor, qc: torch.Tensor, sc: torch.Tensor) -> dict:
    k = x.shape[1]
    xq, xs = kernels.quantize_rows(x)
    return {
        "bf16 cuBLAS": lambda: F.linear(x, w),
        "row-wise GEMM alone": lambda: torch._scaled_mm(
            xq, qc.t(), scale_a=xs, scale_b=sc.view(1, -1), out_dtype=torch.bfloat16
        ),
        "quantization, torch ops": lambda: kernels.quantize_activations(x, k),
        "quantization, one kernel": lambda: kernels.quantize_rows(x),
        "linear, scaled_mm": lambda: kernels.fp8_linear(x, qc, sc, k, None, "scaled_mm"),
        "linear, triton": lambda: kernels.fp8_linear(x, qc, sc, k, None, "triton"),
    }


def main() -> None:
    rows = [int(r) for r in os.environ.get("ROWS", "1,16,64,128,256").split(",")]
    per: dict[str, dict[int, float]] = {}
    with torch.inference_mode():
        for n, k in SHAPES.values():
            w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
            qc, sc = (t.cuda() for t in quantize_per_channel(w))
            for m in rows:
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                cands = candidates(x, w, qc, sc)
                for key in ("linear, scaled_mm", "linear, triton"):
                    assert rel(cands[key](), F.linear(x, w)) < 5e-2, key
                for key, fn in cands.items():
                    per.setdefault(key, {}).setdefault(m, 0.0)
                    per[key][m] += graph_time_us(fn) * LAYERS / 1e3
    for key, by_m in per.items():
        print(f"{key:26s}", {m: round(v, 3) for m, v in by_m.items()})


if __name__ == "__main__":
    main()
