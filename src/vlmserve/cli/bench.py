"""`vlmserve bench`: load a running server with chat or completion requests and report latency and
throughput (bench/serving.py does the measuring; this module maps flags onto BenchConfig and its errors
back onto the flags).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

from vlmserve.cli.engine_args import integer, positive_float, positive_int
from vlmserve.cli.serve import api_keys


def _image_sizes(value: str) -> list[tuple[int, int]]:
    """'640x480' or '640x480,448x448' -> [(640, 480), (448, 448)]."""
    sizes = []
    for item in value.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", item)
        if match is None or min(int(match[1]), int(match[2])) < 1:
            raise argparse.ArgumentTypeError(f"{item!r} is not WIDTHxHEIGHT in pixels, e.g. 640x480")
        sizes.append((int(match[1]), int(match[2])))
    return sizes


def non_negative_int(value: str) -> int:
    number = integer(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return number


def add_parser(subparsers: argparse._SubParsersAction) -> None:
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
    load.add_argument("--num-requests", type=positive_int, default=64, help="(default: %(default)s)")
    rate = load.add_mutually_exclusive_group()
    rate.add_argument(
        "--concurrency",
        type=positive_int,
        default=8,
        help="closed loop: this many requests in flight, each sent when another finished (default: %(default)s)",
    )
    rate.add_argument(
        "--request-rate",
        type=positive_float,
        default=None,
        metavar="REQ_PER_S",
        help="open loop: Poisson arrivals at this mean rate, however many are in flight",
    )
    load.add_argument(
        "--num-clients",
        type=positive_int,
        default=1,
        help="client processes to spread the load over, when one client cannot keep up with the server "
        "(the report says when a client process was busy most of the run) (default: %(default)s)",
    )
    load.add_argument(
        "--warmup",
        type=non_negative_int,
        default=4,
        help="requests sent first and left out of the statistics (default: %(default)s)",
    )
    load.add_argument(
        "--duration-limit",
        type=positive_float,
        default=120.0,
        metavar="SECONDS",
        help="stop issuing requests after this long; those in flight finish (default: %(default)s)",
    )
    load.add_argument(
        "--request-timeout",
        type=positive_float,
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
        type=non_negative_int,
        default=None,
        help="(default: 1 for chat, 0 for completions)",
    )
    data.add_argument(
        "--same-image",
        action="store_true",
        help="send one image in every request (measures image / prefix caches); default: distinct images",
    )
    data.add_argument(
        "--prompt-words", type=non_negative_int, default=16, help="random words per prompt (default: 16)"
    )
    data.add_argument(
        "--output-len", type=positive_int, default=64, help="max_tokens of each request (default: 64)"
    )
    data.add_argument(
        "--ignore-eos",
        action="store_true",
        help="generate exactly --output-len tokens (vLLM's ignore_eos and min_tokens request fields)",
    )
    data.add_argument(
        "--image-pool",
        type=non_negative_int,
        default=0,
        metavar="N",
        help="draw every image at random from N distinct ones (a workload that repeats images, e.g. for "
        "image-aware routing over replicas); default 0: distinct images",
    )
    data.add_argument(
        "--json-schema",
        type=_json_schema_arg,
        default=None,
        metavar="FILE|JSON",
        help="ask for output following this JSON schema (response_format json_schema): a file or inline JSON",
    )
    out = p.add_argument_group("output")
    out.add_argument(
        "--json", type=Path, default=None, metavar="PATH", help="write metrics and per-request timings"
    )
    out.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=bench, parser=p)


def _json_schema_arg(value: str) -> dict[str, Any]:
    """--json-schema: inline JSON when it starts with '{', else a file holding it."""
    try:
        text = value if value.lstrip().startswith("{") else Path(value).read_text()
        schema = json.loads(text)
    except (OSError, json.JSONDecodeError) as e:
        raise argparse.ArgumentTypeError(f"not a JSON schema file or inline JSON object: {e}") from None
    if not isinstance(schema, dict):
        raise argparse.ArgumentTypeError(f"a JSON schema is an object, got {type(schema).__name__}")
    return schema


def bench(args: argparse.Namespace) -> int:
    from vlmserve.bench.serving import BenchConfig, run

    parser: argparse.ArgumentParser = args.parser
    images = args.images_per_request
    if images is None:
        images = 1 if args.endpoint == "chat" else 0
    sizes = [size for group in args.image_size for size in group] if args.image_size else None
    keys = api_keys([args.api_key] if args.api_key else None)
    try:
        config = BenchConfig(
            base_url=args.base_url,
            model=args.model,
            api_key=keys[0] if keys else None,
            endpoint=args.endpoint,
            num_requests=args.num_requests,
            concurrency=args.concurrency if args.request_rate is None else None,
            request_rate=args.request_rate,
            **({"image_sizes": tuple(sizes)} if sizes else {}),
            images_per_request=images,
            same_image=args.same_image,
            prompt_words=args.prompt_words,
            output_len=args.output_len,
            ignore_eos=args.ignore_eos,
            warmup=args.warmup,
            duration_limit_s=args.duration_limit,
            request_timeout_s=args.request_timeout,
            seed=args.seed,
            num_clients=args.num_clients,
            json_schema=args.json_schema,
            image_pool=args.image_pool,
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
