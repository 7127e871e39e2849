"""The model `vlmserve serve` and `LLM()` use when none is named: the demo model shipped inside the package.

A small Qwen2.5-VL trained on generated images of shapes (docs/DEMO_MODEL.md): it runs through exactly the
code a released checkpoint does and needs no download. It names the colour, shape, count and position of
what it sees (held-out accuracy in the README), so a fresh machine has something real to serve and the tests
can tell a broken image path from a working one.
"""

from __future__ import annotations

from pathlib import Path

PACKAGED = Path(__file__).parent / "demo_model"


def demo_checkpoint() -> Path:
    if not (PACKAGED / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"the demo model is missing from {PACKAGED}; reinstall vlmserve, or name a checkpoint"
        )
    return PACKAGED
