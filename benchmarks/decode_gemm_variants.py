"""Decode-size GEMMs for FP8 and AWQ int4 weights (1-16 rows): launch shapes of the current Triton kernels,
the cost of their pieces, and candidates, at the 7B's linear shapes, against float references.

    python benchmarks/decode_gemm_variants.py [--rows 1,4,16] [--json out.json]
    TRITON_INTERPRET=1 python benchmarks/decode_gemm_variants.py --interp   # the candidates' arithmetic on a CPU

Timing: every call reads its own copy of the weights (28, as the 7B's layers) and the 28 calls are replayed
from one CUDA graph, so no weight comes from L2 and launch gaps count as in a graphed decode step.

Candidates:
    tiles           the current kernels under other (block_n, num_stages) and K splits
    prequant_only   the FP8 GEMM on activations quantized beforehand, the quantization kernel not timed: what
                    the GEMM would cost if the kernel before it (a norm, SiLU-and-mul) wrote FP8
    fused_reduce    the split-K reduction inside the FP8 GEMM (the last program of an output tile adds the
                    partials): one launch per linear, not two (from quant_gemm_variants.py)
    awq_magic       AWQ with no int-to-float conversion: each nibble q is or-ed into the bits of 128.0 (bf16;
                    1024.0 in fp16), giving 128 + q exactly, and the zero and the 128 are taken off after the dot
                    (sum (128+q) x - (128+z) sum x), times the scale: two integer ops per weight instead of
                    I2F, a subtract, a multiply and F2F

Measured on the H200 (benchmarks/RESULTS.md, 2026-12-03 "FP8 activations quantized once per linear"): the
FP8 GEMM on activations quantized beforehand took 2.39 ms a step at one row with the quantization kernel
(2.20-2.30 without it) against 2.77-2.82 with the activations quantized in every program, so the kernels now
always quantize beforehand; the fused reduction and other tiles gained less; awq_magic was more accurate
(relative error 1e-4 against 2.5e-3) but slower (gate_up 80 us against 64).

Measured first (same session, that script not kept): a CUDA-core GEMV (no MMA; weights converted in registers and
multiplied by bf16 activations in float32) streamed FP8 at 1.5-2.6 TB/s and int4 at 0.5-1 TB/s, below the
current kernels: FP8 -> f16 -> f32 conversions and their FMAs are ~4 instructions per weight byte, which the
SMs cannot issue at 4 TB/s (the float16-to-float32 conversion runs at a fraction of the FMA rate).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from quant_gemm_variants import fp8_fused_reduce  # noqa: E402

from vlmserve.models.quantization import awq, kernels  # noqa: E402
from vlmserve.models.quantization.fp8 import quantize_blocks, quantize_per_channel  # noqa: E402

SHAPES = {"qkv": (4608, 3584), "o": (3584, 3584), "gate_up": (37888, 3584), "down": (3584, 18944)}
LAYERS = 28


@triton.jit
def _awq_magic_kernel(
    x_ptr,  # (M, K) bf16 / fp16
    qw_ptr,  # (N, K/2) uint8, low nibble = even k
    qz_ptr,  # (N, K/GROUP) uint8
    s_ptr,  # (N, K/GROUP) fp16
    bias_ptr,
    c_ptr,
    M,
    N,
    K,
    TILES_PER_SPLIT,
    stride_xm,
    stride_cm,
    stride_qn,
    stride_zn,
    stride_sn,
    GROUP: tl.constexpr,
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
    offs_j = tl.arange(0, BLOCK_K // 2)
    m_ok = offs_m < M
    n_ok = offs_n < N
    if x_ptr.dtype.element_ty == tl.bfloat16:
        magic: tl.constexpr = 0x4300  # 128.0: 7 mantissa bits, a nibble in the low 4 is 128 + q exactly
        base: tl.constexpr = 128.0
    else:
        magic: tl.constexpr = 0x6400  # 1024.0 in fp16
        base: tl.constexpr = 1024.0
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for i in range(0, TILES_PER_SPLIT):
        k0 = (pid_s * TILES_PER_SPLIT + i) * BLOCK_K
        in_k = k0 < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + (k0 + offs_k)[None, :], mask=m_ok[:, None] & in_k,
                    other=0.0)  # fmt: skip
        w_ok = n_ok & in_k
        packed = tl.load(qw_ptr + offs_n[:, None] * stride_qn + (k0 // 2 + offs_j)[None, :],
                         mask=w_ok[:, None], other=0).to(tl.uint16)  # fmt: skip
        lo = ((packed & 0xF) | magic).to(x_ptr.dtype.element_ty, bitcast=True)
        hi = ((packed >> 4) | magic).to(x_ptr.dtype.element_ty, bitcast=True)
        w = tl.interleave(lo, hi)  # (BLOCK_N, BLOCK_K): base + q
        g = k0 // GROUP
        z = tl.load(qz_ptr + offs_n * stride_zn + g, mask=w_ok, other=0).to(tl.float32)
        s = tl.load(s_ptr + offs_n * stride_sn + g, mask=w_ok, other=0.0).to(tl.float32)
        xsum = tl.sum(x.to(tl.float32), axis=1)
        qx = tl.dot(x, tl.trans(w))
        acc += (qx - xsum[:, None] * (base + z)[None, :]) * s[None, :]
    kernels._store_tile(acc, c_ptr, bias_ptr, offs_m, offs_n, M, N, stride_cm, pid_s, HAS_BIAS, SPLIT)


def awq_magic(x2, qw, qz, sc, group=128, over=None):  # noqa: ANN001, ANN201
    m, k = x2.shape
    n = qw.shape[0]
    t = kernels._tiles(m, n, k, 128, x2.device, over)
    tail = (qw.stride(0), qz.stride(0), sc.stride(0))
    return kernels._launch(_awq_magic_kernel, x2, n, t, None, (qw, qz, sc), tail, GROUP=group)


def fp8_prequant_only(xq, xs, w, s, dtype, over=None):  # noqa: ANN001, ANN201
    """The Triton FP8 GEMM on activations already quantized in 128-column groups."""
    m, k = xq.shape
    n = w.shape[0]
    group_k = k if s.shape[1] == 1 else 128
    t = kernels._tiles(m, n, k, 128, xq.device, over)
    tail = (w.stride(0), s.stride(0), s.stride(1), group_k, xs, xs.stride(0))
    return kernels._launch(kernels._fp8_gemm_kernel, xq, n, t, None, (w, s), tail, dtype=dtype)


def step_time_ms(fns, reps: int = 10) -> float:
    """One CUDA graph of all fns (one per layer), replayed: ms per replay."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for f in fns:
            f()
    g.replay()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(reps):
        g.replay()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / reps


def rel(a, b) -> float:  # noqa: ANN001
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30)).item()


def candidates(fmt: str, m: int, interp: bool):  # noqa: ANN201
    """(name, fn(x, W) -> out, reference kind) for a format; W: one layer's weights."""
    out = []
    if fmt in ("fp8_block", "fp8_channel"):
        bk = 128 if fmt == "fp8_block" else None

        def cur(x, W, ov=None):  # noqa: ANN001, ANN202
            return kernels.fp8_triton(x, W[0], W[1], bk or x.shape[1], None, ov)

        out.append(("current", lambda x, W: kernels.fp8_linear(x, W[0], W[1], bk or x.shape[1], None), "a8"))
        for bn in (32, 64, 128):
            for st in (2, 4, 6):
                if (bn, st) != (64, 4) and not interp:
                    out.append((f"t_n{bn}_s{st}", lambda x, W, o={"block_n": bn, "num_stages": st}: cur(x, W, o),
                                "a8"))  # fmt: skip
        for sp in (1, 2, 4, 16):
            out.append((f"splits{sp}", lambda x, W, o={"splits": sp}: cur(x, W, o), "a8"))
        out.append(("prequant_only", "prequant", "a8"))
        for bn, st in ((32, 4), (64, 6), (128, 4)):
            out.append((f"prequant_only_n{bn}_s{st}", ("prequant", {"block_n": bn, "num_stages": st}), "a8"))
        if fmt == "fp8_block":
            out.append(("fused_reduce", lambda x, W: fp8_fused_reduce(x, W[0], W[1]), "a8"))
    else:
        out.append(("current", lambda x, W: kernels.awq_linear(x, W[0], W[1], W[2], 128, None), "w"))
        for bn in (32, 64, 128):
            for st in (2, 4, 6):
                if (bn, st) != (64, 4) and not interp:
                    out.append((f"t_n{bn}_s{st}", lambda x, W, o={"block_n": bn, "num_stages": st}:
                                kernels.awq_linear(x, W[0], W[1], W[2], 128, None, o), "w"))  # fmt: skip
        out.append(("magic", lambda x, W: awq_magic(x, W[0], W[1], W[2]), "w"))
        for bn, st in ((32, 4), (128, 4), (64, 6), (64, 2)):
            out.append((f"magic_n{bn}_s{st}", lambda x, W, o={"block_n": bn, "num_stages": st}:
                        awq_magic(x, W[0], W[1], W[2], 128, o), "w"))  # fmt: skip
        for sp in (1, 2, 16):
            out.append((f"magic_splits{sp}", lambda x, W, o={"splits": sp}: awq_magic(x, W[0], W[1], W[2], 128, o),
                        "w"))  # fmt: skip
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="1,4,16")
    ap.add_argument("--formats", default="fp8_block,fp8_channel,awq")
    ap.add_argument("--json", default=None)
    ap.add_argument("--interp", action="store_true", help="small shapes, no timing (TRITON_INTERPRET=1)")
    args = ap.parse_args()
    interp = args.interp
    if interp:  # no device to ask for its SM count
        kernels._num_sms = lambda index: 132
    dev = "cpu" if interp else "cuda"
    dt = torch.float16 if interp else torch.bfloat16
    shapes = {"small": (256, 512), "odd": (200, 384)} if interp else SHAPES
    rows = [int(r) for r in args.rows.split(",")]
    torch.manual_seed(0)
    results: dict = {}
    per_step: dict = {}
    t0 = time.time()
    with torch.inference_mode():
        for sname, (n, k) in shapes.items():
            w = (torch.randn(n, k, dtype=torch.float32) / k**0.5).to(dev)
            for fmt in args.formats.split(","):
                if fmt == "fp8_block":
                    q, s = quantize_blocks(w, (128, 128))
                    wts = (q, s.t().contiguous().t())  # the scales column-major, as the model keeps them
                    wref = q.float() * s.float().repeat_interleave(128, 1)[:, :k]
                elif fmt == "fp8_channel":
                    q, s = quantize_per_channel(w)
                    wts, wref = (q, s), q.float() * s.float()
                else:
                    aq, az, asc = awq.quantize(w, 128)
                    wts, wref = (aq, az, asc), awq.dequantize(aq, az, asc, 128)
                copies = [wts] if interp else [tuple(t.clone() for t in wts) for _ in range(LAYERS)]
                for m in rows:
                    x = torch.randn(m, k, dtype=dt, device=dev)
                    ref_w = (x.float() @ wref.t()).to(dt)
                    group = 128 if fmt == "fp8_block" or k % 128 == 0 else k
                    ref_a8 = (kernels.fp8_linear_reference(x, wts[0], wts[1], 128 if fmt == "fp8_block" else k,
                                                           None, 128) if fmt != "awq" else None)  # fmt: skip
                    xq, xs = kernels.quantize_act_groups(x, 128) if fmt != "awq" and not interp else (None, None)
                    r: dict = {}
                    if not interp:
                        r["bf16"] = step_time_ms([lambda W=W: F.linear(x, W) for W in
                                                  [torch.empty(n, k, dtype=dt, device=dev) for _ in range(LAYERS)]])  # fmt: skip
                    for name, fn, kind in candidates(fmt, m, interp):
                        if isinstance(fn, str) or isinstance(fn, tuple):
                            if interp:
                                continue
                            ov = fn[1] if isinstance(fn, tuple) else None
                            fn = lambda x, W, ov=ov: fp8_prequant_only(xq, xs, W[0], W[1], dt, ov)  # noqa: E731
                        try:
                            err = rel(fn(x, wts), ref_a8 if kind == "a8" else ref_w)
                            r[name + "_err"] = round(err, 6)
                            if err > 2e-2:
                                continue
                            if not interp:
                                r[name] = step_time_ms([lambda W=W, fn=fn: fn(x, W) for W in copies])
                        except Exception as e:  # noqa: BLE001
                            r[name + "_fail"] = repr(e)[:200]
                    key = f"{sname}/{fmt}/m{m}"
                    results[key] = r
                    times = {a: b for a, b in r.items() if not a.endswith(("_err", "_fail"))}
                    for a, b in times.items():
                        per_step.setdefault(f"{fmt}/m{m}", {}).setdefault(a, 0.0)
                        per_step[f"{fmt}/m{m}"][a] += b
                    best = sorted(times.items(), key=lambda kv: kv[1])[:4]
                    bad = {a: b for a, b in r.items() if a.endswith("_fail") or (a.endswith("_err") and b > 2e-2)}
                    print(f"{key:24s} [{time.time() - t0:4.0f}s] " + " ".join(
                        f"{a}={b * 1e3 / LAYERS:.1f}us" for a, b in best) +
                        f" current={times.get('current', 0) * 1e3 / LAYERS:.1f}us bf16={times.get('bf16', 0) * 1e3 / LAYERS:.1f}us"
                        + (f" BAD {bad}" if bad else ""), flush=True)  # fmt: skip
                del copies
                if not interp:
                    torch.cuda.empty_cache()
    print("per decode step (ms, 4 linears x 28 layers):")
    for key, d in per_step.items():
        ranked = sorted(d.items(), key=lambda kv: kv[1])
        print(f"  {key:16s}", " ".join(f"{a}={b:.3f}" for a, b in ranked[:8]), f"| current={d.get('current', 0):.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"linear": results, "per_step": per_step}, f, indent=1)


if __name__ == "__main__":
    main()
