"""The engine's async front: the step loop on its own thread, results streamed to asyncio callers.

`generate(request)` hands a request to the loop and yields its `CompletionDelta`s; cancelling the iterator
(a client that went away) aborts the request and frees its KV blocks. The loop thread owns the `EngineCore`
entirely: callers only enqueue commands, so tokenization, image decoding and JSON on the event loop never
stall a step, and a step never blocks the event loop. Torch releases the GIL inside kernels.

What it does not know: HTTP, OpenAI shapes, images. It only moves requests in and deltas out.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from vlmserve.engine.client import DEFAULT_STALL_TIMEOUT_S, EngineHealth, ProgressWatch
from vlmserve.engine.core import EngineCore
from vlmserve.engine.inputs import EngineRequest
from vlmserve.engine.outputs import CompletionDelta

_Sink = Callable[[list[CompletionDelta]], None]  # puts a request's deltas of one step in its inbox

logger = logging.getLogger(__name__)

# After this many consecutive failed steps the engine is declared dead: /health fails so a supervisor
# (Ray Serve, Kubernetes) replaces the process.
MAX_CONSECUTIVE_STEP_FAILURES = 3


class EngineDeadError(RuntimeError):
    pass


async def stream_deltas(
    accepted: asyncio.Future,
    inbox: asyncio.Queue[list[CompletionDelta]],
    n: int,
    request_id: str,
    abort: Callable[[str], None],
) -> AsyncIterator[CompletionDelta]:
    """A submitted request's deltas until all n choices finished: first its acceptance (raises the engine's
    ValueError / QueueFullError), then each step's deltas from its inbox. A caller that stops early (or is
    cancelled, even while waiting for the acceptance) aborts the request."""
    done = 0
    try:
        await accepted
        while done < n:
            for delta in await inbox.get():
                if delta.finished:
                    done += 1
                yield delta
    finally:
        if done < n:
            abort(request_id)


def step_or_fail(core: EngineCore, failures: int) -> tuple[list[CompletionDelta], int, str | None]:
    """One step of `core`, given how many steps in a row failed before it: (deltas, failures now, why the
    engine is dead or None). A failed step fails its own requests (the rest keep running); after
    MAX_CONSECUTIVE_STEP_FAILURES in a row, every request fails and the engine is dead."""
    try:
        return core.step(), 0, None
    except Exception as e:
        failures += 1
        logger.exception("engine step failed (%d in a row)", failures)
        deltas = core.fail_scheduled(f"engine step failed: {type(e).__name__}: {e}")
        # A fatal error (a tensor-parallel worker died) kills the engine at once: no later step can run.
        if failures < MAX_CONSECUTIVE_STEP_FAILURES and not getattr(e, "fatal", False):
            return deltas, failures, None
        reason = f"{failures} consecutive step failures, last: {e!r}"
        return deltas + core.fail_all(reason), failures, reason


@dataclass
class _Add:
    request: EngineRequest
    sink: Callable[[list[CompletionDelta]], None]
    accepted: asyncio.Future
    loop: asyncio.AbstractEventLoop


@dataclass
class _Abort:
    request_id: str


class AsyncEngine:
    """An `EngineClient` whose EngineCore steps on a thread of this process."""

    def __init__(self, core: EngineCore, *, stall_timeout_s: float = DEFAULT_STALL_TIMEOUT_S) -> None:
        self.core = core
        self._commands: queue.Queue[Any] = queue.Queue()
        self._stop = threading.Event()
        self._sinks: dict[str, tuple[asyncio.AbstractEventLoop, _Sink]] = {}
        self.dead_reason: str | None = None
        self._last_command = time.monotonic()
        self._in_flight = 0
        self._in_flight_lock = threading.Lock()
        self.watch = ProgressWatch("engine", self._describe_wait, stall_timeout_s=stall_timeout_s)
        self._thread = threading.Thread(target=self._run, name="vlmserve-engine", daemon=True)
        self._thread.start()

    # --- caller side (any event loop) -----------------------------------------------------------------

    @property
    def is_alive(self) -> bool:
        return self.dead_reason is None and self._thread.is_alive()

    async def generate(self, request: EngineRequest) -> AsyncIterator[CompletionDelta]:
        """Yield the request's deltas until every choice finished. Raises the engine's validation errors
        (prompt too long, queue full) before the first delta."""
        if not self.is_alive:
            raise EngineDeadError(f"engine is not running: {self.dead_reason or 'stopped'}")
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue[list[CompletionDelta]] = asyncio.Queue()
        accepted: asyncio.Future = loop.create_future()
        self._count_in_flight(+1)
        try:
            self._commands.put(_Add(request, inbox.put_nowait, accepted, loop))
            async for delta in stream_deltas(
                accepted, inbox, request.sampling_params.n, request.request_id, self.abort
            ):
                yield delta
        finally:
            self._count_in_flight(-1)

    def _count_in_flight(self, change: int) -> None:
        with self._in_flight_lock:
            self._in_flight += change
            self.watch.set_open(self._in_flight)

    def abort(self, request_id: str) -> None:
        self._commands.put(_Abort(request_id))

    def stats(self) -> dict[str, float]:
        return self.core.stats()

    def health(self) -> EngineHealth:
        dead = self.dead_reason
        if dead is None and not self._thread.is_alive() and not self._stop.is_set():
            dead = "the engine thread exited"
        return self.watch.health(dead)

    def _describe_wait(self) -> str:
        state = "running" if self._thread.is_alive() else "exited"
        return (
            f"engine thread {state}, {self._commands.qsize()} command(s) queued for it, last command taken "
            f"{time.monotonic() - self._last_command:.1f} s ago (its stack is in the dump below)"
        )

    def shutdown(self, timeout: float = 10.0) -> None:
        self.watch.stop()
        self._stop.set()
        self._commands.put(None)
        self._thread.join(timeout)
        if hasattr(self.core, "shutdown"):  # tensor-parallel workers
            self.core.shutdown()

    # --- loop thread ------------------------------------------------------------------------------------

    def _handle(self, cmd: Any) -> None:
        if isinstance(cmd, _Add):
            rid = cmd.request.request_id
            try:
                self.core.add_request(cmd.request)
            except Exception as e:
                cmd.loop.call_soon_threadsafe(_set_exception, cmd.accepted, e)
                return
            self._sinks[rid] = (cmd.loop, cmd.sink)
            cmd.loop.call_soon_threadsafe(_set_result, cmd.accepted, None)
        elif isinstance(cmd, _Abort):
            self._sinks.pop(cmd.request_id, None)
            self.core.abort(cmd.request_id)

    def _dispatch(self, deltas: list[CompletionDelta]) -> None:
        by_request: dict[str, list[CompletionDelta]] = {}
        for d in deltas:
            by_request.setdefault(d.request_id, []).append(d)
        # One wake-up per event loop per step, not one per request: each call_soon_threadsafe writes to the
        # loop's wake-up pipe, and a step of a large batch has a delta for every running request.
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Sink, list[CompletionDelta]]]] = {}
        for rid, ds in by_request.items():
            target = self._sinks.get(rid)
            if target is None:
                continue
            if self.core.is_request_done(rid):
                self._sinks.pop(rid, None)
            loop, sink = target
            by_loop.setdefault(loop, []).append((sink, ds))
        for loop, batch in by_loop.items():
            loop.call_soon_threadsafe(_deliver, batch)

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            # Block for work when idle; otherwise take whatever arrived since the last step.
            block = not self.core.has_unfinished_requests()
            try:
                cmd = self._commands.get(timeout=0.5) if block else self._commands.get_nowait()
            except queue.Empty:
                cmd = None
            while cmd is not None:
                self._last_command = time.monotonic()
                self._handle(cmd)
                try:
                    cmd = self._commands.get_nowait()
                except queue.Empty:
                    cmd = None
            if self._stop.is_set() or not self.core.has_unfinished_requests():
                continue
            deltas, failures, dead_reason = step_or_fail(self.core, failures)
            if dead_reason is not None:
                self.dead_reason = dead_reason
                self._dispatch(deltas)
                return
            self.watch.progress()
            self._dispatch(deltas)


def _deliver(batch: list[tuple[_Sink, list[CompletionDelta]]]) -> None:
    for sink, deltas in batch:
        sink(deltas)


def _set_result(fut: asyncio.Future, value: Any) -> None:
    if not fut.done():
        fut.set_result(value)


def _set_exception(fut: asyncio.Future, exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)
