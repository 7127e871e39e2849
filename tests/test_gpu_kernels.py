"""GPU fast paths against the plain torch path, on random inputs. Skipped cleanly without a CUDA device."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize(
    ("hq", "hkv", "dim", "dtype"),
    [(28, 4, 128, torch.bfloat16), (4, 2, 64, torch.float16), (8, 8, 64, torch.float32)],
)
def test_paged_decode_matches_torch(hq: int, hkv: int, dim: int, dtype: torch.dtype) -> None:
    from vlmserve.models.layers.attention import causal_attention
    from vlmserve.runner.triton_attention import PARTITION, paged_decode_attention, partition_for

    torch.manual_seed(0)
    page, num_blocks = 16, 512
    seq_lens = [1, 15, 16, 17, 600, 1300, 2049]
    k_cache = torch.randn(num_blocks, page, hkv, dim, device="cuda", dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    perm = torch.randperm(num_blocks - 1, device="cuda") + 1  # pages scattered over the pool, never block 0
    tables, used = [], 0
    for n in seq_lens:
        nb = -(-n // page)
        tables.append(perm[used : used + nb])
        used += nb
    width = max(len(t) for t in tables)
    bt = torch.zeros(len(seq_lens), width, dtype=torch.int32, device="cuda")
    for i, t in enumerate(tables):
        bt[i, : len(t)] = t.int()
    q = torch.randn(len(seq_lens), hq, dim, device="cuda", dtype=dtype)
    scale = dim**-0.5
    lens = torch.tensor(seq_lens, dtype=torch.int32, device="cuda")
    # Extra empty partitions must not change the result; a batch of two takes the short partitions.
    got = paged_decode_attention(q, k_cache, v_cache, bt, lens, scale, max(seq_lens) + 2 * PARTITION)
    got2 = paged_decode_attention(q[-2:], k_cache, v_cache, bt[-2:], lens[-2:], scale, 4096)
    assert partition_for(2, hkv) < PARTITION
    torch.testing.assert_close(got2.float(), got[-2:].float(), rtol=2e-2, atol=2e-2)
    for i, n in enumerate(seq_lens):
        ks = k_cache[tables[i]].reshape(-1, hkv, dim)[:n].double()
        vs = v_cache[tables[i]].reshape(-1, hkv, dim)[:n].double()
        ref = causal_attention(q[i : i + 1].double(), ks, vs, scale)[0]
        err = ((got[i].double() - ref).norm() / ref.norm()).item()
        print(f"{dtype} hq={hq} hkv={hkv} d={dim} len={n}: rel err {err:.2e}")
        assert err < (2e-2 if dtype != torch.float32 else 5e-3), (n, err)  # tl.dot runs fp32 as tf32


def test_cuda_graph_decode_and_async_loop_match_the_eager_sync_engine(tmp_path: Path) -> None:
    from tests.conftest import random_image
    from vlmserve.checkpoints.checkpoint import write_checkpoint
    from vlmserve.engine.sampling_params import SamplingParams
    from vlmserve.llm import LLM

    ckpt = write_checkpoint(
        tmp_path / "tiny",
        preset="tiny",
        text={"hidden_size": 128, "num_attention_heads": 2, "mrope_section": [8, 12, 12]},
    )
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=3, max_tokens=24, ignore_eos=True)
    prompts = [
        ("Hello there, tell me about it", []),
        ("<|vision_start|><|image_pad|><|vision_end|>What?", [random_image(60, 40)]),
        ("Once upon a time " * 6, []),
    ]
    outs = {}
    # A 48-token budget splits the longer prompts into chunks that share steps with other requests'
    # decodes: mixed eager steps whose decode rows read a token still on the device (async loop).
    for eager, asyn in ((True, False), (False, False), (True, True), (False, True)):
        llm = LLM(
            str(ckpt),
            dtype="float32",
            device="cuda",
            enforce_eager=eager,
            async_scheduling=asyn,
            max_model_len=2048,
            max_num_seqs=8,
            max_num_batched_tokens=48,
            num_kv_blocks=1024,
        )
        assert (llm.engine.runner.graphs is None) == eager
        assert llm.engine.async_scheduling == asyn
        requests = [
            llm.make_request(text, images, params)
            for params in (greedy, seeded)
            for text, images in prompts * 2
        ]
        outs[eager, asyn] = [o.outputs[0].token_ids for o in llm.run(requests)]
        del llm
    assert outs[False, False] == outs[True, False]
    assert outs[True, True] == outs[True, False]
    assert outs[False, True] == outs[True, False]


@pytest.mark.parametrize("with_decodes", [True, False])
def test_mixed_step_triton_attention_matches_torch(with_decodes: bool) -> None:
    """Prefill chunks (with and without cached history) and decodes in one batch, against the torch path."""
    from vlmserve.runner.attention import PagedAttentionMetadata, TorchPagedAttention
    from vlmserve.runner.triton_attention import TritonPagedAttention

    torch.manual_seed(0)
    hq, hkv, dim, page, num_blocks = 28, 4, 128, 16, 600
    dtype = torch.bfloat16
    shape = (num_blocks, page, hkv, dim)
    caches = [
        (torch.randn(shape, device="cuda", dtype=dtype), torch.randn(shape, device="cuda", dtype=dtype))
    ]
    # (cached tokens, new tokens): decodes at several lengths, a fresh prefill, a chunk after a prefix.
    rows = [(0, 37), (1299, 1), (15, 1), (300, 64), (2048, 1), (0, 1)]
    if not with_decodes:
        rows = [(0, 37), (300, 64), (1000, 17)]
    perm = (torch.randperm(num_blocks - 1) + 1).tolist()
    tables: list[list[int]] = []
    used = 0
    for cached, new in rows:
        nb = -(-(cached + new) // page)
        tables.append(perm[used : used + nb])
        used += nb
    width = max(len(t) for t in tables)
    bt = torch.zeros(len(rows), width, dtype=torch.long)
    for i, t in enumerate(tables):
        bt[i, : len(t)] = torch.tensor(t)
    slots = torch.cat(
        [
            bt[i, torch.arange(c, c + n) // page] * page + torch.arange(c, c + n) % page
            for i, (c, n) in enumerate(rows)
        ]
    )
    meta = PagedAttentionMetadata(
        slot_mapping=slots.cuda(),
        query_lens=[n for _, n in rows],
        seq_lens=[c + n for c, n in rows],
        block_tables=bt.cuda(),
        decode_rows=[i for i, (_, n) in enumerate(rows) if n == 1],
        prefill_rows=[i for i, (_, n) in enumerate(rows) if n > 1],
        host_block_tables=tables,  # the prefill rows go through one flash call
    )
    total = sum(n for _, n in rows)
    q = torch.randn(total, hq, dim, device="cuda", dtype=dtype)
    k = torch.randn(total, hkv, dim, device="cuda", dtype=dtype)
    v = torch.randn_like(k)
    scale = dim**-0.5
    ref_caches = [(a.clone(), b.clone()) for a, b in caches]
    ref = TorchPagedAttention(ref_caches, meta, scale)(0, q, k, v)
    got = TritonPagedAttention(caches, meta, scale, max_seq_len=4096)(0, q, k, v)
    assert torch.equal(caches[0][0], ref_caches[0][0]) and torch.equal(caches[0][1], ref_caches[0][1])
    err = ((got.float() - ref.float()).norm() / ref.float().norm()).item()
    assert err < 2e-2, err


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_fused_rms_norm_and_rotary_match_torch(dtype: torch.dtype) -> None:
    from vlmserve.models.layers import fused
    from vlmserve.models.layers.rotary import rotate_half

    torch.manual_seed(0)
    for rows, hidden in [(1, 3584), (7, 1280), (300, 96)]:
        x = torch.randn(rows, hidden, device="cuda", dtype=dtype) * 3
        w = (1 + 0.1 * torch.randn(hidden, device="cuda")).to(dtype)
        x32 = x.float()
        ref = w * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype)
        got = fused.rms_norm(x, w, 1e-6)
        assert got.dtype == ref.dtype
        torch.testing.assert_close(got, ref, rtol=1e-2 if dtype != torch.float32 else 1e-5, atol=1e-2)
    for dim in (64, 80, 128):  # 80: the vision tower's head dim, not a power of two
        qkv = torch.randn(50, 12 * dim, device="cuda", dtype=dtype)
        q = qkv[:, : 8 * dim].view(50, 8, dim)  # strided view, as the model passes it
        freqs = torch.randn(50, dim // 2, device="cuda")
        cos, sin = torch.cat([freqs.cos()] * 2, -1), torch.cat([freqs.sin()] * 2, -1)
        ref = (q.float() * cos[:, None] + rotate_half(q.float()) * sin[:, None]).to(dtype)
        tol = 1e-2 if dtype != torch.float32 else 1e-5
        torch.testing.assert_close(fused.rotary(q, cos, sin), ref, rtol=tol, atol=tol)
    for tokens, heads, dim in ((1, 28, 128), (300, 16, 80), (5, 3, 64)):  # decode, vision, odd head count
        q = torch.randn(tokens, heads, dim, device="cuda", dtype=dtype)
        freqs = torch.randn(tokens, dim // 2, device="cuda")
        cos, sin = torch.cat([freqs.cos()] * 2, -1), torch.cat([freqs.sin()] * 2, -1)
        ref = (q.float() * cos[:, None] + rotate_half(q.float()) * sin[:, None]).to(dtype)
        tol = 1e-2 if dtype != torch.float32 else 1e-5
        torch.testing.assert_close(fused.rotary(q, cos, sin), ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_fused_qk_norm_rotary_matches_the_norms_then_the_rotary(dtype: torch.dtype) -> None:
    """Qwen3's q / k head norms and the rotary in one kernel, against RMSNorm and apply_rotary's torch paths
    (q's weight on q's heads, k's on k's), from the strided view of the fused projection the model passes."""
    from vlmserve.models.layers import fused
    from vlmserve.models.layers.norm import RMSNorm
    from vlmserve.models.layers.rotary import apply_rotary

    torch.manual_seed(0)
    for tokens, hq, hkv, dim in ((1, 32, 8, 128), (37, 16, 8, 128), (5, 3, 1, 64)):
        qkv = torch.randn(tokens, (hq + 2 * hkv) * dim, device="cuda", dtype=dtype) * 3
        qk = qkv[:, : (hq + hkv) * dim].view(tokens, hq + hkv, dim)
        q_norm, k_norm = RMSNorm(dim, 1e-6).to("cuda", dtype), RMSNorm(dim, 1e-6).to("cuda", dtype)
        with torch.no_grad():
            q_norm.weight.copy_(1 + 0.1 * torch.randn(dim))
            k_norm.weight.copy_(1 + 0.1 * torch.randn(dim))
        freqs = torch.randn(tokens, dim // 2, device="cuda") * 50
        cos, sin = torch.cat([freqs.cos()] * 2, -1), torch.cat([freqs.sin()] * 2, -1)
        with torch.enable_grad():  # the torch paths (the fused ones run only without autograd)
            ref_q = apply_rotary(q_norm(qk[:, :hq]), cos, sin).detach()
            ref_k = apply_rotary(k_norm(qk[:, hq:]), cos, sin).detach()
        with torch.inference_mode():
            got = fused.qk_norm_rotary(qk, q_norm.weight, k_norm.weight, hq, 1e-6, cos, sin)
        tol = 2e-2 if dtype != torch.float32 else 1e-5
        torch.testing.assert_close(got[:, :hq], ref_q, rtol=tol, atol=tol)
        torch.testing.assert_close(got[:, hq:], ref_k, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_fused_add_rms_norm_matches_the_add_then_the_norm(dtype: torch.dtype) -> None:
    """The residual add fused into the norm: the sum bit-identical to the plain add, the norm to RMSNorm's
    kernel over that sum (and both within rounding of the torch path)."""
    from vlmserve.models.layers import fused
    from vlmserve.models.layers.norm import RMSNorm

    torch.manual_seed(0)
    for rows, hidden in [(1, 3584), (7, 1280), (300, 96)]:
        x = torch.randn(rows, hidden, device="cuda", dtype=dtype) * 3
        r = torch.randn(rows, hidden, device="cuda", dtype=dtype) * 3
        w = (1 + 0.1 * torch.randn(hidden, device="cuda")).to(dtype)
        total, normed = fused.add_rms_norm(x, r, w, 1e-6)
        assert torch.equal(total, x + r)
        assert torch.equal(normed, fused.rms_norm(x + r, w, 1e-6))
        norm = RMSNorm(hidden).to("cuda", dtype)
        norm.weight.data.copy_(w)
        with torch.inference_mode():
            t2, n2 = norm.add_forward(x, r)
        assert torch.equal(t2, total) and torch.equal(n2, normed)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_write_kv_matches_two_slot_copies(dtype: torch.dtype) -> None:
    """The one-launch K and V cache write against write_slots, from strided views as the model passes them."""
    from vlmserve.runner.kv_quant import write_kv, write_slots

    torch.manual_seed(0)
    for tokens, hkv, dim in ((1, 4, 128), (37, 2, 64), (5, 3, 128)):
        qkv = torch.randn(tokens, (8 + 2 * hkv) * dim, device="cuda", dtype=dtype)
        k = qkv[:, 8 * dim : (8 + hkv) * dim].view(tokens, hkv, dim)
        v = qkv[:, (8 + hkv) * dim :].view(tokens, hkv, dim)
        slots = torch.randperm(64 * 16, device="cuda")[:tokens]
        kc, vc = (torch.zeros(64, 16, hkv, dim, device="cuda", dtype=dtype) for _ in range(2))
        kr, vr = kc.clone(), vc.clone()
        write_kv(kc, vc, slots, k, v)
        write_slots(kr, slots, k)
        write_slots(vr, slots, v)
        assert torch.equal(kc, kr) and torch.equal(vc, vr)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_fused_silu_and_mul_matches_torch(dtype: torch.dtype) -> None:
    from vlmserve.models.layers import fused

    torch.manual_seed(0)
    for rows, inter in ((1, 18944), (37, 3420), (4, 100)):  # decode, vision MLP, not a block multiple
        x = torch.randn(rows, 2 * inter, device="cuda", dtype=dtype) * 4
        gate, up = x.chunk(2, dim=-1)
        ref = torch.nn.functional.silu(gate) * up
        got = fused.silu_and_mul(x)
        assert got.shape == ref.shape and got.dtype == dtype
        torch.testing.assert_close(got, ref, rtol=1e-2 if dtype != torch.float32 else 1e-5, atol=1e-2)
    x3 = torch.randn(2, 3, 2 * 64, device="cuda", dtype=dtype)  # leading dims kept
    assert fused.silu_and_mul(x3).shape == (2, 3, 64)


def test_training_on_cuda_gets_gradients_through_norms_and_rotary() -> None:
    """The fused kernels have no backward: with autograd on, the layers must take the torch ops, or every
    parameter before a norm silently gets no gradient (the demo model's training depends on this)."""
    from vlmserve.models.layers.norm import RMSNorm
    from vlmserve.models.layers.rotary import apply_rotary

    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 64, device="cuda")
    norm = RMSNorm(64).cuda()
    x = torch.randn(5, 64, device="cuda")
    freqs = torch.randn(5, 32, device="cuda")
    cos, sin = torch.cat([freqs.cos()] * 2, -1), torch.cat([freqs.sin()] * 2, -1)
    y = apply_rotary(norm(lin(x)).view(5, 1, 64), cos, sin)
    y.square().sum().backward()
    assert lin.weight.grad is not None and lin.weight.grad.abs().sum() > 0
    assert norm.weight.grad is not None and norm.weight.grad.abs().sum() > 0
    with torch.inference_mode():  # serving still takes the fused kernels, with the same result
        fused_y = apply_rotary(norm(lin(x)).view(5, 1, 64), cos, sin)
        torch.testing.assert_close(fused_y, y.detach(), rtol=1e-5, atol=1e-5)


def test_vision_varlen_flash_matches_grouped_sdpa() -> None:
    """The vision tower's windows and images in one flash call (bf16) against per-length SDPA (float32)."""
    from vlmserve.models.layers.attention import VarlenGroups, varlen_attention

    torch.manual_seed(0)
    lengths = [64, 64, 16, 40, 64, 4, 1200]  # full windows, edge windows, a whole image
    n, heads, dim = sum(lengths), 16, 80
    q, k, v = (torch.randn(n, heads, dim, device="cuda") for _ in range(3))
    seqs = VarlenGroups(lengths, "cuda")
    ref = varlen_attention(q, k, v, seqs, scale=dim**-0.5)  # float32: the grouped path
    got = varlen_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), seqs, scale=dim**-0.5)
    err = ((got.float() - ref).norm() / ref.norm()).item()
    assert err < 2e-2, err


def test_patchify_on_the_gpu_is_bit_identical_to_the_cpu(tmp_path: Path) -> None:
    from tests.conftest import random_image
    from vlmserve.checkpoints.checkpoint import write_checkpoint
    from vlmserve.models.processor import Qwen2_5_VLProcessor

    proc = Qwen2_5_VLProcessor.from_pretrained(write_checkpoint(tmp_path / "7b", preset="7b", weights=False))
    for size in ((1280, 720), (448, 448), (97, 301)):
        pixels, _ = proc.resize_image(random_image(*size, seed=sum(size)))
        assert torch.equal(proc.patchify(pixels.cuda()).cpu(), proc.patchify(pixels))


def test_images_resized_on_the_gpu_equal_pils(tmp_path: Path) -> None:
    """The device resize (image_resize="device", a GPU engine's default) on the GPU, W1's size, a 12 MP photo
    and an upscale, against PIL's resize: the same encoder input, bit for bit."""
    import numpy as np
    from PIL import Image, ImageFilter

    from vlmserve.checkpoints.checkpoint import write_checkpoint
    from vlmserve.models.processor import Qwen2_5_VLProcessor

    proc = Qwen2_5_VLProcessor.from_pretrained(write_checkpoint(tmp_path / "7b", preset="7b", weights=False))
    rng = np.random.default_rng(0)
    for width, height in ((1280, 720), (4032, 3024), (200, 90)):
        noise = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        for img in (noise, noise.filter(ImageFilter.GaussianBlur(2))):
            feature = proc.process("a<|image_pad|>b", [img], as_pixels=True, resize_on_device=True).images[0]
            assert tuple(feature.data.values.shape[:2]) == (height, width)  # resized on the device
            got = proc.encoder_input(feature.data.values.cuda(), feature.data.grid_thw, torch.bfloat16)
            expected, grid = proc.preprocess_image(img)  # PIL on the host
            assert tuple(grid) == tuple(feature.data.grid_thw)
            assert torch.equal(got.cpu(), expected.to(torch.bfloat16))
