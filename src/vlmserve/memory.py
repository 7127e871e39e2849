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
