"""The engine in its own process (`EngineProcess`, what `vlmserve serve` and a Ray replica run): the same
outputs as the engine in-process, validation errors raised to the caller, aborts, and what happens when
either side of the pipe dies."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import random_image
from vlmserve.config import EngineArgs
from vlmserve.engine.async_engine import EngineDeadError
from vlmserve.engine.engine_process import EngineProcess, dumps, loads, widen_pipe
from vlmserve.engine.input_processor import InputProcessor
from vlmserve.engine.inputs import EngineRequest, ImageFeature
from vlmserve.engine.messages import StepReport
from vlmserve.engine.outputs import CompletionDelta
from vlmserve.engine.sampling_params import SamplingParams
from vlmserve.engine.scheduler import QueueFullError
from vlmserve.llm import LLM, build_engine_config

ENGINE = dict(max_model_len=512, num_kv_blocks=64, max_num_seqs=4)


@pytest.fixture(scope="module")
def reference(tiny_checkpoint: Path) -> LLM:
    return LLM(str(tiny_checkpoint), device="cpu", **ENGINE)


@pytest.fixture(scope="module")
def engine(tiny_checkpoint: Path):
    config = build_engine_config(EngineArgs(model=str(tiny_checkpoint), device="cpu", **ENGINE))
    engine = EngineProcess(config)
    yield engine
    engine.shutdown()


def _requests(llm: LLM, pixels: bool) -> list[EngineRequest]:
    """Greedy requests with and without images, one sampled n=2 request with a seed."""
    # A server sends uint8 pixels to an engine process (EngineConfig.images_as_pixels).
    inputs = InputProcessor(llm.processor, dataclasses.replace(llm.config, engine_process=pixels))
    text = llm.processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    )
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    sampled = SamplingParams(temperature=1.0, top_p=0.9, n=2, seed=7, max_tokens=10, ignore_eos=True)
    return [
        inputs.make_request(inputs.process(text, [random_image(70, 50, seed=1)]), greedy, "img"),
        inputs.make_request(inputs.process("Tell me about the sea."), greedy, "text"),
        inputs.make_request(inputs.process(text, [random_image(40, 90, seed=2)]), sampled, "sampled"),
    ]


async def _collect(engine: EngineProcess, request: EngineRequest) -> dict[int, list[CompletionDelta]]:
    out: dict[int, list[CompletionDelta]] = {}
    async for delta in engine.generate(request):
        out.setdefault(delta.index, []).append(delta)
    return out


def test_same_outputs_as_the_engine_in_process(reference: LLM, engine: EngineProcess) -> None:
    expected = {o.request_id: o for o in reference.run(_requests(reference, pixels=False))}

    async def run_all() -> dict[str, dict[int, list[CompletionDelta]]]:
        requests = _requests(reference, pixels=True)
        results = await asyncio.gather(*(_collect(engine, r) for r in requests))
        return {r.request_id: res for r, res in zip(requests, results, strict=True)}

    got = asyncio.run(run_all())
    assert got.keys() == expected.keys()
    for rid, choices in got.items():
        assert choices.keys() == {o.index for o in expected[rid].outputs}
        for out in expected[rid].outputs:
            deltas = choices[out.index]
            assert [t for d in deltas for t in d.token_ids] == out.token_ids, (rid, out.index)
            assert "".join(d.text for d in deltas) == out.text
            assert deltas[-1].finish_reason == "length"
            assert deltas[-1].num_output_tokens == len(out.token_ids)
    stats = engine.stats()  # as of the last step, sent along with its deltas
    assert stats["num_requests_running"] == 0
    assert stats["generation_tokens_total"] >= 12 + 12 + 2 * 10


def test_validation_errors_reach_the_caller_with_their_type(reference: LLM, tiny_checkpoint: Path) -> None:
    config = build_engine_config(
        EngineArgs(
            model=str(tiny_checkpoint),
            device="cpu",
            max_queued_requests=1,
            **{**ENGINE, "max_num_seqs": 1},
        )
    )
    engine = EngineProcess(config)
    try:
        long = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)

        async def scenario() -> None:
            too_long = reference.make_request("word " * 600, [], SamplingParams(max_tokens=4), "too-long")
            with pytest.raises(ValueError, match="max_model_len"):
                await anext(engine.generate(too_long))
            # One runs, one waits (the queue's one place), the third is refused: 503 material.
            first = engine.generate(reference.make_request("a", [], long, "first"))
            second = engine.generate(reference.make_request("b", [], long, "second"))
            await anext(first)
            task = asyncio.ensure_future(anext(second))
            await asyncio.sleep(0.2)
            with pytest.raises(QueueFullError):
                await anext(engine.generate(reference.make_request("c", [], long, "third")))
            with pytest.raises(ValueError, match="already running"):
                await anext(engine.generate(reference.make_request("a", [], long, "first")))
            # Closing a stream aborts its request: the waiting one starts.
            await first.aclose()
            await asyncio.wait_for(task, 30)
            await second.aclose()

        asyncio.run(scenario())
        deadline = time.monotonic() + 30
        while engine.stats()["num_requests_running"] or engine.stats()["num_requests_waiting"]:
            assert time.monotonic() < deadline, engine.stats()
            time.sleep(0.05)
    finally:
        engine.shutdown()


def test_a_killed_engine_process_ends_open_streams_with_an_error(
    reference: LLM, tiny_checkpoint: Path
) -> None:
    engine = EngineProcess(
        build_engine_config(EngineArgs(model=str(tiny_checkpoint), device="cpu", **ENGINE))
    )
    try:
        params = SamplingParams(temperature=0, max_tokens=100_000, ignore_eos=True)

        async def scenario() -> list[CompletionDelta]:
            stream = engine.generate(reference.make_request("Tell a story.", [], params, "open"))
            seen = [await anext(stream)]
            os.kill(engine.pid, signal.SIGKILL)
            seen += [d async for d in stream]
            return seen

        seen = asyncio.run(asyncio.wait_for(scenario(), 60))
        assert seen[0].finish_reason is None
        assert seen[-1].finish_reason == "error" and "exit code -9" in seen[-1].error
        assert not engine.is_alive and "exit code -9" in engine.dead_reason

        async def after() -> None:
            await anext(engine.generate(reference.make_request("x", [], params, "after")))

        with pytest.raises(EngineDeadError):
            asyncio.run(after())
    finally:
        engine.shutdown()


def test_a_model_that_fails_to_load_raises_in_the_parent(tiny_checkpoint: Path) -> None:
    config = build_engine_config(
        EngineArgs(model=str(tiny_checkpoint), device="cpu", max_model_len=512, num_kv_blocks=2)
    )
    with pytest.raises(ValueError, match="KV cache has 1 usable blocks"):
        EngineProcess(config)


def test_the_engine_process_exits_when_its_parent_dies(tiny_checkpoint: Path, tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import os, sys
        from vlmserve.config import EngineArgs
        from vlmserve.engine.engine_process import EngineProcess
        from vlmserve.llm import build_engine_config
        if __name__ == "__main__":
            e = EngineProcess(build_engine_config(EngineArgs(model={str(tiny_checkpoint)!r}, device="cpu")))
            print(e.pid, flush=True)
            os._exit(0)  # no shutdown, no atexit: as if killed
        """
    )
    (tmp_path / "parent.py").write_text(script)
    path = [str(Path.cwd() / "src"), str(Path.cwd()), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in path if p)}
    out = subprocess.run(
        [sys.executable, str(tmp_path / "parent.py")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    child = int(out.stdout.split()[-1])
    deadline = time.monotonic() + 30
    while _running(child):
        assert time.monotonic() < deadline, "the engine process outlived its parent"
        time.sleep(0.1)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by init) counts as gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def test_requests_cross_the_pipe_intact(reference: LLM) -> None:
    request = _requests(reference, pixels=True)[0]
    back = loads(dumps(request))
    pixels, grid = request.images[0].data.values, request.images[0].data.grid_thw
    assert pixels.dtype == torch.uint8 and request.images[0].data.as_pixels
    assert torch.equal(back.images[0].data.values, pixels) and tuple(back.images[0].data.grid_thw) == tuple(
        grid
    )
    assert torch.equal(back.mrope_positions, request.mrope_positions)
    assert (
        back.prompt_token_ids == request.prompt_token_ids and back.sampling_params == request.sampling_params
    )
    half = torch.randn(3, 4).to(torch.bfloat16)  # numpy has no bfloat16: torch's own pickling
    assert torch.equal(loads(dumps(half)), half)


# ------------------------------------------------------------------------------------------ the pipes never jam
#
# A stand-in core for the child (spawned, so module-level): each step takes STEP_S and reports every running
# request with REPORT_BYTES of text in all, more than a pipe holds; a request finishes after STEPS_PER_REQUEST
# steps. With large requests arriving while steps run, the old design froze: the event loop wrote a request to
# the pipe (blocking: the child reads only between steps) while holding the lock that the parent's reader
# needed to hand out a report; the reader, stuck on the lock, stopped draining the reports, so the child
# blocked writing its next report and never read the request. All three waited on each other.

STEP_S = 0.3
REPORT_BYTES = 256 * 1024
STEPS_PER_REQUEST = 2
IMAGE_BYTES = 1024 * 1024


class _SlowCore:
    def __init__(self, config) -> None:
        self.steps: dict[str, int] = {}

    def add_request(self, request: EngineRequest) -> None:
        self.steps[request.request_id] = 0

    def abort(self, request_id: str) -> None:
        self.steps.pop(request_id, None)

    def has_unfinished_requests(self) -> bool:
        return bool(self.steps)

    def step(self) -> list[CompletionDelta]:
        time.sleep(STEP_S)
        text = "x" * (REPORT_BYTES // max(1, len(self.steps)))
        deltas = []
        for rid in list(self.steps):
            self.steps[rid] += 1
            done = self.steps[rid] >= STEPS_PER_REQUEST
            deltas.append(CompletionDelta(rid, 0, text, [1], None, "length" if done else None))
            if done:
                del self.steps[rid]
        return deltas

    def fail_scheduled(self, reason: str) -> list[CompletionDelta]:
        return []

    def fail_all(self, reason: str) -> list[CompletionDelta]:
        return []

    def stats(self) -> dict[str, float]:
        return {"num_requests_running": float(len(self.steps))}


def _slow_core(config) -> _SlowCore:
    return _SlowCore(config)


def _big_request(i: int) -> EngineRequest:
    pixels = np.random.default_rng(i).integers(0, 255, IMAGE_BYTES, dtype=np.uint8)
    image = ImageFeature(mm_hash=f"h{i}", offset=0, length=1, data=pixels)
    params = SamplingParams(temperature=0, max_tokens=STEPS_PER_REQUEST, ignore_eos=True)
    return EngineRequest(f"r{i}", [1, 2], params, images=[image])


def test_large_requests_and_reports_never_block_the_event_loop(
    tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The parent's reader is slow to hand out a report (as when the front's Python holds the GIL): with the
    # old lock-across-write, a request arriving in that window deadlocked all three parties.
    apply = EngineProcess._apply

    def slow_apply(self: EngineProcess, report) -> None:
        time.sleep(STEP_S / 3)
        apply(self, report)

    monkeypatch.setattr(EngineProcess, "_apply", slow_apply)
    config = build_engine_config(EngineArgs(model=str(tiny_checkpoint), device="cpu", **ENGINE))
    engine = EngineProcess(config, core_factory=_slow_core)
    n = 12
    outcome: dict[str, object] = {}

    async def scenario() -> None:
        gaps: list[float] = []

        async def heartbeat() -> None:
            last = time.monotonic()
            while True:
                await asyncio.sleep(0.01)
                now = time.monotonic()
                gaps.append(now - last)
                last = now

        beat = asyncio.create_task(heartbeat())
        tasks = []
        for i in range(n):  # arrivals independent of completions, as on a server
            tasks.append(asyncio.create_task(_collect(engine, _big_request(i))))
            await asyncio.sleep(STEP_S / 6)
        results = await asyncio.gather(*tasks)
        beat.cancel()
        outcome["finished"] = sum(r[0][-1].finish_reason == "length" for r in results)
        outcome["max_gap"] = max(gaps)

    thread = threading.Thread(target=lambda: asyncio.run(scenario()), daemon=True)
    thread.start()
    thread.join(60)
    try:
        if thread.is_alive():
            os.kill(engine.pid, signal.SIGKILL)  # unblocks a writer stuck on the pipe, so the thread ends
            thread.join(30)
            pytest.fail("the event loop and the engine process deadlocked on their pipes")
        assert outcome["finished"] == n
        # The loop never waited for a step: 10 ms ticks stay far under one step (STEP_S).
        assert outcome["max_gap"] < STEP_S / 2, outcome
    finally:
        engine.shutdown()


class _HangingCore(_SlowCore):
    """Its first step hangs until a file appears (a stand-in for a step that never returns)."""

    def step(self) -> list[CompletionDelta]:
        release = Path(os.environ["VLMSERVE_TEST_RELEASE"])
        while not release.exists():
            time.sleep(0.05)
        return super().step()


def _hanging_core(config) -> _HangingCore:
    return _HangingCore(config)


def test_a_step_that_makes_no_progress_is_reported_stalled_then_clears(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    release = tmp_path / "release"
    monkeypatch.setenv("VLMSERVE_TEST_RELEASE", str(release))  # the spawned child inherits it
    config = build_engine_config(EngineArgs(model=str(tiny_checkpoint), device="cpu", **ENGINE))
    engine = EngineProcess(config, core_factory=_hanging_core, stall_timeout_s=0.5)
    try:
        assert engine.health().status == "ok"  # idle is not stalled, however long

        async def scenario() -> str | None:
            task = asyncio.create_task(_collect(engine, _big_request(0)))
            deadline = time.monotonic() + 20
            while engine.health().status != "stalled" and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
            health = engine.health()
            assert health.status == "stalled", health
            assert health.num_open_requests == 1
            assert "command writer idle" in (health.reason or "")
            release.touch()
            result = await asyncio.wait_for(task, 20)
            return result[0][-1].finish_reason

        with caplog.at_level(logging.ERROR, logger="vlmserve.engine.client"):
            assert asyncio.run(scenario()) == "length"
        assert engine.health().status == "ok"
        stall_logs = [r for r in caplog.records if "stalled" in r.getMessage()]
        assert stall_logs, "the stall was not logged"
        # The log names what the parent's threads wait on (their stacks), not just that time passed.
        assert "vlmserve-engine-reader" in stall_logs[0].getMessage()
    finally:
        engine.shutdown()


def test_the_pipes_hold_many_step_reports_so_a_pausing_front_does_not_stop_the_engine(
    engine: EngineProcess,
) -> None:
    fcntl = pytest.importorskip("fcntl")  # POSIX
    if not hasattr(fcntl, "F_GETPIPE_SZ"):
        pytest.skip(
            "pipe buffer sizes are a Linux feature: elsewhere widen_pipe leaves the pipes as they are"
        )
    # Both pipes of a running engine process: a step report of 128 streams is ~15 KB, Linux's default
    # buffer (64 KiB) holds four of them; the widened one holds dozens.
    for conn in (engine._reports, engine._commands):
        assert fcntl.fcntl(conn.fileno(), fcntl.F_GETPIPE_SZ) >= 1 << 20
    # The engine side writes without blocking while nobody reads: 40 reports of 128 deltas each.
    r, w = mp.get_context("spawn").Pipe(duplex=False)
    widen_pipe(w)
    report = StepReport(
        stepped=True, deltas=[CompletionDelta(f"r{i}", 0, " w", [7], None, None) for i in range(128)]
    )
    data = dumps(report)
    os.set_blocking(w.fileno(), False)
    try:
        for _ in range(40):
            w.send_bytes(data)
    finally:
        os.set_blocking(w.fileno(), True)
    assert [len(r.recv_bytes()) for _ in range(40)] == [len(data)] * 40
    r.close()
    w.close()


class _HeapReportingCore(_SlowCore):
    def stats(self) -> dict[str, float]:
        import gc

        return {"frozen_objects": float(gc.get_freeze_count())}


def _heap_reporting_core(config) -> _HeapReportingCore:
    return _HeapReportingCore(config)


def test_the_engine_process_freezes_its_startup_heap(tiny_checkpoint: Path) -> None:
    # What the child holds once its core is built (torch, numpy, the model) is out of the cyclic collector's
    # reach before its first step: a full collection then walks only what serving created (memory.py).
    config = build_engine_config(EngineArgs(model=str(tiny_checkpoint), device="cpu", **ENGINE))
    engine = EngineProcess(config, core_factory=_heap_reporting_core)
    try:
        assert engine.stats()["frozen_objects"] > 10_000
    finally:
        engine.shutdown()
