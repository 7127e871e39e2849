"""The engine in its own process: `EngineProcess` has AsyncEngine's caller interface, and the EngineCore's step
loop runs in a child process with its own interpreter.

Why: in one process, the step loop and the HTTP front (event loop, JSON, SSE, image preprocessing threads)
share one GIL. Every torch op releases and retakes it, and each retake can wait behind front-end Python for
up to a switch interval; a step of a small model is thousands of such ops. In a child process the engine
never waits for the front, and the front never waits for a step. (vLLM's V1 engine core runs in its own
process for the same reason.)

Wire: two one-way pipes of pickled messages. Parent -> child: ("add", EngineRequest), ("abort", id),
("stop",). Child -> parent, one message per loop turn: which adds were accepted or refused (with the
exception), the step's deltas, the engine stats after it, and, last, why the engine died. Tensors cross as
numpy buffers (pickle protocol 5), images as resized uint8 pixels (the child's runner patchifies them): an
eighth of the bytes of float32 patches.

Failure: the child handles step failures as AsyncEngine does (fail the step's requests; three in a row and
the engine is dead). If the child itself dies (killed, out of memory), the parent's reader sees the pipe
close, marks the engine dead and ends every open request with an error delta. A child whose parent died
sees its command pipe close and exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import copyreg
import io
import logging
import multiprocessing as mp
import pickle
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
import torch

from vlmserve.config import EngineConfig
from vlmserve.engine.async_engine import EngineDeadError, step_or_fail, stream_deltas
from vlmserve.engine.inputs import EngineRequest
from vlmserve.engine.outputs import CompletionDelta

logger = logging.getLogger(__name__)


# --- serialisation ------------------------------------------------------------------------------------------


def _tensor_from_numpy(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array if array.flags.writeable else array.copy())


def _reduce_tensor(t: torch.Tensor) -> tuple[Any, tuple[Any, ...]]:
    if t.device.type == "cpu" and t.dtype not in (torch.bfloat16, torch.float16) and not t.requires_grad:
        return _tensor_from_numpy, (t.contiguous().numpy(),)
    return t.__reduce_ex__(pickle.HIGHEST_PROTOCOL)  # torch's own (zip-serialised) form


_DISPATCH = copyreg.dispatch_table.copy()
_DISPATCH[torch.Tensor] = _reduce_tensor


def dumps(obj: Any) -> bytes:
    """Pickle with CPU tensors as numpy buffers (torch's default pickles go through torch.save's zip format)."""
    buf = io.BytesIO()
    pickler = pickle.Pickler(buf, protocol=pickle.HIGHEST_PROTOCOL)
    pickler.dispatch_table = _DISPATCH
    pickler.dump(obj)
    return buf.getvalue()


loads = pickle.loads


def _picklable(exc: BaseException) -> BaseException:
    try:
        pickle.loads(dumps(exc))
        return exc
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")


# --- child --------------------------------------------------------------------------------------------------


@dataclass
class _Report:
    """What the child sends after one loop turn."""

    accepted: list[str] = field(default_factory=list)
    refused: list[tuple[str, BaseException]] = field(default_factory=list)
    deltas: list[CompletionDelta] = field(default_factory=list)
    stats: dict[str, float] | None = None
    dead_reason: str | None = None


def run_engine(config: EngineConfig, commands: Connection, reports: Connection) -> None:
    """The child's main: build the EngineCore, then loop: take commands, step, report."""
    # Ctrl-C reaches the whole process group: the parent decides when the engine stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from vlmserve.engine.core import EngineCore

    try:
        core = EngineCore(config)
    except BaseException as e:
        reports.send_bytes(dumps(("failed", _picklable(e))))
        return
    reports.send_bytes(dumps(("ready", core.stats())))
    failures = 0
    while True:
        report = _Report()
        # Block for work when idle; otherwise (or once a command came) take whatever else arrived.
        wait: float | None = 0 if core.has_unfinished_requests() else None
        try:
            while commands.poll(wait):
                wait = 0
                cmd = loads(commands.recv_bytes())
                if cmd[0] == "add":
                    request: EngineRequest = cmd[1]
                    try:
                        core.add_request(request)
                        report.accepted.append(request.request_id)
                    except Exception as e:
                        report.refused.append((request.request_id, _picklable(e)))
                elif cmd[0] == "abort":
                    core.abort(cmd[1])
                elif cmd[0] == "stop":
                    return
        except (EOFError, OSError):
            return  # the parent is gone
        if core.has_unfinished_requests():
            report.deltas, failures, report.dead_reason = step_or_fail(core, failures)
        report.stats = core.stats()
        try:
            reports.send_bytes(dumps(report))
        except (BrokenPipeError, OSError):
            return
        if report.dead_reason is not None:
            return


def _child_main(config: EngineConfig, commands: Connection, reports: Connection) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run_engine(config, commands, reports)


# --- parent -------------------------------------------------------------------------------------------------


@dataclass
class _Open:
    loop: asyncio.AbstractEventLoop
    sink: Callable[[list[CompletionDelta]], None]
    accepted: asyncio.Future
    n: int
    finished: set[int] = field(default_factory=set)


class EngineProcess:
    """AsyncEngine's interface (generate, abort, stats, is_alive, dead_reason, shutdown) over an EngineCore in
    a child process. Construction blocks until the child has loaded the model (and raises what it raised)."""

    def __init__(self, config: EngineConfig) -> None:
        ctx = mp.get_context("spawn")  # never fork a process that holds torch's threads
        child_commands, self._commands = ctx.Pipe(duplex=False)
        self._reports, child_reports = ctx.Pipe(duplex=False)
        self._process = ctx.Process(
            target=_child_main,
            args=(config, child_commands, child_reports),
            name="vlmserve-engine",
            daemon=True,
        )
        self._process.start()
        child_commands.close()
        child_reports.close()
        try:
            kind, payload = loads(self._reports.recv_bytes())
        except (EOFError, OSError):
            self._process.join(10)
            raise RuntimeError(
                f"the engine process exited while loading the model (exit code {self._process.exitcode})"
            ) from None
        if kind == "failed":
            self._process.join(10)
            raise payload
        self._stats: dict[str, float] = payload
        self._open: dict[str, _Open] = {}
        self._lock = threading.Lock()  # _open and the command pipe
        self._stopping = False
        self._closed = False  # set (under the lock) once the reader has ended: no request may wait on it
        self.dead_reason: str | None = None
        self.last_step_time = time.monotonic()
        self._reader = threading.Thread(target=self._read, name="vlmserve-engine-reader", daemon=True)
        self._reader.start()

    # --- caller side ------------------------------------------------------------------------------------

    @property
    def is_alive(self) -> bool:
        return self.dead_reason is None and self._process.is_alive()

    @property
    def pid(self) -> int | None:
        return self._process.pid

    async def generate(self, request: EngineRequest) -> AsyncIterator[CompletionDelta]:
        """Yield the request's deltas until every choice finished. Raises the engine's validation errors
        (prompt too long, queue full) before the first delta."""
        if not self.is_alive:
            raise EngineDeadError(f"engine is not running: {self.dead_reason or 'stopped'}")
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue[list[CompletionDelta]] = asyncio.Queue()
        rid = request.request_id
        entry = _Open(loop, inbox.put_nowait, loop.create_future(), request.sampling_params.n)
        payload = dumps(("add", request))
        with self._lock:
            if self._closed:  # the reader failed every open request already: this one would wait forever
                raise EngineDeadError(f"engine is not running: {self.dead_reason or 'stopped'}")
            if rid in self._open:
                raise ValueError(f"request id {rid!r} is already running")
            self._open[rid] = entry
            self._send(payload)
        async for delta in stream_deltas(entry.accepted, inbox, entry.n, rid, self.abort):
            yield delta

    def abort(self, request_id: str) -> None:
        with self._lock:
            if self._open.pop(request_id, None) is not None:
                self._send(dumps(("abort", request_id)))

    def stats(self) -> dict[str, float]:
        return self._stats

    def shutdown(self, timeout: float = 10.0) -> None:
        with self._lock:
            self._stopping = True
            self._send(dumps(("stop",)))
        self._process.join(timeout)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(5)
        self._reader.join(timeout)
        self._commands.close()

    def _send(self, payload: bytes) -> None:
        """Under self._lock. A dead child's pipe raises; the reader thread reports the death."""
        with contextlib.suppress(OSError):  # BrokenPipeError included
            self._commands.send_bytes(payload)

    # --- reader thread ------------------------------------------------------------------------------------

    def _read(self) -> None:
        try:
            while True:
                report: _Report = loads(self._reports.recv_bytes())
                self._apply(report)
                if report.dead_reason is not None:
                    self.dead_reason = report.dead_reason
                    break
        except (EOFError, OSError):
            pass
        finally:
            self._reports.close()
        if self.dead_reason is None and not self._stopping:
            self._process.join(5)
            self.dead_reason = f"the engine process exited (exit code {self._process.exitcode})"
            logger.error("%s", self.dead_reason)
        self._fail_open(self.dead_reason or "engine stopped")

    def _apply(self, report: _Report) -> None:
        if report.stats is not None:
            self._stats = report.stats
        self.last_step_time = time.monotonic()
        by_loop: dict[asyncio.AbstractEventLoop, list[Callable[[], None]]] = {}
        with self._lock:
            for rid in report.accepted:
                entry = self._open.get(rid)
                if entry is not None:
                    by_loop.setdefault(entry.loop, []).append(_resolver(entry.accepted, None))
            for rid, exc in report.refused:
                entry = self._open.pop(rid, None)
                if entry is not None:
                    by_loop.setdefault(entry.loop, []).append(_resolver(entry.accepted, exc))
            by_request: dict[str, list[CompletionDelta]] = {}
            for d in report.deltas:
                by_request.setdefault(d.request_id, []).append(d)
            for rid, deltas in by_request.items():
                entry = self._open.get(rid)
                if entry is None:
                    continue  # aborted by its caller meanwhile
                entry.finished.update(d.index for d in deltas if d.finished)
                if len(entry.finished) >= entry.n:
                    del self._open[rid]
                by_loop.setdefault(entry.loop, []).append(_feeder(entry.sink, deltas))
        _post(by_loop)

    def _fail_open(self, reason: str) -> None:
        with self._lock:
            self._closed = True
            open_requests, self._open = self._open, {}
        by_loop: dict[asyncio.AbstractEventLoop, list[Callable[[], None]]] = {}
        for rid, entry in open_requests.items():
            calls = by_loop.setdefault(entry.loop, [])
            calls.append(_resolver(entry.accepted, EngineDeadError(f"engine is not running: {reason}")))
            deltas = [
                CompletionDelta(rid, i, "", [], None, "error", error=reason)
                for i in range(entry.n)
                if i not in entry.finished
            ]
            calls.append(_feeder(entry.sink, deltas))
        _post(by_loop)


def _post(by_loop: dict[asyncio.AbstractEventLoop, list[Callable[[], None]]]) -> None:
    """One wake-up per event loop, not one per request."""
    for loop, calls in by_loop.items():
        with contextlib.suppress(RuntimeError):  # that event loop is closed: its callers are gone
            loop.call_soon_threadsafe(_run_all, calls)


def _resolver(fut: asyncio.Future, exc: BaseException | None) -> Callable[[], None]:
    def resolve() -> None:
        if fut.done():
            return
        if exc is None:
            fut.set_result(None)
        else:
            fut.set_exception(exc)

    return resolve


def _feeder(
    sink: Callable[[list[CompletionDelta]], None], deltas: list[CompletionDelta]
) -> Callable[[], None]:
    return lambda: sink(deltas)


def _run_all(calls: list[Callable[[], None]]) -> None:
    for call in calls:
        call()
