"""Structured outputs through the engine, with random weights: the grammar does the work, so every output
must satisfy its constraint whatever the model would have said.

JSON schemas (nested objects, arrays, enums, bounded numbers, required fields) validated with the `jsonschema`
package over several seeds and temperatures, with n > 1, logprobs, the asynchronous loop and prefix caching;
regex and choice outputs matched exactly; a Lark grammar's output parsed by the grammar; stop strings;
max_tokens that cuts a structure finishes with "length"; a grammar still compiling does not hold up other
requests; matcher errors, compile failures and aborts; the batched mask application against a
one-row-at-a-time reference, and on CUDA against the CPU.
"""

from __future__ import annotations

import ctypes
import json
import re
import time
from pathlib import Path

import jsonschema
import llguidance
import numpy as np
import pytest
import torch

from vlmserve.engine.sampling_params import SamplingParams, StructuredOutputsParams
from vlmserve.engine.structured import StructuredOutputError, check_structured_outputs
from vlmserve.llm import LLM
from vlmserve.runner.sampler import apply_token_bitmask

SCHEMA = {
    "type": "object",
    "properties": {
        "shape": {"enum": ["circle", "square", "triangle"]},
        "count": {"type": "integer", "minimum": 1, "maximum": 12},
        "score": {"type": "number", "minimum": -1.5, "maximum": 2.5},
        "visible": {"type": "boolean"},
        "box": {
            "type": "object",
            "properties": {
                "x": {"type": "integer", "minimum": 0, "maximum": 640},
                "y": {"type": "integer", "minimum": 0, "maximum": 480},
            },
            "required": ["x", "y"],
            "additionalProperties": False,
        },
        "tags": {
            "type": "array",
            "items": {"type": "string", "maxLength": 6},
            "minItems": 1,
            "maxItems": 3,
        },
    },
    "required": ["shape", "count", "score", "visible", "box", "tags"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module", params=[False, True], ids=["sync", "async"])
def llm(tiny_checkpoint: Path, request: pytest.FixtureRequest) -> LLM:
    return LLM(
        str(tiny_checkpoint),
        max_model_len=512,
        max_num_seqs=8,
        async_scheduling=request.param,
        device="cpu",
        dtype="float32",
    )


def _texts(outputs: list) -> list[tuple[str, str | None]]:
    return [(c.text, c.finish_reason) for o in outputs for c in o.outputs]


@pytest.mark.parametrize("temperature", [0.0, 0.7, 1.5])
def test_json_schema_outputs_validate(llm: LLM, temperature: float) -> None:
    params = SamplingParams(
        n=2,
        temperature=temperature,
        seed=int(temperature * 10),
        max_tokens=160,
        logprobs=2,
        structured_outputs=StructuredOutputsParams(json=SCHEMA),
    )
    prompts = ["Describe the picture.", "What shape is it?", "Count the objects.", "Hello"]
    outputs = llm.generate(prompts, params)
    for o in outputs:
        for c in o.outputs:
            assert c.finish_reason == "stop", c.text
            jsonschema.validate(json.loads(c.text), SCHEMA)
            # logprobs are reported for every token, and the sampled token was allowed (finite)
            assert c.logprobs is not None and len(c.logprobs) == len(c.token_ids)
            assert all(np.isfinite(lp.logprob) for lp in c.logprobs)
    assert llm.engine.structured.num_tracked == 0  # every matcher released with its request


def test_constraint_wins_over_min_tokens_and_ignore_eos(llm: LLM) -> None:
    # The structure decides the end: min_tokens must not mask the EOS the grammar requires (a choice that
    # may be empty allows only EOS at once), and under ignore_eos a complete structure ends the request
    # instead of sampling from a mask that allows nothing. (Found by the fuzz test: both were a 500.)
    cases = [
        SamplingParams(
            temperature=0,
            max_tokens=8,
            min_tokens=4,
            structured_outputs=StructuredOutputsParams(choice=["", "no"]),
        ),
        SamplingParams(
            temperature=1.0,
            seed=1,
            max_tokens=40,
            ignore_eos=True,
            structured_outputs=StructuredOutputsParams(choice=["yes", "no"]),
        ),
        SamplingParams(
            temperature=1.0,
            seed=2,
            max_tokens=40,
            ignore_eos=True,
            min_tokens=30,
            structured_outputs=StructuredOutputsParams(regex=r"[0-9]{3}"),
        ),
    ]
    outputs = [_texts(llm.generate(["Say something."], p))[0] for p in cases]
    assert outputs[0][0] in ("", "no") and outputs[0][1] == "stop"
    assert outputs[1][0] in ("yes", "no") and outputs[1][1] == "stop"
    assert re.fullmatch(r"[0-9]{3}", outputs[2][0]) and outputs[2][1] == "stop"


def test_json_object_regex_choice_and_grammar(llm: LLM) -> None:
    cases = [
        (StructuredOutputsParams(json_object=True), lambda t: isinstance(json.loads(t), dict)),
        (
            StructuredOutputsParams(regex=r"(red|blue) [0-9]{2}-[a-z]{3}"),
            lambda t: re.fullmatch(r"(red|blue) [0-9]{2}-[a-z]{3}", t) is not None,
        ),
        (
            StructuredOutputsParams(choice=["yes", "no", "it depends"]),
            lambda t: t in ("yes", "no", "it depends"),
        ),
    ]
    for constraint, ok in cases:
        for seed in range(3):
            params = SamplingParams(temperature=1.0, seed=seed, max_tokens=120, structured_outputs=constraint)
            ((text, reason),) = _texts(llm.generate(["Say something."], params))
            if constraint.json_object and reason == "length":
                continue  # free-form JSON may legitimately run to max_tokens with random weights
            assert reason == "stop" and ok(text), (constraint, text)

    # A Lark grammar: sums of small numbers; the output must parse with the same grammar.
    grammar = 'start: expr\nexpr: NUM (("+" | "-") NUM){0,3}\nNUM: /[1-9][0-9]?/'
    for seed in range(3):
        params = SamplingParams(
            temperature=1.0,
            seed=seed,
            max_tokens=60,
            structured_outputs=StructuredOutputsParams(grammar=grammar),
        )
        ((text, reason),) = _texts(llm.generate(["Compute."], params))
        assert reason == "stop"
        matcher = llguidance.LLMatcher(
            llguidance.LLTokenizer(llm.processor.tokenizer.to_str()),
            llguidance.LLMatcher.grammar_from_lark(grammar),
        )
        assert re.fullmatch(r"[1-9][0-9]?([+-][1-9][0-9]?){0,3}", text), text
        tokens = llm.processor.tokenizer.encode(text, add_special_tokens=False).ids
        assert matcher.consume_tokens(tokens) and matcher.is_accepting(), text


def test_max_tokens_cuts_a_structure_with_length(llm: LLM) -> None:
    params = SamplingParams(
        temperature=0.0, max_tokens=5, structured_outputs=StructuredOutputsParams(json=SCHEMA)
    )
    ((text, reason),) = _texts(llm.generate(["Describe."], params))
    assert reason == "length"
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)


def test_constrained_and_free_requests_share_batches(llm: LLM) -> None:
    """Free requests run alongside constrained ones (prefix cache shared), and are not constrained."""
    free = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    prompt = "Describe the picture in detail please."
    alone = llm.generate([prompt], free)[0].outputs[0].token_ids
    engine = llm.engine
    reqs = [
        llm.make_request(prompt, [], free, request_id="free"),
        llm.make_request(
            prompt,
            [],
            SamplingParams(
                temperature=0.0, max_tokens=40, structured_outputs=StructuredOutputsParams(json=SCHEMA)
            ),
            request_id="constrained",
        ),
    ]
    outs = llm.run(reqs)
    assert outs[0].outputs[0].token_ids == alone
    text = outs[1].outputs[0].text
    assert text.startswith("{") and engine.scheduler.kv.prefix_cache_hits > 0


def _compile_slowly(llm: LLM, monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    """Every grammar of `llm` takes `seconds` longer to compile."""
    compiler = llm.engine.structured.compiler
    real = compiler.compile

    def slow(params: StructuredOutputsParams) -> object:
        time.sleep(seconds)
        return real(params)

    monkeypatch.setattr(compiler, "compile", slow)


def test_compiling_grammar_does_not_stall_others(llm: LLM, monkeypatch: pytest.MonkeyPatch) -> None:
    """A request whose grammar takes a while to compile waits; a free request keeps producing tokens."""
    _compile_slowly(llm, monkeypatch, 1.0)
    engine = llm.engine
    slow_req = llm.make_request(
        "a",
        [],
        SamplingParams(
            temperature=0.0, max_tokens=4, structured_outputs=StructuredOutputsParams(regex="[a-z]{4}")
        ),
        request_id="slow",
    )
    free_req = llm.make_request(
        "b", [], SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True), "free2"
    )
    engine.add_request(slow_req)
    engine.add_request(free_req)
    order: list[str] = []
    while engine.has_unfinished_requests():
        for d in engine.step():
            if d.finished:
                order.append(d.request_id)
    assert order == ["free2", "slow"]


def test_a_compile_past_the_time_limit_fails_only_its_request(
    llm: LLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    """COMPILE_TIMEOUT_S bounds the wait: a grammar still compiling after it fails its request with an error
    naming the limit, a free request finishes as usual, and nothing stays tracked."""
    import vlmserve.engine.structured as structured

    monkeypatch.setattr(structured, "COMPILE_TIMEOUT_S", 0.2)
    _compile_slowly(llm, monkeypatch, 1.0)
    engine = llm.engine
    constraint = StructuredOutputsParams(regex="[a-z]{3}")
    late = llm.make_request(
        "a", [], SamplingParams(max_tokens=4, structured_outputs=constraint), request_id="late"
    )
    free = llm.make_request("b", [], SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True), "free3")
    engine.add_request(late)
    engine.add_request(free)
    finished = {}
    while engine.has_unfinished_requests():
        for d in engine.step():
            if d.finished:
                finished[d.request_id] = d
    assert finished["late"].finish_reason == "error"
    assert "to compile" in (finished["late"].error or "")
    assert finished["free3"].finish_reason == "length"
    assert engine.structured.num_tracked == 0
    time.sleep(1.0)  # the abandoned compile ends on its pool thread before the next test


def test_a_cached_grammar_is_not_rebuilt(tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The second use of a constraint is a cache hit: no grammar build or validation again, a fresh matcher
    of its own (at its start, whatever the first one consumed)."""
    import vlmserve.engine.structured as structured

    calls: list[StructuredOutputsParams] = []
    real = structured.check_structured_outputs

    def counted(params: StructuredOutputsParams) -> str:
        calls.append(params)
        return real(params)

    monkeypatch.setattr(structured, "check_structured_outputs", counted)
    from tokenizers import Tokenizer

    tokenizer_json = (tiny_checkpoint / "tokenizer.json").read_text()
    vocab = Tokenizer.from_str(tokenizer_json).get_vocab_size()
    compiler = structured.GrammarCompiler(tokenizer_json, vocab, [vocab - 1], threads=1)
    try:
        params = StructuredOutputsParams(
            json={"type": "object", "properties": {"cache_probe": {"type": "integer"}}}
        )
        first = compiler.compile(params)
        assert first.consume_tokens(compiler.tokenizer.tokenize_str('{"cache_probe":'))
        second = compiler.compile(StructuredOutputsParams(json=json.loads(params.json or "")))
        assert len(calls) == 1
        assert second is not first and second.consume_tokens(
            compiler.tokenizer.tokenize_str('{"cache_probe":')
        )
    finally:
        compiler.shutdown()


def test_constraints_beyond_the_size_limit_are_refused() -> None:
    """A schema, regex or grammar longer than MAX_SPEC_CHARS is refused before any compile, naming the limit."""
    from vlmserve.engine.structured import MAX_SPEC_CHARS

    n = MAX_SPEC_CHARS // 100 + 1
    bad = [
        (StructuredOutputsParams(json={"enum": ["x" * 100] * n}), "json"),
        (StructuredOutputsParams(regex="a" * (MAX_SPEC_CHARS + 1)), "regex"),
        (StructuredOutputsParams(grammar="start: " + " ".join(['"ab"'] * n * 25)), "grammar"),
    ]
    for params, field in bad:
        with pytest.raises(StructuredOutputError, match=str(MAX_SPEC_CHARS)) as e:
            check_structured_outputs(params)
        assert e.value.field == field


def test_bad_constraints_are_named() -> None:
    bad = [
        (StructuredOutputsParams(regex="[a-z"), "regex"),
        (StructuredOutputsParams(grammar="start: foo\nfoo: 'a' | "), "grammar"),
        (StructuredOutputsParams(json={"type": "wat"}), "json"),
        (StructuredOutputsParams(json={"type": "integer", "minimum": 5, "maximum": 1}), "json"),
        (StructuredOutputsParams(json={"type": "string", "format": "uri-reference"}), "json"),
        (StructuredOutputsParams(json={"$ref": "http://example.com/schema.json"}), "json"),
    ]
    for params, field in bad:
        with pytest.raises(StructuredOutputError) as e:
            check_structured_outputs(params)
        assert e.value.field == field
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams(regex="a", choice=["a"])
    with pytest.raises(ValueError, match="not valid JSON"):
        StructuredOutputsParams(json="{nope")


def test_engine_survives_a_constraint_that_fails_to_compile(llm: LLM) -> None:
    """The engine-side backstop (the API refuses these first): the request fails alone, with its message."""
    engine = llm.engine
    bad = llm.make_request(
        "a", [], SamplingParams(max_tokens=4, structured_outputs=StructuredOutputsParams(regex="[a-z")), "bad"
    )
    good = llm.make_request("b", [], SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True), "good")
    engine.add_request(bad)
    engine.add_request(good)
    finished = {}
    while engine.has_unfinished_requests():
        for d in engine.step():
            if d.finished:
                finished[d.request_id] = d
    assert engine.structured.num_tracked == 0
    assert finished["bad"].finish_reason == "error" and "regex" in (finished["bad"].error or "")
    assert finished["good"].finish_reason == "length"


def _run_with_fill_thread(
    llm: LLM, monkeypatch: pytest.MonkeyPatch, requests: list, thread: bool
) -> tuple[list[tuple], list[str]]:
    """Run `requests` with every mask filled on the calling thread, or (`thread`) on the fill thread;
    (each choice's token ids, text and finish reason; the names of the threads that filled masks). Checks
    that no fill starts with a row of a request that has finished."""
    import threading

    import vlmserve.engine.structured as structured

    monkeypatch.setattr(structured, "PARALLEL_FILL_MIN_ROWS", 1 if thread else 10_000)
    engine = llm.engine
    fillers: list[str] = []
    compute, start = structured._compute_masks, structured.StructuredOutputs.start_fill

    def spy_compute(*args: object) -> None:
        fillers.append(threading.current_thread().name)
        compute(*args)  # type: ignore[arg-type]

    def spy_start(self: structured.StructuredOutputs, request_ids: list[str], background: bool) -> object:
        for rid in request_ids:
            req = engine.scheduler.requests.get(rid)
            if self.has_matcher(rid):
                assert req is not None and not req.is_finished, f"{rid} finished but its mask is filled"
        return start(self, request_ids, background)

    monkeypatch.setattr(structured, "_compute_masks", spy_compute)
    monkeypatch.setattr(structured.StructuredOutputs, "start_fill", spy_start)
    outs = llm.run(requests)
    monkeypatch.undo()  # the next run's spies wrap the originals, not these
    assert engine.structured.num_tracked == 0
    return [(c.token_ids, c.text, c.finish_reason) for o in outs for c in o.outputs], fillers


def test_masks_filled_on_the_fill_thread_give_the_same_outputs(
    llm: LLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the asynchronous loop a step's masks start filling on the fill thread as soon as the previous
    step's tokens advanced the matchers, while that step is detokenized: the outputs are the ones of masks
    filled when the sampler asks for them, while requests finish at every point of a step: by
    max_tokens and by a complete structure (before the next mask starts), by a stop string (after it
    started), with n > 1 and a free request beside them."""
    cases = [
        SamplingParams(
            n=2,
            temperature=1.0,
            seed=3,
            max_tokens=40,
            structured_outputs=StructuredOutputsParams(json=SCHEMA),
        ),
        SamplingParams(
            temperature=1.0, seed=4, max_tokens=7, structured_outputs=StructuredOutputsParams(json=SCHEMA)
        ),
        SamplingParams(
            temperature=1.0,
            seed=5,
            max_tokens=40,
            ignore_eos=True,
            structured_outputs=StructuredOutputsParams(choice=["yes", "no way"]),
        ),
        SamplingParams(
            temperature=1.0,
            seed=6,
            max_tokens=40,
            stop=[";"],
            structured_outputs=StructuredOutputsParams(regex=r"[a-z]{2};[a-z]{9}"),
        ),
        SamplingParams(temperature=1.0, seed=7, max_tokens=12, ignore_eos=True),
    ]
    runs = []
    for thread in (False, True):
        requests = [llm.make_request(f"Item {i}.", [], p, f"fill-{thread}-{i}") for i, p in enumerate(cases)]
        runs.append(_run_with_fill_thread(llm, monkeypatch, requests, thread))
    (inline, inline_fillers), (threaded, threaded_fillers) = runs
    assert threaded == inline
    assert set(inline_fillers) == {"MainThread"}
    on_thread = [name.startswith("vlmserve-masks") for name in threaded_fillers]
    if llm.engine.async_scheduling:
        # Decode steps' masks; a step queued in a later call (a prefill) is filled when it samples.
        assert sum(on_thread) > len(on_thread) / 2
    else:  # nothing to overlap: the synchronous loop fills when the sampler asks
        assert not any(on_thread)
    # Every way to end happened (output rows: case 0's two choices, then one per case).
    assert inline[2][2] == "length"
    assert inline[3][1] in ("yes", "no way") and inline[3][2] == "stop"
    assert re.fullmatch(r"[a-z]{2}", inline[4][1]) and inline[4][2] == "stop"
    assert inline[5][2] == "length"


def test_aborts_between_steps_with_masks_on_the_fill_thread(
    llm: LLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No fill outlives the step() call that started it, so a request aborted between steps (its matcher
    dropped) is in no fill still running; the other requests go on to their end."""
    import vlmserve.engine.structured as structured

    monkeypatch.setattr(structured, "PARALLEL_FILL_MIN_ROWS", 1)
    running: list[int] = []  # one entry per fill in progress
    fills: list[int] = []
    compute = structured._compute_masks

    def counted(*args: object) -> None:
        running.append(1)
        fills.append(1)
        try:
            compute(*args)  # type: ignore[arg-type]
        finally:
            running.pop()

    monkeypatch.setattr(structured, "_compute_masks", counted)
    engine = llm.engine
    constraint = StructuredOutputsParams(json=SCHEMA)
    engine.add_request(
        llm.make_request(
            "a", [], SamplingParams(n=2, max_tokens=50, structured_outputs=constraint), "aborted"
        )
    )
    engine.add_request(
        llm.make_request("b", [], SamplingParams(n=2, max_tokens=12, structured_outputs=constraint), "kept")
    )
    finished = {}
    for i in range(40):
        assert not running  # between steps
        if i == 4:
            assert engine.structured.num_tracked == 4
            engine.abort("aborted")
            assert engine.structured.num_tracked == 2
        for d in engine.step():
            assert d.request_id != "aborted" or i < 4
            if d.finished:
                finished[(d.request_id, d.index)] = d.finish_reason
        if not engine.has_unfinished_requests():
            break
    assert fills and not running
    assert finished == {("kept", 0): "length", ("kept", 1): "length"}
    assert engine.structured.num_tracked == 0


# The asynchronous engine only: the synchronous loop starts no fill before its sampling, so no fill can
# outlive a failed step there.
@pytest.mark.parametrize("llm", [True], ids=["async"], indirect=True)
def test_a_step_that_fails_after_its_masks_started_waits_for_their_fill(
    llm: LLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A step can fail between the start of the next step's fill and that step's sampling (here: while
    detokenizing). The engine waits for the orphaned fill before it goes on: no fill is still reading
    matchers that later steps advance, or writing a buffer lent again. The step's requests fail; a request
    that arrives after it ends as its constraint says."""
    import vlmserve.engine.structured as structured
    from vlmserve.engine.async_engine import step_or_fail
    from vlmserve.engine.core import EngineCore

    assert llm.engine.async_scheduling
    monkeypatch.setattr(structured, "PARALLEL_FILL_MIN_ROWS", 1)
    running: list[int] = []
    compute = structured._compute_masks

    def slow(*args: object) -> None:
        running.append(1)
        try:
            time.sleep(0.2)  # far longer than the rest of the failing step
            compute(*args)  # type: ignore[arg-type]
        finally:
            running.pop()

    monkeypatch.setattr(structured, "_compute_masks", slow)
    deltas = EngineCore._deltas
    calls = {"n": 0}

    def failing_once(self: EngineCore, *args: object) -> object:
        calls["n"] += 1
        if calls["n"] == 3:  # a decode step's, after the next step's fill started
            raise RuntimeError("detokenizer broke")
        return deltas(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(EngineCore, "_deltas", failing_once)
    engine = llm.engine
    constraint = StructuredOutputsParams(json=SCHEMA)
    engine.add_request(
        llm.make_request("a", [], SamplingParams(max_tokens=30, structured_outputs=constraint), "failed")
    )
    finished: dict[str, str | None] = {}
    for _ in range(10):
        out, _, dead = step_or_fail(engine, 0)
        assert dead is None and not running  # the orphaned fill ended before step_or_fail returned
        finished.update({d.request_id: d.finish_reason for d in out if d.finished})
        if "failed" in finished:
            break
    assert finished == {"failed": "error"} and calls["n"] >= 3
    choice = StructuredOutputsParams(choice=["yes", "no way"])
    params = SamplingParams(max_tokens=20, temperature=1.0, seed=1, structured_outputs=choice)
    engine.add_request(llm.make_request("b", [], params, "after"))
    text = ""
    while engine.has_unfinished_requests():
        out, _, dead = step_or_fail(engine, 0)
        assert dead is None
        text += "".join(d.text for d in out)
        finished.update({d.request_id: d.finish_reason for d in out if d.finished})
    assert finished["after"] == "stop" and text in ("yes", "no way")


@pytest.mark.parametrize("vocab", [100, 128, 131])
def test_apply_token_bitmask_matches_row_by_row(vocab: int) -> None:
    rng = np.random.default_rng(vocab)
    logits = torch.from_numpy(rng.standard_normal((5, vocab)).astype(np.float32))
    words = (vocab + 31) // 32
    bits = rng.integers(-(2**31), 2**31, size=(3, words), dtype=np.int64).astype(np.int32)
    rows = torch.tensor([4, 0, 2])
    out = apply_token_bitmask(logits, rows, torch.from_numpy(bits))
    expected = logits.clone()
    for i, row in enumerate(rows.tolist()):
        for token in range(vocab):
            if not (int(bits[i, token // 32]) >> (token % 32)) & 1:
                expected[row, token] = float("-inf")
    assert torch.equal(out, expected)


def test_mask_fill_threads_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    """VLMSERVE_MASK_FILL_THREADS sets the mask pool's size; a value that is not a count says so by name."""
    from vlmserve import envs
    from vlmserve.engine import structured

    monkeypatch.setenv("VLMSERVE_MASK_FILL_THREADS", "3")
    assert structured._mask_fill_threads(envs._count("VLMSERVE_MASK_FILL_THREADS")) == 3
    monkeypatch.delenv("VLMSERVE_MASK_FILL_THREADS")
    assert 1 <= structured._mask_fill_threads(envs._count("VLMSERVE_MASK_FILL_THREADS")) <= 4
    for bad in ("four", "0", "-2"):
        monkeypatch.setenv("VLMSERVE_MASK_FILL_THREADS", bad)
        with pytest.raises(ValueError, match="VLMSERVE_MASK_FILL_THREADS must be a whole number"):
            envs._count("VLMSERVE_MASK_FILL_THREADS")


def test_apply_token_bitmask_every_row_without_row_index() -> None:
    """rows None (every row constrained, in order) masks as the explicit rows 0..B-1 do."""
    rng = np.random.default_rng(7)
    logits = torch.from_numpy(rng.standard_normal((4, 70)).astype(np.float32))
    bits = torch.from_numpy(rng.integers(-(2**31), 2**31, size=(4, 3), dtype=np.int64).astype(np.int32))
    out = apply_token_bitmask(logits, None, bits)
    assert torch.equal(out, apply_token_bitmask(logits, torch.arange(4), bits))
    assert torch.isinf(out).any() and not torch.isinf(logits).any()  # a new tensor, the input untouched


def test_masks_attached_after_the_tensors_sample_as_masks_given_up_front() -> None:
    """The runner builds a step's sampling tensors while the masks fill, naming the constrained rows, and
    attaches the masks after: same tensors, same tokens, and a constrained row short of min_tokens keeps
    EOS allowed (its grammar decides when it may end) either way."""
    from vlmserve.runner.sampler import Sampler, build_sampling_tensors, with_token_bitmask

    vocab, batch = 200, 5
    logits = torch.randn(batch, vocab)
    params = [SamplingParams(temperature=0.0, min_tokens=4) for _ in range(batch)]
    args = (params, [[]] * batch, [[1]] * batch, [None] * batch, [0], "cpu")
    for rows in ([0, 1, 2, 3, 4], [1, 3]):
        bits = _random_bitmask(len(rows), vocab, len(rows))
        bits[:, 0] |= 1  # EOS (token 0) allowed by every grammar
        up_front = build_sampling_tensors(*args, (rows, bits))
        later = with_token_bitmask(build_sampling_tensors(*args, constrained_rows=rows), rows, bits)
        assert later.min_tokens_rows == up_front.min_tokens_rows
        assert all(r not in rows for r in later.min_tokens_rows)  # EOS masked only on free rows
        assert (later.bitmask_rows is None) == (len(rows) == batch)
        assert Sampler()(logits, later).token_ids == Sampler()(logits, up_front).token_ids


def _random_bitmask(rows: int, vocab: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # Sparse masks, as grammars give: about 1 token in 64 allowed, and at least one per row.
    allowed = rng.random((rows, vocab)) < 1 / 64
    allowed[np.arange(rows), rng.integers(0, vocab, rows)] = True
    words = (vocab + 31) // 32
    padded = np.zeros((rows, words * 32), dtype=bool)
    padded[:, :vocab] = allowed
    return np.packbits(padded, axis=1, bitorder="little").view(np.int32).reshape(rows, words)


def test_sampler_with_grammar_mask_greedy_random_and_logprobs() -> None:
    from vlmserve.runner.sampler import Sampler, build_sampling_tensors, make_generator

    vocab, batch = 300, 6
    logits = torch.randn(batch, vocab)
    rows = [1, 3, 4]
    bits = _random_bitmask(len(rows), vocab, 1)
    allowed = np.unpackbits(bits.view(np.uint8), axis=1, bitorder="little")[:, :vocab].astype(bool)
    params = [SamplingParams(temperature=0.0 if i % 2 else 1.0, seed=i, logprobs=1) for i in range(batch)]
    gens = [make_generator(p.seed, "cpu") for p in params]
    sampling = build_sampling_tensors(params, [[]] * batch, [[1]] * batch, gens, [0], "cpu", (rows, bits))
    out = Sampler()(logits, sampling)
    for j, row in enumerate(rows):
        assert allowed[j, out.token_ids[row]]
        if params[row].greedy:
            masked = np.where(allowed[j], logits[row].numpy(), -np.inf)
            assert out.token_ids[row] == int(masked.argmax())
        # logprobs of the distribution the row samples from (the mask applied first, as vLLM reports)
        assert out.top_logprobs is not None and allowed[j, out.top_logprobs[row][0][0]]
    assert out.logprobs is not None and all(np.isfinite(lp) for lp in out.logprobs if lp is not None)
    free = [r for r in range(batch) if r not in rows and params[r].greedy]
    assert all(out.token_ids[r] == int(logits[r].argmax()) for r in free)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_grammar_mask_on_cuda_matches_cpu() -> None:
    """Batch 128 at Qwen2.5-VL's logits width: the mask goes to the device once and is applied there, with
    the same result as on the CPU; greedy constrained rows pick the same tokens."""
    from vlmserve.runner.sampler import Sampler, build_sampling_tensors

    batch, vocab = 128, 152064
    torch.manual_seed(0)
    logits = torch.randn(batch, vocab)
    rows = [*range(0, batch, 2), batch - 1]
    bits = _random_bitmask(len(rows), vocab, 2)
    cpu = apply_token_bitmask(logits, torch.tensor(rows), torch.from_numpy(bits))
    gpu = apply_token_bitmask(logits.cuda(), torch.tensor(rows).cuda(), torch.from_numpy(bits).cuda())
    assert torch.equal(gpu.cpu(), cpu)

    params = [SamplingParams(temperature=0.0, logprobs=2 if i % 3 == 0 else None) for i in range(batch)]
    args = (params, [[]] * batch, [[1]] * batch, [None] * batch, [0])
    cpu_batch = build_sampling_tensors(*args, "cpu", (rows, bits))
    gpu_batch = build_sampling_tensors(*args, "cuda", (rows, bits))
    assert gpu_batch.bitmask is not None and gpu_batch.bitmask.is_cuda
    cpu_out, gpu_out = Sampler()(logits, cpu_batch), Sampler()(logits.cuda(), gpu_batch)
    assert gpu_out.token_ids == cpu_out.token_ids
    assert gpu_out.logprobs is not None and cpu_out.logprobs is not None
    for a, b in zip(gpu_out.logprobs, cpu_out.logprobs, strict=True):
        assert (a is None) == (b is None) and (a is None or abs(a - b) < 1e-4)
    every = _random_bitmask(batch, vocab, 3)
    cpu = apply_token_bitmask(logits, None, torch.from_numpy(every))
    assert torch.equal(apply_token_bitmask(logits.cuda(), None, torch.from_numpy(every).cuda()).cpu(), cpu)


def test_a_matcher_in_error_fails_only_its_request(llm: LLM) -> None:
    """A matcher that errs while computing a mask (e.g. a parser limit hit) fails its request with the
    grammar engine's message; the step runs for the others."""
    engine = llm.engine
    constrained = llm.make_request(
        "a",
        [],
        SamplingParams(max_tokens=8, structured_outputs=StructuredOutputsParams(regex="[0-9]{6}")),
        "erring",
    )
    free = llm.make_request("b", [], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True), "fine")
    engine.add_request(constrained)
    engine.add_request(free)
    finished = {}
    while engine.has_unfinished_requests():
        matcher = engine.structured._matchers.get("erring")
        if matcher is not None and not matcher.is_error():
            assert not matcher.consume_token(llm.processor.tokenizer.token_to_id("a"))  # puts it in error
        for d in engine.step():
            if d.finished:
                finished[d.request_id] = d
    assert engine.structured.num_tracked == 0
    assert finished["erring"].finish_reason == "error" and "constraint failed" in (
        finished["erring"].error or ""
    )
    assert finished["fine"].finish_reason == "length"


def test_aborts_release_matchers_and_compiles(llm: LLM) -> None:
    engine = llm.engine
    params = SamplingParams(n=2, max_tokens=50, structured_outputs=StructuredOutputsParams(json=SCHEMA))
    engine.add_request(llm.make_request("a", [], params, "compiling"))
    engine.abort("compiling")  # before any step: its compile is dropped
    engine.add_request(llm.make_request("b", [], params, "running"))
    for _ in range(4):
        engine.step()
    assert engine.structured.num_tracked == 2  # the two choices of "running"
    engine.abort("running")
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.structured.num_tracked == 0


def test_stop_strings_end_a_constrained_output(llm: LLM) -> None:
    params = SamplingParams(
        temperature=1.0,
        seed=5,
        max_tokens=60,
        stop=[";"],
        structured_outputs=StructuredOutputsParams(regex=r"[a-z]{3};[a-z]{3};[a-z]{3}"),
    )
    out = llm.generate(["List."], params)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == ";"
    assert re.fullmatch(r"[a-z]{3}", out.text), out.text
    assert llm.engine.structured.num_tracked == 0


def test_masks_cover_a_logits_width_past_the_tokenizer(tiny_checkpoint: Path) -> None:
    """Released checkpoints pad the LM head past the tokenizer (Qwen2.5-VL: 152064 logits, 151665 tokens):
    the masks span every logit, and the padding ids are never allowed."""
    from vlmserve.engine.structured import GrammarCompiler, StructuredOutputs

    tokenizer_json = (tiny_checkpoint / "tokenizer.json").read_text()
    size = len(json.loads(tokenizer_json)["model"]["vocab"]) + 14  # + the special tokens
    outputs = StructuredOutputs(GrammarCompiler(tokenizer_json, size + 100, [size - 12]))
    outputs._matchers["r"] = outputs.compiler.compile(StructuredOutputsParams(regex="[a-z ]+"))
    bitmask = outputs.fill_bitmask(["r"])
    assert bitmask is not None and bitmask.bits.shape == (1, (size + 100 + 31) // 32)
    allowed = np.unpackbits(bitmask.bits.view(np.uint8), bitorder="little")
    assert allowed[:size].sum() > 0 and allowed[size:].sum() == 0


def test_a_mask_that_allows_no_token_fails_the_request_as_the_clients(tiny_checkpoint: Path) -> None:
    """A matcher can leave a step with no allowed token and no error (llguidance stops on a parser limit,
    ParserTooComplex, as the fuzz test found): the row must not be sampled as if constrained (any token would
    be refused); the request fails with a constraint error, which the API answers 400, not 500."""
    from vlmserve.api.errors import InvalidRequestError
    from vlmserve.api.streaming import Collected
    from vlmserve.engine.outputs import CompletionDelta
    from vlmserve.engine.structured import GrammarCompiler, StructuredOutputs

    class StoppedMatcher:  # what llguidance's matcher does after ParserTooComplex: an all-zero mask
        def unsafe_compute_mask_ptr(self, ptr: int, size: int) -> None:
            np.ctypeslib.as_array((ctypes.c_int32 * (size // 4)).from_address(ptr))[:] = 0

        def is_error(self) -> bool:
            return False

        def get_error(self) -> str:
            return ""

    tokenizer_json = (tiny_checkpoint / "tokenizer.json").read_text()
    size = len(json.loads(tokenizer_json)["model"]["vocab"]) + 14
    outputs = StructuredOutputs(GrammarCompiler(tokenizer_json, size, [size - 12]))
    outputs._matchers["r"] = StoppedMatcher()
    bitmask = outputs.fill_bitmask(["r"])
    assert bitmask is not None and (bitmask.bits == -1).all()  # unconstrained this step, failed next
    errors = outputs.take_errors()
    assert "allows no token" in errors["r"] and not outputs.has_matcher("r")

    collected = Collected()
    failed = CompletionDelta("r", 0, "", [], None, "error", error=errors["r"], error_kind="constraint")
    collected.add(0, failed, first_of_prompt=True)
    with pytest.raises(InvalidRequestError, match="could not be followed"):
        collected.raise_error()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_runner_mask_buffers_are_pinned_and_reused_after_their_copy() -> None:
    """The masks fill pinned host memory that the sampler copies without staging; two buffers in turn, and a
    buffer comes back only after the copy that read it ran: the copy here waits behind ~100 ms of device
    work, so a buffer handed back early would be overwritten before it is read. (GPU only: on a CPU the
    runner hands out fresh arrays, with no copy to wait for.)"""
    from types import SimpleNamespace

    from vlmserve.runner.model_runner import ModelRunner, _MaskBuffer

    runner = SimpleNamespace(
        device=torch.device("cuda"),
        max_num_seqs=8,
        _mask_turn=0,
        _mask_buffers=[_MaskBuffer(), _MaskBuffer()],
    )
    a = ModelRunner.mask_buffer(runner, 3, 5)
    b = ModelRunner.mask_buffer(runner, 8, 5)
    assert a.shape == (3, 5) and b.shape == (8, 5) and a.dtype == np.int32
    assert torch.from_numpy(a).is_pinned() and a.ctypes.data != b.ctypes.data
    a[:] = 7
    torch.cuda._sleep(200_000_000)  # ~100 ms of device time queued before the copy
    dev = torch.from_numpy(a).to("cuda", non_blocking=True)
    ModelRunner._mask_copied(runner, a)
    assert runner._mask_buffers[runner._mask_turn ^ 1].copied is not None
    again = ModelRunner.mask_buffer(runner, 2, 5)  # a's buffer: handed out once the copy above ran
    assert again.ctypes.data == a.ctypes.data
    again[:] = 0
    assert torch.equal(dev.cpu(), torch.full((3, 5), 7, dtype=torch.int32))
