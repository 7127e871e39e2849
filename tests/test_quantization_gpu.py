"""Quantized GEMM kernels against their torch references, on random shapes (odd sizes, batch 1), and a
quantized model on the GPU (eager and CUDA graphs) against the CPU reference. Skipped cleanly without CUDA."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _fp8_gpu() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


needs_fp8 = pytest.mark.skipif(not _fp8_gpu(), reason="needs a GPU with FP8 (compute capability >= 8.9)")


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.float() - ref.float()).norm() / ref.float().norm()).item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 2, 4, 5, 17, 64, 333])
@pytest.mark.parametrize(
    ("n", "k", "group"), [(72, 256, 128), (200, 384, 128), (4096, 1024, 128), (40, 96, 32)]
)
@pytest.mark.parametrize("tiles", [None, {"splits": 1}, {"splits": 3}])
def test_awq_kernels_match_reference(
    dtype: torch.dtype, rows: int, n: int, k: int, group: int, tiles: dict | None
) -> None:
    from vlmserve.models.quantization import awq, kernels

    gen = torch.Generator().manual_seed(rows * 7 + n)
    w = torch.randn(n, k, generator=gen) / k**0.5
    qw, qz, s = (t.cuda() for t in awq.quantize(w, group))
    x = torch.randn(rows, k, generator=gen).to("cuda", dtype)
    bias = torch.randn(n, generator=gen).to("cuda", dtype)
    ref = kernels.awq_linear_reference(x, qw, qz, s, group, bias)
    got = kernels.awq_linear(x, qw, qz, s, group, bias, tiles=tiles)  # split K or not
    assert got.dtype == dtype and got.shape == (rows, n)
    # The kernel rounds each dequantized weight to the activations' dtype.
    assert _rel(got, ref) < 1e-2


@pytest.mark.parametrize("rows", [1, 5, 16])
def test_awq_wide_outputs_at_decode_sizes_match_reference(rows: int) -> None:
    """From AWQ_NARROW_MIN_N outputs decode batches take narrower tiles (an output count that is no multiple
    of them here: the last tile masked)."""
    from vlmserve.models.quantization import awq, kernels

    n, k, group = kernels.AWQ_NARROW_MIN_N + 16, 256, 128
    gen = torch.Generator().manual_seed(rows)
    w = torch.randn(n, k, generator=gen) / k**0.5
    qw, qz, s = (t.cuda() for t in awq.quantize(w, group))
    x = torch.randn(rows, k, generator=gen).to("cuda", torch.bfloat16)
    ref = kernels.awq_linear_reference(x, qw, qz, s, group, None)
    assert _rel(kernels.awq_linear(x, qw, qz, s, group, None), ref) < 1e-2


@needs_fp8
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 3, 16, 17, 128, 301])
@pytest.mark.parametrize(
    ("n", "k", "block"),
    [
        (72, 256, None),
        (200, 300, None),
        (1024, 512, None),
        (200, 300, 128),
        (4096, 1024, 128),
        (130, 520, 128),
    ],
)
@pytest.mark.parametrize(
    ("backend", "tiles"), [("triton", {"splits": 1}), ("triton", {"splits": 3}), ("auto", None)]
)
def test_fp8_kernels_match_reference(
    dtype: torch.dtype, rows: int, n: int, k: int, block: int | None, backend: str, tiles: dict | None
) -> None:
    from vlmserve.checkpoints.quantized_checkpoint import fp8_block_quantize
    from vlmserve.models.quantization import fp8, kernels

    gen = torch.Generator().manual_seed(rows * 13 + n)
    w = torch.randn(n, k, generator=gen) / k**0.5
    if block:
        q, scale_inv = fp8_block_quantize(w, (block, block))
        scale = scale_inv.repeat_interleave(block, 0)[:n].contiguous()
        block_k = block
    else:
        q, scale = fp8.quantize_per_channel(w)
        block_k = k
    q, scale = q.cuda(), scale.cuda()
    x = torch.randn(rows, k, generator=gen).to("cuda", dtype)
    bias = torch.randn(n, generator=gen).to("cuda", dtype)
    chosen = kernels.fp8_backend(x, q, scale) if backend == "auto" else backend
    # The Triton kernel scales activations per row and K tile; _scaled_mm per row.
    group = kernels.triton_act_group(scale, block_k) if chosen == "triton" else None
    ref = kernels.fp8_linear_reference(x, q, scale, block_k, bias, group)
    got = kernels.fp8_linear(x, q, scale, block_k, bias, backend=backend, tiles=tiles)
    assert got.dtype == dtype and got.shape == (rows, n)
    assert _rel(got, ref) < 1e-2


@needs_fp8
def test_fp8_scaled_mm_matches_reference() -> None:
    from vlmserve.models.quantization import fp8, kernels

    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("row-wise scaled _scaled_mm needs Hopper or newer")
    for rows, n, k in [(1, 512, 256), (7, 1024, 512), (256, 3072, 1024)]:
        w = torch.randn(n, k) / k**0.5
        q, scale = (t.cuda() for t in fp8.quantize_per_channel(w))
        x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
        assert kernels.scaled_mm_applies(x, q, scale)
        ref = kernels.fp8_linear_reference(x, q, scale, k, None)
        assert _rel(kernels.fp8_linear(x, q, scale, k, None, backend="scaled_mm"), ref) < 1e-2


@needs_fp8
def test_quantize_rows_matches_the_torch_quantization() -> None:
    """The one-kernel per-token quantization in front of cuBLASLt's row-wise GEMM against the torch ops it
    replaced: the same scales, and the same e4m3 values up to a rounding step in rare elements (Triton's
    division); K not a multiple of its block, a zero row, bf16 and float32 inputs."""
    from vlmserve.models.quantization import kernels

    gen = torch.Generator().manual_seed(11)
    for rows, k, dtype in [(1, 3584, torch.bfloat16), (130, 18944, torch.bfloat16), (7, 1000, torch.float32)]:
        x = (torch.randn(rows, k, generator=gen) * 3).to("cuda", dtype)
        if rows > 1:
            x[rows // 2] = 0  # a zero row: the smallest scale, all-zero values
        q, s = kernels.quantize_rows(x)
        ref_q, ref_s = kernels.quantize_activations(x, k)
        assert q.shape == (rows, k) and s.shape == (rows, 1)
        torch.testing.assert_close(s, ref_s, rtol=1e-6, atol=0)
        differ = q.float() != ref_q.float()
        assert differ.float().mean().item() < 1e-3
        assert _rel(q.float() * s, ref_q.float() * ref_s) < 1e-3
    # Per-channel weights take the split-K Triton kernel below ROWWISE_MM_MIN_ROWS rows, and cuBLASLt's
    # row-wise GEMM from there where it applies (Hopper and newer).
    weight = torch.empty(512, 1024, device="cuda", dtype=kernels.FP8)
    per_channel = torch.ones(512, 1, device="cuda")
    below = torch.zeros(kernels.ROWWISE_MM_MIN_ROWS - 1, 1024, device="cuda", dtype=torch.bfloat16)
    at = torch.zeros(kernels.ROWWISE_MM_MIN_ROWS, 1024, device="cuda", dtype=torch.bfloat16)
    assert kernels.fp8_backend(below, weight, per_channel) == "triton"
    row_wise = kernels.scaled_mm_applies(at, weight, per_channel)
    assert kernels.fp8_backend(at, weight, per_channel) == ("scaled_mm" if row_wise else "triton")


@needs_fp8
def test_fp8_block_scaled_mm_matches_reference_and_replays_in_a_graph() -> None:
    """cuBLASLt's 128x128 block-scaled GEMM (Hopper, from SCALED_MM_MIN_ROWS rows): row counts that are no
    multiple of 4 (padded), 4 to 148 K blocks, bias; chosen by `auto` for such weights; the same in a CUDA
    graph. Other GPUs never take this path (block_scaled_mm_applies), hence the skip there."""
    from vlmserve.models.quantization import fp8, kernels

    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("cuBLASLt's 128x128 block scaling is Hopper's")
    gen = torch.Generator().manual_seed(5)
    for rows, n, k in [(64, 256, 512), (77, 384, 1536), (301, 4608, 3584), (1031, 512, 18944)]:
        w = torch.randn(n, k, generator=gen) / k**0.5
        q, scale = (t.cuda() for t in fp8.quantize_blocks(w, (128, 128)))
        scale = scale.t().contiguous().t()
        blocks = kernels.cublas_block_scales(scale, 128)
        x = torch.randn(rows, k, generator=gen).to("cuda", torch.bfloat16)
        bias = torch.randn(n, generator=gen).to("cuda", torch.bfloat16)
        assert kernels.fp8_backend(x, q, scale, blocks) == "scaled_mm_block"
        assert kernels.fp8_backend(x[: kernels.SCALED_MM_MIN_ROWS - 1], q, scale, blocks) == "triton"
        ref = kernels.fp8_linear_reference(x, q, scale, 128, bias, kernels.CUBLAS_BLOCK)
        got = kernels.fp8_linear(x, q, scale, 128, bias, block_scales=blocks)
        assert got.dtype == torch.bfloat16 and got.shape == (rows, n)
        assert _rel(got, ref) < 1e-2, (rows, n, k)
    out = torch.empty_like(got)
    kernels.fp8_linear(x, q, scale, 128, bias, block_scales=blocks)  # warm-up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out.copy_(kernels.fp8_linear(x, q, scale, 128, bias, block_scales=blocks))
    x.copy_(torch.randn(rows, k, generator=gen).to("cuda", torch.bfloat16))
    graph.replay()
    assert _rel(out, kernels.fp8_linear(x, q, scale, 128, bias, block_scales=blocks)) < 1e-3


@pytest.mark.parametrize("fmt", ["awq", "fp8-block", "fp8-channel", "online-fp8"])
def test_quantized_model_on_gpu_matches_cpu_reference_with_and_without_cuda_graphs(
    tmp_path: Path, fmt: str
) -> None:
    from tests.test_quantization import TEXT
    from vlmserve.checkpoints.checkpoint import write_checkpoint
    from vlmserve.checkpoints.quantized_checkpoint import write_quantized_checkpoint
    from vlmserve.engine.sampling_params import SamplingParams
    from vlmserve.llm import LLM
    from vlmserve.models.layers.attention import ContiguousKVCache
    from vlmserve.models.loader import load_model

    if fmt != "awq" and not _fp8_gpu():
        pytest.skip("needs a GPU with FP8")
    if fmt == "online-fp8":
        ckpt, quant = write_checkpoint(tmp_path / "f", text=TEXT, seed=3), "fp8"
    else:
        ckpt, quant = write_quantized_checkpoint(tmp_path / "q", fmt, text=TEXT, seed=3), None
    ids = list(
        range(10, 150)
    )  # 140 rows: past ROWWISE_MM_MIN_ROWS (per-channel FP8: cuBLASLt's row-wise GEMM)

    def logits(device: str, dtype: str) -> torch.Tensor:
        model = load_model(ckpt, dtype, device, progress=False, quantization=quant)
        with torch.inference_mode():
            x = model.embed(torch.tensor(ids, device=device))
            cache = ContiguousKVCache(
                len(model.model.layers), model.model.layers[0].self_attn.head_dim ** -0.5
            )
            return model.compute_logits(model(x, torch.arange(len(ids), device=device).expand(3, -1), cache))

    ref = logits("cpu", "float32")
    got = logits("cuda", "bfloat16").cpu()
    # bf16 activations, and FP8 activations on the GPU (the CPU reference leaves them unquantized): e4m3's
    # three mantissa bits per token through the layers measured 0.041-0.042 on an H200 for the three FP8
    # layouts. The kernels' own arithmetic is checked tightly, against a reference that quantizes activations
    # too, in test_fp8_kernels_match_reference; this test checks the wiring.
    assert _rel(got, ref) < (5e-2 if fmt != "awq" else 2e-2)

    kwargs = dict(device="cuda", dtype="bfloat16", max_model_len=512, num_kv_blocks=128, quantization=quant)
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    runs = []
    for eager in (True, False):
        llm = LLM(str(ckpt), enforce_eager=eager, **kwargs)
        prompts = [
            llm.processor.apply_chat_template([{"role": "user", "content": f"Count to {i}."}])
            for i in range(6)
        ]
        runs.append([o.outputs[0].token_ids for o in llm.generate(prompts, params)])
        del llm
        torch.cuda.empty_cache()
    assert runs[0] == runs[1] and all(len(t) == 16 for t in runs[0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_paged_decode_reads_an_fp8_kv_cache(dtype: torch.dtype) -> None:
    from vlmserve.models.layers.attention import causal_attention
    from vlmserve.runner.kv_quant import FP8_KV, from_cache, gather, to_cache
    from vlmserve.runner.triton_attention import paged_decode_attention

    torch.manual_seed(0)
    hq, hkv, dim, page, num_blocks = 28, 4, 128, 16, 400
    seq_lens = [1, 15, 17, 300, 1300]
    k_cache = to_cache(torch.randn(num_blocks, page, hkv, dim, device="cuda"), FP8_KV)
    v_cache = to_cache(torch.randn(num_blocks, page, hkv, dim, device="cuda"), FP8_KV)
    perm = torch.randperm(num_blocks - 1, device="cuda") + 1
    tables, used = [], 0
    for n in seq_lens:
        nb = -(-n // page)
        tables.append(perm[used : used + nb])
        used += nb
    bt = torch.zeros(len(seq_lens), max(len(t) for t in tables), dtype=torch.int32, device="cuda")
    for i, t in enumerate(tables):
        bt[i, : len(t)] = t.int()
    q = torch.randn(len(seq_lens), hq, dim, device="cuda", dtype=dtype)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device="cuda")
    got = paged_decode_attention(q, k_cache, v_cache, bt, lens, dim**-0.5, max(seq_lens))
    for i, n in enumerate(seq_lens):
        ks = from_cache(gather(k_cache, tables[i]).reshape(-1, hkv, dim)[:n], torch.float64)
        vs = from_cache(gather(v_cache, tables[i]).reshape(-1, hkv, dim)[:n], torch.float64)
        ref = causal_attention(q[i : i + 1].double(), ks, vs, dim**-0.5)[0]
        assert _rel(got[i], ref) < 2e-2, n


def test_fp8_kv_cache_engine_cuda_graphs_match_eager(tmp_path: Path) -> None:
    from tests.test_quantization import TEXT
    from vlmserve.checkpoints.checkpoint import write_checkpoint
    from vlmserve.engine.sampling_params import SamplingParams
    from vlmserve.llm import LLM

    ckpt = write_checkpoint(tmp_path / "f", text=TEXT, seed=3)
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    runs = []
    for eager in (True, False):
        llm = LLM(
            str(ckpt),
            device="cuda",
            dtype="bfloat16",
            kv_cache_dtype="fp8",
            max_model_len=512,
            num_kv_blocks=128,
            enforce_eager=eager,
        )
        assert llm.engine.runner.kv_caches[0][0].dtype == torch.float8_e4m3fn
        prompts = [
            llm.processor.apply_chat_template([{"role": "user", "content": f"Count to {i}."}])
            for i in range(6)
        ]
        runs.append([o.outputs[0].token_ids for o in llm.generate(prompts, params)])
        del llm
        torch.cuda.empty_cache()
    assert runs[0] == runs[1]
