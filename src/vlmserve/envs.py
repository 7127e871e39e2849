"""Every environment variable vlmserve reads, in one place, typed. Nothing else reads os.environ.

(huggingface_hub reads its own: HF_TOKEN, HF_HOME, HF_HUB_OFFLINE.)
"""

from __future__ import annotations

import os
from pathlib import Path


def _float(name: str, default: float) -> float:
    value = os.environ.get(name)
    return default if value in (None, "") else float(value)


def _count(name: str) -> int | None:
    """A whole number >= 1; None when unset."""
    value = os.environ.get(name, "")
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")
    return int(value)


def _path(name: str, default: Path) -> Path:
    value = os.environ.get(name)
    return default if not value else Path(value).expanduser()


# KV cache size on CPU when neither kv_cache_memory_gb nor num_kv_blocks is given.
VLMSERVE_CPU_KV_CACHE_GB: float = _float("VLMSERVE_CPU_KV_CACHE_GB", 1.0)
# Where vlmserve keeps its state (the Ray cluster `vlmserve run` started).
VLMSERVE_CACHE_DIR: Path = _path("VLMSERVE_CACHE_DIR", Path.home() / ".cache" / "vlmserve")
# API keys (comma-separated) when --api-key is not given; unset: any bearer token is accepted.
VLMSERVE_API_KEY: str | None = os.environ.get("VLMSERVE_API_KEY") or None
# Set by the operator: then vlmserve leaves glibc's malloc arenas as configured (memory.py).
MALLOC_ARENA_MAX_SET: bool = bool(os.environ.get("MALLOC_ARENA_MAX"))
# Threads of llguidance's pool that fills structured outputs' masks; unset: min(4, CPUs) (engine/structured.py).
VLMSERVE_MASK_FILL_THREADS: int | None = _count("VLMSERVE_MASK_FILL_THREADS")
