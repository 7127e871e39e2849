"""The KV cache sized from measured memory (engine/kv_sizing.py).

On the CPU: the budget arithmetic, the largest step the scheduler can produce (its tokens, rows, images and
blocks), that step run through a real runner, and a runner whose cache is reallocated serving as before. On a
GPU (skipped without one): an engine sized at a given gpu_memory_utilization stays within it while serving
its largest steps.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tests.conftest import random_image
from vlmserve.engine.kv_sizing import LargestStep, MemoryProfile, kv_cache_blocks
from vlmserve.engine.sampling_params import SamplingParams
from vlmserve.engine.scheduler import SchedulerConfig
from vlmserve.llm import LLM

GiB = 2**30


def test_budget_arithmetic() -> None:
    # 80 GiB at 0.5 = 40 GiB; minus 10 in use, 6 of activations, 1 of graphs = 23 GiB of 2 MiB blocks.
    blocks = kv_cache_blocks(80 * GiB, 0.5, 10 * GiB, 6 * GiB, 1 * GiB, 2 * 2**20)
    assert blocks == 23 * 512
    # A partial block does not count.
    assert kv_cache_blocks(10 * GiB, 1.0, 0, 0, 0, 3 * GiB) == 3
    profile = MemoryProfile(total=80 * GiB, in_use=10 * GiB, activations=6 * GiB, graphs=1 * GiB)
    assert profile.kv_blocks(0.5, 2 * 2**20) == blocks
    assert profile.kv_blocks(0.9, 2 * 2**20) > blocks


@pytest.mark.parametrize(("in_use", "activations"), [(20 * GiB, 20 * GiB), (39 * GiB, 1 * GiB)])
def test_no_budget_left_names_the_setting(in_use: int, activations: int) -> None:
    with pytest.raises(ValueError, match=r"gpu_memory_utilization=0\.5 leaves no memory for the KV cache"):
        kv_cache_blocks(80 * GiB, 0.5, in_use, activations, 1 * GiB, 2**20)


def _limits(**kw: int) -> SchedulerConfig:
    fields = dict(
        num_blocks=1 + 2048 // 16,
        block_size=16,
        max_model_len=2048,
        max_num_seqs=8,
        max_num_batched_tokens=512,
        encoder_cache_size=2048,
        max_encoder_tokens_per_step=512,
    )
    return SchedulerConfig(**{**fields, **kw})  # type: ignore[arg-type]


def _step(limits: SchedulerConfig, max_image_tokens: int) -> LargestStep:
    return LargestStep(
        limits, max_image_tokens, patch_size=14, merge_size=2, image_token_id=7, vocab_size=100
    )


def test_largest_step_fills_every_budget() -> None:
    """The token budget over max_num_seqs rows that all sample, the encoder budget in images of the largest
    size, and blocks for all of it."""
    step = _step(_limits(), max_image_tokens=100)
    sched = step.schedule()
    assert sched.num_batched_tokens == 512
    assert len(sched.scheduled) == 8
    assert all(s.sample for s in sched.scheduled)
    encoded = [req.images[i] for req, i in sched.encoder_inputs]
    # 505 tokens in the long request: five images of 100 tokens, then the largest grids that fit the rest
    # (2 x 2, then 1 x 1).
    assert [img.length for img in encoded] == [100] * 5 + [4, 1]
    assert step.image_tokens == 505
    for img in encoded:
        t, h, w = img.data.grid_thw
        assert t * h * w // 4 == img.length
        assert tuple(img.data.values.shape) == (h * 14, w * 14, 3)
    # The null block, 32 for the long request and one for each short one; but at least one max_model_len
    # sequence's 128 (the scheduler's own check).
    assert step.num_blocks == 1 + 128
    assert _step(_limits(max_model_len=512, num_blocks=33), 100).num_blocks == 1 + 32 + 7
    rows = sched.grammar_bitmask.resolve()
    assert rows.bits.shape == (8, 4) and (rows.bits == -1).all()


def test_largest_step_with_an_image_larger_than_the_token_budget() -> None:
    """An image the step cannot hold whole is still encoded whole; its request computes a chunk of it."""
    limits = _limits(max_encoder_tokens_per_step=1024, max_num_batched_tokens=256)
    step = _step(limits, max_image_tokens=1024)
    sched = step.schedule()
    assert sched.num_batched_tokens == 256
    [(req, i)] = sched.encoder_inputs
    assert req.images[i].length == 1024
    assert sum(s.sample for s in sched.scheduled) == 7  # the image's request is mid-prompt


def test_largest_step_is_capped_by_max_model_len() -> None:
    step = _step(_limits(max_model_len=64, num_blocks=5, max_num_batched_tokens=1024), max_image_tokens=16)
    sched = step.schedule()
    assert sched.num_batched_tokens == 8 * 64
    assert all(s.num_tokens == 64 and s.sample for s in sched.scheduled)


def test_largest_step_without_images() -> None:
    """No image allowed (limit_mm_per_prompt image 0): the step runs no encoder."""
    sched = _step(_limits(), max_image_tokens=0).schedule()
    assert not sched.encoder_inputs
    assert sched.num_batched_tokens == 512 and all(s.sample for s in sched.scheduled)


def test_largest_step_runs_through_the_runner(tiny_checkpoint: Path) -> None:
    """The profile step through the real runner and sampler (on the CPU here; on a GPU the engine measures
    it), every sampling feature and the grammar mask on: a token for every row that samples."""
    from vlmserve.config import EngineArgs
    from vlmserve.engine.core import EngineCore
    from vlmserve.llm import build_engine_config
    from vlmserve.runner.model_runner import ModelRunner

    config = build_engine_config(
        EngineArgs(
            model=str(tiny_checkpoint),
            device="cpu",
            dtype="float32",
            max_model_len=512,
            max_num_batched_tokens=256,
            max_num_seqs=8,
            num_kv_blocks=64,
        )
    )
    engine = EngineCore(config)
    step = engine._largest_step()
    assert step.image_tokens > 0
    runner = ModelRunner(
        engine.model,
        step.num_blocks,
        config.block_size,
        engine.eos_token_ids,
        max_model_len=config.max_model_len,
        max_num_seqs=config.max_num_seqs,
        encoder_input=engine.processor.encoder_input,
    )
    sched = step.schedule()
    tokens = runner.launch(sched).result()
    assert set(tokens) == {s.request.request_id for s in sched.scheduled if s.sample}
    assert len(tokens) == 8
    assert all(len(t.top_logprobs or []) == 20 for t in tokens.values())
    assert runner.encoder_cache


SMALL = dict(
    device="cpu",
    dtype="float32",
    max_model_len=256,
    max_num_batched_tokens=256,
    max_num_seqs=8,
    num_kv_blocks=48,
)


def _greedy(llm: LLM) -> list[int]:
    text = "<|vision_start|><|image_pad|><|vision_end|>What is it?"
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    request = llm.make_request(text, [random_image(56, 56, seed=3)], params)
    return llm.run([request])[0].outputs[0].token_ids


def _profile_then_reallocate(llm: LLM, num_blocks: int) -> None:
    """What the engine does on a GPU: the largest step on a cache of its own, then the sized cache."""
    runner = llm.engine.runner
    step = llm.engine._largest_step()
    runner.allocate_kv_cache(step.num_blocks)
    runner.launch(step.schedule()).result()  # leaves encoder outputs, generators and KV behind
    runner.allocate_kv_cache(num_blocks)
    assert runner.num_blocks == num_blocks and not runner.encoder_cache and not runner.generators


def test_reallocated_cache_serves_as_before(tiny_checkpoint: Path) -> None:
    """A runner whose cache was replaced before the first request serves the same greedy tokens as one that
    kept its first cache."""
    expected = _greedy(LLM(str(tiny_checkpoint), **SMALL))  # type: ignore[arg-type]
    llm = LLM(str(tiny_checkpoint), **SMALL)  # type: ignore[arg-type]
    _profile_then_reallocate(llm, 48)
    assert _greedy(llm) == expected


def test_tensor_parallel_ranks_run_the_profile_and_reallocate_together(tiny_checkpoint: Path) -> None:
    """Under tensor parallelism the largest step runs on both ranks and the worker replaces its cache when
    rank 0 does (gloo on the CPU): the tokens stay those of one rank."""
    expected = _greedy(LLM(str(tiny_checkpoint), **SMALL))  # type: ignore[arg-type]
    llm = LLM(str(tiny_checkpoint), tensor_parallel_size=2, **SMALL)  # type: ignore[arg-type]
    try:
        _profile_then_reallocate(llm, 64)
        assert _greedy(llm) == expected
    finally:
        llm.engine.shutdown()


GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@GPU
def test_measured_kv_cache_stays_within_gpu_memory_utilization(tiny_checkpoint: Path) -> None:
    """Sized at a utilization a few GiB above what the GPU uses now, the engine serves a max-size prefill (with
    images) and a full decode batch without the device's used memory passing total * utilization."""
    torch.cuda.init()
    free, total = torch.cuda.mem_get_info()
    util = min(0.9, (total - free + 4 * GiB) / total)
    max_model_len, seqs = 2048, 32
    llm = LLM(
        str(tiny_checkpoint),
        device="cuda",
        dtype="bfloat16",
        gpu_memory_utilization=util,
        max_model_len=max_model_len,
        max_num_batched_tokens=2048,
        max_num_seqs=seqs,
    )
    engine = llm.engine
    assert engine.num_blocks - 1 >= math.ceil(max_model_len / engine.config.block_size)
    assert engine.runner.graphs is not None
    image_chat = llm.processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}] * 4 + [{"type": "text", "text": "Compare."}]}]
    )
    images = [random_image(400, 300, seed=i) for i in range(4)]
    long_text = llm.processor.apply_chat_template(
        [{"role": "user", "content": "Tell me a long story about the sea. " * 105}]
    )
    params = SamplingParams(temperature=0.8, top_p=0.9, top_k=20, logprobs=5, max_tokens=24, ignore_eos=True)
    requests = [llm.make_request(image_chat, images, params), llm.make_request(long_text, [], params)]
    requests += [llm.make_request(f"short prompt {i}", [], params) for i in range(seqs - 2)]
    outputs = llm.run(requests)
    assert all(len(o.outputs[0].token_ids) == 24 for o in outputs)
    torch.cuda.synchronize()
    free_now, _ = torch.cuda.mem_get_info()
    # The peak: what is used now, plus what the caching allocator held at its peak beyond what it holds now.
    peak = (total - free_now) + torch.cuda.max_memory_reserved() - torch.cuda.memory_reserved()
    assert peak <= total * util + 256 * 2**20, (peak / GiB, total * util / GiB)


@pytest.mark.gpu
@GPU
def test_tensor_parallel_path_sizes_its_cache_from_the_profile(tiny_checkpoint: Path) -> None:
    """One rank over NCCL: the largest step and the graph captures take the tensor-parallel path (all-reduces
    in the step and captured in the graphs); the sized engine gives the plain engine's greedy tokens."""
    from vlmserve.engine.core import EngineCore

    free, total = torch.cuda.mem_get_info()
    kw = dict(
        device="cuda",
        dtype="bfloat16",
        gpu_memory_utilization=min(0.9, (total - free + 2 * GiB) / total),
        max_model_len=512,
        max_num_batched_tokens=512,
        max_num_seqs=16,
        async_scheduling=False,
    )
    llm = LLM(str(tiny_checkpoint), **kw)  # type: ignore[arg-type]
    expected = _greedy(llm)
    del llm.engine
    torch.cuda.empty_cache()
    llm.engine = EngineCore(llm.config, llm.processor, force_tensor_parallel=True)
    try:
        assert llm.engine.workers is not None and llm.engine.runner.graphs is not None
        assert llm.engine.num_blocks - 1 >= 512 // llm.config.block_size
        assert _greedy(llm) == expected
    finally:
        llm.engine.shutdown()
