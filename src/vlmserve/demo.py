"""The model `vlmserve serve` uses when none is named: needs no download.

Until a trained demo checkpoint ships inside the package, this is a tiny random-weight Qwen2.5-VL written
once into the cache directory by the project's own generator (it answers in gibberish, through the real
code path).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from vlmserve import envs

PACKAGED = Path(__file__).parent / "demo_model"


def demo_checkpoint() -> Path:
    if (PACKAGED / "config.json").is_file():
        return PACKAGED
    from vlmserve.testing.checkpoint import write_checkpoint

    out = envs.VLMSERVE_CACHE_DIR / "demo-random-tiny"
    if not (out / "model.safetensors").is_file():
        # Written aside, then renamed into place: several processes (Ray replicas) may race here.
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".demo-"))
        write_checkpoint(tmp, preset="tiny", seed=0)
        try:
            tmp.rename(out)
        except OSError:  # another process won the race; its checkpoint is identical
            shutil.rmtree(tmp, ignore_errors=True)
    return out
