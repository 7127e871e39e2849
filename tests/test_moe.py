"""The sparse MoE block (Qwen3-VL-MoE): the torch path against HF's block, the expert-block layout the GPU
kernel relies on (checked on CPU by running its block loop in torch), and the Triton grouped-expert kernel
against the torch path on random inputs (GPU tests skip cleanly without CUDA)."""

from __future__ import annotations

import pytest
import torch

from vlmserve.models.layers.activation import silu_and_mul
from vlmserve.models.layers.moe import SparseMoE, align_rows, moe_reference

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _random_moe(hidden: int, inter: int, experts: int, top_k: int, seed: int = 0) -> SparseMoE:
    gen = torch.Generator().manual_seed(seed)
    moe = SparseMoE(hidden, inter, experts, top_k)
    with torch.no_grad():
        moe.gate.weight.copy_(torch.randn(experts, hidden, generator=gen) / hidden**0.5)
        moe.experts.gate_up_proj.copy_(torch.randn(experts, 2 * inter, hidden, generator=gen) / hidden**0.5)
        moe.experts.down_proj.copy_(torch.randn(experts, hidden, inter, generator=gen) / inter**0.5)
    return moe


def test_sparse_moe_matches_hf_block() -> None:
    from transformers.models.qwen3_vl_moe.configuration_qwen3_vl_moe import Qwen3VLMoeTextConfig
    from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import Qwen3VLMoeTextSparseMoeBlock

    hidden, inter, experts, top_k = 64, 48, 8, 3
    ours = _random_moe(hidden, inter, experts, top_k)
    cfg = Qwen3VLMoeTextConfig(
        hidden_size=hidden, moe_intermediate_size=inter, num_experts=experts, num_experts_per_tok=top_k
    )
    ref = Qwen3VLMoeTextSparseMoeBlock(cfg)
    with torch.no_grad():  # HF's own parameters are in our (experts, out, in) layout
        ref.gate.weight.copy_(ours.gate.weight)
        ref.experts.gate_up_proj.copy_(ours.experts.gate_up_proj)
        ref.experts.down_proj.copy_(ours.experts.down_proj)
    x = torch.randn(37, hidden, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = ref(x[None])[0]
        got = ours(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("tokens", "experts", "top_k", "block_m"), [(1, 128, 8, 16), (50, 8, 2, 16), (7, 4, 4, 64)]
)
def test_align_rows_puts_each_row_once_in_a_block_of_its_expert(
    tokens: int, experts: int, top_k: int, block_m: int
) -> None:
    gen = torch.Generator().manual_seed(tokens)
    topk_ids = torch.stack([torch.randperm(experts, generator=gen)[:top_k] for _ in range(tokens)])
    sorted_rows, block_expert = align_rows(topk_ids, experts, block_m)
    m = tokens * top_k
    assert sorted_rows.numel() == block_expert.numel() * block_m
    assert sorted_rows.numel() >= m
    real = sorted_rows[sorted_rows < m]
    assert sorted(real.tolist()) == list(range(m))  # every row exactly once
    flat = topk_ids.flatten()
    for b, e in enumerate(block_expert.tolist()):
        rows = sorted_rows[b * block_m : (b + 1) * block_m]
        rows = rows[rows < m]
        if e < 0:
            assert rows.numel() == 0  # blocks past the last expert's hold only padding
        else:
            assert (flat[rows.long()] == e).all()


def _blocked_moe_in_torch(x, w13, w2, weights, topk_ids, block_m: int) -> torch.Tensor:
    """The Triton kernel's algorithm written as a torch loop over blocks: what fused_moe_triton computes."""
    t, k = topk_ids.shape
    sorted_rows, block_expert = align_rows(topk_ids, w13.shape[0], block_m)
    m = t * k
    gate_up = torch.zeros(m, w13.shape[1])
    for b, e in enumerate(block_expert.tolist()):
        rows = sorted_rows[b * block_m : (b + 1) * block_m].long()
        rows = rows[rows < m]
        if e >= 0 and rows.numel():
            gate_up[rows] = x[rows // k] @ w13[e].t()
    act = silu_and_mul(gate_up)
    down = torch.zeros(m, w2.shape[1])
    for b, e in enumerate(block_expert.tolist()):
        rows = sorted_rows[b * block_m : (b + 1) * block_m].long()
        rows = rows[rows < m]
        if e >= 0 and rows.numel():
            down[rows] = (act[rows] @ w2[e].t()) * weights.flatten()[rows, None]
    return down.view(t, k, -1).sum(1)


def test_block_layout_computes_the_reference() -> None:
    moe = _random_moe(32, 24, 6, 2, seed=3)
    x = torch.randn(29, 32, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        weights, ids = moe.route(x)
        ref = moe_reference(x, moe.experts.gate_up_proj, moe.experts.down_proj, weights, ids)
        got = _blocked_moe_in_torch(x, moe.experts.gate_up_proj, moe.experts.down_proj, weights, ids, 16)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize(
    ("tokens", "hidden", "inter", "experts", "top_k"),
    [
        (1, 2048, 768, 128, 8),  # Qwen3-VL-30B-A3B decode at batch 1 (one row per block)
        (4, 2048, 768, 128, 8),  # the largest batch with one row per block
        (64, 2048, 768, 128, 8),  # decode batch
        (700, 256, 96, 8, 2),  # prefill; intermediate size not a multiple of the kernel's 64
        (5, 64, 48, 4, 4),  # every expert on every token
    ],
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_moe_matches_torch_reference(
    tokens: int, hidden: int, inter: int, experts: int, top_k: int, dtype: torch.dtype
) -> None:
    from vlmserve.models.layers.moe import fused_moe_triton

    moe = _random_moe(hidden, inter, experts, top_k).to("cuda", dtype)
    x = torch.randn(tokens, hidden, device="cuda", dtype=dtype)
    with torch.inference_mode():
        weights, ids = moe.route(x)
        w13, w2 = moe.experts.gate_up_proj, moe.experts.down_proj
        ref = moe_reference(x.float(), w13.float(), w2.float(), weights.float(), ids)
        got = fused_moe_triton(x, w13, w2, weights, ids)
        assert moe(x).dtype == dtype  # SparseMoE takes the Triton path on CUDA under inference mode
    assert got.shape == ref.shape and got.dtype == dtype
    err = ((got.float() - ref).norm() / ref.norm()).item()
    assert err < 1e-2, err


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize(("tokens", "experts", "top_k"), [(1, 128, 8), (130, 128, 8), (9, 60, 3)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_routing_kernel_matches_softmax_topk_renormalised(
    tokens: int, experts: int, top_k: int, dtype: torch.dtype
) -> None:
    """The one-launch router (route_topk) picks the torch path's experts in its order, with its weights
    (among equal logits, which bf16 makes likely, either may come first: the picked logits are compared)."""
    from vlmserve.models.layers.moe import route_topk

    torch.manual_seed(tokens)
    logits = torch.randn(tokens, experts, device="cuda").to(dtype)
    weights, ids = route_topk(logits, top_k)
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    ref_w, ref_ids = torch.topk(probs, top_k, dim=-1)
    ref_w = (ref_w / ref_w.sum(dim=-1, keepdim=True)).to(dtype)
    assert ids.dtype == torch.int32 and weights.dtype == dtype
    assert torch.equal(logits.gather(1, ids.long()), logits.gather(1, ref_ids))
    assert all(len(set(row)) == top_k for row in ids.tolist())  # k distinct experts per token
    torch.testing.assert_close(weights, ref_w, rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-6)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("tokens", [8, 16])  # one row per block (32 rows), aligned blocks (64)
def test_triton_moe_replays_in_a_cuda_graph_with_new_routing(tokens: int) -> None:
    """The expert layout is built on the device without a host sync and with shapes fixed by the token count,
    so a CUDA graph captured with one routing computes any other routing correctly on replay."""
    from vlmserve.models.layers.moe import fused_moe_triton

    moe = _random_moe(256, 128, 16, 4).to("cuda", torch.bfloat16)
    x = torch.randn(tokens, 256, device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode():
        fused_moe_triton(x, moe.experts.gate_up_proj, moe.experts.down_proj, *moe.route(x))  # compile
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = moe(x)
        for seed in range(3):
            torch.manual_seed(seed)
            x.copy_(torch.randn_like(x))
            graph.replay()
            weights, ids = moe.route(x)
            ref = moe_reference(
                x.float(),
                moe.experts.gate_up_proj.float(),
                moe.experts.down_proj.float(),
                weights.float(),
                ids,
            )
            err = ((out.float() - ref).norm() / ref.norm()).item()
            assert err < 1e-2, (seed, err)
