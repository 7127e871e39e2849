"""Tensor parallelism on the CPU: two ranks over gloo (the driver's rank 0 and one worker process) against
one device, on tiny random checkpoints of each family.

The oracle is the same engine with tensor_parallel_size=1: greedy tokens identical, logprobs within float32
rounding (a row-parallel layer sums its partial products in another order). Prompts cover text only, one
image and several images, and repeat so that the second round hits the prefix cache and the encoder cache.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.conftest import random_image
from vlmserve.engine.sampling_params import SamplingParams
from vlmserve.llm import LLM
from vlmserve.testing.checkpoint import write_checkpoint

ENGINE = dict(max_model_len=512, max_num_batched_tokens=128, max_num_seqs=8, device="cpu", dtype="float32")


def _prompts(llm: LLM) -> list[tuple[str, list]]:
    def chat(question: str, images: list) -> tuple[str, list]:
        parts = [{"type": "image"} for _ in images] + [{"type": "text", "text": question}]
        return llm.processor.apply_chat_template([{"role": "user", "content": parts}]), images

    shared = random_image(56, 56, seed=11)
    return [
        chat("Tell me a story about a lighthouse keeper.", []),
        chat("What is this?", [shared]),
        chat("Compare these.", [random_image(60, 44, seed=12), shared, random_image(40, 70, seed=13)]),
    ]


def _run(llm: LLM) -> list[tuple[list[int], list[float]]]:
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=0)
    prompts = _prompts(llm)
    out = []
    # Twice: the second round reuses the first's KV blocks (prefix cache) and image rows (encoder cache).
    for _ in range(2):
        for r in llm.generate(prompts, params):
            c = r.outputs[0]
            out.append((c.token_ids, [lp.logprob for lp in c.logprobs or []]))
        out.append(([r.num_cached_tokens for r in llm.generate(prompts[1:2], params)], []))
    return out


def _compare(tp1: list, tp2: list) -> None:
    assert len(tp1) == len(tp2)
    for (ids1, lp1), (ids2, lp2) in zip(tp1, tp2, strict=True):
        assert ids1 == ids2
        assert torch.allclose(torch.tensor(lp1), torch.tensor(lp2), atol=1e-4)


@pytest.fixture(scope="module")
def few_kv_heads(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # One KV head, two ranks: the KV head is replicated on both.
    return write_checkpoint(
        tmp_path_factory.mktemp("tp-kv1"),
        preset="tiny",
        seed=3,
        text=dict(num_attention_heads=4, num_key_value_heads=1),
    )


@pytest.fixture(scope="module")
def qwen3_moe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("tp-moe"), family="qwen3_vl_moe", seed=4)


def _llm(path: Path, tp: int) -> Iterator[LLM]:
    llm = LLM(str(path), tensor_parallel_size=tp, **ENGINE)
    try:
        yield llm
    finally:
        llm.engine.shutdown()


@pytest.mark.parametrize("checkpoint", ["tiny_checkpoint", "few_kv_heads", "qwen3_moe"])
def test_tp2_matches_tp1(checkpoint: str, request: pytest.FixtureRequest) -> None:
    path = request.getfixturevalue(checkpoint)
    ref = _run(next(_llm(path, 1)))
    gen = _llm(path, 2)
    llm = next(gen)
    try:
        assert llm.engine.workers is not None and len(llm.engine.workers.pids) == 1
        _compare(ref, _run(llm))
        assert ref[-1][0][0] > 0  # the repeated image prompt did hit the prefix cache
    finally:
        gen.close()
