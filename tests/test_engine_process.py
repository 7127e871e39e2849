"""The engine in its own process (`EngineProcess`, what `vlmserve serve` and a Ray replica run): the same
outputs as the engine in-process, validation errors raised to the caller, aborts, and what happens when
either side of the pipe dies."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import random_image
from vlmserve.config import EngineArgs
from vlmserve.engine.async_engine import EngineDeadError
from vlmserve.engine.engine_process import EngineProcess, dumps, loads
from vlmserve.engine.inputs import EngineRequest
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
    llm.processor.patchify_on_device = pixels  # a server sends uint8 pixels to an engine process
    try:
        text = llm.processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
        )
        greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
        sampled = SamplingParams(temperature=1.0, top_p=0.9, n=2, seed=7, max_tokens=10, ignore_eos=True)
        return [
            llm.make_request(text, [random_image(70, 50, seed=1)], greedy, "img"),
            llm.make_request("Tell me about the sea.", [], greedy, "text"),
            llm.make_request(text, [random_image(40, 90, seed=2)], sampled, "sampled"),
        ]
    finally:
        llm.processor.patchify_on_device = False


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
    with pytest.raises(ValueError, match="KV cache holds 2 blocks"):
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
    pixels, grid = request.images[0].data
    assert pixels.dtype == torch.uint8
    assert torch.equal(back.images[0].data[0], pixels) and tuple(back.images[0].data[1]) == tuple(grid)
    assert torch.equal(back.mrope_positions, request.mrope_positions)
    assert (
        back.prompt_token_ids == request.prompt_token_ids and back.sampling_params == request.sampling_params
    )
    half = torch.randn(3, 4).to(torch.bfloat16)  # numpy has no bfloat16: torch's own pickling
    assert torch.equal(loads(dumps(half)), half)
