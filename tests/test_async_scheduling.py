"""Asynchronous scheduling: step N+1 is queued before step N's tokens reach the host.

On a GPU this overlaps the host's work for one step with the device's work for the other. The loop's
logic is device-independent, so it is checked here on the CPU (where `async_scheduling=True` runs the same
code path, just without anything to overlap): same outputs as the synchronous loop, for every way a
request can end, and the order of launches and waits that makes the overlap possible.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from tests.conftest import random_image
from vlmserve.engine.sampling_params import SamplingParams, StructuredOutputsParams
from vlmserve.llm import LLM
from vlmserve.runner.model_runner import StepOutput


def _engines(ckpt: Path) -> tuple[LLM, LLM]:
    kw = dict(max_model_len=256, max_num_batched_tokens=64, max_num_seqs=8, num_kv_blocks=40, block_size=16)
    return LLM(str(ckpt), async_scheduling=False, **kw), LLM(str(ckpt), async_scheduling=True, **kw)


def _requests(llm: LLM) -> list:
    img = random_image(64, 48, seed=4)
    text = llm.processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    )
    plain = "Tell me about the sea."
    base = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    # The greedy text decides the stop string and stop token below: both end generation mid-way.
    greedy = llm.generate([plain], base)[0].outputs[0]
    stop_str = next(
        greedy.text[i : i + 2]
        for i in range(4, len(greedy.text) - 2)
        if greedy.text[i : i + 2].strip() and "\ufffd" not in greedy.text[i : i + 2]
    )
    cases = [
        ((text, [img]), base),
        (
            (plain, []),
            SamplingParams(temperature=0.9, top_p=0.8, top_k=50, seed=7, max_tokens=16, ignore_eos=True),
        ),
        ((text, [img]), SamplingParams(temperature=0, max_tokens=9, logprobs=2, ignore_eos=True)),
        ((plain, []), SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, stop=[stop_str])),
        (
            (plain, []),
            SamplingParams(
                temperature=0, max_tokens=20, ignore_eos=True, stop_token_ids=[greedy.token_ids[6]]
            ),
        ),
        # Sampling that needs every earlier token: the loop waits for the pending one first.
        ((plain, []), SamplingParams(temperature=0, max_tokens=12, repetition_penalty=1.5, ignore_eos=True)),
        (
            (plain, []),
            SamplingParams(temperature=1.0, max_tokens=10, min_tokens=6, seed=3, presence_penalty=0.5),
        ),
        ((text, [img]), SamplingParams(n=2, temperature=1.0, seed=11, max_tokens=7, ignore_eos=True)),
        # The model's own end-of-sequence token: random weights may or may not sample it, either way
        # the two loops must agree.
        ((plain, []), SamplingParams(temperature=1.0, seed=5, max_tokens=24)),
        # A grammar's mask depends on every earlier token: sampled only after the last one is applied.
        (
            (text, [img]),
            SamplingParams(
                temperature=1.0,
                seed=13,
                max_tokens=24,
                structured_outputs=StructuredOutputsParams(
                    json={"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
                ),
            ),
        ),
    ]
    return [
        llm.make_request(p[0], p[1], params, request_id=f"case-{i}") for i, (p, params) in enumerate(cases)
    ]


def _summary(outputs: list) -> list:
    return [
        [
            (
                c.token_ids,
                c.text,
                c.finish_reason,
                c.stop_reason,
                [(lp.token_id, lp.top) for lp in c.logprobs or []],
            )
            for c in out.outputs
        ]
        for out in outputs
    ]


def test_async_loop_gives_the_sync_loops_outputs(tiny_checkpoint: Path) -> None:
    sync, asyn = _engines(tiny_checkpoint)
    expected = _summary(sync.run(_requests(sync)))
    got = _summary(asyn.run(_requests(asyn)))
    assert len(got) == len(expected)
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        for gc, ec in zip(g, e, strict=True):
            assert gc[:4] == ec[:4], f"case {i}"
            for (gt, gtop), (et, etop) in zip(gc[4], ec[4], strict=True):
                assert gt == et
                assert [t for t, _ in gtop] == [t for t, _ in etop]
                assert [v for _, v in gtop] == pytest.approx([v for _, v in etop], abs=1e-5)
    # The stop cases really stopped early, so the async loop had rows to drop.
    finish = [e[0][2] for e in expected]
    assert finish[3] == finish[4] == "stop"
    for llm in (sync, asyn):
        assert llm.engine.scheduler.kv.num_used_blocks == 0  # the dropped rows' blocks came back too


def test_min_tokens_counts_pending_tokens_and_does_not_stall_the_loop(tiny_checkpoint: Path) -> None:
    # min_tokens needs the number of earlier tokens, not their values: the async loop queues the next step
    # before the last token is read, and must count that pending token. A token the greedy run first samples
    # at index k, made a stop id with min_tokens=k, is masked exactly until then: both loops stop at k + 1
    # tokens; a loop that missed the pending token would mask it one step too long.
    sync, asyn = _engines(tiny_checkpoint)
    plain = "Tell me about the sea."
    greedy = sync.generate([plain], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))[0]
    ids = greedy.outputs[0].token_ids
    k = next(k for k in range(4, 20) if ids[k] not in ids[:k])
    cases = [
        SamplingParams(temperature=0, max_tokens=20, min_tokens=k, ignore_eos=True, stop_token_ids=[ids[k]]),
        SamplingParams(temperature=1.0, seed=9, max_tokens=24, min_tokens=12),
    ]
    assert not any(p.reads_output_tokens for p in cases)
    runs = [
        _summary(llm.run([llm.make_request(plain, [], p, request_id=f"m{i}") for i, p in enumerate(cases)]))
        for llm in (sync, asyn)
    ]
    assert runs[0] == runs[1]
    token_ids, _, finish, stop_reason, _ = runs[0][0][0]
    assert (len(token_ids), finish, stop_reason) == (k + 1, "stop", ids[k])


def test_next_step_is_queued_before_the_previous_tokens_are_read(
    tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, llm = _engines(tiny_checkpoint)
    events: list[tuple[str, int]] = []
    counter = itertools.count()
    runner = llm.engine.runner
    prepare = runner.prepare

    def traced_prepare(sched, prev=None, defer_sampling=False):
        step = prepare(sched, prev, defer_sampling)
        run = step.run

        def traced_run():
            out = run()
            if sched.scheduled:  # (the last call only hands the runner what finished)
                out.trace_step = next(counter)  # on the object: ids of freed outputs get reused
                prefill = any(s.num_tokens > 1 for s in sched.scheduled)
                events.append(("launch prefill" if prefill else "launch", out.trace_step))
            return out

        step.run = traced_run
        return step

    result = StepOutput.result

    def traced_result(self):
        events.append(("wait", getattr(self, "trace_step", -1)))
        return result(self)

    monkeypatch.setattr(runner, "prepare", traced_prepare)
    monkeypatch.setattr(StepOutput, "result", traced_result)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    out = llm.run([llm.make_request("Count with me", [], params)])
    assert len(out[0].outputs[0].token_ids) == 6
    # Step n's tokens are waited for only after decode step n + 1 is queued; the one request ran 6 steps
    # (1 prefill + 5 decodes whose input is the previous step's token, still on the device).
    waits = [(i, n) for i, (kind, n) in enumerate(events) if kind == "wait"]
    assert len(waits) >= 5
    for i, n in waits[:5]:
        assert ("launch", n + 1) in events[:i], events
    # A length stop is known at scheduling time: no step is queued for a request whose last token is
    # pending, so the 6 tokens took exactly 6 launched steps.
    assert sum(1 for kind, _ in events if kind.startswith("launch")) == 6

    # A prefill step (thousands of kernel launches on a GPU) is queued only after the running step's
    # tokens are handed out: the running request's next delta does not wait for the newcomer's prefill.
    events.clear()
    engine = llm.engine
    engine.add_request(
        llm.make_request("First one", [], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    )
    for _ in range(3):
        engine.step()
    engine.add_request(llm.make_request("A second, longer prompt " * 3, [], params))
    events.clear()
    handed_out = engine.step()  # schedules and prepares the mixed step, applies the running one
    assert [d.request_id for d in handed_out]
    assert [kind for kind, _ in events] == ["wait"]
    engine.step()  # queues it first thing
    assert events[1][0] == "launch prefill", events
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.scheduler.kv.num_used_blocks == 0


def test_sampling_that_reads_earlier_tokens_waits_only_in_its_sampling(
    tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request whose sampling reads its earlier tokens' values (penalties, a grammar): decode step n + 1's
    forward is still queued before step n's tokens are read (it takes them on the device); only its sampling
    is queued after they are applied on the host."""
    _, llm = _engines(tiny_checkpoint)
    events: list[str] = []
    runner = llm.engine.runner
    prepare = runner.prepare

    def traced_prepare(sched, prev=None, defer_sampling=False):
        step = prepare(sched, prev, defer_sampling)
        run = step.run

        def traced_run():
            out = run()
            if sched.scheduled:
                events.append("sample" if out.deferred is None else "forward")
            return out

        step.run = traced_run
        return step

    result, sample_now = StepOutput.result, StepOutput.sample_now

    def traced_result(self):
        events.append("wait")
        return result(self)

    def traced_sample_now(self):
        if self.deferred is not None:
            events.append("sample")
        sample_now(self)

    monkeypatch.setattr(runner, "prepare", traced_prepare)
    monkeypatch.setattr(StepOutput, "result", traced_result)
    monkeypatch.setattr(StepOutput, "sample_now", traced_sample_now)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, repetition_penalty=1.3)
    out = llm.run([llm.make_request("Count with me", [], params)])
    assert len(out[0].outputs[0].token_ids) == 6
    # The prefill samples at once; each decode: forward, then the previous step's wait, then its sampling.
    assert events[:2] == ["sample", "forward"]
    assert events[2:14] == ["wait", "sample", "forward"] * 4
    sync, _ = _engines(tiny_checkpoint)
    expected = sync.run([sync.make_request("Count with me", [], params)])
    assert out[0].outputs[0].token_ids == expected[0].outputs[0].token_ids


def _tight(ckpt: Path, asyn: bool) -> LLM:
    kw = dict(max_model_len=256, max_num_batched_tokens=64, max_num_seqs=8, num_kv_blocks=40, block_size=16)
    return LLM(str(ckpt), async_scheduling=asyn, **kw)


def _fail_next(monkeypatch: pytest.MonkeyPatch, obj: object, name: str) -> None:
    def boom(*args, **kwargs):
        raise RuntimeError("injected fault")

    monkeypatch.setattr(obj, name, boom)


def test_a_failure_after_an_early_apply_still_hands_out_the_applied_deltas(
    tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # X samples with a penalty: its decode step's forward is queued, the step in flight is applied (X's first
    # token), then the decode's sampling is queued, and fails. X's applied delta must still reach the caller
    # before its error (or its stream loses a token it was already told about).
    llm = _tight(tiny_checkpoint, True)
    engine = llm.engine
    penalized = SamplingParams(temperature=0, max_tokens=4, repetition_penalty=1.5, ignore_eos=True)
    engine.add_request(llm.make_request("hello there", [], penalized, request_id="X"))
    got = engine.step()  # queues X's prefill
    sample_now = StepOutput.sample_now

    def failing_sample_now(self: StepOutput) -> None:
        if self.deferred is not None:
            raise RuntimeError("injected fault")
        sample_now(self)

    monkeypatch.setattr(StepOutput, "sample_now", failing_sample_now)
    with pytest.raises(RuntimeError, match="injected"):
        engine.step()
    got += engine.fail_scheduled("step failed")
    x = [d for d in got if d.request_id == "X"]
    assert [len(d.token_ids) for d in x] == [1, 0] and x[-1].finish_reason == "error"


def test_a_failed_queued_step_leaves_no_uncomputed_blocks_in_the_prefix_cache(
    tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A 140-token prompt in 64-token chunks: the second chunk is queued (an eager step) when the first is
    # applied, then fails. Only the first chunk's blocks may be cached; a hit on the second's would serve
    # KV that was never written.
    prompt = " ".join(f"word{i}" for i in range(30))
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    expected = _tight(tiny_checkpoint, False).generate([prompt], params)[0].outputs[0].token_ids
    llm = _tight(tiny_checkpoint, True)
    engine = llm.engine
    engine.add_request(llm.make_request(prompt, [], params, request_id="A"))
    engine.step()
    engine.step()
    assert engine._to_launch is not None  # the second chunk, prepared and not queued yet
    with monkeypatch.context() as m:
        _fail_next(m, engine.runner, "_run_eager")
        with pytest.raises(RuntimeError, match="injected"):
            engine.step()
    assert [d.finish_reason for d in engine.fail_scheduled("step failed")] == ["error"]
    assert engine.scheduler.kv.num_cached_blocks == 64 // 16
    again = llm.generate([prompt], params)[0]
    assert again.num_cached_tokens == 64
    assert again.outputs[0].token_ids == expected


@pytest.mark.parametrize("asyn", [False, True], ids=["sync", "async"])
def test_an_image_whose_encoding_step_failed_is_encoded_when_next_needed(
    tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch, asyn: bool
) -> None:
    # The scheduler counted the image as encoded when it planned the failed step; the runner never had it.
    img = random_image(84, 56, seed=1)
    llm = _tight(tiny_checkpoint, asyn)
    text = llm.processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}]
    )
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    llm.engine.add_request(llm.make_request(text, [img], params, request_id="A"))
    with monkeypatch.context() as m:
        _fail_next(m, llm.engine.runner, "prepare")
        with pytest.raises(RuntimeError, match="injected"):
            llm.engine.step()
    llm.engine.fail_scheduled("step failed")
    out = llm.generate([(text, [img])], params)[0].outputs[0]
    assert out.finish_reason == "length"
    assert (
        out.token_ids
        == _tight(tiny_checkpoint, asyn).generate([(text, [img])], params)[0].outputs[0].token_ids
    )


def test_a_queued_step_that_fails_fails_only_its_own_requests(
    tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # B decodes while A's long prompt is chunked; A's next chunk (an eager step, queued at the start of the
    # next call) fails when queued. B was in that step too (its decode shares it) and fails with it; C, held
    # back by max_num_seqs, keeps running. (The step applied before it is done: its requests that are not in
    # the failed one, e.g. one preempted meanwhile, are not failed either.)
    llm = LLM(
        str(tiny_checkpoint),
        async_scheduling=True,
        max_model_len=256,
        max_num_batched_tokens=64,
        max_num_seqs=2,
        num_kv_blocks=40,
        block_size=16,
    )
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    engine.add_request(llm.make_request("short one", [], params, request_id="B"))
    engine.step()
    engine.step()
    engine.add_request(llm.make_request(" ".join(f"w{i}" for i in range(60)), [], params, request_id="A"))
    engine.add_request(llm.make_request("waiting", [], params, request_id="C"))
    while engine._to_launch is None:
        engine.step()
    in_queued = {s.request.request_id for s in engine._to_launch[0].scheduled}
    assert "C" not in in_queued
    with monkeypatch.context() as m:
        _fail_next(m, engine.runner, "_run_eager")
        with pytest.raises(RuntimeError, match="injected"):
            engine.step()
    failed = {d.request_id for d in engine.fail_scheduled("step failed") if d.finish_reason == "error"}
    assert failed == in_queued
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    assert any(d.request_id == "C" and d.finish_reason == "length" for d in outputs)
