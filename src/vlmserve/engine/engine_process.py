"""The engine in its own process: `EngineProcess` is an `EngineClient` whose EngineCore step loop runs in a
child process with its own interpreter.

Why: in one process, the step loop and the HTTP front (event loop, JSON, SSE, image preprocessing threads)
share one GIL. Every torch op releases and retakes it, and each retake can wait behind front-end Python for
up to a switch interval; a step of a small model is thousands of such ops. In a child process the engine
never waits for the front, and the front never waits for a step. (vLLM's V1 engine core runs in its own
process for the same reason.)

Wire: two one-way pipes of pickled typed messages (engine/messages.py). Tensors cross as numpy buffers
(pickle protocol 5), images as resized uint8 pixels (the child's runner patchifies them).

No side ever blocks on a pipe while holding something the other side needs. A request's message (hundreds
of KB of pixels, far more than a pipe's buffer) would block its writer until the child reads it, and the
child reads only between steps: so the caller (an event loop) never writes. It registers the request under
a lock that guards only the table of open requests, and queues the message for a writer thread; in the
child, a reader thread drains the command pipe into a queue at all times, so the parent's writer never
waits for a step either. The parent's reader thread takes that lock only for table updates, never across
I/O, so the child's reports always drain.

Failure: the child handles step failures as AsyncEngine does (fail the step's requests; three in a row and
the engine is dead). If the child itself dies (killed, out of memory), the parent's reader sees the pipe
close, marks the engine dead and ends every open request with an error delta. A child whose parent died
sees its command pipe close and exits. An engine with requests in flight that completes no step for the
stall timeout is reported stalled (`health()`), and the log names what each side waits on, with stacks
(the child writes its own on SIGUSR1).
"""

from __future__ import annotations

import asyncio
import contextlib
import copyreg
import io
import logging
import multiprocessing as mp
import os
import pickle
import queue
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
from vlmserve.engine.client import (
    DEFAULT_STALL_TIMEOUT_S,
    EngineHealth,
    ProgressWatch,
    install_stack_dump_signal,
)
from vlmserve.engine.inputs import EngineRequest
from vlmserve.engine.messages import (
    AbortRequest,
    AddRequest,
    Command,
    LoadFailed,
    Ready,
    StepReport,
    Stop,
)
from vlmserve.engine.outputs import CompletionDelta
from vlmserve.memory import freeze_startup_heap

logger = logging.getLogger(__name__)

# The signal on which the child writes every thread's stack to its stderr (the stall watchdog sends it).
STACK_DUMP_SIGNAL = signal.SIGUSR1

# Builds the child's core from the config; a test substitutes its own (a module-level function: it is
# pickled to the spawned child). The core needs add_request, abort, step, fail_scheduled, fail_all,
# has_unfinished_requests and stats.
CoreFactory = Callable[[EngineConfig], Any]


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


# A step report of 128 streams is ~15 KB: Linux's default pipe (64 KiB) holds four, so a front that stops
# reading for a few steps (a GC pause, a burst of requests to parse) would block the engine's step loop.
PIPE_BYTES = 1 << 20


def widen_pipe(conn: Connection, size: int = PIPE_BYTES) -> int:
    """Grow the kernel buffer of the pipe under `conn` to `size` bytes where the OS allows it (Linux, up to
    /proc/sys/fs/pipe-max-size); returns the buffer's size, or 0 where it cannot be read."""
    try:
        import fcntl
    except ImportError:  # not a POSIX system
        return 0
    setsz, getsz = getattr(fcntl, "F_SETPIPE_SZ", None), getattr(fcntl, "F_GETPIPE_SZ", None)
    if setsz is None or getsz is None:
        return 0
    with contextlib.suppress(OSError):  # above the system's limit for unprivileged users: keep what it has
        fcntl.fcntl(conn.fileno(), setsz, size)
    try:
        return int(fcntl.fcntl(conn.fileno(), getsz))
    except OSError:
        return 0


def _picklable(exc: BaseException) -> BaseException:
    try:
        pickle.loads(dumps(exc))
        return exc
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")


# --- child --------------------------------------------------------------------------------------------------


def _default_core(config: EngineConfig) -> Any:
    from vlmserve.engine.core import EngineCore

    return EngineCore(config)


def _read_commands(commands: Connection, inbox: queue.SimpleQueue[Command | None]) -> None:
    """The child's reader thread: keep the command pipe drained whatever the step loop does. None in the
    inbox means the parent is gone."""
    try:
        while True:
            inbox.put(loads(commands.recv_bytes()))
    except (EOFError, OSError):
        inbox.put(None)


def run_engine(
    config: EngineConfig,
    commands: Connection,
    reports: Connection,
    core_factory: CoreFactory = _default_core,
) -> None:
    """The child's main: build the core, then loop: take commands, step, report."""
    # Ctrl-C reaches the whole process group: the parent decides when the engine stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    install_stack_dump_signal(STACK_DUMP_SIGNAL)
    try:
        core = core_factory(config)
    except BaseException as e:
        reports.send_bytes(dumps(LoadFailed(_picklable(e))))
        return
    freeze_startup_heap()  # before the first step: full collections then skip the model and torch
    reports.send_bytes(dumps(Ready(core.stats())))
    inbox: queue.SimpleQueue[Command | None] = queue.SimpleQueue()
    threading.Thread(
        target=_read_commands, args=(commands, inbox), name="vlmserve-engine-commands", daemon=True
    ).start()
    failures = 0
    while True:
        report = StepReport()
        # Block for work when idle; otherwise take whatever else arrived, without waiting.
        block = not core.has_unfinished_requests()
        while True:
            try:
                cmd = inbox.get(block=block)
            except queue.Empty:
                break
            block = False
            if cmd is None or isinstance(cmd, Stop):
                return  # the parent is gone, or asked to stop
            if isinstance(cmd, AddRequest):
                try:
                    core.add_request(cmd.request)
                    report.accepted.append(cmd.request.request_id)
                except Exception as e:
                    report.refused.append((cmd.request.request_id, _picklable(e)))
            elif isinstance(cmd, AbortRequest):
                core.abort(cmd.request_id)
        if core.has_unfinished_requests():
            report.deltas, failures, report.dead_reason = step_or_fail(core, failures)
            report.stepped = True
        report.stats = core.stats()
        try:
            reports.send_bytes(dumps(report))
        except (BrokenPipeError, OSError):
            return
        if report.dead_reason is not None:
            return


def _child_main(
    config: EngineConfig, commands: Connection, reports: Connection, core_factory: CoreFactory
) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run_engine(config, commands, reports, core_factory)


# --- parent -------------------------------------------------------------------------------------------------


@dataclass
class _Open:
    loop: asyncio.AbstractEventLoop
    sink: Callable[[list[CompletionDelta]], None]
    accepted: asyncio.Future
    n: int
    finished: set[int] = field(default_factory=set)


class EngineProcess:
    """An `EngineClient` over an EngineCore in a child process. Construction blocks until the child has
    loaded the model (and raises what it raised)."""

    def __init__(
        self,
        config: EngineConfig,
        *,
        core_factory: CoreFactory = _default_core,
        stall_timeout_s: float = DEFAULT_STALL_TIMEOUT_S,
    ) -> None:
        ctx = mp.get_context("spawn")  # never fork a process that holds torch's threads
        child_commands, self._commands = ctx.Pipe(duplex=False)
        self._reports, child_reports = ctx.Pipe(duplex=False)
        widen_pipe(self._commands)
        widen_pipe(child_reports)
        self._process = ctx.Process(
            target=_child_main,
            args=(config, child_commands, child_reports, core_factory),
            name="vlmserve-engine",
            daemon=True,
        )
        self._process.start()
        child_commands.close()
        child_reports.close()
        try:
            first = loads(self._reports.recv_bytes())
        except (EOFError, OSError):
            self._process.join(10)
            raise RuntimeError(
                f"the engine process exited while loading the model (exit code {self._process.exitcode})"
            ) from None
        if isinstance(first, LoadFailed):
            self._process.join(10)
            raise first.error
        self._stats: dict[str, float] = first.stats
        self._open: dict[str, _Open] = {}
        self._lock = threading.Lock()  # guards _open and _closed only: never held across I/O
        self._stopping = False
        self._closed = False  # set (under the lock) once the reader has ended: no request may wait on it
        self.dead_reason: str | None = None
        self._last_report = time.monotonic()
        # Commands for the child, written by the writer thread: a caller never blocks on the pipe.
        self._outbox: queue.SimpleQueue[Command | None] = queue.SimpleQueue()
        self._sending: tuple[float, int] | None = None  # (since, bytes) of the message being written
        self.watch = ProgressWatch(
            "engine process",
            self._describe_wait,
            stall_timeout_s=stall_timeout_s,
            dump_peer=self._dump_child_stacks,
        )
        self._writer = threading.Thread(target=self._write, name="vlmserve-engine-writer", daemon=True)
        self._writer.start()
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
        with self._lock:
            if self._closed:  # the reader failed every open request already: this one would wait forever
                raise EngineDeadError(f"engine is not running: {self.dead_reason or 'stopped'}")
            if rid in self._open:
                raise ValueError(f"request id {rid!r} is already running")
            self._open[rid] = entry
            self.watch.set_open(len(self._open))
        self._outbox.put(AddRequest(request))
        async for delta in stream_deltas(entry.accepted, inbox, entry.n, rid, self.abort):
            yield delta

    def abort(self, request_id: str) -> None:
        with self._lock:
            found = self._open.pop(request_id, None) is not None
            self.watch.set_open(len(self._open))
        if found:
            self._outbox.put(AbortRequest(request_id))

    def stats(self) -> dict[str, float]:
        return self._stats

    def health(self) -> EngineHealth:
        dead = self.dead_reason
        if dead is None and not self._process.is_alive() and not self._stopping:
            dead = f"the engine process exited (exit code {self._process.exitcode})"
        return self.watch.health(dead)

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stopping = True
        self.watch.stop()
        self._outbox.put(Stop())
        self._outbox.put(None)
        self._process.join(timeout)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(5)
        self._writer.join(timeout)
        self._reader.join(timeout)
        self._commands.close()

    # --- writer thread ------------------------------------------------------------------------------------

    def _write(self) -> None:
        while (cmd := self._outbox.get()) is not None:
            data = dumps(cmd)
            self._sending = (time.monotonic(), len(data))
            try:
                self._commands.send_bytes(data)
            except OSError:  # BrokenPipeError included: the child is gone; the reader reports it
                return
            finally:
                self._sending = None

    # --- reader thread ------------------------------------------------------------------------------------

    def _read(self) -> None:
        try:
            while True:
                report: StepReport = loads(self._reports.recv_bytes())
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
        self._outbox.put(None)  # ends the writer: nothing it could still send would be read

    def _apply(self, report: StepReport) -> None:
        if report.stats is not None:
            self._stats = report.stats
        self._last_report = time.monotonic()
        if report.stepped:
            self.watch.progress()
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
            self.watch.set_open(len(self._open))
        _post(by_loop)

    # --- stall diagnosis ----------------------------------------------------------------------------------

    def _describe_wait(self) -> str:
        now = time.monotonic()
        sending = self._sending
        writer = "idle" if sending is None else f"writing {sending[1]} bytes for {now - sending[0]:.1f} s"
        child = "running" if self._process.is_alive() else f"exited ({self._process.exitcode})"
        return (
            f"engine process {self.pid} {child}; last report from it {now - self._last_report:.1f} s ago; "
            f"command writer {writer}, {self._outbox.qsize()} command(s) queued behind it; "
            f"the engine process writes its stacks to stderr"
        )

    def _dump_child_stacks(self) -> None:
        if self._process.is_alive() and self.pid is not None:
            os.kill(self.pid, STACK_DUMP_SIGNAL)

    def _fail_open(self, reason: str) -> None:
        with self._lock:
            self._closed = True
            open_requests, self._open = self._open, {}
            self.watch.set_open(0)
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
