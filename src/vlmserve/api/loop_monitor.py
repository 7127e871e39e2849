"""Watches the HTTP front's event loop: how late its timers fire (exported as a histogram), and, from a
thread, whether it has stopped running altogether (then the log gets the loop thread's stack, once per
freeze).

Why: every route, every stream and /health itself run on this one loop. Anything that blocks it (a blocking
write, a lock, a slow synchronous call) stops the whole server, and from outside that looks like a hang with
no message. The lag histogram shows small blockages long before they become a freeze; the freeze log names
the line the loop is stuck on.

Does not know: routes, engines.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import threading
import time
import traceback

from prometheus_client import Histogram

logger = logging.getLogger(__name__)

TICK_S = 0.1  # the timer whose lateness is measured
DEFAULT_FREEZE_S = 5.0  # a loop that ran nothing for this long is logged as frozen


class EventLoopMonitor:
    def __init__(self, lag: Histogram, *, freeze_s: float = DEFAULT_FREEZE_S, tick_s: float = TICK_S) -> None:
        self.lag = lag
        self.freeze_s = freeze_s
        self.tick_s = tick_s
        self.frozen = False  # set by the watching thread while the loop is frozen
        self._last_tick = time.monotonic()
        self._loop_thread: int | None = None
        self._stop = threading.Event()
        self._task: asyncio.Task[None] | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """From the loop to watch."""
        self._loop_thread = threading.get_ident()
        self._last_tick = time.monotonic()
        self._task = asyncio.get_running_loop().create_task(self._tick())
        self._thread = threading.Thread(target=self._watch, name="vlmserve-loop-watchdog", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _tick(self) -> None:
        while True:
            before = time.monotonic()
            await asyncio.sleep(self.tick_s)
            now = time.monotonic()
            self.lag.observe(max(0.0, now - before - self.tick_s))
            self._last_tick = now

    def _watch(self) -> None:
        interval = min(1.0, self.freeze_s / 4)
        while not self._stop.wait(interval):
            idle = time.monotonic() - self._last_tick
            if idle > self.freeze_s and not self.frozen:
                self.frozen = True
                frame = sys._current_frames().get(self._loop_thread or 0)
                stack = "".join(traceback.format_stack(frame)) if frame is not None else "(no frame)"
                logger.error("the event loop has run nothing for %.1f s; it is at:\n%s", idle, stack)
            elif idle <= self.freeze_s and self.frozen:
                self.frozen = False
                logger.warning("the event loop runs again")
