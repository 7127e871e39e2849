"""The engine-client interface: what the API layer, `LLM`-style callers and the Ray replica may ask of an
engine, whichever way it runs (`AsyncEngine`: the step loop on a thread of this process; `EngineProcess`:
the step loop in a child process).

Owns: the `EngineClient` protocol, `EngineHealth` (ok / stalled / dead, with a reason a person can act on),
and `ProgressWatch`, the stall detector both clients share: an engine with requests in flight that has
completed no step for `stall_timeout_s` is *stalled*. A stall is reported by /health and logged once, with
what each side is waiting on and the stacks of the threads involved; it clears by itself when steps resume.

Does not know: HTTP, OpenAI shapes, how requests are prepared.
"""

from __future__ import annotations

import faulthandler
import io
import logging
import sys
import threading
import time
import traceback
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Literal, Protocol

from vlmserve.engine.inputs import EngineRequest
from vlmserve.engine.outputs import CompletionDelta

logger = logging.getLogger(__name__)

# A step longer than this with requests in flight is a stall. Long enough for the slowest legitimate step
# (a first Triton compile, a prefill of many large images); short enough that a supervisor hears of a hang.
DEFAULT_STALL_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class EngineHealth:
    status: Literal["ok", "stalled", "dead"]
    reason: str | None = None
    num_open_requests: int = 0
    seconds_since_progress: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == "ok"


class EngineClient(Protocol):
    """One model's engine as its callers see it."""

    dead_reason: str | None

    @property
    def is_alive(self) -> bool: ...

    def generate(self, request: EngineRequest) -> AsyncIterator[CompletionDelta]:
        """The request's deltas until all n choices finished; the engine's validation errors (prompt too
        long, queue full, duplicate id) are raised before the first delta. Closing the iterator early aborts
        the request."""
        ...

    def abort(self, request_id: str) -> None: ...

    def stats(self) -> dict[str, float]: ...

    def health(self) -> EngineHealth: ...

    def shutdown(self, timeout: float = 10.0) -> None: ...


class ProgressWatch:
    """Tracks the engine's progress for one client and watches it from a daemon thread.

    The client calls `progress()` after every completed step and `set_open(n)` when its count of requests
    in flight changes. `describe` returns what the client is waiting on (for the log), `dump_peer` asks the
    other side (a child process) to log its own stacks.
    """

    def __init__(
        self,
        name: str,
        describe: Callable[[], str],
        *,
        stall_timeout_s: float = DEFAULT_STALL_TIMEOUT_S,
        dump_peer: Callable[[], None] | None = None,
        check_interval_s: float | None = None,
    ) -> None:
        self.name = name
        self.stall_timeout_s = stall_timeout_s
        self._describe = describe
        self._dump_peer = dump_peer
        self._last_progress = time.monotonic()
        self._open = 0
        self._reported = False
        self._stop = threading.Event()
        interval = check_interval_s if check_interval_s is not None else min(1.0, stall_timeout_s / 4)
        self._thread = threading.Thread(
            target=self._watch, args=(interval,), name=f"{name}-watchdog", daemon=True
        )
        self._thread.start()

    def progress(self) -> None:
        self._last_progress = time.monotonic()

    def set_open(self, n: int) -> None:
        if self._open == 0 and n > 0:
            # Idle time before the first request is not a stall: the clock starts with the work.
            self._last_progress = time.monotonic()
        self._open = n

    def seconds_since_progress(self) -> float:
        return time.monotonic() - self._last_progress if self._open else 0.0

    def health(self, dead_reason: str | None) -> EngineHealth:
        if dead_reason is not None:
            return EngineHealth("dead", dead_reason, self._open)
        idle = self.seconds_since_progress()
        if idle > self.stall_timeout_s:
            reason = (
                f"no engine step completed for {idle:.0f} s with {self._open} request(s) in flight "
                f"(stall timeout {self.stall_timeout_s:g} s): {self._describe()}"
            )
            return EngineHealth("stalled", reason, self._open, idle)
        return EngineHealth("ok", None, self._open, idle)

    def stop(self) -> None:
        self._stop.set()

    def _watch(self, interval: float) -> None:
        while not self._stop.wait(interval):
            health = self.health(None)
            if health.status == "stalled" and not self._reported:
                self._reported = True
                logger.error("%s stalled: %s\n%s", self.name, health.reason, thread_stacks())
                if self._dump_peer is not None:
                    try:
                        self._dump_peer()
                    except Exception:
                        logger.warning("could not ask the engine process for its stacks", exc_info=True)
            elif health.status == "ok" and self._reported:
                self._reported = False
                logger.warning("%s made progress again", self.name)


def thread_stacks() -> str:
    """The Python stack of every thread of this process, named (what a stalled process is waiting on)."""
    names = {t.ident: t.name for t in threading.enumerate()}
    out = io.StringIO()
    for ident, frame in sys._current_frames().items():
        out.write(f"--- thread {names.get(ident, '?')} ({ident}):\n")
        out.write("".join(traceback.format_stack(frame)))
    return out.getvalue()


def install_stack_dump_signal(signum: int) -> None:
    """On `signum`, write every thread's stack to stderr (from C, so it works while the GIL is held)."""
    faulthandler.register(signum, file=sys.stderr, all_threads=True)
