"""The OpenAI-compatible HTTP layer: `build_app(ModelServer.from_engine_args(EngineArgs(...)))` is a FastAPI app
serving /v1/chat/completions, /v1/completions, /v1/models, /health, /version and /metrics."""

from vlmserve.api.server import build_app, run_server
from vlmserve.api.serving import ModelServer

__all__ = ["ModelServer", "build_app", "run_server"]
