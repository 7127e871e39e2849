"""`vlmserve bench`: a serving benchmark against any OpenAI-compatible URL (vlmserve, `vllm serve`, Ray Serve
LLM, ...), so that every server is measured with the same client.

    vlmserve bench --base-url http://127.0.0.1:8000/v1 --model NAME --num-requests 64 --concurrency 8 \\
        --image-size 640x480 --prompt-words 1 --output-len 64 --ignore-eos --json out.json

Owns: the synthetic requests (random JPEG images, distinct per request unless `same_image`, sent as data URLs
in chat content parts; prompts of N random words), the load (closed loop: N workers each sending its next
request when the last one finished; open loop: Poisson arrivals at a rate), warm-up requests kept out of the
statistics, the duration bound (stop issuing, let in-flight requests finish), timing every streamed token,
and the report: throughput and TTFT / TPOT / ITL / end-to-end latency mean, p50, p90, p99, as a table and
as JSON with every request's timings.

Timing: TTFT is from just before the request is sent to the first chunk that carries a token (not the
opening role chunk, which vlmserve sends before any token); ITL is the gap between consecutive token chunks
(one chunk per token, as vLLM and vlmserve stream); TPOT is a request's (latency - TTFT) / (output tokens - 1),
latency ending at `[DONE]`. Token counts come from the `usage` of the final chunk
(stream_options.include_usage); a server that sends none is counted by its token chunks instead.

Clients: one process can be the limit (JSON parsing of every chunk of many streams is Python work), so
`num_clients` spreads the load over that many client processes: the bodies dealt out in turn, the
concurrency (or the Poisson rate) split between them, every process starting together; their results are
merged into one report. Each process measures its own CPU time; one that was busy for most of the run is
reported ("client_cpu_max"), with a note that the client, not the server, may have set the figures.

With `json_schema`, every request asks for output following that schema (OpenAI's `response_format`): the
load of structured outputs. With `ignore_eos` as well, a schema that cannot close within `output_len` tokens
keeps the token counts equal to an unconstrained run.

Does not know: vlmserve's engine or server. It speaks HTTP and OpenAI's streaming wire format, plus vLLM's
`ignore_eos` / `min_tokens` extensions when asked to ignore EOS.
"""

from __future__ import annotations

import asyncio
import base64
import io
import itertools
import json
import math
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import httpx
import numpy as np
from PIL import Image
from tqdm import tqdm

Endpoint = Literal["chat", "completions"]
ENDPOINT_PATHS: dict[str, str] = {"chat": "/chat/completions", "completions": "/completions"}

# Common short English words: prompts of N words are about N tokens for real (Qwen) tokenizers.
_WORD_LIST = (
    "the of and to in is it you that he was for on are with as his they be at one have this from or had by "
    "hot word but what some we can out other were all there when up use your how said an each she which do "
    "their time if will way about many then them write would like so these her long make thing see him two "
    "has look more day could go come did number sound no most people my over know water than call first who "
    "may down side been now find any new work part take get place made live where after back little only "
    "round man year came show every good me give our under name very through just form great think say help "
    "low line differ turn cause much mean before move right boy old too same tell does set three want air "
    "well also play small end put home read hand port large spell add even land here must big high such"
)
WORDS: tuple[str, ...] = tuple(_WORD_LIST.split())
# Error messages are grouped by their first characters, so that per-request details (ids, offsets) do not
# split one cause into many lines.
ERROR_KEY_CHARS = 160
MAX_ERRORS_SHOWN = 10  # distinct error messages in the table (the JSON has them all)
PERCENTILES = (50, 90, 99)
# A client process busier than this share of one core may itself have set the pace.
CLIENT_BOUND_CPU = 0.8


@dataclass(frozen=True)
class BenchConfig:
    """One benchmark run. Exactly one of `concurrency` (closed loop) and `request_rate` (Poisson, requests per
    second) is set."""

    base_url: str
    model: str
    api_key: str | None = None
    endpoint: Endpoint = "chat"
    num_requests: int = 64
    concurrency: int | None = 8
    request_rate: float | None = None
    image_sizes: tuple[tuple[int, int], ...] = ((640, 480),)
    images_per_request: int = 1
    same_image: bool = False
    # > 0: every image is drawn at random from this many distinct ones (a workload that repeats images, as a
    # fleet of replicas with image-aware routing sees it); 0: distinct images (or one, with same_image)
    image_pool: int = 0
    prompt_words: int = 16
    output_len: int = 64
    ignore_eos: bool = False
    warmup: int = 4
    duration_limit_s: float = 120.0
    request_timeout_s: float = 600.0
    seed: int = 0
    num_clients: int = 1  # client processes the load is spread over
    json_schema: dict[str, Any] | None = None  # sent as response_format json_schema (structured outputs)

    def __post_init__(self) -> None:
        if (self.concurrency is None) == (self.request_rate is None):
            raise ValueError(
                "give exactly one of concurrency (closed loop) and request_rate (Poisson arrivals), "
                f"got concurrency={self.concurrency} request_rate={self.request_rate}"
            )
        if self.endpoint not in ENDPOINT_PATHS:
            raise ValueError(f"endpoint must be one of {sorted(ENDPOINT_PATHS)}, got {self.endpoint!r}")
        if self.endpoint == "completions" and self.images_per_request:
            raise ValueError(
                f"images_per_request={self.images_per_request}: /v1/completions takes text prompts only; "
                "use the chat endpoint for images, or 0 images per request"
            )
        if self.same_image and self.image_pool:
            raise ValueError(
                f"same_image and image_pool={self.image_pool} both given; same_image is image_pool=1, keep one"
            )
        if self.images_per_request and not self.image_sizes:
            raise ValueError("image_sizes is empty; give at least one WIDTHxHEIGHT, e.g. 640x480")
        if self.images_per_request == 0 and self.prompt_words == 0:
            raise ValueError(
                "a request needs an image or a prompt: images_per_request and prompt_words are 0"
            )
        if self.concurrency is not None and self.num_clients > self.concurrency:
            raise ValueError(
                f"num_clients ({self.num_clients}) exceeds concurrency ({self.concurrency}): every client "
                "process needs at least one request in flight"
            )
        for name in ("num_requests", "output_len", "num_clients"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("images_per_request", "prompt_words", "warmup"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    @property
    def url(self) -> str:
        return self.base_url.rstrip("/") + ENDPOINT_PATHS[self.endpoint]

    @property
    def max_in_flight(self) -> int:
        # Open loop: every request may be in flight at once; the connection pool must not queue them.
        return self.concurrency if self.concurrency is not None else self.num_requests


# ------------------------------------------------------------------------------------------ synthetic requests


def synthetic_image(size: tuple[int, int], seed: int) -> Image.Image:
    """(width, height) RGB image of smooth gradients plus noise: resizes and compresses like a photo rather
    than like pure noise, and each seed gives different pixels (so a server's image cache never hits by
    accident). The offline benchmark draws its images here too."""
    rng = np.random.default_rng(seed)
    width, height = size
    ramp = np.linspace(0.0, 255.0, width)[None, :, None] * rng.random(3)[None, None, :]  # (1, W, 3)
    pixels = (ramp + rng.integers(0, 64, (height, width, 3))).clip(0, 255).astype(np.uint8)  # (H, W, 3)
    return Image.fromarray(pixels, "RGB")


def synthetic_jpeg(width: int, height: int, seed: int) -> bytes:
    buf = io.BytesIO()
    synthetic_image((width, height), seed).save(buf, "JPEG", quality=85)
    return buf.getvalue()


def _data_url(jpeg: bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii")


def build_bodies(config: BenchConfig, count: int, seed: int) -> list[bytes]:
    """`count` request bodies, serialized up front so that building them costs no time inside the run (the
    client often shares its CPU with the server under test)."""
    rng = np.random.default_rng(seed)
    shared: str | None = None
    pool: dict[int, str] = {}
    bodies = []
    for i in range(count):
        prompt = " ".join(rng.choice(WORDS, config.prompt_words).tolist())
        images = []
        for j in range(config.images_per_request):
            if config.same_image:
                # One image for every request (the first size): measures a server's image / prefix cache.
                if shared is None:
                    shared = _data_url(synthetic_jpeg(*config.image_sizes[0], seed=seed))
                images.append(shared)
            elif config.image_pool > 0:
                k = int(rng.integers(config.image_pool))
                if k not in pool:
                    width, height = config.image_sizes[k % len(config.image_sizes)]
                    pool[k] = _data_url(synthetic_jpeg(width, height, seed=seed * 1_000_003 + k))
                images.append(pool[k])
            else:
                k = i * config.images_per_request + j
                width, height = config.image_sizes[k % len(config.image_sizes)]
                images.append(_data_url(synthetic_jpeg(width, height, seed=seed * 1_000_003 + k)))
        body: dict[str, Any] = {
            "model": config.model,
            "max_tokens": config.output_len,
            "temperature": 0.0,  # greedy: the same load every run, whatever the server's sampling default
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if config.endpoint == "chat":
            content: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": u}} for u in images]
            if prompt:
                content.append({"type": "text", "text": prompt})
            body["messages"] = [{"role": "user", "content": content}]
        else:
            body["prompt"] = prompt
        if config.ignore_eos:
            # vLLM's extensions (vlmserve reads the same names). NOTE: OpenAI's own API refuses unknown
            # fields, so leave ignore_eos off when measuring it.
            body["ignore_eos"] = True
            body["min_tokens"] = config.output_len
        if config.json_schema is not None:
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "bench", "schema": config.json_schema},
            }
        bodies.append(json.dumps(body).encode())
    return bodies


# ------------------------------------------------------------------------------------------ one request


@dataclass
class RequestResult:
    """One request's outcome; times in seconds on the perf_counter clock."""

    ok: bool
    start: float
    latency: float
    ttft: float | None = None
    itls: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    output_tokens: int = 0
    # Prompt tokens the server answered from its prefix cache (usage.prompt_tokens_details), when it says.
    cached_tokens: int = 0
    error: str | None = None

    @property
    def tpot(self) -> float | None:
        if not self.ok or self.ttft is None or self.output_tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)


ChunkKind = Literal["token", "finish", "other"]


def _chunk_kind(chunk: dict[str, Any], endpoint: Endpoint) -> ChunkKind:
    """ "token": the chunk carries text (possibly "": a token whose text is held back, an incomplete UTF-8
    sequence); "finish": no text but a finish_reason, which is the last token for servers that send one chunk
    per token (vlmserve, when the last token adds no text) and no token for servers that close with a
    finish chunk of its own (OpenAI); "other": the opening role chunk, the usage-only chunk."""
    choices = chunk.get("choices") or []
    if not choices:
        return "other"
    choice = choices[0]
    if endpoint == "completions":
        has_text = choice.get("text") is not None
    else:
        delta = choice.get("delta") or {}
        if "role" in delta and not delta.get("content"):
            return "other"  # the opening {"role": "assistant", "content": ""} comes before any token
        has_text = delta.get("content") is not None
    if has_text:
        return "token"
    return "finish" if choice.get("finish_reason") is not None else "other"


def _error_message(response: httpx.Response) -> str:
    try:
        error = response.json().get("error")
        message = error.get("message") if isinstance(error, dict) else error
    except (ValueError, AttributeError):
        message = None
    return str(message or response.text[:ERROR_KEY_CHARS] or response.reason_phrase)


async def send_request(
    client: httpx.AsyncClient, config: BenchConfig, body: bytes, headers: dict[str, str]
) -> RequestResult:
    """POST one streamed request and time its tokens. Never raises (except on cancellation): any failure
    becomes a result with `ok=False` and the reason, so one bad request cannot end the run."""
    start = time.perf_counter()

    def failed(reason: str) -> RequestResult:
        return RequestResult(ok=False, start=start, latency=time.perf_counter() - start, error=reason)

    token_times: list[float] = []
    last_kind: ChunkKind = "other"
    usage: dict[str, Any] | None = None
    try:
        async with (
            asyncio.timeout(config.request_timeout_s),
            client.stream("POST", config.url, content=body, headers=headers) as response,
        ):
            if response.status_code != 200:
                await response.aread()
                return failed(f"HTTP {response.status_code}: {_error_message(response)}")
            async for line in response.aiter_lines():
                now = time.perf_counter()
                if not line.startswith("data:"):
                    continue  # blank separators and SSE comments
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    error = chunk["error"]
                    return failed(
                        f"stream error: {error.get('message') if isinstance(error, dict) else error}"
                    )
                kind = _chunk_kind(chunk, config.endpoint)
                if kind != "other":
                    token_times.append(now)
                    last_kind = kind
                if chunk.get("usage"):
                    usage = chunk["usage"]
    except TimeoutError:
        return failed(f"no complete answer within the request timeout of {config.request_timeout_s:g} s")
    except Exception as e:  # connection refused / reset, bad JSON, ...: counted, never fatal to the run
        return failed(f"{type(e).__name__}: {e}")
    latency = time.perf_counter() - start
    usage = usage or {}
    output_tokens = int(usage.get("completion_tokens", 0))
    if last_kind == "finish" and len(token_times) == output_tokens + 1:
        token_times.pop()  # the usage says the closing finish chunk carried no token
    if not token_times:
        return failed("the stream ended without a token")
    return RequestResult(
        ok=True,
        start=start,
        latency=latency,
        ttft=token_times[0] - start,
        itls=[b - a for a, b in itertools.pairwise(token_times)],
        prompt_tokens=int(usage.get("prompt_tokens", 0)),
        output_tokens=output_tokens or len(token_times),  # no usage: one token per chunk
        cached_tokens=int((usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)),
    )


# ------------------------------------------------------------------------------------------ load


Send = Callable[[bytes], Awaitable[RequestResult]]


async def closed_loop(
    bodies: Sequence[bytes], concurrency: int, deadline: float, send: Send
) -> list[RequestResult]:
    """`concurrency` workers, each sending the next body as soon as its last request finished; none is issued
    after `deadline` (perf_counter seconds)."""
    pending = iter(bodies)  # shared: next() never awaits, so workers cannot take the same body
    results: list[RequestResult] = []

    async def worker() -> None:
        for body in pending:
            if time.perf_counter() >= deadline:
                return
            results.append(await send(body))

    await asyncio.gather(*(worker() for _ in range(min(concurrency, len(bodies)))))
    return results


async def poisson_loop(
    bodies: Sequence[bytes], rate: float, deadline: float, send: Send, rng: np.random.Generator
) -> list[RequestResult]:
    """Open loop: requests arrive as a Poisson process of `rate` per second, whether or not earlier ones
    finished; none is issued after `deadline`."""
    tasks: list[asyncio.Task[RequestResult]] = []
    # Arrival times are absolute, so time spent in the loop itself does not slow the rate down.
    arrival = time.perf_counter()
    for body in bodies:
        if arrival >= deadline:
            break
        await asyncio.sleep(max(0.0, arrival - time.perf_counter()))
        tasks.append(asyncio.create_task(send(body)))
        arrival += float(rng.exponential(1.0 / rate))
    return list(await asyncio.gather(*tasks))


@dataclass
class BenchReport:
    config: BenchConfig
    results: list[RequestResult]
    duration_s: float
    started_at: str
    # Counted apart: a failing warm-up usually means every request will fail the same way, and says so first.
    warmup_failed: int = 0
    # The busiest client process's CPU time over the run's wall time (1.0 = one core all the time).
    client_cpu_max: float = 0.0

    @property
    def not_issued(self) -> int:
        """Requests never sent because the duration limit was reached first."""
        return self.config.num_requests - len(self.results)

    def metrics(self) -> dict[str, Any]:
        return summarize(self.results, self.duration_s) | {
            "not_issued": self.not_issued,
            "warmup_failed": self.warmup_failed,
            "num_clients": self.config.num_clients,
            "client_cpu_max": self.client_cpu_max,
        }

    def to_json(self) -> dict[str, Any]:
        from vlmserve import __version__

        t0 = min((r.start for r in self.results), default=0.0)
        # The key is a secret: say whether one was sent, never which.
        config = asdict(self.config) | {"api_key": "<set>" if self.config.api_key else None}
        return {
            "started_at": self.started_at,
            "vlmserve_version": __version__,
            "config": config,
            "metrics": self.metrics(),
            "requests": [
                {
                    "ok": r.ok,
                    "error": r.error,
                    "start_s": r.start - t0,
                    "ttft_ms": None if r.ttft is None else 1e3 * r.ttft,
                    "latency_ms": 1e3 * r.latency,
                    "tpot_ms": None if r.tpot is None else 1e3 * r.tpot,
                    "prompt_tokens": r.prompt_tokens,
                    "cached_tokens": r.cached_tokens,
                    "output_tokens": r.output_tokens,
                    "itl_ms": [1e3 * x for x in r.itls],
                }
                for r in sorted(self.results, key=lambda r: r.start)
            ],
        }


@dataclass
class ClientRun:
    """What one client process measured: its results, the run's start and end, its CPU seconds."""

    results: list[RequestResult]
    start: float
    end: float
    cpu_s: float
    warmup_failed: int


async def run_client(
    config: BenchConfig,
    bodies: Sequence[bytes],
    warmup: Sequence[bytes],
    *,
    concurrency: int | None,
    rate: float | None,
    seed: int,
    progress: Callable[[], None] = lambda: None,
    ready: Callable[[], None] = lambda: None,
) -> ClientRun:
    """One client's load: warm up, call `ready` (where several clients wait for each other), then send
    `bodies` closed loop at `concurrency` or Poisson at `rate`."""
    headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
    if config.api_key:
        headers["Authorization"] = f"Bearer {config.api_key}"
    in_flight = concurrency if concurrency is not None else max(1, len(bodies))
    limits = httpx.Limits(max_connections=in_flight, max_keepalive_connections=in_flight)
    # No pool / read timeouts of httpx's own: the per-request deadline (asyncio.timeout) bounds each request.
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(None, connect=30.0)) as client:
        # Warm-up at the run's own concurrency (all at once for Poisson), so that first-call costs (connections,
        # allocator growth, compilation) are paid at the batch sizes the run will see.
        warmup_results = await closed_loop(
            warmup, in_flight, math.inf, lambda body: send_request(client, config, body, headers)
        )
        ready()

        async def send(body: bytes) -> RequestResult:
            result = await send_request(client, config, body, headers)
            progress()
            return result

        cpu0 = time.process_time()
        start = time.perf_counter()
        deadline = start + config.duration_limit_s
        if rate is not None:
            results = await poisson_loop(bodies, rate, deadline, send, np.random.default_rng(seed))
        else:
            results = await closed_loop(bodies, in_flight, deadline, send)
        end = time.perf_counter()
        cpu = time.process_time() - cpu0
    return ClientRun(results, start, end, cpu, sum(not r.ok for r in warmup_results))


def _client_process(
    config: BenchConfig,
    k: int,
    bodies: list[bytes],
    warmup: list[bytes],
    barrier: Any,
    done: Any,
    out: Any,
) -> None:
    n = config.num_clients
    # The concurrency split as evenly as it goes (the first clients take the remainder); Poisson processes of
    # rate r/n add up to one of rate r.
    concurrency = (
        None if config.concurrency is None else config.concurrency // n + (k < config.concurrency % n)
    )
    rate = None if config.request_rate is None else config.request_rate / n

    def count() -> None:
        with done.get_lock():
            done.value += 1

    try:
        run = asyncio.run(
            run_client(
                config,
                bodies,
                warmup,
                concurrency=concurrency,
                rate=rate,
                seed=config.seed + 7919 * k,
                progress=count,
                ready=barrier.wait,
            )
        )
        out.put((k, run))
    except BaseException as e:
        barrier.abort()  # the others must not wait for a client that will never be ready
        out.put((k, RuntimeError(f"client process {k} failed: {type(e).__name__}: {e}")))


def _run_processes(
    config: BenchConfig, bodies: list[bytes], warmup: list[bytes], progress: bool
) -> list[ClientRun]:
    import multiprocessing as mp
    import queue

    n = config.num_clients
    ctx = mp.get_context("spawn")
    barrier, done, out = ctx.Barrier(n), ctx.Value("i", 0), ctx.Queue()
    procs = [
        ctx.Process(
            target=_client_process,
            args=(config, k, bodies[k::n], warmup[k::n], barrier, done, out),
            name=f"bench-client-{k}",
            daemon=True,
        )
        for k in range(n)
    ]
    for proc in procs:
        proc.start()
    runs: dict[int, ClientRun] = {}
    with tqdm(total=len(bodies), disable=not progress, unit="req", desc="bench") as bar:
        while len(runs) < n:
            try:
                k, run = out.get(timeout=0.5)
            except queue.Empty:
                bar.update(done.value - bar.n)
                dead = [p.name for p in procs if not p.is_alive() and p.exitcode not in (0, None)]
                if dead and len(runs) < n and out.empty():
                    raise RuntimeError(f"benchmark client process(es) {', '.join(dead)} died") from None
                continue
            if isinstance(run, BaseException):
                for proc in procs:
                    proc.kill()
                raise run
            runs[k] = run
        bar.update(done.value - bar.n)
    for proc in procs:
        proc.join(10)
    return [runs[k] for k in range(n)]


async def run_benchmark(config: BenchConfig, *, progress: bool = True) -> BenchReport:
    """Warm up, then send `num_requests` requests under the configured load; returns every result."""
    warmup = build_bodies(config, config.warmup, seed=config.seed + 10_000)
    bodies = build_bodies(config, config.num_requests, seed=config.seed)
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    if config.num_clients > 1:
        runs = await asyncio.to_thread(_run_processes, config, bodies, warmup, progress)
    else:
        with tqdm(total=len(bodies), disable=not progress, unit="req", desc="bench") as bar:
            runs = [
                await run_client(
                    config,
                    bodies,
                    warmup,
                    concurrency=config.concurrency,
                    rate=config.request_rate,
                    seed=config.seed,
                    progress=bar.update,
                )
            ]
    # perf_counter is the system's monotonic clock: the processes' times compare directly.
    start = min(r.start for r in runs)
    duration = max(r.end for r in runs) - start
    results = [x for r in runs for x in r.results]
    cpu_max = max((r.cpu_s / max(r.end - r.start, 1e-9) for r in runs), default=0.0)
    warmup_failed = sum(r.warmup_failed for r in runs)
    return BenchReport(config, results, duration, started_at, warmup_failed, cpu_max)


# ------------------------------------------------------------------------------------------ statistics


def distribution_ms(values_s: Sequence[float]) -> dict[str, float | None]:
    """mean, p50, p90, p99 in milliseconds (None without values); percentiles interpolate linearly."""
    if not values_s:
        return {"mean": None, **{f"p{p}": None for p in PERCENTILES}}
    ms = 1e3 * np.asarray(values_s, dtype=np.float64)
    return {"mean": float(ms.mean()), **{f"p{p}": float(np.percentile(ms, p)) for p in PERCENTILES}}


def summarize(results: Sequence[RequestResult], duration_s: float) -> dict[str, Any]:
    duration_s = max(duration_s, 1e-9)  # a run with nothing issued takes no time
    ok = [r for r in results if r.ok]
    input_tokens = sum(r.prompt_tokens for r in ok)
    output_tokens = sum(r.output_tokens for r in ok)
    errors = Counter((r.error or "unknown error")[:ERROR_KEY_CHARS] for r in results if not r.ok)
    return {
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "duration_s": duration_s,
        "total_input_tokens": input_tokens,
        "total_cached_tokens": sum(r.cached_tokens for r in ok),
        "total_output_tokens": output_tokens,
        "request_throughput": len(ok) / duration_s,
        "output_throughput": output_tokens / duration_s,
        "total_token_throughput": (input_tokens + output_tokens) / duration_s,
        "ttft_ms": distribution_ms([r.ttft for r in ok if r.ttft is not None]),
        "tpot_ms": distribution_ms([t for r in ok if (t := r.tpot) is not None]),
        "itl_ms": distribution_ms([x for r in ok for x in r.itls]),
        "e2e_latency_ms": distribution_ms([r.latency for r in ok]),
        "errors": dict(errors.most_common()),
    }


def format_report(report: BenchReport) -> str:
    """The human-readable table printed after a run."""
    c, m = report.config, report.metrics()
    load = (
        f"concurrency {c.concurrency}" if c.concurrency is not None else f"Poisson {c.request_rate:g} req/s"
    )
    images = (
        f"{c.images_per_request} x "
        + ",".join(f"{w}x{h}" for w, h in c.image_sizes)
        + (" (same image)" if c.same_image else "")
        + (f" (from a pool of {c.image_pool})" if c.image_pool else "")
        if c.images_per_request
        else "none"
    )
    rows = [
        ("endpoint", f"{c.url} (model {c.model})"),
        ("client processes (busiest's CPU)", f"{c.num_clients} ({100 * m['client_cpu_max']:.0f}% of a core)"),
        (
            "load",
            f"{load}, {c.num_requests} requests, {c.warmup} warm-up"
            + (f" ({m['warmup_failed']} failed)" if m["warmup_failed"] else ""),
        ),
        ("images per request", images),
        (
            "prompt words / output tokens",
            f"{c.prompt_words} / {c.output_len}" + (" (ignore_eos)" if c.ignore_eos else ""),
        ),
        ("completed / failed / not issued", f"{m['completed']} / {m['failed']} / {m['not_issued']}"),
        ("duration (s)", f"{m['duration_s']:.2f}"),
        (
            "input (prefix-cached) / output tokens",
            f"{m['total_input_tokens']} ({m['total_cached_tokens']}) / {m['total_output_tokens']}",
        ),
        ("request throughput (req/s)", f"{m['request_throughput']:.2f}"),
        ("output token throughput (tok/s)", f"{m['output_throughput']:.1f}"),
        ("total token throughput (tok/s)", f"{m['total_token_throughput']:.1f}"),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    header = f"{'(ms)':<8}" + "".join(f"{h:>10}" for h in ("mean", "p50", "p90", "p99"))
    lines += ["", header, "-" * len(header)]
    for name, key in (("TTFT", "ttft_ms"), ("TPOT", "tpot_ms"), ("ITL", "itl_ms"), ("E2E", "e2e_latency_ms")):
        stats = m[key]
        cells = "".join(
            "         -" if stats[s] is None else f"{stats[s]:>10.1f}" for s in ("mean", "p50", "p90", "p99")
        )
        lines.append(f"{name:<8}{cells}")
    if not c.same_image and not c.image_pool and m["total_cached_tokens"] > m["total_input_tokens"] / 2:
        # NOTE: the same --seed sends the same images and prompts, so a second run against a server that is
        # still up measures its prefix cache instead of prefill.
        lines += [
            "",
            "note: the server answered most prompt tokens from its prefix cache; if it already served a run "
            "with this --seed, restart it or use another --seed",
        ]
    if m["client_cpu_max"] > CLIENT_BOUND_CPU:
        lines += [
            "",
            f"note: a client process was busy {100 * m['client_cpu_max']:.0f}% of the run: the client may have "
            f"been the limit, not the server; run again with more --num-clients (now {c.num_clients})",
        ]
    if m["errors"]:
        shown = list(m["errors"].items())[:MAX_ERRORS_SHOWN]
        lines += ["", f"errors (count: message; {len(shown)} most frequent of {len(m['errors'])}):"]
        lines += [f"  {n}: {message}" for message, n in shown]
    return "\n".join(lines)


def run(config: BenchConfig, *, json_path: Path | None = None, progress: bool = True) -> int:
    """Run, print the table, write the JSON; exit status 0 when every issued request completed, else 1 (the
    report is printed and written either way)."""
    report = asyncio.run(run_benchmark(config, progress=progress))
    print(format_report(report), flush=True)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(report.to_json(), indent=2))
    metrics = report.metrics()
    return 0 if metrics["completed"] > 0 and metrics["failed"] == 0 else 1
