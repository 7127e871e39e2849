"""The `vlmserve` command: one subcommand per function, flags with the names vLLM users already type.

    vlmserve serve [MODEL_SOURCE] --model-id NAME --host 127.0.0.1 --port 8000 --max-model-len 4096 ...

Engine flags are generated from `EngineArgs` (config.py), so each field has exactly one flag, named like the
field (`max_num_seqs` -> `--max-num-seqs`), and only the flags given on the command line reach EngineArgs (its
defaults stay the single source of defaults). Flag errors exit with status 2 and name the flag; a model
that cannot be loaded exits with status 1 and says why. To add a subcommand, write `_add_<name>(subparsers)`
that registers its flags and `set_defaults(handler=...)`, and list it in `SUBCOMMANDS`.

Does not know: how engines, apps or servers work inside (api/server.py, api/serving.py do).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from vlmserve import __version__, envs
from vlmserve.config import EngineArgs

logger = logging.getLogger("vlmserve")

# Flags that differ from the field name (vLLM has two names for the served model id).
_FLAG_NAMES: dict[str, tuple[str, ...]] = {
    "served_model_name": ("--served-model-name", "--model-id"),
    "quantization": ("--quantization", "-q"),
}
_LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
# MediaConfig field -> the flag that sets it, to name the flag in MediaConfig's errors.
_MEDIA_FLAGS = {
    "allowed_local_media_path": "--allowed-local-media-path",
    "allowed_media_domains": "--allowed-media-domains",
    "fetch_timeout_s": "--media-fetch-timeout",
}


def _flags(field: str) -> tuple[str, ...]:
    return _FLAG_NAMES.get(field, ("--" + field.replace("_", "-"),))


def _integer(value: str) -> int:
    # argparse reports a ValueError from a type function under the function's name; say what was wrong.
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an integer") from None


def _port(value: str) -> int:
    port = _integer(value)
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a TCP port (0-65535)")
    return port


def _positive_int(value: str) -> int:
    number = _integer(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return number


def _positive_float(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if not number > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return number


def _flag_kind(annotation: Any) -> tuple[Callable[[str], Any] | None, list[str] | None]:
    """(argparse type, choices) for an EngineArgs field type; (None, None) means a boolean switch."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        annotation = args[0]
    if annotation is bool:
        return None, None
    if typing.get_origin(annotation) is typing.Literal:
        return str, [str(a) for a in typing.get_args(annotation)]
    if annotation in (int, float, str):
        return annotation, None
    # dicts (limit_mm_per_prompt, mm_processor_kwargs): a JSON string, parsed and checked by EngineArgs.
    return str, None


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """One flag per EngineArgs field (except the positional model); defaults stay EngineArgs'."""
    group = parser.add_argument_group("engine options (EngineArgs; vLLM names)")
    for name, field in EngineArgs.model_fields.items():
        if name == "model":
            continue
        kind, choices = _flag_kind(field.annotation)
        default = field.get_default(call_default_factory=True)
        shown = json.dumps(default) if isinstance(default, dict) else default
        help_text = field.description or name.replace("_", " ")
        if default is not None:
            help_text += f" (default: {shown})"
        if kind is None:
            group.add_argument(
                *_flags(name),
                dest=name,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=help_text,
            )
        else:
            group.add_argument(
                *_flags(name),
                dest=name,
                type=kind,
                choices=choices,
                default=argparse.SUPPRESS,
                metavar=None if choices else name.upper(),
                help=help_text,
            )


def engine_args_from(args: argparse.Namespace, parser: argparse.ArgumentParser) -> EngineArgs:
    """EngineArgs from the flags that were given; a validation error exits 2 naming the flag."""
    given = {name: getattr(args, name) for name in EngineArgs.model_fields if hasattr(args, name)}
    try:
        return EngineArgs(**given)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            field = str(err["loc"][0]) if err["loc"] else ""
            flag = "/".join(_flags(field)) if field in EngineArgs.model_fields else "arguments"
            message = str(err["msg"]).removeprefix("Value error, ")
            problems.append(f"argument {flag}: {message} (got {err.get('input')!r})")
        parser.error("; ".join(problems))


# ------------------------------------------------------------------------------------------ serve


def _add_serve(subparsers: argparse._SubParsersAction) -> None:
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
    http.add_argument("--port", type=_port, default=8000, help="(default: %(default)s)")
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
        type=_positive_int,
        default=None,
        metavar="BYTES",
        help="largest request body accepted, base64 images included (default: 64 MiB)",
    )
    http.add_argument(
        "--body-read-timeout",
        type=_positive_float,
        default=None,
        metavar="SECONDS",
        help="answer 408 when a client sends no part of its request body for this long (default: 30)",
    )
    http.add_argument(
        "--timeout-graceful-shutdown",
        type=_positive_float,
        default=30.0,
        metavar="SECONDS",
        help="seconds SIGTERM waits for in-flight requests and streams before closing them "
        "(default: %(default)s)",
    )
    http.add_argument("--log-level", choices=_LOG_LEVELS, default="info", help="(default: %(default)s)")
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
        type=_positive_float,
        default=None,
        metavar="SECONDS",
        help="seconds to connect to / read from an image server (default: 10)",
    )
    add_engine_args(p)
    p.set_defaults(handler=serve, parser=p)


def _api_keys(flag_values: list[str] | None) -> list[str]:
    raw = flag_values if flag_values is not None else [envs.VLMSERVE_API_KEY or ""]
    return [key.strip() for value in raw for key in value.split(",") if key.strip()]


def serve(args: argparse.Namespace) -> int:
    from vlmserve.memory import limit_malloc_arenas

    limit_malloc_arenas()  # first: arenas made before the cap are not limited by it
    from vlmserve.api.middleware import DEFAULT_BODY_READ_TIMEOUT_S, DEFAULT_MAX_REQUEST_BODY_BYTES
    from vlmserve.api.server import build_app, run_server
    from vlmserve.api.serving import ModelServer
    from vlmserve.llm import build_engine_config
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
        api_keys=_api_keys(args.api_key),
        max_request_body_bytes=args.max_request_body_bytes or DEFAULT_MAX_REQUEST_BODY_BYTES,
        body_read_timeout=args.body_read_timeout or DEFAULT_BODY_READ_TIMEOUT_S,
        playground=args.playground,
    )
    logger.info("serving model id %r at http://%s:%d/v1", server.model_id, args.host, args.port)
    run_server(
        app,
        args.host,
        args.port,
        log_level=args.log_level,
        timeout_graceful_shutdown=args.timeout_graceful_shutdown,
    )
    return 0


# ------------------------------------------------------------------------------------------ run-batch


def _add_run_batch(subparsers: argparse._SubParsersAction) -> None:
    from vlmserve.api import batch

    p = batch.add_parser(subparsers, add_engine_args)
    p.set_defaults(handler=run_batch, parser=p)


def run_batch(args: argparse.Namespace) -> int:
    from vlmserve.api import batch

    engine_args = None
    if args.url is None:
        model = args.model_source or args.model_flag
        if model is not None:
            args.model = model
        engine_args = engine_args_from(args, args.parser)
    return batch.main(args, engine_args)


# ------------------------------------------------------------------------------------------ run / status / shutdown (Ray Serve)


def _add_run(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "run",
        help="deploy on Ray Serve: a built app (module:app) or a Serve YAML file",
        description="Deploy on Ray Serve. TARGET is a Serve YAML file (applications: [{name, route_prefix, "
        "import_path: vlmserve:build_openai_app, args: {llm_configs: [...]}}]) or module:app, an application "
        "built with vlmserve.build_openai_app. Without --address, starts a local Ray cluster (or reuses the "
        "one an earlier `vlmserve run` started).",
    )
    p.add_argument("target", metavar="TARGET", help="config.yaml or module:app (e.g. serve_qwen_VL:app)")
    p.add_argument(
        "--non-blocking",
        action="store_true",
        help="return once the applications are RUNNING and leave them serving (stop: vlmserve shutdown -y)",
    )
    p.add_argument(
        "--address", default=None, metavar="HOST:PORT", help="join this Ray cluster instead of a local one"
    )
    p.add_argument(
        "--host", default=None, help="HTTP address (default: the file's http_options.host, else 127.0.0.1)"
    )
    p.add_argument(
        "--port",
        type=_port,
        default=None,
        help="HTTP port (default: the file's http_options.port, else 8000)",
    )
    p.add_argument(
        "--num-cpus",
        type=_positive_int,
        default=None,
        help="CPUs of a local cluster started here (default: this machine's cores)",
    )
    p.set_defaults(handler=run, parser=p)


def run(args: argparse.Namespace) -> int:
    from vlmserve.deploy import cluster

    try:
        return cluster.run(
            args.target,
            address=args.address,
            non_blocking=args.non_blocking,
            host=args.host,
            port=args.port,
            num_cpus=args.num_cpus,
            record_path=cluster.default_record_path(),
        )
    except (RuntimeError, ValueError) as e:  # ClusterError, config errors, a failed deployment
        print(f"vlmserve run: error: {e}", file=sys.stderr)
        return 1


def _add_status(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("status", help="show the Ray Serve applications and their replicas")
    p.add_argument(
        "--address", default=None, metavar="HOST:PORT", help="(default: the cluster `vlmserve run` started)"
    )
    p.set_defaults(handler=status, parser=p)


def status(args: argparse.Namespace) -> int:
    from vlmserve.deploy import cluster

    try:
        return cluster.status(address=args.address, record_path=cluster.default_record_path())
    except RuntimeError as e:
        print(f"vlmserve status: error: {e}", file=sys.stderr)
        return 1


def _add_shutdown(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "shutdown", help="stop the Ray Serve applications and the local Ray cluster `vlmserve run` started"
    )
    p.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")
    p.add_argument(
        "--address", default=None, metavar="HOST:PORT", help="(default: the cluster `vlmserve run` started)"
    )
    p.set_defaults(handler=shutdown, parser=p)


def shutdown(args: argparse.Namespace) -> int:
    from vlmserve.deploy import cluster

    try:
        return cluster.shutdown(address=args.address, yes=args.yes, record_path=cluster.default_record_path())
    except RuntimeError as e:
        print(f"vlmserve shutdown: error: {e}", file=sys.stderr)
        return 1


# ------------------------------------------------------------------------------------------ bench


def _image_sizes(value: str) -> list[tuple[int, int]]:
    """'640x480' or '640x480,448x448' -> [(640, 480), (448, 448)]."""
    sizes = []
    for item in value.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", item)
        if match is None or min(int(match[1]), int(match[2])) < 1:
            raise argparse.ArgumentTypeError(f"{item!r} is not WIDTHxHEIGHT in pixels, e.g. 640x480")
        sizes.append((int(match[1]), int(match[2])))
    return sizes


def _non_negative_int(value: str) -> int:
    number = _integer(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return number


def _add_bench(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "bench",
        help="benchmark an OpenAI-compatible server (vlmserve, vLLM, Ray Serve LLM) with image + text requests",
        description="Send synthetic streamed requests (random JPEG images as data URLs, prompts of random "
        "words) to an OpenAI-compatible server and report request / token throughput and TTFT, TPOT, ITL and "
        "end-to-end latency (mean, p50, p90, p99). Exit status 1 when any request failed.",
    )
    target = p.add_argument_group("server")
    target.add_argument(
        "--base-url", default="http://127.0.0.1:8000/v1", help="the API's base URL (default: %(default)s)"
    )
    target.add_argument("--model", required=True, help="the served model id (GET /v1/models lists them)")
    target.add_argument(
        "--api-key",
        default=None,
        metavar="KEY",
        help="sent as 'Authorization: Bearer KEY' (default: the first key of $VLMSERVE_API_KEY, if set)",
    )
    target.add_argument(
        "--endpoint",
        choices=("chat", "completions"),
        default="chat",
        help="/v1/chat/completions or /v1/completions (text only) (default: %(default)s)",
    )
    load = p.add_argument_group("load")
    load.add_argument("--num-requests", type=_positive_int, default=64, help="(default: %(default)s)")
    rate = load.add_mutually_exclusive_group()
    rate.add_argument(
        "--concurrency",
        type=_positive_int,
        default=8,
        help="closed loop: this many requests in flight, each sent when another finished (default: %(default)s)",
    )
    rate.add_argument(
        "--request-rate",
        type=_positive_float,
        default=None,
        metavar="REQ_PER_S",
        help="open loop: Poisson arrivals at this mean rate, however many are in flight",
    )
    load.add_argument(
        "--num-clients",
        type=_positive_int,
        default=1,
        help="client processes to spread the load over, when one client cannot keep up with the server "
        "(the report says when a client process was busy most of the run) (default: %(default)s)",
    )
    load.add_argument(
        "--warmup",
        type=_non_negative_int,
        default=4,
        help="requests sent first and left out of the statistics (default: %(default)s)",
    )
    load.add_argument(
        "--duration-limit",
        type=_positive_float,
        default=120.0,
        metavar="SECONDS",
        help="stop issuing requests after this long; those in flight finish (default: %(default)s)",
    )
    load.add_argument(
        "--request-timeout",
        type=_positive_float,
        default=600.0,
        metavar="SECONDS",
        help="a request not finished by then counts as failed (default: %(default)s)",
    )
    load.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of images, prompts and arrivals; a run with the same seed sends the same requests, which a "
        "server still up from the last run answers from its prefix cache (default: 0)",
    )
    data = p.add_argument_group("requests")
    data.add_argument(
        "--image-size",
        type=_image_sizes,
        action="append",
        default=None,
        metavar="WxH[,WxH...]",
        help="image sizes, used in turn; repeat or comma-separate (default: 640x480)",
    )
    data.add_argument(
        "--images-per-request",
        type=_non_negative_int,
        default=None,
        help="(default: 1 for chat, 0 for completions)",
    )
    data.add_argument(
        "--same-image",
        action="store_true",
        help="send one image in every request (measures image / prefix caches); default: distinct images",
    )
    data.add_argument(
        "--image-pool",
        type=_non_negative_int,
        default=0,
        metavar="N",
        help="draw every image at random from N distinct ones (a workload that repeats images, e.g. for "
        "image-aware routing over replicas); default 0: distinct images",
    )
    data.add_argument(
        "--prompt-words", type=_non_negative_int, default=16, help="random words per prompt (default: 16)"
    )
    data.add_argument(
        "--output-len", type=_positive_int, default=64, help="max_tokens of each request (default: 64)"
    )
    data.add_argument(
        "--ignore-eos",
        action="store_true",
        help="generate exactly --output-len tokens (vLLM's ignore_eos and min_tokens request fields)",
    )
    out = p.add_argument_group("output")
    out.add_argument(
        "--json", type=Path, default=None, metavar="PATH", help="write metrics and per-request timings"
    )
    out.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=bench, parser=p)


def bench(args: argparse.Namespace) -> int:
    from vlmserve.bench.serving import BenchConfig, run

    parser: argparse.ArgumentParser = args.parser
    images = args.images_per_request
    if images is None:
        images = 1 if args.endpoint == "chat" else 0
    sizes = [size for group in args.image_size for size in group] if args.image_size else None
    api_keys = _api_keys([args.api_key] if args.api_key else None)
    try:
        config = BenchConfig(
            base_url=args.base_url,
            model=args.model,
            api_key=api_keys[0] if api_keys else None,
            endpoint=args.endpoint,
            num_requests=args.num_requests,
            concurrency=args.concurrency if args.request_rate is None else None,
            request_rate=args.request_rate,
            **({"image_sizes": tuple(sizes)} if sizes else {}),
            images_per_request=images,
            same_image=args.same_image,
            image_pool=args.image_pool,
            prompt_words=args.prompt_words,
            output_len=args.output_len,
            ignore_eos=args.ignore_eos,
            warmup=args.warmup,
            duration_limit_s=args.duration_limit,
            request_timeout_s=args.request_timeout,
            seed=args.seed,
            num_clients=args.num_clients,
        )
    except ValueError as e:
        # BenchConfig names its fields; the user typed flags.
        fields = re.compile(r"\b(" + "|".join(_BENCH_FLAGS) + r")\b")
        parser.error(fields.sub(lambda m: _BENCH_FLAGS[m[1]], str(e)))
    return run(config, json_path=args.json, progress=not args.no_progress)


_BENCH_FLAGS = {
    "num_requests": "--num-requests",
    "concurrency": "--concurrency",
    "request_rate": "--request-rate",
    "endpoint": "--endpoint",
    "image_sizes": "--image-size",
    "images_per_request": "--images-per-request",
    "prompt_words": "--prompt-words",
    "output_len": "--output-len",
    "warmup": "--warmup",
    "num_clients": "--num-clients",
}


# ------------------------------------------------------------------------------------------ entry point

SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_serve,
    _add_run_batch,
    _add_run,
    _add_status,
    _add_shutdown,
    _add_bench,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vlmserve", description="Serve vision-language models behind an OpenAI-compatible API."
    )
    parser.add_argument("--version", action="version", version=f"vlmserve {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
