"""vlmserve: serve vision-language models behind an OpenAI-compatible API.

Public names are imported lazily, so `import vlmserve` (and the CLI) stays cheap until one is used.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "LLM": "vlmserve.llm",
    "SamplingParams": "vlmserve.engine.sampling_params",
    "StructuredOutputsParams": "vlmserve.engine.sampling_params",
    "EngineArgs": "vlmserve.config",
    "LLMConfig": "vlmserve.deploy.config",
    "build_openai_app": "vlmserve.deploy.builder",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'vlmserve' has no attribute {name!r}")
