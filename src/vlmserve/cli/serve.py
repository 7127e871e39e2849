"""`vlmserve serve`: one model behind the OpenAI-compatible HTTP API (api/server.py), in this process.

Flag errors exit with status 2 and name the flag; a model that cannot be loaded exits with status 1 and says
why. Does not know: how the app or the engine work inside (api/server.py, api/serving.py).
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path
from typing import Any

from vlmserve import envs
from vlmserve.cli.engine_args import add_engine_args, engine_args_from, port, positive_float, positive_int

logger = logging.getLogger("vlmserve")

LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
# MediaConfig field -> the flag that sets it, to name the flag in MediaConfig's errors.
_MEDIA_FLAGS = {
    "allowed_local_media_path": "--allowed-local-media-path",
    "allowed_media_domains": "--allowed-media-domains",
    "fetch_timeout_s": "--media-fetch-timeout",
}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve a model behind an OpenAI-compatible HTTP API",
        description="Serve a Qwen2.5-VL model behind an OpenAI-compatible API (/v1/chat/completions, "
        "/v1/completions, /v1/models, /health, /metrics, /version).",
    )
    p.add_argument(
        "model_source",
        nargs="?",
        default=None,
        metavar="MODEL_SOURCE",
        help="checkpoint directory or Hugging Face repo id; 'demo' (the default) is the small demo model "
        "shipped in the package: it answers about the shapes, colours, counts and positions of objects in an image, "
        "with no download",
    )
    p.add_argument(
        "--model",
        dest="model_flag",
        default=None,
        metavar="MODEL_SOURCE",
        help="same as MODEL_SOURCE (vLLM's flag)",
    )
    http = p.add_argument_group("HTTP server")
    http.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on; 0.0.0.0 for all interfaces (default: %(default)s)",
    )
    http.add_argument("--port", type=port, default=8000, help="(default: %(default)s)")
    http.add_argument(
        "--api-key",
        action="append",
        default=None,
        metavar="KEY",
        help="require 'Authorization: Bearer KEY' on /v1 routes; repeat or comma-separate for several keys "
        "(default: $VLMSERVE_API_KEY; unset: no key needed)",
    )
    http.add_argument(
        "--max-request-body-bytes",
        type=positive_int,
        default=None,
        metavar="BYTES",
        help="largest request body accepted, base64 images included (default: 64 MiB)",
    )
    http.add_argument(
        "--body-read-timeout",
        type=positive_float,
        default=None,
        metavar="SECONDS",
        help="answer 408 when a client sends no part of its request body for this long (default: 30)",
    )
    http.add_argument(
        "--timeout-graceful-shutdown",
        type=positive_float,
        default=30.0,
        metavar="SECONDS",
        help="seconds SIGTERM waits for in-flight requests and streams before closing them "
        "(default: %(default)s)",
    )
    http.add_argument("--log-level", choices=LOG_LEVELS, default="info", help="(default: %(default)s)")
    http.add_argument(
        "--no-playground",
        dest="playground",
        action="store_false",
        help="do not serve the playground page at / (drop or paste an image, ask, watch the answer stream)",
    )
    media = p.add_argument_group("image inputs")
    media.add_argument(
        "--allowed-local-media-path",
        default=None,
        metavar="DIR",
        help="allow images given as local paths / file:// URLs inside DIR (default: refused)",
    )
    media.add_argument(
        "--allowed-media-domains",
        nargs="+",
        default=(),
        metavar="HOST",
        help="hosts (or *.suffix) whose image URLs may be fetched even if they resolve to private addresses",
    )
    media.add_argument(
        "--allow-private-network",
        action="store_true",
        help="fetch image URLs from any address, private networks included (turns the SSRF guard off)",
    )
    media.add_argument(
        "--media-fetch-timeout",
        type=positive_float,
        default=None,
        metavar="SECONDS",
        help="seconds to connect to / read from an image server (default: 10)",
    )
    add_engine_args(p)
    p.set_defaults(handler=serve, parser=p)


def api_keys(flag_values: list[str] | None) -> list[str]:
    """--api-key values (each may hold several, comma-separated), else VLMSERVE_API_KEY's."""
    raw = flag_values if flag_values is not None else [envs.VLMSERVE_API_KEY or ""]
    return [key.strip() for value in raw for key in value.split(",") if key.strip()]


def serve(args: argparse.Namespace) -> int:
    from vlmserve.memory import freeze_startup_heap, limit_malloc_arenas

    limit_malloc_arenas()  # first: arenas made before the cap are not limited by it
    from vlmserve.api.middleware import DEFAULT_BODY_READ_TIMEOUT_S, DEFAULT_MAX_REQUEST_BODY_BYTES
    from vlmserve.api.server import build_app, run_server
    from vlmserve.api.serving import ModelServer
    from vlmserve.engine.build_config import build_engine_config
    from vlmserve.media import MediaConfig
    from vlmserve.models.loader import CheckpointError

    parser: argparse.ArgumentParser = args.parser
    if args.model_source and args.model_flag and args.model_source != args.model_flag:
        parser.error(f"MODEL_SOURCE {args.model_source!r} and --model {args.model_flag!r} disagree; give one")
    model = args.model_source or args.model_flag
    if model is not None:
        args.model = model
    engine_args = engine_args_from(args, parser)
    media_kwargs: dict[str, Any] = {
        "allowed_media_domains": tuple(args.allowed_media_domains),
        "allow_private_network": args.allow_private_network,
    }
    if args.allowed_local_media_path is not None:
        root = Path(args.allowed_local_media_path).expanduser().resolve()
        if not root.is_dir():
            parser.error(f"argument --allowed-local-media-path: {root} is not an existing directory")
        media_kwargs["allowed_local_media_path"] = root
    if args.media_fetch_timeout is not None:
        media_kwargs["fetch_timeout_s"] = args.media_fetch_timeout
    try:
        media_config = MediaConfig(**media_kwargs)
    except ValueError as e:
        field = re.search(r"MediaConfig\.(\w+)", str(e))
        flag = _MEDIA_FLAGS.get(field.group(1), "image input flags") if field else "image input flags"
        parser.error(f"argument {flag}: {e}")

    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        config = build_engine_config(engine_args)
    except CheckpointError as e:
        print(f"vlmserve serve: error: cannot load the model: {e}", file=sys.stderr)
        return 1
    except ValueError as e:
        parser.error(str(e))
    logger.info("loading %s from %s", config.served_model_name, config.model_path)
    try:
        server = ModelServer.from_config(config, media_config)
    except (OSError, ValueError) as e:
        print(f"vlmserve serve: error: cannot start the engine: {e}", file=sys.stderr)
        return 1
    app = build_app(
        server,
        api_keys=api_keys(args.api_key),
        max_request_body_bytes=args.max_request_body_bytes or DEFAULT_MAX_REQUEST_BODY_BYTES,
        body_read_timeout=args.body_read_timeout or DEFAULT_BODY_READ_TIMEOUT_S,
        playground=args.playground,
    )
    # The engine is loaded and the app built: what lives now lives to the end (memory.py).
    frozen = freeze_startup_heap()
    logger.info("froze %d startup objects out of the garbage collector's full collections", frozen)
    logger.info("serving model id %r at http://%s:%d/v1", server.model_id, args.host, args.port)
    run_server(
        app,
        args.host,
        args.port,
        log_level=args.log_level,
        timeout_graceful_shutdown=args.timeout_graceful_shutdown,
    )
    return 0
