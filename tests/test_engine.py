"""The full engine (scheduler + paged runner + sampler + detokenizer) on a tiny real checkpoint, on the CPU
(pinned: the oracles are exact float32 comparisons, which a bf16 GPU engine would not meet).

The oracle is `greedy_generate`: one request at a time, contiguous KV cache, no scheduling. Whatever the
batching, chunking, preemption and caching did, greedy tokens must be identical.
"""

from __future__ import annotations

import dataclasses
import math
import random
from pathlib import Path

import pytest
import torch

from tests.conftest import random_image
from tests.hf_reference import HFImageTextProcessor
from vlmserve.engine.input_processor import InputProcessor
from vlmserve.engine.sampling_params import SamplingParams
from vlmserve.llm import LLM
from vlmserve.models.generate import greedy_generate

SYSTEM = "You are a careful assistant that describes pictures in great detail, naming every colour and shape."


def _chat(llm: LLM, question: str, images: list) -> tuple[str, list]:
    parts = [{"type": "image"} for _ in images] + [{"type": "text", "text": question}]
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": parts}]
    return llm.processor.apply_chat_template(messages), images


def _oracle(llm: LLM, request, max_tokens: int) -> list[int]:
    return greedy_generate(
        llm.engine.model,
        request.prompt_token_ids,
        request.images,
        request.mrope_positions,
        request.mrope_delta,
        max_tokens,
    )


@pytest.fixture(scope="module", params=[False, True], ids=["sync", "async"])
def tight_llm(tiny_checkpoint: Path, request: pytest.FixtureRequest) -> LLM:
    # A small token budget forces chunked prefill; 34 blocks of 16 tokens cannot hold 18 requests of
    # ~60-200 tokens at once (34 blocks), which forces preemption and recompute. Every test runs with the
    # step loop synchronous and asynchronous (each step queued before the previous one's tokens are read,
    # as on a GPU), where a request can be preempted or stopped while a token of it is still pending.
    return LLM(
        str(tiny_checkpoint),
        max_model_len=256,
        max_num_batched_tokens=64,
        max_num_seqs=12,
        num_kv_blocks=34,
        block_size=16,
        async_scheduling=request.param,
        device="cpu",
        dtype="float32",  # batch-invariant arithmetic: bf16 rounding would depend on the batch's shape
    )


def test_batched_engine_matches_one_at_a_time_greedy(tight_llm: LLM) -> None:
    llm = tight_llm
    rng = random.Random(0)
    shared = random_image(56, 56, seed=100)  # repeated: prefix-cache and encoder-cache hits
    prompts = []
    for i in range(18):
        kind = i % 4
        if kind == 0:
            prompts.append(_chat(llm, "Tell me a story " * rng.randint(1, 8), []))
        elif kind == 1:
            prompts.append(
                _chat(llm, "What is this?", [random_image(rng.randint(28, 90), rng.randint(28, 90), i)])
            )
        elif kind == 2:
            images = [random_image(rng.randint(28, 70), rng.randint(28, 70), i * 10 + j) for j in range(3)]
            prompts.append(_chat(llm, "Compare these.", images))
        else:
            prompts.append(_chat(llm, f"Describe it, variant {i}.", [shared]))
    max_tokens = [rng.randint(4, 24) for _ in prompts]
    requests = [
        llm.make_request(text, images, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
        for (text, images), n in zip(prompts, max_tokens, strict=True)
    ]
    outputs = llm.run(requests)

    stats = llm.engine.stats()
    assert stats["num_preemptions"] > 0, "the test must force preemption"
    assert stats["prefix_cache_hits"] > 0
    for req, out, n in zip(requests, outputs, max_tokens, strict=True):
        assert out.outputs[0].token_ids == _oracle(llm, req, n), req.request_id
        assert out.outputs[0].finish_reason == "length"
    assert llm.engine.scheduler.kv.num_used_blocks == 0  # nothing leaked


def test_prefix_cache_knows_images(tight_llm: LLM) -> None:
    llm = tight_llm
    img_a, img_b = random_image(84, 84, seed=1), random_image(84, 84, seed=2)
    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    text, _ = _chat(llm, "What colour is it?", [img_a])
    first = llm.run([llm.make_request(text, [img_a], params)])[0]
    again = llm.run([llm.make_request(text, [img_a], params)])[0]
    other = llm.run([llm.make_request(text, [img_b], params)])[0]
    req = llm.make_request(text, [img_b], params)
    image_start = req.images[0].offset
    bs = llm.config.block_size
    assert first.num_cached_tokens <= image_start  # only the system prompt could have been cached before
    # Same text and image: everything but the last (partial) block is reused.
    assert again.num_cached_tokens == (len(req.prompt_token_ids) - 1) // bs * bs
    # Same text, different image: at most the full blocks before the image are reused.
    assert other.num_cached_tokens == image_start // bs * bs
    assert other.outputs[0].token_ids == _oracle(llm, req, 2)


def test_engine_greedy_equals_hf_generate(tiny_checkpoint: Path) -> None:
    from transformers import Qwen2_5_VLForConditionalGeneration as HFModel

    llm = LLM(str(tiny_checkpoint), max_model_len=1024, device="cpu", dtype="float32")
    images = [random_image(70, 50, seed=7), random_image(40, 90, seed=8)]
    text, _ = _chat(llm, "What are these?", images)
    out = llm.generate([(text, images)], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))[0]
    ref = HFModel.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()
    hf_in = HFImageTextProcessor.from_pretrained(tiny_checkpoint)(
        text=[text], images=images, return_tensors="pt"
    )
    with torch.inference_mode():
        expected = ref.generate(**hf_in, max_new_tokens=24, do_sample=False, eos_token_id=None)
    assert out.outputs[0].token_ids == expected[0, hf_in["input_ids"].shape[1] :].tolist()


def test_sampling_options_through_the_engine(tight_llm: LLM) -> None:
    llm = tight_llm
    img = random_image(60, 60, seed=3)
    text, _ = _chat(llm, "Go on.", [img])
    seeded = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=12, seed=1234, ignore_eos=True)

    # A seeded request gives the same tokens alone and among different batch mates.
    alone = llm.generate([(text, [img])], seeded)[0].outputs[0].token_ids
    noisy = SamplingParams(temperature=1.3, max_tokens=12, ignore_eos=True)
    mates = [llm.make_request(f"Hi there {i}", [], noisy) for i in range(3)]
    batch = llm.run([*mates[:2], llm.make_request(text, [img], seeded), mates[2]])
    assert batch[2].outputs[0].token_ids == alone

    # n > 1: independent choices (different seeds per choice), the prompt computed once and shared.
    hits_before = llm.engine.stats()["prefix_cache_hits"]
    many = llm.generate(
        [(text, [img])], SamplingParams(n=3, temperature=1.0, max_tokens=8, seed=5, ignore_eos=True)
    )
    choices = [c.token_ids for c in many[0].outputs]
    assert len({tuple(c) for c in choices}) > 1
    assert llm.engine.stats()["prefix_cache_hits"] - hits_before >= 2 * (
        (len(many[0].prompt_token_ids) - 1) // 16 * 16
    )

    # max_tokens and logprobs of the raw distribution.
    greedy = llm.generate(
        [(text, [img])], SamplingParams(temperature=0, max_tokens=5, logprobs=3, ignore_eos=True)
    )[0]
    out = greedy.outputs[0]
    assert len(out.token_ids) == 5
    assert out.finish_reason == "length"
    assert len(out.logprobs) == 5
    for lp in out.logprobs:
        assert lp.top[0][0] == lp.token_id  # greedy picks the most likely token
        assert lp.logprob == pytest.approx(lp.top[0][1])
        assert len(lp.top) == 3
        assert all(lp.top[i][1] >= lp.top[i + 1][1] for i in range(2))
        assert lp.logprob <= 0.0
    # The top logprobs are a distribution's: their probabilities sum to at most 1.
    assert sum(math.exp(v) for _, v in out.logprobs[0].top) <= 1.0 + 1e-6
    assert llm.engine.scheduler.kv.num_used_blocks == 0


def test_stop_strings_and_stop_tokens(tight_llm: LLM) -> None:
    llm = tight_llm
    text, _ = _chat(llm, "Say something long.", [])
    base = llm.generate([text], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))[0].outputs[0]
    full = base.text
    # Pick a stop string from the middle of the greedy text: generation must stop there, without it.
    cut = next(
        i for i in range(3, len(full) - 3) if full[i : i + 2].strip() and "\ufffd" not in full[i : i + 2]
    )
    stop = full[cut : cut + 2]
    first = full.index(stop)
    stopped = llm.generate(
        [text], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop])
    )[0]
    assert stopped.outputs[0].text == full[:first]
    assert stopped.outputs[0].finish_reason == "stop"
    assert stopped.outputs[0].stop_reason == stop
    # A stop token id ends generation with that token reported but not rendered as text.
    tok = base.token_ids[5]
    by_token = llm.generate(
        [text], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop_token_ids=[tok])
    )[0].outputs[0]
    assert by_token.token_ids == base.token_ids[: base.token_ids.index(tok) + 1]
    assert by_token.finish_reason == "stop"
    assert llm.engine.scheduler.kv.num_used_blocks == 0


def test_abort_frees_blocks(tight_llm: LLM) -> None:
    llm = tight_llm
    text, images = _chat(llm, "Keep going " * 5, [random_image(80, 80, seed=9)])
    params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
    for i in range(4):
        llm.engine.add_request(llm.make_request(text, images, params, request_id=f"abort-{i}"))
    for _ in range(6):
        llm.engine.step()
    assert llm.engine.scheduler.kv.num_used_blocks > 0
    for i in range(4):
        llm.engine.abort(f"abort-{i}")
    assert not llm.engine.has_unfinished_requests()
    assert llm.engine.scheduler.kv.num_used_blocks == 0


def test_prompt_longer_than_max_model_len_is_refused(tight_llm: LLM) -> None:
    llm = tight_llm
    request = llm.make_request("word " * 300, [], SamplingParams(max_tokens=4))
    with pytest.raises(ValueError, match=r"256") as e:
        llm.engine.add_request(request)
    assert str(len(request.prompt_token_ids)) in str(e.value)


def test_cpu_decode_and_few_token_steps_use_one_thread_only_for_small_models(
    tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from types import SimpleNamespace

    from vlmserve.runner import model_runner

    runner = LLM(str(tiny_checkpoint), device="cpu").engine.runner
    decode = SimpleNamespace(scheduled=[SimpleNamespace(num_tokens=1)] * 2, encoder_inputs=[])
    big_decode = SimpleNamespace(scheduled=[SimpleNamespace(num_tokens=1)] * 32, encoder_inputs=[])
    prefill = SimpleNamespace(scheduled=[SimpleNamespace(num_tokens=64)], encoder_inputs=[])
    mixed = SimpleNamespace(
        scheduled=[SimpleNamespace(num_tokens=1)] * 8 + [prefill.scheduled[0]], encoder_inputs=[]
    )
    try:
        assert runner.one_thread_small_steps  # the tiny test model is far below SMALL_CPU_MODEL_BYTES
        runner._set_cpu_threads(decode)
        assert torch.get_num_threads() == 1
        runner._set_cpu_threads(prefill)
        assert torch.get_num_threads() == model_runner.CPU_THREADS
        runner._set_cpu_threads(big_decode)  # a decode step of any batch size: one token per sequence
        assert torch.get_num_threads() == 1
        runner._set_cpu_threads(mixed)  # a prefill chunk in the step: every thread
        assert torch.get_num_threads() == model_runner.CPU_THREADS
        # A model above the size limit (the limit lowered, as if the weights were a real checkpoint's).
        monkeypatch.setattr(model_runner, "SMALL_CPU_MODEL_BYTES", 0)
        large = LLM(str(tiny_checkpoint), device="cpu").engine.runner
        assert not large.one_thread_small_steps
        large._set_cpu_threads(decode)
        assert torch.get_num_threads() == model_runner.CPU_THREADS
    finally:
        torch.set_num_threads(model_runner.CPU_THREADS)


def test_images_sent_as_pixels_are_patchified_by_the_runner(tiny_checkpoint: Path) -> None:
    """An engine on a GPU takes uint8 pixels and patchifies them on the device, resized on the host or (its
    default, image_resize="device") there too; each path on the CPU gives the same tokens as float32 patches
    made by the processor."""
    images = [random_image(70, 50, seed=7), random_image(40, 90, seed=8)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    tokens = {}
    for mode in ("patches", "pixels", "device resize"):
        llm = LLM(  # fresh caches: each run encodes its images
            str(tiny_checkpoint),
            max_model_len=1024,
            device="cpu",
            image_resize="device" if mode == "device resize" else "host",
        )
        if mode != "device resize":  # what an engine on a GPU that resizes on the host is configured with
            llm.inputs = InputProcessor(
                llm.processor, dataclasses.replace(llm.config, device="cuda" if mode == "pixels" else "cpu")
            )
        text, _ = _chat(llm, "What are these?", images)
        request = llm.make_request(text, images, params)
        data = request.images[0].data.values
        if mode == "patches":
            assert data.dtype == torch.float32 and data.dim() == 2
        else:
            assert data.dtype == torch.uint8 and data.dim() == 3 and data.shape[-1] == 3
            _, grid_h, grid_w = request.images[0].data.grid_thw
            resized = (grid_h * 14, grid_w * 14)
            assert resized != (50, 70)  # the tiny checkpoint's processor resizes this image
            assert tuple(data.shape[:2]) == ((50, 70) if mode == "device resize" else resized)
        tokens[mode] = llm.run([request])[0].outputs[0].token_ids
        if mode != "patches":  # the reference loop takes such images with the processor's encoder_input
            with pytest.raises(ValueError, match="encoder_input"):
                _oracle(llm, request, 1)
            oracle = greedy_generate(
                llm.engine.model,
                request.prompt_token_ids,
                request.images,
                request.mrope_positions,
                request.mrope_delta,
                12,
                encoder_input=llm.processor.encoder_input,
            )
            assert oracle == tokens[mode]
    assert tokens["pixels"] == tokens["patches"] == tokens["device resize"]
