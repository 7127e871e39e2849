"""Candidate GEMMs for FP8 and AWQ weights at the 7B's linear shapes, timed beside the current kernels
(CUDA-graph replays, ms per decode step = the four linears x 28 layers) and checked against the references.

    python benchmarks/quant_gemm_variants.py            # ROWS=1,4,16,64,128,256,1024 by default
    TRITON_INTERPRET=1 python benchmarks/quant_gemm_variants.py   # the Triton candidates' arithmetic on a CPU

Candidates (measured on the H200 on 2026-12-03, benchmarks/RESULTS.md; none but the cuBLASLt block-scaled
GEMM was adopted):
    fp8_swap_a8 / fp8_swap_a16   "swap AB": the weight tile as the MMA's M side (BLOCK_N x BLOCK_K) and the
                                 few activation rows as its N side; FP8 activations, or bf16 ones against
                                 weights converted in registers (W8A16)
    awq_swap / awq_swap_halves   the same for AWQ int4, zero and scale applied after the dot
                                 (sum_k q x - z sum_k x) * s; _halves: a byte holds k and k + 64 of a K tile
                                 (no nibble interleave)
    fp8_smm_128x128              torch._scaled_mm with 1x128 activation and 128x128 weight scales (cuBLASLt;
                                 since adopted: kernels.fp8_linear's scaled_mm_block backend)
    fp8_fused_reduce             the current split-K kernel with the split reduction fused into it (the last
                                 program of an output tile adds the partials): one launch per linear, not two
                                 (not yet timed on a GPU)
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from quant_kernels import SHAPES, LAYERS, graph_time_us, rel  # noqa: E402

from vlmserve.checkpoints.quantized_checkpoint import fp8_block_quantize  # noqa: E402
from vlmserve.models.quantization import awq, kernels  # noqa: E402
from vlmserve.models.quantization.kernels import _splitk_reduce_kernel  # noqa: E402

INTERP = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _store_t(acc, c_ptr, offs_m, offs_n, M, N, stride_cm, pid_s, SPLIT: tl.constexpr):
    # acc is (BLOCK_N, BLOCK_M): the transposed tile
    ok = (offs_n < N)[:, None] & (offs_m < M)[None, :]
    if SPLIT:
        c = c_ptr + pid_s * M * N + offs_m[None, :] * N + offs_n[:, None]
    else:
        c = c_ptr + offs_m[None, :] * stride_cm + offs_n[:, None]
    tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _fp8_swap_kernel(
    x_ptr,
    b_ptr,
    bs_ptr,
    c_ptr,
    M,
    N,
    K,
    TILES_PER_SPLIT,
    stride_xm,
    stride_cm,
    stride_bn,
    stride_bsn,
    stride_bsk,
    GROUP_K,
    A8: tl.constexpr,
    SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < N
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for i in range(0, TILES_PER_SPLIT):
        k0 = (pid_s * TILES_PER_SPLIT + i) * BLOCK_K
        k = k0 + offs_k
        k_ok = k < K
        xt = tl.load(
            x_ptr + offs_m[None, :] * stride_xm + k[:, None], mask=k_ok[:, None] & m_ok[None, :], other=0.0
        )
        b = tl.load(
            b_ptr + offs_n[:, None] * stride_bn + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0
        )
        b_s = tl.load(
            bs_ptr + offs_n * stride_bsn + (k0 // GROUP_K) * stride_bsk, mask=n_ok & (k0 < K), other=0.0
        )
        if A8:
            xf = xt.to(tl.float32)
            a_s = tl.maximum(tl.max(tl.abs(xf), axis=0) / 448.0, 1e-12)
            a = tl.clamp(xf / a_s[None, :], -448.0, 448.0).to(tl.float8e4nv)
            acc += tl.dot(b, a) * b_s[:, None] * a_s[None, :]
        else:
            acc += tl.dot(b.to(xt.dtype), xt).to(tl.float32) * b_s[:, None]
    _store_t(acc, c_ptr, offs_m, offs_n, M, N, stride_cm, pid_s, SPLIT)


@triton.jit
def _awq_swap_kernel(
    x_ptr,
    qw_ptr,
    qz_ptr,
    s_ptr,
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
    HALVES: tl.constexpr,
    SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # acc(n, m) += (sum_k q[n,k] x[m,k] - z[n] sum_k x[m,k]) * s[n]; the scale and zero after the dot.
    # HALVES: byte j of a K tile holds k0+j (low nibble) and k0+BLOCK_K/2+j (high): no interleave.
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_j = tl.arange(0, BLOCK_K // 2)
    m_ok = offs_m < M
    n_ok = offs_n < N
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for i in range(0, TILES_PER_SPLIT):
        k0 = (pid_s * TILES_PER_SPLIT + i) * BLOCK_K
        in_k = k0 < K
        w_ok = n_ok & in_k
        packed = tl.load(
            qw_ptr + offs_n[:, None] * stride_qn + (k0 // 2 + offs_j)[None, :], mask=w_ok[:, None], other=0
        )
        g = k0 // GROUP
        z = tl.load(qz_ptr + offs_n * stride_zn + g, mask=w_ok, other=0).to(tl.float32)
        s = tl.load(s_ptr + offs_n * stride_sn + g, mask=w_ok, other=0.0).to(tl.float32)
        if HALVES:
            lo = (packed & 0xF).to(x_ptr.dtype.element_ty)
            hi = (packed >> 4).to(x_ptr.dtype.element_ty)
            x_lo = tl.load(
                x_ptr + offs_m[None, :] * stride_xm + (k0 + offs_j)[:, None],
                mask=m_ok[None, :] & in_k,
                other=0.0,
            )
            x_hi = tl.load(
                x_ptr + offs_m[None, :] * stride_xm + (k0 + BLOCK_K // 2 + offs_j)[:, None],
                mask=m_ok[None, :] & in_k,
                other=0.0,
            )
            qx = tl.dot(lo, x_lo) + tl.dot(hi, x_hi)
            xsum = tl.sum(x_lo.to(tl.float32), axis=0) + tl.sum(x_hi.to(tl.float32), axis=0)
        else:
            q = tl.interleave(packed & 0xF, packed >> 4).to(x_ptr.dtype.element_ty)
            xt = tl.load(
                x_ptr + offs_m[None, :] * stride_xm + (k0 + tl.arange(0, BLOCK_K))[:, None],
                mask=m_ok[None, :] & in_k,
                other=0.0,
            )
            qx = tl.dot(q, xt)
            xsum = tl.sum(xt.to(tl.float32), axis=0)
        acc += (qx - z[:, None] * xsum[None, :]) * s[:, None]
    _store_t(acc, c_ptr, offs_m, offs_n, M, N, stride_cm, pid_s, SPLIT)


def _launch_t(kernel, x2, n, t, weights, tail, **meta):
    m = x2.shape[0]
    out = torch.empty(m, n, dtype=x2.dtype, device=x2.device)
    split = t.splits > 1
    part = torch.empty(t.splits, m, n, dtype=torch.float32, device=x2.device) if split else out
    grid = (triton.cdiv(n, t.block_n), triton.cdiv(m, t.block_m), t.splits)
    kernel[grid](
        x2,
        *weights,
        part,
        m,
        n,
        x2.shape[1],
        t.k_per_split // t.block_k,
        x2.stride(0),
        out.stride(0),
        *tail,
        SPLIT=split,
        BLOCK_M=t.block_m,
        BLOCK_N=t.block_n,
        BLOCK_K=t.block_k,
        num_warps=t.num_warps,
        num_stages=t.num_stages,
        **meta,
    )
    if split:
        _splitk_reduce_kernel[(m, triton.cdiv(n, 1024))](
            part, out, out, m, n, t.splits, out.stride(0), HAS_BIAS=False, BLOCK=1024, num_warps=4
        )
    return out


def tiles(m, n, k, bk, dev, over=None):
    if INTERP:
        over = {"splits": 1 + (m % 2), **(over or {})}
    t = kernels._tiles(m, n, k, bk, dev, over)
    return t


def fp8_swap(x2, w, s, a8, over=None):
    m, k = x2.shape
    n = w.shape[0]
    o = {"block_m": 16, "block_n": 64, "num_warps": 4, "num_stages": 4}
    o.update(over or {})
    t = tiles(m, n, k, 128, x2.device, o)
    return _launch_t(_fp8_swap_kernel, x2, n, t, (w, s), (w.stride(0), s.stride(0), s.stride(1), 128), A8=a8)


def awq_swap(x2, qw, qz, sc, halves, over=None):
    m, k = x2.shape
    n = qw.shape[0]
    o = {"block_m": 16, "block_n": 64, "num_warps": 4, "num_stages": 4}
    o.update(over or {})
    t = tiles(m, n, k, 128, x2.device, o)
    return _launch_t(
        _awq_swap_kernel,
        x2,
        n,
        t,
        (qw, qz, sc),
        (qw.stride(0), qz.stride(0), sc.stride(0)),
        GROUP=128,
        HALVES=halves,
    )


def halves_pack(qw):
    """(N, K/2) low nibble = even k -> per 128-tile: byte j = k0+j (low) | k0+64+j (high)."""
    q = awq.unpack_rows(qw)  # (N, K)
    n, k = q.shape
    q = q.view(n, k // 128, 2, 64)
    return (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(n, k // 2).to(torch.uint8).contiguous()


@triton.jit
def _fp8_fused_reduce_kernel(
    x_ptr,
    b_ptr,
    bs_ptr,
    part_ptr,
    count_ptr,
    c_ptr,
    M,
    N,
    K,
    TILES_PER_SPLIT,
    stride_xm,
    stride_cm,
    stride_bn,
    stride_bsn,
    stride_bsk,
    GROUP_K,
    SPLITS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # The current split-K FP8 kernel (activations quantized in registers), but the split reduction fused: each
    # program stores its float32 partial tile, then takes a ticket on its output tile's counter; the program
    # holding the last ticket adds the SPLITS partials, writes the output and resets the counter (so a CUDA
    # graph can replay it). No second kernel per linear.
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
        k0 = (pid_s * TILES_PER_SPLIT + i) * BLOCK_K
        k = k0 + offs_k
        k_ok = k < K
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0
        ).to(tl.float32)
        a_s = tl.maximum(tl.max(tl.abs(x), axis=1) / 448.0, 1e-12)
        a = tl.clamp(x / a_s[:, None], -448.0, 448.0).to(tl.float8e4nv)
        b = tl.load(
            b_ptr + offs_n[:, None] * stride_bn + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0
        )
        b_s = tl.load(
            bs_ptr + offs_n * stride_bsn + (k0 // GROUP_K) * stride_bsk, mask=n_ok & (k0 < K), other=0.0
        )
        acc += tl.dot(a, tl.trans(b)) * a_s[:, None] * b_s[None, :]
    ok = m_ok[:, None] & n_ok[None, :]
    tile = offs_m[:, None] * N + offs_n[None, :]
    tl.store(part_ptr + pid_s * M * N + tile, acc, mask=ok)
    tl.debug_barrier()  # every thread's partial stored before the ticket is taken
    counter = count_ptr + pid_m * tl.num_programs(1) + pid_n
    ticket = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
    if ticket == SPLITS - 1:
        total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for s in range(0, SPLITS):
            total += tl.load(part_ptr + s * M * N + tile, mask=ok, other=0.0, cache_modifier=".cg")
        tl.store(
            c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :], total.to(c_ptr.dtype.element_ty), mask=ok
        )
        tl.atomic_xchg(counter, 0, sem="relaxed", scope="gpu")


_COUNTERS: dict = {}


def fp8_fused_reduce(x2, w, s, over=None):
    """x2 (M, K) @ dequant(w, s).T with the split reduction inside the GEMM kernel (decode sizes)."""
    m, k = x2.shape
    n = w.shape[0]
    t = tiles(m, n, k, 128, x2.device, over)
    grid = (triton.cdiv(m, t.block_m), triton.cdiv(n, t.block_n), t.splits)
    key = (x2.device, grid[0] * grid[1])
    if key not in _COUNTERS:  # zeroed once; every call leaves it zeroed
        _COUNTERS[key] = torch.zeros(grid[0] * grid[1], dtype=torch.int32, device=x2.device)
    out = torch.empty(m, n, dtype=x2.dtype, device=x2.device)
    part = torch.empty(t.splits, m, n, dtype=torch.float32, device=x2.device)
    _fp8_fused_reduce_kernel[grid](
        x2,
        w,
        s,
        part,
        _COUNTERS[key],
        out,
        m,
        n,
        k,
        t.k_per_split // t.block_k,
        x2.stride(0),
        out.stride(0),
        w.stride(0),
        s.stride(0),
        s.stride(1),
        128,
        SPLITS=t.splits,
        BLOCK_M=t.block_m,
        BLOCK_N=t.block_n,
        BLOCK_K=t.block_k,
        num_warps=t.num_warps,
        num_stages=t.num_stages,
    )
    return out


def main():
    dev = "cuda" if not INTERP else "cpu"
    dt = torch.bfloat16 if not INTERP else torch.float16
    rows = [int(r) for r in os.environ.get("ROWS", "1,4,16,64,128,256,1024").split(",")]
    shapes = SHAPES if not INTERP else {"small": (256, 512), "odd": (200, 384)}
    res, per_step = {}, {}
    torch.manual_seed(0)
    with torch.inference_mode():
        for name, (n, k) in shapes.items():
            w = torch.randn(n, k, device=dev, dtype=dt) / k**0.5
            qb, sinv = (t.to(dev) for t in fp8_block_quantize(w.float(), (128, 128)))
            sb = sinv.repeat_interleave(128, 0)[:n].contiguous()  # (N, K/128) row-major
            sb_cm = sb.t().contiguous().t()  # column-major, as the model stores it
            aq, az, asc = (t.to(dev) for t in awq.quantize(w.float(), 128))
            aqh = halves_pack(aq)
            for m in rows:
                x = torch.randn(m, k, device=dev, dtype=dt)
                r = {}
                ref8 = kernels.fp8_linear_reference(x, qb, sb, 128, None, 128)
                ref16 = (x.float() @ (qb.float() * sb.repeat_interleave(128, 1)[:, :k]).t()).to(dt)
                refq = kernels.awq_linear_reference(x, aq, az, asc, 128, None)
                cands = {}
                if not INTERP:
                    cands["bf16"] = (lambda: F.linear(x, w), None)
                    cands["fp8_cur"] = (lambda: kernels.fp8_linear(x, qb, sb_cm, 128, None), ref8)
                    cands["awq_cur"] = (lambda: kernels.awq_linear(x, aq, az, asc, 128, None), refq)
                    blocks = kernels.cublas_block_scales(sb_cm, 128)
                    if blocks is not None and kernels.block_scaled_mm_applies(x, qb, blocks):
                        cands["fp8_smm_128x128"] = (
                            lambda: kernels.fp8_linear(
                                x, qb, sb_cm, 128, None, "scaled_mm_block", block_scales=blocks
                            ),
                            ref8,
                        )
                if m < 16:
                    cands["fp8_fused_reduce"] = (lambda: fp8_fused_reduce(x, qb, sb_cm), ref8)
                if m <= 64:
                    for tn, ov in (
                        ("", {}),
                        ("_n128", {"block_n": 128}),
                        ("_n32", {"block_n": 32}),
                        ("_w8", {"num_warps": 8, "block_n": 128}),
                    ):
                        if INTERP and tn:
                            continue
                        cands["fp8_swap_a8" + tn] = (lambda ov=ov: fp8_swap(x, qb, sb_cm, True, ov), ref8)
                        cands["fp8_swap_a16" + tn] = (lambda ov=ov: fp8_swap(x, qb, sb_cm, False, ov), ref16)
                        cands["awq_swap" + tn] = (lambda ov=ov: awq_swap(x, aq, az, asc, False, ov), refq)
                        cands["awq_swap_halves" + tn] = (
                            lambda ov=ov: awq_swap(x, aqh, az, asc, True, ov),
                            refq,
                        )
                for key, (fn, ref) in cands.items():
                    try:
                        if ref is not None:
                            r[key + "_err"] = rel(fn(), ref)
                        if not INTERP:
                            r[key] = graph_time_us(fn)
                            per_step.setdefault(key, {}).setdefault(m, 0.0)
                            per_step[key][m] += r[key] * LAYERS / 1e3
                    except Exception as e:  # noqa: BLE001
                        r[key + "_fail"] = repr(e)[:200]
                res[f"{name}_m{m}"] = r
                print(
                    name,
                    m,
                    {a: (round(b, 4) if isinstance(b, float) else b) for a, b in r.items()},
                    flush=True,
                )
    print("linears per decode step (ms, 28 layers):")
    for key, by_m in per_step.items():
        print(f"  {key:28s}", {m: round(v, 3) for m, v in by_m.items()})
    out = os.environ.get("OUT_JSON")
    if out:
        json.dump({"linear": res, "per_step": per_step}, open(out, "w"), indent=1)


if __name__ == "__main__":
    main()
