"""Soak: twice the server's capacity for minutes on end, then proof that nothing leaked.

    .venv/bin/python -m tests.stress.soak --minutes 10      # the full run (RELIABILITY.md has its figures)
    .venv/bin/python -m tests.stress.soak --seconds 30      # a quick one

The app of `vlmserve serve` (build_app over a ModelServer) runs under uvicorn on 127.0.0.1 in this process,
on a tiny random-weight checkpoint, with max_num_seqs and max_queued_requests set: its capacity is
max_num_seqs + max_queued_requests requests in the engine at once. Twice that many clients loop without
pause over a mix of requests (streamed and not, chat with an image, completions with n=2, streams the client
abandons after a few events, requests whose client gives up before the answer, corrupt images), so about
half of all attempts find the queue full. A client that gets 503 retries after a few milliseconds instead of
the Retry-After second, to keep the pressure at twice capacity.

Checked while it runs: every answer is a complete success, a 400 for the corrupt image, or a 503 with
Retry-After that came at once (never a 500, never a stream cut short by the server). Checked at the end,
once the clients are gone: no KV block held, no request left in the engine, no asyncio task or file
descriptor more than before the load, and resident memory flat between the middle and the end of the
run. Loopback only; bounded by its duration.

tests/test_reliability.py runs this same code for ~20 s; the `LiveServer` harness is shared with it.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import json
import math
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import uvicorn
from fastapi import FastAPI
from PIL import Image

from vlmserve.api.server import build_app
from vlmserve.api.serving import ModelServer
from vlmserve.config import EngineArgs
from vlmserve.engine.engine_process import EngineProcess
from vlmserve.media import MediaConfig
from vlmserve.memory import limit_malloc_arenas

T = TypeVar("T")

MODEL = "tiny"
# A 503 must come "at once": well under one request's service time, even on a loaded 2-core machine (the
# engine thread takes a full queue's refusal between two steps).
MAX_REJECT_P99_S = 0.5
MAX_REJECT_LATENCY_S = 2.0
# Resident memory may wobble (allocator arenas, caches filling) but must not trend upward.
MAX_RSS_GROWTH_BYTES = 64 * 2**20


# ------------------------------------------------------------------------------------------ live server


class LiveServer:
    """`app` under uvicorn on 127.0.0.1:<free port>, on its own thread and event loop; stopped on exit.

    In-process so that a test can look at the server's event loop (its tasks) and engine state directly,
    while clients still go through real sockets.
    """

    def __init__(self, app: FastAPI, **uvicorn_options: Any) -> None:
        # log_config=None: uvicorn's records go to the root logger (and so to pytest's capture).
        options = {"log_level": "warning", "log_config": None, **uvicorn_options}
        config = uvicorn.Config(app, host="127.0.0.1", port=0, lifespan="on", **options)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._run, name="live-server", daemon=True)
        self._loop: asyncio.AbstractEventLoop | None = None
        self.base_url = ""

    def _run(self) -> None:
        with asyncio.Runner() as runner:
            self._loop = runner.get_loop()
            runner.run(self._server.serve())

    def __enter__(self) -> LiveServer:
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        (sock,) = self._server.servers[0].sockets
        self.base_url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(30)

    def call(self, fn: Callable[[], Awaitable[T]]) -> T:
        """Run `fn()` on the server's event loop and return its result (for looking at server state)."""
        assert self._loop is not None, "the server is not running"
        return asyncio.run_coroutine_threadsafe(fn(), self._loop).result(10)

    def num_tasks(self) -> int:
        """asyncio tasks alive on the server's loop (not counting the one asking)."""

        async def count() -> int:
            return len(asyncio.all_tasks()) - 1

        return self.call(count)


def rss_bytes(server: ModelServer | None = None) -> int:
    """Resident memory of this process, plus the engine's process when the server runs one."""
    pids = ["self"]
    if server is not None and isinstance(server.engine, EngineProcess):
        pids.append(str(server.engine.pid))
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/statm") as f:
            total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return total


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def engine_leaks(server: ModelServer) -> list[str]:
    """What the engine still holds for requests although none is in flight: [] when clean.

    Reads engine internals on purpose: these maps are where a missed abort would leave its trace. An engine
    in its own process is checked from this side: no open request in the parent, none running or waiting in
    the child's stats.
    """
    engine = server.engine
    found = []
    if isinstance(engine, EngineProcess):
        if engine._open:
            found.append(f"{len(engine._open)} open requests left in the engine process's parent side")
        stats = engine.stats()
        if stats["num_requests_running"] or stats["num_requests_waiting"]:
            found.append(f"requests left in the engine process: {stats}")
        return found
    core = engine.core
    if core.has_unfinished_requests():
        found.append(f"{len(core.scheduler.requests)} requests left in the scheduler")
    if engine._sinks:
        found.append(f"{len(engine._sinks)} delta sinks left in the async engine")
    if core._choices or core._children:
        found.append(f"{len(core._choices)} choices / {len(core._children)} requests left in the core")
    if core.structured.num_tracked:
        found.append(f"{core.structured.num_tracked} grammar matchers / compiles left in the core")
    try:
        core.scheduler.kv.assert_no_leaks()
    except AssertionError as e:
        found.append(f"KV blocks leaked: {e}")
    return found


def wait_until(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


# ------------------------------------------------------------------------------------------ load


@dataclass(frozen=True)
class SoakConfig:
    duration_s: float = 600.0
    max_num_seqs: int = 4
    max_queued_requests: int = 4
    encoder_cache_tokens: int | None = None  # None: the engine's default
    clients: int | None = None  # default: twice the capacity
    sample_every_s: float = 2.0
    seed: int = 0

    @property
    def capacity(self) -> int:
        return self.max_num_seqs + self.max_queued_requests

    @property
    def num_clients(self) -> int:
        return self.clients or 2 * self.capacity


@dataclass
class Sample:
    t_s: float
    rss_mib: float
    fds: int
    tasks: int
    threads: int
    running: int
    waiting: int
    kv_usage: float
    encoder_cache_usage: float  # fills up to its capacity, then stays: part of the memory that grows early


@dataclass
class SoakReport:
    config: SoakConfig
    outcomes: Counter[str] = field(default_factory=Counter)
    # 503 latencies as a histogram of whole milliseconds: a list would grow by ~100 k entries a minute.
    reject_latency_ms: Counter[int] = field(default_factory=Counter)
    samples: list[Sample] = field(default_factory=list)
    baseline: dict[str, float] = field(default_factory=dict)
    end: dict[str, float] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def problem(self, text: str) -> None:
        if len(self.problems) < 50:
            self.problems.append(text)

    def rss_growth_bytes(self) -> float:
        """Mean RSS over the last quarter of the run minus that over its second quarter (after warm-up)."""
        n = len(self.samples)
        if n < 8:
            return 0.0
        middle = [s.rss_mib for s in self.samples[n // 4 : n // 2]]
        last = [s.rss_mib for s in self.samples[3 * n // 4 :]]
        return (statistics.fmean(last) - statistics.fmean(middle)) * 2**20

    def reject_latency_quantile(self, q: float) -> float | None:
        """The q-quantile of 503 latencies, in seconds (to the millisecond above)."""
        total = sum(self.reject_latency_ms.values())
        seen = 0
        for ms in sorted(self.reject_latency_ms):
            seen += self.reject_latency_ms[ms]
            if seen >= q * total:
                return ms / 1000
        return None

    def summary(self) -> dict[str, Any]:
        return {
            "duration_s": self.config.duration_s,
            "capacity": self.config.capacity,
            "clients": self.config.num_clients,
            "outcomes": dict(self.outcomes),
            "reject_latency_p50_s": self.reject_latency_quantile(0.5),
            "reject_latency_p99_s": self.reject_latency_quantile(0.99),
            "reject_latency_max_s": self.reject_latency_quantile(1.0),
            "rss_mib_first_last_max": [
                self.samples[0].rss_mib if self.samples else None,
                self.samples[-1].rss_mib if self.samples else None,
                max((s.rss_mib for s in self.samples), default=None),
            ],
            "rss_growth_mib": round(self.rss_growth_bytes() / 2**20, 1),
            "baseline": self.baseline,
            "end": self.end,
            "problems": self.problems,
        }


def _png_data_url(rng: random.Random) -> str:
    buf = io.BytesIO()
    size = (rng.randint(28, 96), rng.randint(28, 96))
    Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3))).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _chat(content: Any, **fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], **fields}


class _Rejected(Exception):
    """A proper 503 + Retry-After: the client retries."""


class _Failed(Exception):
    """Anything else but 200 (already recorded as a problem): counted apart from the refusals."""


async def _check_status(r: httpx.Response, started: float, report: SoakReport) -> None:
    """Raise _Rejected for a proper 503; record anything else but 200 as a problem and raise _Failed."""
    if r.status_code == 503:
        await r.aread()
        report.reject_latency_ms[math.ceil((time.monotonic() - started) * 1000)] += 1
        if "retry-after" not in r.headers or r.json()["error"].get("code") != "queue_full":
            report.problem(f"503 without Retry-After / queue_full: {r.headers} {r.text[:200]}")
        raise _Rejected
    if r.status_code != 200:
        await r.aread()
        report.problem(f"unexpected {r.status_code}: {r.text[:300]}")
        raise _Failed


async def _one_request(http: httpx.AsyncClient, rng: random.Random, report: SoakReport) -> str:
    """Send one request of a random kind; return its outcome label."""
    kind = rng.choices(
        ["stream", "image", "completion", "abandon", "give_up", "bad_image"], [30, 20, 15, 15, 12, 8]
    )[0]
    started = time.monotonic()
    if kind in ("stream", "abandon"):
        max_tokens = rng.randint(8, 48) if kind == "stream" else 400
        body = _chat("Tell a story.", max_tokens=max_tokens, ignore_eos=True, stream=True)
        async with http.stream("POST", "/v1/chat/completions", json=body) as r:
            await _check_status(r, started, report)
            events = 0
            last = ""
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                events += 1
                last = line
                if kind == "abandon" and events >= rng.randint(2, 6):
                    return "abandoned"  # leaving the block closes the connection mid-stream
                if '"error"' in line:
                    report.problem(f"error event in a stream: {line[:300]}")
            if last != "data: [DONE]" or events < max_tokens + 2:
                report.problem(f"stream ended early after {events} events, last {last[:200]!r}")
        return kind
    if kind == "image":
        content = [
            {"type": "image_url", "image_url": {"url": _png_data_url(rng)}},
            {"type": "text", "text": "What is this?"},
        ]
        r = await http.post("/v1/chat/completions", json=_chat(content, max_tokens=rng.randint(4, 16)))
        await _check_status(r, started, report)
        if r.json()["choices"][0]["finish_reason"] is None:
            report.problem(f"image chat without finish_reason: {r.text[:200]}")
        return kind
    if kind == "completion":
        body = {"model": MODEL, "prompt": "Once upon", "max_tokens": rng.randint(4, 24), "n": 2}
        r = await http.post("/v1/completions", json=body)
        await _check_status(r, started, report)
        if len(r.json()["choices"]) != 2:
            report.problem(f"completion with n=2 has {len(r.json()['choices'])} choices")
        return kind
    if kind == "give_up":
        body = {"model": MODEL, "prompt": "Once upon", "max_tokens": 400, "ignore_eos": True}
        try:
            r = await http.post("/v1/completions", json=body, timeout=rng.uniform(0.05, 0.3))
        except httpx.TimeoutException:
            return "gave_up"  # httpx closed the connection: the server must abort the request
        await _check_status(r, started, report)
        return kind
    # bad_image
    corrupt = "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 40).decode()
    r = await http.post(
        "/v1/chat/completions",
        json=_chat([{"type": "image_url", "image_url": {"url": corrupt}}], max_tokens=4),
    )
    if r.status_code != 400 or r.json()["error"]["code"] != "invalid_image":
        report.problem(f"corrupt image gave {r.status_code}: {r.text[:200]}")
    return kind


async def _client(base_url: str, stop_at: float, rng: random.Random, report: SoakReport) -> None:
    async with httpx.AsyncClient(base_url=base_url, timeout=60) as http:
        while time.monotonic() < stop_at:
            try:
                report.outcomes[await _one_request(http, rng, report)] += 1
            except _Rejected:
                report.outcomes["rejected"] += 1
            except _Failed:
                report.outcomes["failed"] += 1
                await asyncio.sleep(rng.uniform(0.001, 0.02))
            except Exception as e:  # a transport error the server caused: a dropped connection
                report.problem(f"client error: {type(e).__name__}: {e}")


def _sample(live: LiveServer, server: ModelServer, started: float) -> Sample:
    stats = server.stats()
    return Sample(
        t_s=round(time.monotonic() - started, 1),
        rss_mib=round(rss_bytes(server) / 2**20, 1),
        fds=open_fds(),
        tasks=live.num_tasks(),
        threads=threading.active_count(),
        running=int(stats["num_requests_running"]),
        waiting=int(stats["num_requests_waiting"]),
        kv_usage=round(stats["kv_cache_usage"], 3),
        encoder_cache_usage=round(stats["encoder_cache_usage"], 3),
    )


def _resources(live: LiveServer) -> dict[str, float]:
    return {"fds": open_fds(), "tasks": live.num_tasks(), "threads": threading.active_count()}


def run_soak(checkpoint: Path, config: SoakConfig, log: Callable[[str], None] = lambda _: None) -> SoakReport:
    """Run the soak against a fresh server on `checkpoint`; `report.problems` is empty when all held."""
    report = SoakReport(config)
    args = EngineArgs(
        model=str(checkpoint),
        served_model_name=MODEL,
        max_model_len=1024,
        num_kv_blocks=256,
        max_num_seqs=config.max_num_seqs,
        max_queued_requests=config.max_queued_requests,
        encoder_cache_tokens=config.encoder_cache_tokens,
    )
    server = ModelServer.from_engine_args(args, MediaConfig())
    try:
        with LiveServer(build_app(server, shutdown_servers=False)) as live:
            asyncio.run(_warm_up(live.base_url))  # worker threads and lazy imports exist before the baseline
            report.baseline = _resources(live)
            started = time.monotonic()
            stop_at = started + config.duration_s

            async def load() -> None:
                rngs = [random.Random(config.seed * 1000 + i) for i in range(config.num_clients)]
                clients = [asyncio.ensure_future(_client(live.base_url, stop_at, r, report)) for r in rngs]
                while time.monotonic() < stop_at:
                    await asyncio.sleep(min(config.sample_every_s, max(0.0, stop_at - time.monotonic())))
                    sample = await asyncio.to_thread(_sample, live, server, started)
                    if sample.running > config.max_num_seqs or sample.waiting > config.max_queued_requests:
                        report.problem(f"over capacity: {sample}")
                    report.samples.append(sample)
                    log(f"{sample}  {dict(report.outcomes)}")
                await asyncio.gather(*clients)

            asyncio.run(load())
            _check_end(live, server, report)
    finally:
        asyncio.run(server.aclose())
    return report


async def _warm_up(base_url: str) -> None:
    async with httpx.AsyncClient(base_url=base_url, timeout=60) as http:
        rng = random.Random(-1)
        content = [{"type": "image_url", "image_url": {"url": _png_data_url(rng)}}]
        bodies = [_chat(content, max_tokens=2), {"model": MODEL, "prompt": "x", "max_tokens": 2}]
        for r in await asyncio.gather(
            *(
                http.post(path, json=b)
                for path, b in zip(["/v1/chat/completions", "/v1/completions"], bodies, strict=True)
            )
        ):
            r.raise_for_status()


def _check_end(live: LiveServer, server: ModelServer, report: SoakReport) -> None:
    if not wait_until(lambda: not engine_leaks(server), timeout=15):
        report.problem(f"engine not clean after the load: {engine_leaks(server)}")
    base = report.baseline
    # Connections close and their handler tasks end a moment after the clients are gone.
    wait_until(lambda: open_fds() <= base["fds"] and live.num_tasks() <= base["tasks"], timeout=15)
    report.end = _resources(live)
    # Threads are reported, not checked: the server loop's default executor grows lazily up to its bound.
    for key in ("fds", "tasks"):
        if report.end[key] > base[key]:
            report.problem(f"{key}: {report.end[key]:.0f} after the load, {base[key]:.0f} before")
    growth = report.rss_growth_bytes()
    if growth > MAX_RSS_GROWTH_BYTES:
        report.problem(f"resident memory grew by {growth / 2**20:.0f} MiB between mid-run and the end")
    p99, slowest = report.reject_latency_quantile(0.99), report.reject_latency_quantile(1.0)
    if p99 is not None and (p99 > MAX_REJECT_P99_S or slowest > MAX_REJECT_LATENCY_S):  # type: ignore[operator]
        report.problem(
            f"503s took too long: p99 {p99:.3f} s (limit {MAX_REJECT_P99_S}), max {slowest:.3f} s "
            f"(limit {MAX_REJECT_LATENCY_S})"
        )


# ------------------------------------------------------------------------------------------ CLI


@contextlib.contextmanager
def _checkpoint(path: str | None) -> Iterator[Path]:
    if path:
        yield Path(path)
        return
    from vlmserve.checkpoints.checkpoint import write_checkpoint

    with tempfile.TemporaryDirectory(prefix="vlmserve-soak-") as tmp:
        yield write_checkpoint(Path(tmp), preset="tiny", seed=0)


def main(argv: list[str] | None = None) -> int:
    limit_malloc_arenas()  # as `vlmserve serve` does, before anything allocates on other threads
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0, help="how long to load the server (default 10)")
    ap.add_argument("--seconds", type=float, default=None, help="overrides --minutes")
    ap.add_argument("--max-num-seqs", type=int, default=SoakConfig.max_num_seqs)
    ap.add_argument("--max-queued-requests", type=int, default=SoakConfig.max_queued_requests)
    ap.add_argument(
        "--encoder-cache-tokens",
        type=int,
        default=None,
        help="vision-encoder cache size (default: the engine's)",
    )
    ap.add_argument("--checkpoint", help="a checkpoint directory (default: a tiny random one)")
    ap.add_argument("--json", type=Path, help="also write the report here")
    args = ap.parse_args(argv)
    config = SoakConfig(
        duration_s=args.seconds if args.seconds is not None else args.minutes * 60,
        max_num_seqs=args.max_num_seqs,
        max_queued_requests=args.max_queued_requests,
        encoder_cache_tokens=args.encoder_cache_tokens,
        sample_every_s=10.0 if (args.seconds or args.minutes * 60) >= 120 else 2.0,
    )
    with _checkpoint(args.checkpoint) as checkpoint:
        report = run_soak(checkpoint, config, log=lambda line: print(line, flush=True))
    summary = report.summary()
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(
            json.dumps({**summary, "samples": [asdict(s) for s in report.samples]}, indent=2)
        )
    return 1 if report.problems else 0


if __name__ == "__main__":
    sys.exit(main())
