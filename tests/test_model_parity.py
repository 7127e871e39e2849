"""Our Qwen2.5-VL against HF transformers' (the reference), on CPU in float32.

Tolerance: both sides run the same float32 math in a different order (fused projections, packed varlen
attention, matmul instead of Conv3d), so logits differ by accumulated rounding only: ~1e-5 relative to their
scale. We assert max |diff| <= 1e-4 * max(1, max |logit|), which a single wrong position, mask or weight
would exceed by orders of magnitude.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import Qwen2_5_VLForConditionalGeneration as HFModel

from tests.conftest import random_image
from tests.hf_reference import HFImageTextProcessor
from vlmserve.checkpoints.checkpoint import write_checkpoint
from vlmserve.models.generate import greedy_generate, prompt_embeddings
from vlmserve.models.layers.attention import ContiguousKVCache
from vlmserve.models.loader import load_model
from vlmserve.models.processor import Qwen2_5_VLProcessor

CONFIGS = {
    "tiny": {},
    "tied": {"tie_word_embeddings": True},
    "wide-heads": {  # head_dim 64, a single KV head, one window per small image, full attention first
        "text": dict(
            hidden_size=128, num_attention_heads=2, num_key_value_heads=1, mrope_section=[8, 12, 12]
        ),
        "vision": dict(hidden_size=64, num_heads=4, depth=3, window_size=112, fullatt_block_indexes=[0]),
    },
    "many-heads": {  # head_dim 16, 6 query heads over 3 KV heads, 3 vision blocks with two full ones
        "text": dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=3, mrope_section=[2, 3, 3]),
        "vision": dict(hidden_size=48, num_heads=3, depth=3, window_size=56, fullatt_block_indexes=[0, 2]),
    },
}


def _user(*parts: dict) -> dict:
    return {"role": "user", "content": list(parts)}


IMG = {"type": "image"}


def _text(s: str) -> dict:
    return {"type": "text", "text": s}


PROMPTS = {
    "text-only": ([_user(_text("Describe a red circle."))], []),
    "one-image": ([_user(IMG, _text("What is in this image?"))], [(64, 48)]),
    "three-images": (
        [_user(IMG, _text("and"), IMG, IMG, _text("Compare them."))],
        [(64, 48), (31, 97), (120, 60)],
    ),
    "multi-turn-early-image": (
        [
            _user(IMG, _text("What colour is it?")),
            {"role": "assistant", "content": "It is blue."},
            _user(_text("And its shape?")),
        ],
        [(90, 70)],
    ),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp(request.param), seed=1, **CONFIGS[request.param])


@pytest.fixture(scope="module")
def models(checkpoint: Path):
    ours = load_model(checkpoint, dtype="float32", progress=False)
    ref = HFModel.from_pretrained(checkpoint, dtype=torch.float32).eval()
    return (
        ours,
        ref,
        Qwen2_5_VLProcessor.from_pretrained(checkpoint),
        HFImageTextProcessor.from_pretrained(checkpoint),
    )


def _inputs(models, name: str):
    _, _, proc, hf_proc = models
    messages, sizes = PROMPTS[name]
    images = [random_image(w, h, seed=i) for i, (w, h) in enumerate(sizes)]
    text = proc.apply_chat_template(messages)
    ours_in = proc.process(text, images)
    hf_in = hf_proc(text=[text], images=images or None, return_tensors="pt")
    assert ours_in.token_ids == hf_in["input_ids"][0].tolist()
    return ours_in, hf_in


def assert_logits_match(ours, ref, ours_in, hf_in, prompt: str) -> None:
    """Our model's logits over the whole prompt equal HF's (relative to the largest logit). Shared with the
    other families' tests (tests/test_families.py)."""
    with torch.inference_mode():
        expected = ref(**hf_in).logits[0]  # (L, V)
        x = prompt_embeddings(ours, ours_in.token_ids, ours_in.images)
        cache = ContiguousKVCache(len(ours.model.layers), ours.model.layers[0].self_attn.head_dim ** -0.5)
        got = ours.compute_logits(ours(x, ours_in.mrope_positions, cache))
    err = (got - expected).abs().max().item()
    scale = expected.abs().max().item()
    print(f"{prompt}: max |logit diff| = {err:.2e} (max |logit| = {scale:.1f})")
    assert err <= 1e-4 * max(1.0, scale)


def assert_greedy_matches(ours, ref, ours_in, hf_in) -> None:
    """32 greedy tokens from our loop equal HF's generate()."""
    with torch.inference_mode():
        # No EOS on either side: random weights may emit it at any step, and we compare all 32 tokens.
        # NOTE: drop EOS rather than set min_new_tokens: min_new_tokens masks EOS in the logits, which
        # changes the argmax wherever EOS would have won. Our loop, given no EOS ids, runs all 32 steps.
        out = ref.generate(**hf_in, max_new_tokens=32, do_sample=False, eos_token_id=None)
    expected = out[0, len(ours_in.token_ids) :].tolist()
    assert len(expected) == 32
    got = greedy_generate(
        ours, ours_in.token_ids, ours_in.images, ours_in.mrope_positions, ours_in.mrope_delta, 32
    )
    assert got == expected


@pytest.mark.parametrize("prompt", list(PROMPTS))
def test_logits_match_reference(models, prompt: str) -> None:
    ours, ref, _, _ = models
    assert_logits_match(ours, ref, *_inputs(models, prompt), prompt)


@pytest.mark.parametrize("prompt", ["one-image", "three-images"])
def test_greedy_32_tokens_match_generate(models, prompt: str) -> None:
    ours, ref, _, _ = models
    assert_greedy_matches(ours, ref, *_inputs(models, prompt))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [32, 64, 80])
def test_rotary_matches_hf(dtype: torch.dtype, head_dim: int) -> None:
    """The CPU rotary (half by half, straight into the output dtype) against HF's formula (float32 copies,
    rotate_half, cast back), on q / k as the attention layers pass them: strided views of a fused projection."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision

    from vlmserve.models.layers.rotary import apply_rotary

    gen = torch.Generator().manual_seed(head_dim)
    tokens, heads = 300, 4
    qkv = (torch.randn(tokens, 3 * heads, head_dim, generator=gen) * 3).to(dtype)
    q, k = qkv[:, :heads], qkv[:, heads : 2 * heads]  # row stride 3 * heads * head_dim
    angles = torch.rand(tokens, head_dim // 2, generator=gen) * 1000
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    ref_q, ref_k = apply_rotary_pos_emb_vision(q, k, cos, sin)
    with torch.enable_grad():  # the training path (autograd on) is HF's formula itself
        assert torch.equal(apply_rotary(q, cos, sin), ref_q)
    with torch.inference_mode():  # the serving path
        fast_q, fast_k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    half = head_dim // 2
    for x, ours, ref in ((q, fast_q, ref_q), (k, fast_k, ref_k)):
        assert ours.dtype == dtype and ours.shape == ref.shape
        # The same float32 arithmetic up to a fused multiply-add: the float32 results differ by rounding of
        # the two products' size (cancellation can make that large next to the sum), the results in `dtype`
        # by at most one rounding step of their own.
        terms = (x[..., :half].float().abs() + x[..., half:].float().abs()).repeat(1, 1, 2)
        bound = 2 * torch.finfo(torch.float32).eps * terms + torch.finfo(dtype).eps * ref.float().abs()
        assert ((ours.float() - ref.float()).abs() <= bound).all()
