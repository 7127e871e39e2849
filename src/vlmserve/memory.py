"""Process-wide memory settings for a long-running server."""

from __future__ import annotations

import ctypes
import sys

from vlmserve import envs

_M_ARENA_MAX = -8  # mallopt parameter number, from glibc's malloc.h


def limit_malloc_arenas(arenas: int = 2) -> bool:
    """Cap glibc's malloc arenas, as MALLOC_ARENA_MAX does; returns whether the cap was set.

    glibc gives threads that allocate at the same time arenas of their own (up to 8 per core). A server's
    threads (the event loop, the workers that decode images and tokenize, the engine loop) allocate buffers
    of ever-changing sizes, and memory freed in one arena cannot serve another, so resident memory creeps up
    under steady load: ~0.6 MiB a minute in the soak (RELIABILITY.md), flat with two arenas. Call it before
    other threads allocate (arenas that exist already stay); calling it again is harmless. Left alone where
    the operator set MALLOC_ARENA_MAX, and where the C library is not glibc.
    """
    if envs.MALLOC_ARENA_MAX_SET or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # musl and other C libraries
        return False
    return bool(mallopt(_M_ARENA_MAX, arenas))


def freeze_startup_heap() -> int:
    """Collect, then move every object alive now out of the cyclic garbage collector's reach (`gc.freeze`);
    returns how many were frozen. Called once a serving process has started (model loaded, app built): by
    `vlmserve serve`, a Ray replica, the engine process and its tensor-parallel workers; a library user's
    own process is left alone.

    A server keeps hundreds of thousands of objects from startup to exit (torch and its modules, the model,
    the tokenizer, the app's routes and models). Every full collection walks them all, and the process stops
    meanwhile: on the 2-core machine with the small bench model, 120-200 ms pauses in the engine process
    (every stream's next token waits) and in the front (no stream is written, the engine's reports pile up).
    Frozen, they are left out: a full collection walks only what serving created since. Frozen objects that
    die later are still freed by reference counting; only cycles among them are kept.
    """
    import gc

    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
