"""`vlmserve run-batch`: OpenAI's batch input format (JSONL) in, one result line per request out, as
`vllm run-batch` does.

Each input line is `{"custom_id": "...", "method": "POST", "url": "/v1/chat/completions" | "/v1/responses" |
"/v1/completions", "body": {...}}`. Each output line is OpenAI's batch output:

    {"id": "batch_req_...", "custom_id": "...", "response": {"status_code": 200, "request_id": "...",
     "body": {...}}, "error": null}

A request the API refuses keeps its status and error body in `response` (as OpenAI's batch output does); a line
that is no request at all (not JSON, a missing field, an unknown url, a repeated custom_id) gets `response:
null` and an `error` naming the line. Neither stops the job.

The requests go through the very routes `vlmserve serve` answers (the app of api/server.py, called in process
through ASGI), or, with `--url`, to a running server: a `vlmserve serve` or a Ray Serve app, whose ingress
spreads them over the model's replicas. Memory stays bounded on large files: the input is streamed, at most
`max_concurrency` requests are in flight, and each result is written (and flushed) as it arrives, so results
may come out of input order. The job is resumable: a rerun skips every custom_id (and every bad line) the
output file already holds, and appends.

Does not know: how the routes answer (server.py and the route modules), how engines are built.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm

logger = logging.getLogger(__name__)

URLS = ("/v1/chat/completions", "/v1/responses", "/v1/completions")
DEFAULT_MAX_CONCURRENCY = 64


@dataclass(frozen=True)
class BatchRequest:
    line: int  # 1-based line number in the input file
    custom_id: str
    url: str
    body: dict[str, Any]


@dataclass(frozen=True)
class BadLine:
    line: int
    custom_id: str | None
    message: str


@dataclass
class BatchSummary:
    total: int = 0  # request lines in the input (blank lines not counted)
    skipped: int = 0  # already in the output file
    succeeded: int = 0
    failed: int = 0  # a status other than 200, or a bad line
    done_ids: set[str] = field(default_factory=set, repr=False)


def parse_line(number: int, text: str) -> BatchRequest | BadLine:
    """One input line as a request, or what is wrong with it."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        return BadLine(number, None, f"line {number} is not valid JSON: {e}")
    if not isinstance(data, dict):
        return BadLine(number, None, f"line {number} is not a JSON object")
    custom_id = data.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return BadLine(number, None, f"line {number} has no 'custom_id' (a non-empty string)")
    method = data.get("method", "POST")
    if method != "POST":
        return BadLine(number, custom_id, f"line {number}: method {method!r} is not supported; use 'POST'")
    url = data.get("url")
    if url not in URLS:
        return BadLine(
            number, custom_id, f"line {number}: url {url!r} is not supported; use one of {', '.join(URLS)}"
        )
    body = data.get("body")
    if not isinstance(body, dict):
        return BadLine(number, custom_id, f"line {number} has no 'body' object")
    if body.get("stream"):
        return BadLine(number, custom_id, f"line {number}: a batch request cannot stream; drop 'stream'")
    return BatchRequest(number, custom_id, str(url), body)


def read_done(output: Path) -> tuple[set[str], set[int]]:
    """The custom_ids, and the line numbers of bad lines without one, that `output` already holds. A partial
    last line (a job killed mid-write) is cut off, so that appending continues on a fresh line."""
    ids: set[str] = set()
    lines: set[int] = set()
    if not output.exists():
        return ids, lines
    with output.open("rb+") as f:
        complete = 0  # bytes up to the end of the last complete line
        for raw in f:  # line by line: the output of a large job need not fit in memory
            if not raw.endswith(b"\n"):
                break
            complete += len(raw)
            try:
                record = json.loads(raw)
            except json.JSONDecodeError:
                continue
            if not isinstance(record, dict):
                continue
            if isinstance(record.get("custom_id"), str):
                ids.add(record["custom_id"])
            elif isinstance(record.get("error"), dict) and isinstance(record["error"].get("line"), int):
                lines.add(record["error"]["line"])
        f.truncate(complete)
    return ids, lines


def _input_lines(path: Path) -> Iterator[tuple[int, str]]:
    with path.open(encoding="utf-8", errors="replace") as f:
        for number, text in enumerate(f, start=1):
            if text.strip():
                yield number, text


def _record(custom_id: str | None, response: dict[str, Any] | None, error: dict[str, Any] | None) -> str:
    record = {
        "id": f"batch_req_{uuid.uuid4().hex}",
        "custom_id": custom_id,
        "response": response,
        "error": error,
    }
    return json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n"


async def _send(client: httpx.AsyncClient, request: BatchRequest) -> tuple[str, bool]:
    """The request's output line, and whether it succeeded."""
    try:
        response = await client.post(request.url, json=request.body)
    except httpx.HTTPError as e:
        message = f"line {request.line}: the request failed before an answer: {e!r}"
        error = {"code": "request_failed", "message": message, "line": request.line}
        return _record(request.custom_id, None, error), False
    try:
        body: Any = response.json()
    except ValueError:
        body = {"error": {"message": response.text, "type": "server_error"}}
    request_id = body.get("id") if isinstance(body, dict) else None
    answer = {"status_code": response.status_code, "request_id": request_id, "body": body}
    return _record(request.custom_id, answer, None), response.status_code == 200


async def run_batch(
    input_path: Path,
    output_path: Path,
    client: httpx.AsyncClient,
    *,
    max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
    progress: bool = True,
) -> BatchSummary:
    """Send every request of `input_path` not yet in `output_path` through `client`; append the results."""
    done_ids, done_lines = read_done(output_path)
    summary = BatchSummary(total=sum(1 for _ in _input_lines(input_path)))
    bar = tqdm(total=summary.total, unit="req", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    seen: set[str] = set()
    slots = asyncio.Semaphore(max_concurrency)
    in_flight: set[asyncio.Task[None]] = set()

    with output_path.open("a", encoding="utf-8") as out:

        def write(line: str, ok: bool) -> None:
            out.write(line)
            out.flush()
            if ok:
                summary.succeeded += 1
            else:
                summary.failed += 1
            bar.update(1)

        async def run_one(request: BatchRequest) -> None:
            try:
                write(*await _send(client, request))
            finally:
                slots.release()

        try:
            for number, text in _input_lines(input_path):
                parsed = parse_line(number, text)
                custom_id = parsed.custom_id
                if (custom_id is not None and custom_id in done_ids) or (
                    custom_id is None and number in done_lines
                ):
                    summary.skipped += 1
                    bar.update(1)
                    continue
                if custom_id is not None and custom_id in seen and isinstance(parsed, BatchRequest):
                    parsed = BadLine(
                        number, None, f"line {number}: custom_id {custom_id!r} is used twice; make it unique"
                    )
                if isinstance(parsed, BadLine):
                    error = {"code": "invalid_batch_line", "message": parsed.message, "line": number}
                    write(_record(parsed.custom_id, None, error), ok=False)
                    continue
                seen.add(parsed.custom_id)
                await slots.acquire()  # bounded: the file is read no faster than requests finish
                task = asyncio.create_task(run_one(parsed))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
            if in_flight:
                await asyncio.gather(*in_flight)
        finally:
            for task in in_flight:
                task.cancel()
            bar.close()
    summary.done_ids = done_ids | seen
    return summary


# ------------------------------------------------------------------------------------------ command line


def add_parser(subparsers: argparse._SubParsersAction, add_engine_args: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "run-batch",
        help="run a JSONL file of requests (OpenAI's batch format) and write the results",
        description="Run OpenAI batch input (one {custom_id, method, url, body} per line; url "
        f"{', '.join(URLS)}) through the server's routes and write OpenAI batch output. A bad line gets an "
        "error line of its own; a rerun skips custom_ids already in the output. With --url, send the requests "
        "to a running server (vlmserve serve, or a Ray Serve app: its replicas share the work) instead of "
        "loading the model here.",
    )
    p.add_argument("-i", "--input-file", required=True, type=Path, metavar="FILE", help="requests, JSONL")
    p.add_argument("-o", "--output-file", required=True, type=Path, metavar="FILE", help="results, JSONL")
    p.add_argument(
        "model_source",
        nargs="?",
        default=None,
        metavar="MODEL_SOURCE",
        help="checkpoint directory or Hugging Face repo id (default: the demo model); ignored with --url",
    )
    p.add_argument(
        "--model", dest="model_flag", default=None, metavar="MODEL_SOURCE", help="same as MODEL_SOURCE"
    )
    p.add_argument(
        "--url",
        default=None,
        help="base URL of a running server, e.g. http://127.0.0.1:8000 (a Ray app: with its route prefix)",
    )
    p.add_argument(
        "--api-key", default=None, help="bearer token for --url (default: $VLMSERVE_API_KEY, $OPENAI_API_KEY)"
    )
    p.add_argument(
        "--max-concurrency",
        type=int,
        default=DEFAULT_MAX_CONCURRENCY,
        metavar="N",
        help="requests in flight at once (default: %(default)s)",
    )
    p.add_argument(
        "--allowed-local-media-path",
        default=None,
        metavar="DIR",
        help="allow images given as local paths / file:// URLs inside DIR (default: refused)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_engine_args(p)
    return p


def main(args: argparse.Namespace, engine_args: Any) -> int:
    """Run the job; `engine_args` is None with --url. Exit status 0 when every line succeeded, else 1."""
    if args.max_concurrency < 1:
        args.parser.error(f"argument --max-concurrency: must be >= 1, got {args.max_concurrency}")
    if not args.input_file.is_file():
        args.parser.error(f"argument -i/--input-file: {args.input_file} is not a file")
    if args.allowed_local_media_path is not None:
        root = Path(args.allowed_local_media_path).expanduser().resolve()
        if not root.is_dir():
            args.parser.error(f"argument --allowed-local-media-path: {root} is not an existing directory")
        args.allowed_local_media_path = root
    summary = asyncio.run(_main(args, engine_args))
    print(
        f"vlmserve run-batch: {summary.succeeded} succeeded, {summary.failed} failed, {summary.skipped} "
        f"already in {args.output_file}; results in {args.output_file}",
        file=sys.stderr,
    )
    return 0 if summary.failed == 0 else 1


async def _main(args: argparse.Namespace, engine_args: Any) -> BatchSummary:
    progress = not args.no_progress
    if args.url is not None:
        key = args.api_key or os.environ.get("VLMSERVE_API_KEY") or os.environ.get("OPENAI_API_KEY")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        async with httpx.AsyncClient(base_url=args.url.rstrip("/"), headers=headers, timeout=None) as client:
            return await run_batch(
                args.input_file,
                args.output_file,
                client,
                max_concurrency=args.max_concurrency,
                progress=progress,
            )

    from vlmserve.api.server import build_app
    from vlmserve.api.serving import ModelServer
    from vlmserve.media import MediaConfig

    media = MediaConfig(allowed_local_media_path=args.allowed_local_media_path)
    server = await asyncio.to_thread(ModelServer.from_engine_args, engine_args, media)
    try:
        app = build_app(server, shutdown_servers=False, playground=False)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://vlmserve", timeout=None) as client:
            return await run_batch(
                args.input_file,
                args.output_file,
                client,
                max_concurrency=args.max_concurrency,
                progress=progress,
            )
    finally:
        await server.aclose()
