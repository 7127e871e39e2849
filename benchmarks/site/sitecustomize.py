# Measurement aid for served-load runs (not part of vlmserve): stacks on SIGUSR1 in every process, and with
# VLMSERVE_FRONT_PROFILE=PATH a cProfile of the HTTP front's main thread (its event loop), written at exit.
import faulthandler
import os
import signal
import sys

faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)

_path = os.environ.get("VLMSERVE_FRONT_PROFILE")
if _path and "serve" in sys.argv:
    import atexit
    import cProfile
    import io
    import pstats
    import time

    _prof = cProfile.Profile()
    _t0, _c0 = time.monotonic(), time.thread_time()

    def _dump() -> None:
        global _prof
        if not _prof:
            return
        _prof.disable()
        out = io.StringIO()
        out.write(f"main thread: wall {time.monotonic() - _t0:.1f} s, cpu {time.thread_time() - _c0:.1f} s\n")
        stats = pstats.Stats(_prof, stream=out)
        stats.sort_stats("tottime").print_stats(45)
        stats.sort_stats("cumulative").print_stats(45)
        with open(_path, "w") as f:
            f.write(out.getvalue())
        _prof = None

    atexit.register(_dump)

    def _term(signum, frame) -> None:  # uvicorn re-raises SIGTERM after its shutdown, which skips atexit
        _dump()
        os._exit(0)

    signal.signal(signal.SIGTERM, _term)
    _prof.enable()


# With VLMSERVE_ENGINE_SWITCH_INTERVAL_MS=X, the engine process's GIL switch interval (default 5 ms): whether
# a thread holding the GIL delays the engine thread when it comes back from a blocking call.
_switch_ms = os.environ.get("VLMSERVE_ENGINE_SWITCH_INTERVAL_MS")
if _switch_ms and "--multiprocessing-fork" in sys.argv:
    sys.setswitchinterval(float(_switch_ms) / 1000)


def _once_the_engine_is_loaded(fn, name: str) -> None:  # type: ignore[no-untyped-def]
    """In the engine process (a spawned child), run `fn` on a thread of its own once EngineCore exists."""
    import threading
    import time

    def wait_then_run() -> None:
        while getattr(sys.modules.get("vlmserve.engine.core"), "EngineCore", None) is None:
            time.sleep(0.2)
        fn()

    threading.Thread(target=wait_then_run, name=name, daemon=True).start()


# With VLMSERVE_ENGINE_PHASES=DIR, the engine process times its loop's phases (vlmserve.bench.offline.PHASES)
# and writes cumulative totals to DIR/phases-PID.json every 0.5 s; served_load.py --engine-phases turns the
# difference over each load into ms per engine step.
_phases_dir = os.environ.get("VLMSERVE_ENGINE_PHASES")
if _phases_dir and "--multiprocessing-fork" in sys.argv:

    def _phases() -> None:
        import json
        import time

        from vlmserve.bench.offline import phase_timers

        path = os.path.join(_phases_dir, f"phases-{os.getpid()}.json")
        with phase_timers() as totals:
            while True:
                with open(path + ".tmp", "w") as f:
                    json.dump(totals.snapshot(), f)
                os.replace(path + ".tmp", path)
                time.sleep(0.5)

    _once_the_engine_is_loaded(_phases, "phase-timers")

# With VLMSERVE_ENGINE_TRACE=PATH, the engine process records a torch.profiler trace (host and device) of
# engine steps VLMSERVE_ENGINE_TRACE_FROM (default 1000) to +VLMSERVE_ENGINE_TRACE_STEPS (default 40), counting
# only steps with VLMSERVE_ENGINE_TRACE_MIN_RUNNING (default 0) or more running requests, and writes it to
# PATH (Chrome trace JSON); benchmarks/trace_gaps.py reads where the device idled.
_trace_path = os.environ.get("VLMSERVE_ENGINE_TRACE")
if _trace_path and "--multiprocessing-fork" in sys.argv:

    def _trace() -> None:
        import torch
        from torch.profiler import ProfilerActivity, profile

        from vlmserve.engine.core import EngineCore

        first = int(os.environ.get("VLMSERVE_ENGINE_TRACE_FROM", "1000"))
        last = first + int(os.environ.get("VLMSERVE_ENGINE_TRACE_STEPS", "40"))
        # Count only steps with at least this many running requests (the load's full batch, not its warm-up).
        min_running = int(os.environ.get("VLMSERVE_ENGINE_TRACE_MIN_RUNNING", "0"))
        # Python stacks name the host's work but slow it down several times at a full batch: 0 leaves them out.
        with_stack = os.environ.get("VLMSERVE_ENGINE_TRACE_STACK", "1") != "0"
        step = EngineCore.step
        state = {"n": 0, "prof": None}
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])

        def traced(self, *a, **k):  # type: ignore[no-untyped-def]
            if state["prof"] is None and len(self.scheduler.running) < min_running:
                return step(self, *a, **k)
            state["n"] += 1
            if state["n"] == first:
                state["prof"] = profile(activities=activities, with_stack=with_stack)
                state["prof"].__enter__()
            try:
                return step(self, *a, **k)
            finally:
                if state["n"] == last and state["prof"] is not None:
                    state["prof"].__exit__(None, None, None)
                    state["prof"].export_chrome_trace(_trace_path)
                    if EngineCore.step is traced:  # unless another wrapper (the phase timers) went on top
                        EngineCore.step = step

        EngineCore.step = traced

    _once_the_engine_is_loaded(_trace, "engine-trace")

# With VLMSERVE_GC_LOG=DIR, every vlmserve process (the front and the engine) times Python's cyclic garbage
# collections by generation (before and after a gc.freeze) and rewrites DIR/gc-<pid>.json each second: count, total and longest pause.
_gc_dir = os.environ.get("VLMSERVE_GC_LOG")
if _gc_dir and ("serve" in sys.argv or "--multiprocessing-fork" in sys.argv):
    import gc
    import json
    import threading
    import time

    _gc_stats: dict = {}  # "gen<g>" (before any gc.freeze) or "gen<g>-frozen" (after): count, total, longest
    _gc_t0 = [0.0]
    _gc_long: list = []
    _gc_start = time.perf_counter()

    def _gc_timer(phase: str, info: dict) -> None:
        if phase == "start":
            _gc_t0[0] = time.perf_counter()
            return
        ms = 1000 * (time.perf_counter() - _gc_t0[0])
        key = f"gen{info['generation']}" + ("-frozen" if gc.get_freeze_count() else "")
        s = _gc_stats.setdefault(key, {"count": 0, "total_ms": 0.0, "max_ms": 0.0})
        s["count"] += 1
        s["total_ms"] += ms
        s["max_ms"] = max(s["max_ms"], ms)
        if ms > 5:  # (seconds since the process started, generation, ms), to place it before or in a load
            _gc_long.append((round(time.perf_counter() - _gc_start, 2), info["generation"], round(ms, 1)))

    gc.callbacks.append(_gc_timer)

    def _gc_dump() -> None:
        path = os.path.join(_gc_dir, f"gc-{os.getpid()}.json")
        while True:
            time.sleep(1.0)
            with open(path + ".tmp", "w") as f:
                json.dump(
                    {
                        "argv": sys.argv[:3],
                        "frozen": gc.get_freeze_count(),
                        "stats": _gc_stats,
                        "long": _gc_long,
                        "at_s": round(time.perf_counter() - _gc_start, 1),
                    },
                    f,
                )
            os.replace(path + ".tmp", path)

    threading.Thread(target=_gc_dump, name="gc-log", daemon=True).start()
