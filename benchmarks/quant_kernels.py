"""Quantized GEMM and MoE kernels at the released models' shapes: correctness against the torch references,
and time per call (CUDA-graph replays, so launch overhead is excluded as it is in a served decode step).

    python benchmarks/quant_kernels.py [--old OLD_KERNELS.py] [--old-moe OLD_MOE.py] [--json out.json]

--old / --old-moe: a previous copy of models/quantization/kernels.py / models/layers/moe.py, timed beside the
current ones (before/after in one run). Shapes: Qwen2.5-VL-7B's linears (qkv, o, gate_up, down) and
Qwen3-VL-30B-A3B's MoE layer (128 experts, top 8, hidden 2048, expert intermediate 768).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from vlmserve.checkpoints.quantized_checkpoint import fp8_block_quantize
from vlmserve.models.layers import moe as moe_mod
from vlmserve.models.quantization import awq, fp8, kernels
from vlmserve.models.quantization.kernels import _store_tile


# The quantized kernels' split-K GEMM without quantization, to time against cuBLAS at decode sizes (not used
# by the server: a candidate until it measures faster).
@triton.jit
def _dense_gemm_kernel(
    x_ptr,  # (M, K)
    w_ptr,  # (N, K), x's dtype
    bias_ptr,
    c_ptr,  # (M, N) output, or (SPLITS, M, N) float32 partials when SPLIT
    M,
    N,
    K,
    TILES_PER_SPLIT,
    stride_xm,
    stride_cm,
    stride_wn,
    HAS_BIAS: tl.constexpr,
    SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for i in range(0, TILES_PER_SPLIT):
        k = (pid_s * TILES_PER_SPLIT + i) * BLOCK_K + offs_k
        k_ok = k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :], mask=m_ok[:, None] & k_ok[None, :],
                    other=0.0)  # fmt: skip
        w = tl.load(w_ptr + offs_n[:, None] * stride_wn + k[None, :], mask=n_ok[:, None] & k_ok[None, :],
                    other=0.0)  # fmt: skip
        acc += tl.dot(x, tl.trans(w))
    _store_tile(acc, c_ptr, bias_ptr, offs_m, offs_n, M, N, stride_cm, pid_s, HAS_BIAS, SPLIT)


def dense_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, tiles: dict[str, int] | None = None
) -> torch.Tensor:
    """x (..., K) @ weight (N, K).T + bias with the split-K Triton kernel (decode sizes; see _tiles)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    n, k = weight.shape
    t = kernels._tiles(x2.shape[0], n, k, 128, x2.device, tiles)
    out = kernels._launch(_dense_gemm_kernel, x2, n, t, bias, (weight,), (weight.stride(0),))
    return out.view(*shape[:-1], n)


SHAPES = {"qkv": (4608, 3584), "o": (3584, 3584), "gate_up": (37888, 3584), "down": (3584, 18944)}
LAYERS = 28


def load(path: str, name: str):  # noqa: ANN201
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def graph_time_us(fn, reps: int = 20) -> float:  # noqa: ANN001
    """Mean time of fn() replayed from a CUDA graph holding `reps` calls."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    g.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    n = 10
    for _ in range(n):
        g.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (n * reps)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--old", default=None)
    ap.add_argument("--old-moe", default=None)
    ap.add_argument("--rows", default="1,4,16,128,1024")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    old = load(args.old, "old_kernels") if args.old else None
    old_moe = load(args.old_moe, "old_moe") if args.old_moe else None
    torch.manual_seed(0)
    dev = "cuda"
    res: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "linear": {}, "moe": {}}
    rows_list = [int(r) for r in args.rows.split(",")]
    per_step: dict[str, dict[int, float]] = {}
    with torch.inference_mode():
        for name, (n, k) in SHAPES.items():
            w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) / k**0.5
            qb, sinv = (t.to(dev) for t in fp8_block_quantize(w.float(), (128, 128)))
            sb = sinv.repeat_interleave(128, 0)[:n].contiguous()
            qc, sc = (t.to(dev) for t in fp8.quantize_per_channel(w.float()))
            aq, az, asc = (t.to(dev) for t in awq.quantize(w.float(), 128))
            for m in rows_list:
                x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
                r: dict[str, float] = {}
                r["bf16"] = graph_time_us(lambda: F.linear(x, w))
                if m <= 16:  # the split-K Triton kernel unquantized, against cuBLAS
                    r["bf16_triton_err"] = rel(dense_linear(x, w, None), F.linear(x.float(), w.float()))
                    for name_t, t in (
                        ("", None),
                        ("_n32k256", {"block_n": 32, "block_k": 256}),
                        ("_n128k64", {"block_n": 128, "block_k": 64}),
                        ("_n64k128s6", {"num_stages": 6}),
                    ):
                        r["bf16_triton" + name_t] = graph_time_us(lambda: dense_linear(x, w, None, tiles=t))
                ref = kernels.fp8_linear_reference(x, qb, sb, 128, None, 128)
                r["fp8_block_err"] = rel(kernels.fp8_linear(x, qb, sb, 128, None), ref)
                r["fp8_block"] = graph_time_us(lambda: kernels.fp8_linear(x, qb, sb, 128, None))
                r["fp8_channel"] = graph_time_us(lambda: kernels.fp8_linear(x, qc, sc, k, None))
                if kernels.scaled_mm_applies(x, qc, sc):
                    r["fp8_channel_scaled_mm"] = graph_time_us(
                        lambda: kernels.fp8_linear(x, qc, sc, k, None, backend="scaled_mm")
                    )
                ref = kernels.awq_linear_reference(x, aq, az, asc, 128, None)
                r["awq_err"] = rel(kernels.awq_linear(x, aq, az, asc, 128, None), ref)
                r["awq"] = graph_time_us(lambda: kernels.awq_linear(x, aq, az, asc, 128, None))
                if old is not None:
                    r["old_fp8_block"] = graph_time_us(lambda: old.fp8_linear(x, qb, sb, 128, None))
                    r["old_awq"] = graph_time_us(lambda: old.awq_linear(x, aq, az, asc, 128, None))
                if m >= 128:  # tile alternatives at batch / prefill sizes
                    for bm, bn, warps, stages in (
                        (64, 128, 4, 3),
                        (128, 128, 8, 3),
                        (128, 64, 4, 4),
                        (64, 64, 4, 4),
                        (128, 256, 8, 3),
                    ):
                        t = {
                            "block_m": bm,
                            "block_n": bn,
                            "num_warps": warps,
                            "num_stages": stages,
                            "splits": 1,
                        }
                        key = f"{bm}x{bn}w{warps}s{stages}"
                        try:
                            r[f"fp8_block_{key}"] = graph_time_us(
                                lambda: kernels.fp8_linear(x, qb, sb, 128, None, tiles=t)
                            )
                            r[f"awq_{key}"] = graph_time_us(
                                lambda: kernels.awq_linear(x, aq, az, asc, 128, None, tiles=t)
                            )
                        except Exception as e:  # noqa: BLE001 (a tile that does not fit the SM's memory)
                            r[f"fail_{key}"] = str(e)[:80]
                res["linear"][f"{name}_m{m}"] = r
                for key, v in r.items():
                    if not key.endswith("_err") and isinstance(v, float):
                        per_step.setdefault(key, {}).setdefault(m, 0.0)
                        per_step[key][m] += v * LAYERS / 1e3
                print(
                    name, m, {a: round(b, 4) if isinstance(b, float) else b for a, b in r.items()}, flush=True
                )
        res["linears_ms_per_step"] = per_step
        print("linears per decode step (ms, 28 layers):")
        for key, by_m in per_step.items():
            print(f"  {key:32s}", {m: round(v, 3) for m, v in by_m.items()})

        # MoE: Qwen3-VL-30B-A3B's layer
        e, topk, h, inter = 128, 8, 2048, 768
        w13 = torch.randn(e, 2 * inter, h, device=dev, dtype=torch.bfloat16) / h**0.5
        w2 = torch.randn(e, h, inter, device=dev, dtype=torch.bfloat16) / inter**0.5
        for t in (1, 2, 4, 8, 32, 128, 512):
            x = torch.randn(t, h, device=dev, dtype=torch.bfloat16)
            logits = torch.randn(t, e, device=dev)
            wts, ids = torch.topk(torch.softmax(logits, -1), topk, -1)
            wts = (wts / wts.sum(-1, keepdim=True)).to(torch.bfloat16)
            ref = moe_mod.moe_reference(x.float(), w13.float(), w2.float(), wts.float(), ids)
            r = {"err": rel(moe_mod.fused_moe_triton(x, w13, w2, wts, ids), ref)}
            r["new"] = graph_time_us(lambda: moe_mod.fused_moe_triton(x, w13, w2, wts, ids), reps=5)
            if old_moe is not None:
                r["old"] = graph_time_us(lambda: old_moe.fused_moe_triton(x, w13, w2, wts, ids), reps=5)
            if t >= 32:
                for bn, bk, warps, stages in (
                    (64, 64, 4, 3),
                    (64, 128, 4, 3),
                    (128, 64, 4, 3),
                    (128, 128, 8, 3),
                    (32, 128, 4, 4),
                ):
                    cfg = {"BLOCK_N": bn, "BLOCK_K": bk, "num_warps": warps, "num_stages": stages}
                    try:
                        r[f"{bn}x{bk}w{warps}s{stages}"] = graph_time_us(
                            lambda: moe_mod.fused_moe_triton(x, w13, w2, wts, ids, tiles=cfg), reps=5
                        )
                    except Exception as ex:  # noqa: BLE001
                        r[f"fail_{bn}x{bk}"] = str(ex)[:80]
            # bytes of the distinct experts' weights this batch reads, over the H200's ~4.8 TB/s
            distinct = ids.unique().numel()
            r["floor_us"] = distinct * 3 * inter * h * 2 / 4.8e6
            res["moe"][f"t{t}"] = r
            print("moe", t, {a: round(b, 4) if isinstance(b, float) else b for a, b in r.items()}, flush=True)
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
