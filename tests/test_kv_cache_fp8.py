"""kv_cache_dtype="fp8": keys and values stored as e4m3 in the paged cache (CPU path; the Triton decode kernel
is checked in tests/test_quantization_gpu.py).

Oracle: the plain one-request loop whose contiguous KV cache holds the same keys and values rounded to e4m3.
The engine (chunked prefill, paged blocks, batching) must give the same greedy tokens.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vlmserve.checkpoints.checkpoint import write_checkpoint
from vlmserve.engine.sampling_params import SamplingParams
from vlmserve.llm import LLM
from vlmserve.models.layers.attention import ContiguousKVCache
from vlmserve.runner.kv_quant import FP8_KV, from_cache, kv_storage_dtype, to_cache

TEXT = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2)
TEXT["mrope_section"] = [4, 6, 6]


class RoundedKV(ContiguousKVCache):
    """The reference cache, holding keys and values as an FP8 cache would give them back."""

    def __init__(self, num_layers: int, scale: float, rounded: bool) -> None:
        super().__init__(num_layers, scale)
        self.rounded = rounded

    def __call__(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.rounded:
            k, v = (from_cache(to_cache(t, FP8_KV), t.dtype) for t in (k, v))
        return super().__call__(layer_idx, q, k, v)


@torch.inference_mode()
def _loop(model, ids: list[int], steps: int, rounded: bool) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens and the first step's logits, one request, contiguous cache."""
    cache = RoundedKV(len(model.model.layers), model.model.layers[0].self_attn.head_dim ** -0.5, rounded)
    x, pos, out, first = model.embed(torch.tensor(ids)), torch.arange(len(ids)).expand(3, -1), [], None
    for step in range(steps):
        logits = model.compute_logits(model(x, pos, cache)[-1:])
        first = logits if first is None else first
        out.append(int(logits.argmax(-1)))
        x = model.embed(torch.tensor(out[-1:]))
        pos = torch.full((3, 1), len(ids) + step)
    return out, first


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("kv8"), text=TEXT, seed=7)


def test_engine_with_fp8_kv_cache_equals_the_loop_on_rounded_kv(checkpoint: Path) -> None:
    llm = LLM(
        str(checkpoint),
        device="cpu",
        dtype="float32",
        kv_cache_dtype="fp8",
        max_model_len=512,
        num_kv_blocks=64,
        max_num_seqs=4,
        max_num_batched_tokens=32,  # chunked prefill: later chunks read earlier ones back from the FP8 cache
    )
    assert llm.engine.runner.kv_caches[0][0].dtype == FP8_KV
    prompts = [
        llm.processor.apply_chat_template([{"role": "user", "content": f"Tell me about the number {i}."}])
        for i in range(4)
    ]
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    outs = llm.generate(prompts, params)
    model = llm.engine.model
    for prompt, out in zip(prompts, outs, strict=True):
        ids = llm.processor.process(prompt, []).token_ids
        expected, rounded_logits = _loop(model, ids, 16, rounded=True)
        assert out.outputs[0].token_ids == expected
        _, exact_logits = _loop(model, ids, 1, rounded=False)
        assert (rounded_logits - exact_logits).abs().max() > 1e-4  # the rounding is real


def test_fp8_kv_cache_holds_twice_the_blocks_of_bf16(checkpoint: Path) -> None:
    blocks = {}
    for kv in ("auto", "fp8"):
        llm = LLM(
            str(checkpoint),
            device="cpu",
            dtype="bfloat16",
            kv_cache_dtype=kv,
            kv_cache_memory_gb=0.01,
            max_model_len=1024,
        )
        blocks[kv] = llm.engine.num_blocks
    assert blocks["fp8"] // 2 == blocks["auto"]  # (the same bytes, rounded down to whole blocks)


def test_values_beyond_e4m3_are_clamped_not_nan() -> None:
    x = torch.tensor([1000.0, -1000.0, 0.3])
    back = from_cache(to_cache(x, FP8_KV), torch.float32)
    assert back.tolist()[:2] == [448.0, -448.0] and abs(back[2].item() - 0.3) < 0.02
    with pytest.raises(ValueError, match=r"kv_cache_dtype 'int8' is not supported; use one of auto, fp8"):
        kv_storage_dtype("int8", torch.bfloat16)


def test_fp8_kv_cache_on_a_gpu_without_fp8_is_refused(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with pytest.raises(ValueError, match=r"kv_cache_dtype='fp8' needs a GPU with FP8.*has 8\.0"):
        kv_storage_dtype("fp8", torch.bfloat16, torch.device("cuda", 0))
    assert kv_storage_dtype("fp8", torch.bfloat16, torch.device("cpu")) == FP8_KV
