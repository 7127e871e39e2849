"""Under load, faults and hostile clients the server keeps serving and loses nothing.

Every test talks to a real uvicorn server on 127.0.0.1 (tests/stress/soak.py's LiveServer, in this process
so that engine state, event-loop tasks and file descriptors can be checked directly) with httpx or raw
sockets. RELIABILITY.md lists each case with the test that covers it, here or in the other test files.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from tests.stress.soak import LiveServer, SoakConfig, engine_leaks, open_fds, run_soak, wait_until
from vlmserve.api import middleware
from vlmserve.api.server import build_app
from vlmserve.api.serving import ModelServer
from vlmserve.api.streaming import SSEResponse
from vlmserve.config import EngineArgs
from vlmserve.deploy.server import LLMServer
from vlmserve.engine.async_engine import MAX_CONSECUTIVE_STEP_FAILURES
from vlmserve.engine.engine_process import EngineProcess
from vlmserve.media import MediaConfig

MODEL = "tiny"


def make_server(checkpoint: Path, **engine: Any) -> ModelServer:
    args = EngineArgs(
        model=str(checkpoint), served_model_name=MODEL, max_model_len=4096, num_kv_blocks=600, **engine
    )
    return ModelServer.from_engine_args(args, MediaConfig())


def chat(content: str = "Tell a long story.", **fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], **fields}


def long_stream(max_tokens: int = 3000) -> dict[str, Any]:
    return chat(max_tokens=max_tokens, ignore_eos=True, stream=True)


def generated(server: ModelServer) -> float:
    return server.stats()["generation_tokens_total"]


def running(server: ModelServer) -> int:
    return int(server.stats()["num_requests_running"])


def sse_events(lines: Iterable[str]) -> list[str]:
    """The data of each SSE event in `lines` (a response's text split on newlines, or a stream's lines)."""
    return [line[6:] for line in lines if line.startswith("data: ")]


def raw_post(base_url: str, path: str, body: bytes, content_length: int | None = None) -> socket.socket:
    """Open a connection and send a POST whose body may be shorter than its Content-Length (an upload cut
    off); the caller decides what the client does next."""
    host, port = base_url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    length = len(body) if content_length is None else content_length
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {length}\r\n\r\n"
    )
    sock.sendall(head.encode() + body)
    return sock


def quiet_when_done(live: LiveServer, server: ModelServer, fds: int, tasks: int) -> None:
    """Nothing held for requests any more: engine clean, tasks and descriptors back to `fds` / `tasks`."""
    assert wait_until(lambda: not engine_leaks(server), 20), engine_leaks(server)
    assert wait_until(lambda: live.num_tasks() <= tasks and open_fds() <= fds, 20), (
        f"tasks {live.num_tasks()} (before {tasks}), fds {open_fds()} (before {fds})"
    )


@pytest.fixture(scope="module")
def server(tiny_checkpoint: Path) -> Iterator[ModelServer]:
    s = make_server(tiny_checkpoint)
    yield s
    asyncio.run(s.aclose())


@pytest.fixture(scope="module")
def live(server: ModelServer) -> Iterator[LiveServer]:
    with LiveServer(build_app(server, shutdown_servers=False)) as running_server:
        yield running_server


@pytest.fixture
def idle(live: LiveServer, server: ModelServer) -> tuple[int, int]:
    """(file descriptors, server tasks) of the idle server, taken once any earlier test's requests ended."""
    assert wait_until(lambda: not engine_leaks(server), 20), engine_leaks(server)
    time.sleep(0.1)  # their connections close a moment later
    return open_fds(), live.num_tasks()


# ------------------------------------------------------------------------------------------ overload


async def test_overload_is_refused_at_once_and_admitted_requests_finish(tiny_checkpoint: Path) -> None:
    """max_num_seqs=2 + max_queued_requests=2: of 10 simultaneous streams, those beyond the 4 the engine can
    hold get 503 + Retry-After right away; every admitted one streams to its end."""
    server = make_server(tiny_checkpoint, max_num_seqs=2, max_queued_requests=2)
    max_tokens = 300  # ~1 s per stream: all 10 arrive while the first 4 still hold their places
    try:
        with LiveServer(build_app(server, shutdown_servers=False)) as live:
            peak = {"running": 0, "waiting": 0}
            sampling = True

            def sample() -> None:
                while sampling:
                    stats = server.stats()
                    peak["running"] = max(peak["running"], int(stats["num_requests_running"]))
                    peak["waiting"] = max(peak["waiting"], int(stats["num_requests_waiting"]))
                    time.sleep(0.002)

            sampler = threading.Thread(target=sample)
            sampler.start()

            async def one(http: httpx.AsyncClient) -> tuple[int, float, httpx.Response]:
                started = time.monotonic()
                body = chat(max_tokens=max_tokens, ignore_eos=True, stream=True)
                r = await http.post("/v1/chat/completions", json=body)
                return r.status_code, time.monotonic() - started, r

            async with httpx.AsyncClient(base_url=live.base_url, timeout=60) as http:
                results = await asyncio.gather(*(one(http) for _ in range(10)))
                sampling = False
                sampler.join()
                admitted = [(t, r) for status, t, r in results if status == 200]
                rejected = [(t, r) for status, t, r in results if status != 200]
                # At most 2 running + 2 queued are admitted. Fewer when a request arrives before the engine
                # thread has moved earlier ones from the queue to running (the queue is full for that moment).
                assert 2 <= len(admitted) <= 4 and len(rejected) == 10 - len(admitted), [
                    s for s, _, _ in results
                ]
                for elapsed, r in rejected:
                    assert r.status_code == 503, r.text
                    assert r.headers["retry-after"] == "1"
                    assert r.json()["error"]["code"] == "queue_full"
                    assert elapsed < 1.0
                for _, r in admitted:
                    events = sse_events(r.text.split("\n"))
                    assert events[-1] == "[DONE]"
                    finishes = [json.loads(e)["choices"][0]["finish_reason"] for e in events[:-1]]
                    assert finishes[-1] == "length" and len(finishes) == max_tokens + 1
                # The engine never held more than it was configured for, and serves on.
                assert peak["running"] == 2 and peak["waiting"] <= 2, peak
                r = await http.post("/v1/chat/completions", json=chat(max_tokens=3))
                assert r.status_code == 200
            assert wait_until(lambda: not engine_leaks(server), 10), engine_leaks(server)
    finally:
        await server.aclose()


def test_short_soak_at_twice_capacity_leaks_nothing(tiny_checkpoint: Path) -> None:
    """The soak of tests/stress/soak.py, bounded to 20 s (the 10-minute run's figures are in RELIABILITY.md)."""
    report = run_soak(tiny_checkpoint, SoakConfig(duration_s=20, sample_every_s=1.0))
    assert report.problems == [], json.dumps(report.summary(), indent=2)
    served = {"stream", "image", "completion", "abandoned", "gave_up", "bad_image"}
    assert served <= set(report.outcomes), report.outcomes
    assert report.outcomes["rejected"] > 0
    assert report.end["fds"] <= report.baseline["fds"] and report.end["tasks"] <= report.baseline["tasks"]


# ------------------------------------------------------------------------------------------ vanishing clients


@pytest.mark.parametrize("stream", [False, True], ids=["non-streamed", "streamed"])
def test_client_gone_before_the_answer_aborts_its_request(
    live: LiveServer, server: ModelServer, idle: tuple[int, int], stream: bool
) -> None:
    before = generated(server)
    body = json.dumps(chat(max_tokens=3000, ignore_eos=True, stream=stream)).encode()
    sock = raw_post(live.base_url, "/v1/chat/completions", body)
    assert wait_until(lambda: running(server) == 1, 10)
    sock.close()  # gone without reading a byte
    quiet_when_done(live, server, *idle)
    assert generated(server) - before < 3000


def test_client_gone_mid_upload_leaves_nothing_behind(
    live: LiveServer, server: ModelServer, idle: tuple[int, int], caplog: pytest.LogCaptureFixture
) -> None:
    with httpx.Client(base_url=live.base_url, timeout=60) as http:
        # An unrelated stream runs throughout.
        with http.stream("POST", "/v1/chat/completions", json=long_stream(200)) as other:
            lines = other.iter_lines()
            assert next(lines).startswith("data: ")
            for _ in range(3):
                body = json.dumps(chat("x" * 5000, max_tokens=4)).encode()
                sock = raw_post(live.base_url, "/v1/chat/completions", body[:2000], len(body))
                time.sleep(0.05)
                sock.close()  # 3000 bytes of the body never come
            events = sse_events(lines)
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["choices"][0]["finish_reason"] == "length"
        assert http.post("/v1/chat/completions", json=chat(max_tokens=2)).status_code == 200
    quiet_when_done(live, server, *idle)
    # A client that hangs up is no server error.
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


def _read_until_closed(sock: socket.socket, timeout: float = 10.0) -> bytes:
    sock.settimeout(timeout)
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def test_body_that_stops_arriving_gets_408_and_a_slow_one_is_served(server: ModelServer) -> None:
    """The body-read timeout bounds the wait for each piece of a body, not the request: a client that sends
    part of its body and then nothing is answered 408 and disconnected; one that sends its body slowly but
    steadily, and a stream that outlives the timeout once its body is in, are served as usual."""
    timeout = 0.5
    with LiveServer(build_app(server, body_read_timeout=timeout, shutdown_servers=False)) as live:
        body = json.dumps(chat(max_tokens=2)).encode()
        start = time.monotonic()
        stalled = raw_post(live.base_url, "/v1/chat/completions", body[:10], len(body))
        never = raw_post(live.base_url, "/v1/chat/completions", b"", len(body))  # headers only
        for sock in (stalled, never):
            raw = _read_until_closed(sock)
            answered = time.monotonic() - start
            sock.close()
            head, _, payload = raw.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 408"), raw[:200]
            error = json.loads(payload)["error"]
            assert error["code"] == "request_timeout" and f"{timeout:g} s" in error["message"]
            assert 0.8 * timeout < answered < 2.5, answered  # after the configured wait, not some other
        with httpx.Client(base_url=live.base_url, timeout=30) as http:
            with http.stream("POST", "/v1/chat/completions", json=long_stream(40)) as stream:
                lines = stream.iter_lines()
                assert next(lines).startswith("data: ")
                time.sleep(3 * timeout)  # the body is in: no read timeout while the answer streams
                events = sse_events(lines)
            assert events[-1] == "[DONE]"

            # Slow but steady: every piece arrives within the timeout, so the request is served.
            upload = time.monotonic()
            slow = raw_post(live.base_url, "/v1/chat/completions", body[:8], len(body))
            for i in range(8, len(body), 16):
                time.sleep(timeout / 5)
                slow.sendall(body[i : i + 16])
            assert time.monotonic() - upload > timeout  # longer in all than one wait may be
            slow.settimeout(10)
            raw = b""
            while b"\r\n\r\n" not in raw:  # the server keeps the connection open: read the status line
                raw += slow.recv(65536)
            slow.close()
            assert raw.startswith(b"HTTP/1.1 200"), raw[:300]
            assert http.post("/v1/chat/completions", json=chat(max_tokens=2)).status_code == 200
    assert wait_until(lambda: not engine_leaks(server), 20), engine_leaks(server)


def test_client_that_stops_reading_is_cut_off_and_its_request_aborted(
    live: LiveServer, server: ModelServer, idle: tuple[int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client that keeps its connection open but reads nothing: once the socket buffers are full and a
    send has waited stalled_client_timeout_s, the stream ends and the engine request is aborted."""
    monkeypatch.setattr(SSEResponse, "stalled_client_timeout_s", 0.5)
    max_tokens = 3800
    before = generated(server)
    host, port = live.base_url.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window fills fast
    sock.connect((host, int(port)))
    # Top-20 logprobs make each event ~1.5 kB, so the kernel's socket buffers (a few MB on loopback) fill
    # long before the last token.
    body = json.dumps({**long_stream(max_tokens), "logprobs": True, "top_logprobs": 20}).encode()
    sock.sendall(
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    try:
        assert wait_until(lambda: running(server) == 1, 10)
        # Others are served meanwhile.
        r = httpx.post(f"{live.base_url}/v1/chat/completions", json=chat(max_tokens=3), timeout=30)
        assert r.status_code == 200
        assert wait_until(lambda: running(server) == 0, 30)
        assert not engine_leaks(server)
        assert generated(server) - before < max_tokens + 3  # aborted, not run to the end
    finally:
        sock.close()
    quiet_when_done(live, server, *idle)


# ------------------------------------------------------------------------------------------ engine faults


class StepFaults:
    """Makes the model runner raise on its next `count` steps (or every step with count=None)."""

    def __init__(self, server: ModelServer, monkeypatch: pytest.MonkeyPatch) -> None:
        # Faults go into the engine's runner, so these tests run it in the server's process.
        runner = server.engine.core.runner
        self._prepare = runner.prepare  # every step goes through it, in either loop
        self.remaining: int | None = 0
        monkeypatch.setattr(runner, "prepare", self._maybe_fail)

    def _maybe_fail(self, *args: Any, **kwargs: Any) -> Any:
        if self.remaining is None or self.remaining > 0:
            if self.remaining is not None:
                self.remaining -= 1
            raise RuntimeError("injected step failure")
        return self._prepare(*args, **kwargs)


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_a_failed_step_fails_only_its_requests_and_the_engine_serves_on(
    tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch, async_scheduling: bool
) -> None:
    # max_num_seqs=1: the streamed request runs, the second one waits (and is not part of the failed step).
    # Async (the GPU's loop): the step fails while the previous one is in flight, with a token pending.
    server = make_server(
        tiny_checkpoint, max_num_seqs=1, async_scheduling=async_scheduling, engine_process=False
    )
    faults = StepFaults(server, monkeypatch)
    try:
        with (
            LiveServer(build_app(server, shutdown_servers=False)) as live,
            httpx.Client(base_url=live.base_url, timeout=60) as http,
        ):
            with http.stream("POST", "/v1/chat/completions", json=long_stream(2000)) as victim:
                lines = victim.iter_lines()
                assert next(lines).startswith("data: ")
                result: dict[str, httpx.Response] = {}
                waiting = threading.Thread(
                    target=lambda: result.update(
                        r=http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 5})
                    )
                )
                waiting.start()
                assert wait_until(lambda: server.stats()["num_requests_waiting"] == 1, 10)
                faults.remaining = 1
                events = sse_events(lines)
            assert events[-1] == "[DONE]"
            error = json.loads(events[-2])["error"]
            assert error["code"] == "engine_error" and "injected step failure" in error["message"]
            waiting.join(30)
            assert result["r"].status_code == 200, result["r"].text
            assert result["r"].json()["choices"][0]["finish_reason"] == "length"
            assert http.get("/health").status_code == 200
            assert http.post("/v1/chat/completions", json=chat(max_tokens=3)).status_code == 200
            assert wait_until(lambda: not engine_leaks(server), 10), engine_leaks(server)
    finally:
        asyncio.run(server.aclose())


def test_an_engine_that_keeps_failing_is_declared_dead(
    tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = make_server(tiny_checkpoint, engine_process=False)
    StepFaults(server, monkeypatch).remaining = None
    try:
        with (
            LiveServer(build_app(server, shutdown_servers=False)) as live,
            httpx.Client(base_url=live.base_url, timeout=60) as http,
        ):
            # Each request fails with its step; consecutive failed steps add up until the engine gives up.
            for _ in range(MAX_CONSECUTIVE_STEP_FAILURES):
                r = http.post("/v1/chat/completions", json=chat(max_tokens=3))
                assert r.status_code == 500
                assert r.json()["error"]["type"] == "server_error"
                assert "injected step failure" in r.json()["error"]["message"]
            assert wait_until(lambda: not server.is_alive, 10)
            health = http.get("/health")
            assert health.status_code == 503 and health.json()["error"]["code"] == "engine_dead"
            r = http.post("/v1/chat/completions", json=chat(max_tokens=3))
            assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"
            assert r.headers["retry-after"] == "1"
        # Ray Serve's health check of a replica with this engine fails too, so Ray replaces the replica.
        # (Called on a stand-in: a real LLMServer would build its own engine.)
        with pytest.raises(RuntimeError, match="not running"):
            LLMServer.check_health(SimpleNamespace(server=server))  # type: ignore[arg-type]
    finally:
        asyncio.run(server.aclose())


def _metric(text: str, name: str) -> float:
    """The value of the first sample of `name` in a Prometheus text exposition."""
    for line in text.splitlines():
        if line.startswith(name):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def test_a_stalled_engine_shows_in_health_and_metrics_while_the_server_keeps_answering(
    tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = make_server(tiny_checkpoint, engine_process=False, engine_stall_timeout_s=0.5)
    release = threading.Event()
    runner = server.engine.core.runner
    prepare = runner.prepare

    def hang_then_prepare(*args: Any, **kwargs: Any) -> Any:
        release.wait(30)  # a step that does not return (a hung kernel, a lost wake-up)
        return prepare(*args, **kwargs)

    monkeypatch.setattr(runner, "prepare", hang_then_prepare)
    try:
        with (
            LiveServer(build_app(server, shutdown_servers=False)) as live,
            httpx.Client(base_url=live.base_url, timeout=30) as http,
        ):
            assert http.get("/health").status_code == 200
            result: dict[str, Any] = {}
            worker = threading.Thread(
                target=lambda: result.update(r=http.post("/v1/chat/completions", json=chat(max_tokens=3)))
            )
            worker.start()
            assert wait_until(lambda: http.get("/health").status_code == 503, 10)
            health = http.get("/health").json()["error"]
            assert health["code"] == "engine_stalled"
            assert (
                "1 request(s) in flight" in health["message"] and "engine thread running" in health["message"]
            )
            metrics = http.get("/metrics").text
            assert _metric(metrics, 'vlmserve:engine_seconds_since_progress{model_name="tiny"}') > 0.5
            assert _metric(metrics, "vlmserve:event_loop_lag_seconds_count") > 0
            release.set()
            worker.join(30)
            assert result["r"].status_code == 200
            assert http.get("/health").status_code == 200
    finally:
        release.set()
        asyncio.run(server.aclose())


# ------------------------------------------------------------------------------------------ API keys


def test_keys_are_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every configured key is compared, each as a fixed-size digest: neither which key matched, nor how
    much of one, nor its length shows in the time taken."""
    calls: list[tuple[int, int]] = []
    compare_digest = hmac.compare_digest

    def recording(a: bytes, b: bytes) -> bool:
        calls.append((len(a), len(b)))
        return compare_digest(a, b)

    monkeypatch.setattr(middleware.hmac, "compare_digest", recording)
    keys = ["k1", "a-much-longer-second-key", "third"]
    guard = middleware.APIKeyMiddleware(app=None, api_keys=keys)  # type: ignore[arg-type]
    for token, expected in [(b"k1", True), (b"third", True), (b"k", False), (b"x" * 500, False)]:
        calls.clear()
        assert guard._matches(token) is expected
        assert len(calls) == len(keys)
        assert {lengths for lengths in calls} == {(32, 32)}


def test_keys_never_reach_the_logs(server: ModelServer, caplog: pytest.LogCaptureFixture) -> None:
    good, bad = "sk-good-1f2e3d4c5b6a", "sk-bad-9z8y7x6w5v"
    caplog.set_level(logging.DEBUG)
    app = build_app(server, api_keys=[good], shutdown_servers=False)
    with (
        LiveServer(app, log_level="debug", access_log=True) as live,
        httpx.Client(base_url=live.base_url, timeout=30) as http,
    ):
        for key, status in [(good, 200), (bad, 401), (None, 401)]:
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            assert http.post(
                "/v1/chat/completions", json=chat(max_tokens=2), headers=headers
            ).status_code == (status)
        # Failing requests log the most; the key must not be in them either.
        headers = {"Authorization": f"Bearer {good}", "X-Request-Id": "x"}
        assert http.post("/v1/chat/completions", json={"messages": 1}, headers=headers).status_code == 400
        r = http.post("/v1/chat/completions", content=b"{", headers=headers)
        assert r.status_code == 400
    # The access log and the debug logs were captured: the check below looks at what a server writes.
    assert any(r.name == "uvicorn.access" for r in caplog.records), caplog.text
    assert good not in caplog.text and bad not in caplog.text


def test_a_killed_engine_process_fails_its_streams_and_health(tiny_checkpoint: Path) -> None:
    """The engine's process dies (the OOM killer, kill -9): the stream in flight ends with an SSE error and
    [DONE], /health turns 503 engine_dead (a supervisor replaces the server), new requests get 503."""
    server = make_server(tiny_checkpoint)
    assert isinstance(server.engine, EngineProcess)
    try:
        with (
            LiveServer(build_app(server, shutdown_servers=False)) as live,
            httpx.Client(base_url=live.base_url, timeout=60) as http,
        ):
            with http.stream("POST", "/v1/chat/completions", json=long_stream(2000)) as victim:
                lines = victim.iter_lines()
                assert next(lines).startswith("data: ")
                os.kill(server.engine.pid, signal.SIGKILL)
                events = sse_events(lines)
            assert events[-1] == "[DONE]"
            error = json.loads(events[-2])["error"]
            assert error["code"] == "engine_error" and "exit code -9" in error["message"], error
            assert wait_until(lambda: not server.is_alive, 10)
            health = http.get("/health")
            assert health.status_code == 503 and health.json()["error"]["code"] == "engine_dead"
            r = http.post("/v1/chat/completions", json=chat(max_tokens=3))
            assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"
    finally:
        asyncio.run(server.aclose())
