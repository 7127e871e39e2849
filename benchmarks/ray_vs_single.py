"""Time to first token and inter-token latency through Ray Serve vs `vlmserve serve`, same model, same CPU.

    .venv/bin/python benchmarks/ray_vs_single.py [--preset small-bench] [--requests 30] [--max-tokens 64]

Writes a random-weight checkpoint (no download), then serves it twice, one after the other, with the same
engine options and the same number of torch threads: (1) `vlmserve serve` (one process), (2) `vlmserve run
config.yaml --non-blocking` on a fresh local Ray cluster (HTTP proxy -> OpenAiIngress replica ->
LLMServer replica: two extra hops per request and per token), then `vlmserve shutdown -y`. Each is measured
with streamed chat completions (ignore_eos, so every request yields exactly --max-tokens tokens), first one
at a time, then --concurrency at once; a chunk whose `delta.content` is non-empty counts as a token arrival.

TTFT: request sent -> first content chunk received. ITL: gap between consecutive content chunks of a request.
Prints a Markdown table (p50 / p90 over all requests / gaps) for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

VLMSERVE = [sys.executable, "-m", "vlmserve"]
ENGINE = {"max_model_len": 1024, "kv_cache_memory_gb": 0.25, "max_num_seqs": 8}


@dataclass
class Samples:
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    tokens: int = 0
    wall: float = 0.0


def stream_one(
    client: httpx.Client, url: str, model: str, max_tokens: int, out: Samples, lock: threading.Lock
) -> None:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "Describe a sunny beach in a few words."}],
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": True,
    }
    arrivals: list[float] = []
    start = time.perf_counter()
    with client.stream("POST", url, json=body, timeout=300) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                arrivals.append(time.perf_counter())
    with lock:
        out.ttft.append(arrivals[0] - start)
        out.itl.extend(b - a for a, b in itertools.pairwise(arrivals))
        out.tokens += len(arrivals)


def measure(base_url: str, model: str, requests: int, concurrency: int, max_tokens: int) -> Samples:
    url = f"{base_url}/v1/chat/completions"
    out, lock = Samples(), threading.Lock()
    with httpx.Client() as client:
        for _ in range(3):  # warm up: first-call allocations, Ray's routing tables
            stream_one(client, url, model, max_tokens, Samples(), lock)
        per_worker = [requests // concurrency + (i < requests % concurrency) for i in range(concurrency)]

        def worker(n: int) -> None:
            for _ in range(n):
                stream_one(client, url, model, max_tokens, out, lock)

        threads = [threading.Thread(target=worker, args=(n,)) for n in per_worker]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        out.wall = time.perf_counter() - start
    return out


def wait_healthy(url: str, proc: subprocess.Popen[bytes] | None, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"{url} not healthy after {timeout}s")


def pct(values: list[float], q: float) -> float:
    return (
        statistics.quantiles(values, n=100, method="inclusive")[q - 1] * 1000
        if len(values) > 1
        else values[0] * 1000
    )


def serve_single(
    args: argparse.Namespace, checkpoint: Path, env: dict[str, str], work: Path
) -> dict[int, Samples]:
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in ENGINE.items()]
    cmd = [*VLMSERVE, "serve", str(checkpoint), "--model-id", "m", "--port", str(args.port), *flags]
    with (work / "serve.log").open("wb") as log:
        proc = subprocess.Popen(
            [*cmd, "--log-level", "warning"], env=env, stdout=log, stderr=subprocess.STDOUT
        )
    try:
        base = f"http://127.0.0.1:{args.port}"
        wait_healthy(base, proc)
        return {c: measure(base, "m", args.requests, c, args.max_tokens) for c in (1, args.concurrency)}
    finally:
        proc.terminate()
        proc.wait(60)


def serve_ray(
    args: argparse.Namespace, checkpoint: Path, env: dict[str, str], work: Path
) -> dict[int, Samples]:
    # Same engine options; the replica gets the same number of torch threads as the single process.
    model = {
        "model_loading_config": {"model_id": "m", "model_source": str(checkpoint)},
        "engine_kwargs": ENGINE,
        # Token-by-token latency is what this compares: no stream batching window on the Ray side.
        "experimental_configs": {"stream_batching_interval_ms": 0},
        "deployment_config": {"ray_actor_options": {"num_cpus": args.threads}},
        "runtime_env": {"env_vars": {"OMP_NUM_THREADS": str(args.threads)}},
    }
    app = {"name": "bench", "route_prefix": "/", "import_path": "vlmserve:build_openai_app"}
    config = work / "serve_config.yaml"  # JSON is YAML
    config.write_text(
        json.dumps(
            {
                "http_options": {"host": "127.0.0.1", "port": args.port},
                "applications": [{**app, "args": {"llm_configs": [model]}}],
            }
        )
    )
    run = subprocess.run(
        [*VLMSERVE, "run", str(config), "--non-blocking"], env=env, capture_output=True, text=True
    )
    try:
        if run.returncode != 0:
            raise SystemExit(f"vlmserve run failed:\n{run.stdout}\n{run.stderr}")
        base = f"http://127.0.0.1:{args.port}"
        wait_healthy(base, None)
        return {c: measure(base, "m", args.requests, c, args.max_tokens) for c in (1, args.concurrency)}
    finally:
        subprocess.run([*VLMSERVE, "shutdown", "-y"], env=env, capture_output=True, text=True, check=False)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="small-bench")
    parser.add_argument("--requests", type=int, default=30)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the engine, both setups")
    parser.add_argument("--port", type=int, default=18400)
    parser.add_argument(
        "--ray-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment of the Ray cluster, e.g. RAY_SERVE_ENABLE_DIRECT_INGRESS=1 (repeatable)",
    )
    parser.add_argument("--skip-single", action="store_true", help="measure only the Ray setup")
    args = parser.parse_args()

    from vlmserve.checkpoints.checkpoint import write_checkpoint

    with tempfile.TemporaryDirectory(prefix="vlmserve-raybench-") as tmp:
        work = Path(tmp)
        checkpoint = write_checkpoint(work / "ckpt", preset=args.preset, seed=0)
        env = {
            **os.environ,
            "OMP_NUM_THREADS": str(args.threads),
            "VLMSERVE_CACHE_DIR": str(work / "cache"),
            "RAY_USAGE_STATS_ENABLED": "0",
        }
        results: dict[str, dict[int, Samples]] = {}
        if not args.skip_single:
            results["vlmserve serve"] = serve_single(args, checkpoint, env, work)
        ray_env = {**env, **dict(item.split("=", 1) for item in args.ray_env)}
        label = "Ray Serve (vlmserve run" + "".join(f", {e}" for e in args.ray_env) + ")"
        results[label] = serve_ray(args, checkpoint, ray_env, work)

    import ray
    import torch

    print(
        f"model: {args.preset} (random weights); {args.requests} streamed chat requests of {args.max_tokens} "
        f"tokens per row; engine {ENGINE}; torch threads {args.threads}"
    )
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores; Python {platform.python_version()}, "
        f"torch {torch.__version__}, ray {ray.__version__}\n"
    )
    print("| server | concurrency | TTFT p50 (ms) | TTFT p90 (ms) | ITL p50 (ms) | ITL p90 (ms) | tokens/s |")
    print("|---|---|---|---|---|---|---|")
    for name, by_concurrency in results.items():
        for concurrency, s in by_concurrency.items():
            print(
                f"| {name} | {concurrency} | {pct(s.ttft, 50):.1f} | {pct(s.ttft, 90):.1f} | "
                f"{pct(s.itl, 50):.2f} | {pct(s.itl, 90):.2f} | {s.tokens / s.wall:.0f} |"
            )


if __name__ == "__main__":
    main()
