"""`vlmserve serve` against `vlmserve run` (Ray Serve), alternating, with the CPU each server spent per request.

    .venv/bin/python benchmarks/ray_serving.py --checkpoint /tmp/vlmbench/small-bench \\
        --setups serve,run --rounds 2 --concurrency 1,8,32 --num-requests 64

    # image-aware routing against Ray's default router: two replicas, images repeated from a pool of 16,
    # caches that hold about half of them per replica
    .venv/bin/python benchmarks/ray_serving.py --checkpoint /tmp/vlmbench/small-bench \\
        --setups run-pow2,run --replicas 2 --threads 1 --image-pool 16 --concurrency 16 --num-requests 96 \\
        --engine-kwargs '{"encoder_cache_tokens": 2048, "num_kv_blocks": 360, "max_model_len": 2048}'

Each round starts every setup in turn (a fresh server, or a fresh local Ray cluster via `vlmserve run
--non-blocking` and `vlmserve shutdown -y`), runs `vlmserve bench` (streamed chat, 640x480 JPEGs, 64 tokens,
ignore_eos) at each concurrency, and stops it, so that setups alternate in time on a shared machine. Around
each `vlmserve bench` run it reads the CPU time (user + system, /proc) of every process of the server: the
`vlmserve serve` process and its engine process, or every process of the Ray cluster (GCS, raylet, proxy,
controller, ingress and server replicas, their engine processes). CPU milliseconds per request is what a
request costs the machine, whoever else is running; on a saturated 2-core machine it is what bounds req/s,
and unlike req/s it barely moves when other jobs share the cores.

Setups: `serve`; `run` (the app as built: image-aware router, the window of --window-ms, and on the cluster
`vlmserve run` starts for one application, Ray Serve's direct ingress: the ingress replica serves HTTP on the
port itself); `run-proxy` (the same through Ray Serve's HTTP proxy, `--no-direct-ingress`); `run-pow2` (`run`
with Ray Serve's default power-of-two-choices router). For two replicas or more, the Prometheus counters of
the image and prefix caches and of the router are read from /metrics after each run.

Prints one Markdown row per run and writes every figure to --out (JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

VLMSERVE = [sys.executable, "-m", "vlmserve"]
CLK_TCK = os.sysconf("SC_CLK_TCK")
COUNTERS = (
    "vlmserve:router_affinity_hit_total",
    "vlmserve:router_affinity_miss_total",
    "vlmserve:router_affinity_spill_total",
    "vlmserve:images_encoded_total",
    "vlmserve:encoder_cache_hits_total",
    "vllm:prefix_cache_queries_total",
    "vllm:prefix_cache_hits_total",
)


@dataclass
class Run:
    setup: str
    round: int
    concurrency: int
    req_per_s: float
    ttft_p50_ms: float
    itl_p50_ms: float
    itl_p99_ms: float
    completed: int
    cpu_ms_per_request: float
    cpu_by_process_ms_per_request: dict[str, float] = field(default_factory=dict)
    counters: dict[str, float] = field(default_factory=dict)
    load_before: float = 0.0


# ------------------------------------------------------------------------------------------- processes


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        tree.setdefault(ppid, []).append(int(entry))
    return tree


def process_tree(root: int) -> list[int]:
    tree, out, todo = _children(), [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(tree.get(pid, []))
    return out


def _label(pid: int) -> str:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    first = argv[0].decode(errors="replace")
    if first.startswith("ray::"):
        return first.split(" ")[0][:48]  # ray::ServeReplica:app:LLMServer:m, ray::ProxyActor, ...
    text = b" ".join(argv).decode(errors="replace")
    if "multiprocessing" in text:
        return "engine process"
    for name in ("gcs_server", "raylet", "dashboard", "log_monitor", "runtime_env", "vlmserve serve"):
        if name in text:
            return name
    return Path(first).name


def cpu_times(pids: list[int]) -> dict[int, tuple[str, float]]:
    out: dict[int, tuple[str, float]] = {}
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[pid] = (_label(pid), (int(fields[11]) + int(fields[12])) / CLK_TCK)
    return out


def metric_sums(base: str) -> dict[str, float]:
    text = httpx.get(f"{base}/metrics", timeout=10).text
    sums = dict.fromkeys(COUNTERS, 0.0)
    for line in text.splitlines():
        m = re.match(r"^([^{\s]+)(?:\{[^}]*\})? (\S+)$", line)
        if m and m.group(1) in sums:
            sums[m.group(1)] += float(m.group(2))
    return sums


# ------------------------------------------------------------------------------------------- servers


def wait_healthy(base: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            # /health answers before the models list is ready on Ray: wait for the model too.
            if (
                httpx.get(f"{base}/health", timeout=2).status_code == 200
                and httpx.get(f"{base}/v1/models", timeout=5).status_code == 200
            ):
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"{base} not healthy after {timeout:.0f}s")


class Server:
    def __init__(self, setup: str, args: argparse.Namespace, work: Path, port: int) -> None:
        self.setup, self.args, self.work, self.port = setup, args, work, port
        self.env = {
            **os.environ,
            "RAY_USAGE_STATS_ENABLED": "0",
            "VLMSERVE_CACHE_DIR": str(work / f"cache-{port}"),
            **dict(item.split("=", 1) for item in args.ray_env if setup != "serve"),
        }
        self.base = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.root = 0

    def start(self) -> None:
        a = self.args
        if self.setup == "serve":
            cmd = [*VLMSERVE, "serve", str(a.checkpoint), "--model-id", "m", "--port", str(self.port)]
            cmd += [f"--{k.replace('_', '-')}={v}" for k, v in a.engine_kwargs.items()]
            env = {**self.env, "OMP_NUM_THREADS": str(a.threads)} if a.threads else self.env
            log = (self.work / f"serve-{self.port}.log").open("wb")
            self.proc = subprocess.Popen([*cmd, "--log-level", "warning"], env=env, stdout=log, stderr=log)
            self.root = self.proc.pid
            wait_healthy(self.base)
            return
        deployment: dict[str, object] = {"num_replicas": a.replicas}
        if self.setup == "run-pow2":
            from ray.serve._private.constants import DEFAULT_REQUEST_ROUTER_PATH

            deployment["request_router_config"] = {"request_router_class": DEFAULT_REQUEST_ROUTER_PATH}
        model: dict[str, object] = {
            "model_loading_config": {"model_id": "m", "model_source": str(a.checkpoint)},
            "deployment_config": deployment,
            "engine_kwargs": a.engine_kwargs,
            "experimental_configs": {"stream_batching_interval_ms": a.window_ms},
        }
        if a.threads:
            model["runtime_env"] = {"env_vars": {"OMP_NUM_THREADS": str(a.threads)}}
        config = self.work / f"serve-{self.port}.yaml"  # JSON is YAML
        app = {"name": "bench", "route_prefix": "/", "import_path": "vlmserve:build_openai_app"}
        config.write_text(
            json.dumps(
                {
                    "http_options": {"host": "127.0.0.1", "port": self.port},
                    "applications": [{**app, "args": {"llm_configs": [model]}}],
                }
            )
        )
        run = subprocess.run(
            [
                *VLMSERVE,
                "run",
                str(config),
                "--non-blocking",
                *(["--no-direct-ingress"] if self.setup == "run-proxy" else []),
            ],
            env=self.env,
            capture_output=True,
            text=True,
        )
        if run.returncode != 0:
            raise SystemExit(f"vlmserve run failed:\n{run.stdout}\n{run.stderr}")
        record = json.loads((self.work / f"cache-{self.port}" / "ray" / "cluster.json").read_text())
        self.root = int(record["pid"])
        wait_healthy(self.base)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(60)
        else:
            subprocess.run([*VLMSERVE, "shutdown", "-y"], env=self.env, capture_output=True, check=False)


# ------------------------------------------------------------------------------------------- runs


def bench(server: Server, concurrency: int, seed: int, out: Path) -> dict[str, Any]:
    a = server.args
    cmd = [
        *VLMSERVE, "bench", "--base-url", f"{server.base}/v1", "--model", "m",
        "--num-requests", str(a.num_requests), "--concurrency", str(concurrency), "--seed", str(seed),
        "--image-size", a.image_size, "--output-len", str(a.output_len), "--ignore-eos",
        "--duration-limit", "300", "--no-progress", "--json", str(out),
    ]  # fmt: skip
    if a.image_pool:
        cmd += ["--image-pool", str(a.image_pool)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.read_text())


def measure(server: Server, setup: str, rnd: int, concurrency: int, seed: int, work: Path) -> Run:
    load = float(Path("/proc/loadavg").read_text().split()[0])
    counters_before = metric_sums(server.base)
    pids = process_tree(server.root)
    before = cpu_times(pids)
    result = bench(server, concurrency, seed, work / f"{setup}-r{rnd}-c{concurrency}.json")
    after = cpu_times(process_tree(server.root))
    counters_after = metric_sums(server.base)
    m: dict[str, Any] = result["metrics"]
    completed = int(m["completed"])
    by_label: dict[str, float] = {}
    for pid, (label, t1) in after.items():
        t0 = before.get(pid, (label, 0.0))[1]
        by_label[label] = by_label.get(label, 0.0) + (t1 - t0) * 1e3 / max(completed, 1)
    return Run(
        setup=setup,
        round=rnd,
        concurrency=concurrency,
        req_per_s=float(m["request_throughput"]),
        ttft_p50_ms=float(m["ttft_ms"]["p50"]),
        itl_p50_ms=float(m["itl_ms"]["p50"]),
        itl_p99_ms=float(m["itl_ms"]["p99"]),
        completed=completed,
        cpu_ms_per_request=sum(by_label.values()),
        cpu_by_process_ms_per_request={k: round(v, 2) for k, v in sorted(by_label.items()) if v > 0.05},
        counters={k: counters_after[k] - counters_before[k] for k in COUNTERS},
        load_before=load,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, required=True, help="e.g. a small-bench checkpoint")
    p.add_argument("--setups", default="serve,run", help="comma-separated: serve, run, run-proxy, run-pow2")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--image-size", default="640x480")
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--image-pool", type=int, default=0, help="images drawn from this many (0: distinct)")
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS of each engine (0: default)")
    p.add_argument("--window-ms", type=float, default=0.0, help="stream_batching_interval_ms of `run`")
    p.add_argument("--ray-env", action="append", default=[], metavar="NAME=VALUE")
    p.add_argument(
        "--engine-kwargs",
        type=json.loads,
        default={},
        metavar="JSON",
        help='engine options of every setup, e.g. \'{"encoder_cache_tokens": 2048, "num_kv_blocks": 360, "max_model_len": 2048}\' '
        "(smaller caches than one replica's share of the images make placement matter)",
    )
    p.add_argument("--port", type=int, default=18600)
    p.add_argument("--out", type=Path, default=None, help="JSON file of every run")
    args = p.parse_args()
    # Stopped with SIGTERM: still stop the server or Ray cluster being measured (the `finally` below).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    setups = args.setups.split(",")
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    runs: list[Run] = []
    print("| setup | round | concurrency | req/s | TTFT p50 (ms) | ITL p50 / p99 (ms) | server CPU ms / request "
          "| load before |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="vlmserve-raybench-") as tmp:
        work = Path(tmp)
        port = args.port
        for rnd in range(1, args.rounds + 1):
            for setup in setups:
                port += 1
                server = Server(setup, args, work, port)
                server.start()
                try:
                    for c in concurrencies:
                        run = measure(server, setup, rnd, c, seed=1000 * rnd + c, work=work)
                        runs.append(run)
                        print(
                            f"| {setup} | {rnd} | {c} | {run.req_per_s:.2f} | {run.ttft_p50_ms:.0f} | "
                            f"{run.itl_p50_ms:.1f} / {run.itl_p99_ms:.1f} | {run.cpu_ms_per_request:.1f} | "
                            f"{run.load_before:.2f} |",
                            flush=True,
                        )
                finally:
                    server.stop()
    import ray
    import torch

    meta = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ray": ray.__version__,
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    for run in runs:
        print(json.dumps({"setup": run.setup, "round": run.round, "c": run.concurrency,
                          "cpu_by_process": run.cpu_by_process_ms_per_request,
                          "counters": {k.split(":")[1]: v for k, v in run.counters.items() if v}}))  # fmt: skip
    if args.out is not None:
        args.out.write_text(json.dumps({"meta": meta, "runs": [asdict(r) for r in runs]}, indent=1))


if __name__ == "__main__":
    main()
