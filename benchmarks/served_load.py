"""Served-load runs on one machine: start `vlmserve serve`, drive it with `vlmserve bench` loads, and record
what each load got, the CPU time of the server's processes, and whether the server stalled.

    python benchmarks/served_load.py --out OUT --label new \\
        --load w2x8:8:128:384:448x448:512 --load w1c1:1:1:32:1280x720:128 \\
        -- --load-format dummy --dtype bfloat16 --max-model-len 8192 --max-num-seqs 128

A load is NAME:CLIENT_PROCESSES:CONCURRENCY:REQUESTS:WxH:OUTPUT_TOKENS[:EXTRA BENCH FLAGS], e.g.
`w2json:8:128:384:448x448:512:--json-schema benchmarks/schemas/long_extraction.json` (the flags split on spaces). The server runs the code under --src
(default: this checkout's src/), the client always this checkout's bench. Every wait ends when the process
waited for has died. A server whose /metrics stops answering for --stall-after seconds during a load is
declared stalled: every process of it is sent SIGUSR1 (the engine process writes its stacks on it; with
--dump-stacks-site, so does the front, through a sitecustomize that registers faulthandler), the load is
stopped, and no later load runs on that server.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def children(pid: int) -> list[int]:
    """Every descendant of pid (Linux /proc)."""
    out: list[int] = []
    try:
        tasks = Path(f"/proc/{pid}/task").iterdir()
        direct = [int(c) for t in tasks for c in (t / "children").read_text().split()]
    except OSError:
        return out
    for c in direct:
        out += [c, *children(c)]
    return out


def cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def metric_lines(text: str, prefix: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line.startswith(prefix):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def engine_phases(phases_dir: Path) -> dict:
    """The engine process's latest cumulative phase totals (benchmarks/site/sitecustomize.py)."""
    time.sleep(0.6)  # one more snapshot
    for f in phases_dir.glob("phases-*.json"):
        return json.loads(f.read_text())
    return {"seconds": {}, "calls": {}}


def phases_per_step(before: dict, after: dict) -> dict:
    """ms per engine step of each phase over one load (its steps include the client's warm-up requests)."""
    steps = after["calls"].get("EngineCore.step", 0) - before["calls"].get("EngineCore.step", 0)
    out = {"steps": steps}
    for k, v in sorted(after["seconds"].items()):
        out[k] = round(1e3 * (v - before["seconds"].get(k, 0.0)) / max(steps, 1), 3)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--label", required=True)
    ap.add_argument("--src", type=Path, default=ROOT / "src")
    ap.add_argument("--model", default=None, help="checkpoint dir; default: the 7B architecture, no weights")
    ap.add_argument("--load", action="append", required=True)
    ap.add_argument("--stall-after", type=float, default=45.0)
    ap.add_argument("--load-timeout", type=float, default=400.0)
    ap.add_argument("--dump-stacks-site", type=Path, default=None)
    ap.add_argument(
        "--engine-phases",
        action="store_true",
        help="time the engine loop's phases in the engine process (benchmarks/site), ms per step per load",
    )
    ap.add_argument(
        "--engine-trace",
        type=Path,
        help="a torch.profiler trace of engine steps 1000-1040 to this file (read by benchmarks/trace_gaps.py)",
    )
    ap.add_argument("--extra-path", default=os.environ.get("PYTHONPATH", ""))
    ap.add_argument("server_flags", nargs="*")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    model = args.model
    if model is None:
        model = str(Path(tempfile.gettempdir()) / "vlmserve-7b")
        if not Path(model, "config.json").exists():
            env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), args.extra_path]))
            code = "from vlmserve.checkpoints.checkpoint import write_checkpoint as w; w(%r, preset='7b', weights=False)"
            subprocess.run([sys.executable, "-c", code % model], env=env, check=True)

    server_path = [str(args.src.resolve()), args.extra_path]
    if (args.engine_phases or args.engine_trace) and args.dump_stacks_site is None:
        args.dump_stacks_site = ROOT / "benchmarks" / "site"
    if args.dump_stacks_site is not None:
        server_path.insert(0, str(args.dump_stacks_site.resolve()))
    server_env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in server_path if p))
    if args.engine_trace:
        server_env["VLMSERVE_ENGINE_TRACE"] = str(args.engine_trace.resolve())
    phases_dir = args.out / f"{args.label}-phases"
    if args.engine_phases:
        phases_dir.mkdir(exist_ok=True)
        for stale in phases_dir.glob("phases-*"):
            stale.unlink()
        server_env["VLMSERVE_ENGINE_PHASES"] = str(phases_dir.resolve())
    client_env = dict(
        os.environ, PYTHONPATH=os.pathsep.join(p for p in [str(ROOT / "src"), args.extra_path] if p)
    )
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = args.out / f"{args.label}-server.log"
    cmd = [sys.executable, "-m", "vlmserve", "serve", model, "--host", "127.0.0.1", "--port", str(port)]
    with log.open("wb") as f:
        server = subprocess.Popen(
            [*cmd, "--served-model-name", "m", *args.server_flags],
            stdout=f,
            stderr=subprocess.STDOUT,
            env=server_env,
            start_new_session=True,
        )
    summary: dict = {"label": args.label, "server_flags": args.server_flags, "loads": {}}
    try:
        t0 = time.monotonic()
        while True:
            if server.poll() is not None:
                print(log.read_text()[-4000:])
                raise SystemExit(f"server exited with {server.returncode} while starting")
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() - t0 > 900:
                raise SystemExit("server not healthy after 900 s")
            time.sleep(1)
        summary["startup_s"] = time.monotonic() - t0
        print(f"[{args.label}] server up in {summary['startup_s']:.0f} s", flush=True)
        for spec in args.load:
            name, clients, conc, n, size, out_len, *extra = spec.split(":", 6)
            jpath = args.out / f"{args.label}-{name}.json"
            bench = [
                sys.executable, "-m", "vlmserve", "bench", "--base-url", f"{base}/v1", "--model", "m",
                "--num-clients", clients, "--concurrency", conc, "--num-requests", n, "--image-size", size,
                "--output-len", out_len, "--ignore-eos", "--prompt-words", "8", "--warmup", clients,
                "--request-timeout", "300", "--duration-limit", str(args.load_timeout), "--no-progress",
                "--json", str(jpath), "--seed", str(zlib.crc32(spec.encode()) % 1000),
                *(extra[0].split() if extra else []),
            ]  # fmt: skip
            procs = [server.pid, *children(server.pid)]
            cpu0 = {p: cpu_seconds(p) for p in procs}
            phases0 = engine_phases(phases_dir) if args.engine_phases else None
            start = time.monotonic()
            client = subprocess.Popen(bench, env=client_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            silent_since: float | None = None
            stalled = False
            while client.poll() is None:
                time.sleep(3)
                if server.poll() is not None:
                    client.kill()
                    break
                try:
                    httpx.get(f"{base}/metrics", timeout=5)
                    silent_since = None
                except httpx.TransportError:
                    silent_since = silent_since or time.monotonic()
                    if time.monotonic() - silent_since > args.stall_after:
                        stalled = True
                        print(
                            f"[{args.label}] {name}: /metrics silent for {args.stall_after} s: stacks",
                            flush=True,
                        )
                        for p in [server.pid, *children(server.pid)]:
                            try:
                                os.kill(p, signal.SIGUSR1)
                            except ProcessLookupError:
                                pass
                        time.sleep(5)
                        client.kill()
                        break
                if time.monotonic() - start > args.load_timeout + 330:
                    client.kill()
                    break
            wall = time.monotonic() - start
            text = client.communicate()[0].decode(errors="replace")
            cpu = {str(p): round((cpu_seconds(p) - c) / wall, 2) for p, c in cpu0.items()}
            entry = {"stalled": stalled, "wall_s": wall, "cpu_cores_by_pid": cpu, "table": text[-3000:]}
            if args.engine_phases:
                entry["engine_phases_ms_per_step"] = phases_per_step(phases0, engine_phases(phases_dir))
                print(
                    f"[{args.label}] {name}: engine phases {entry['engine_phases_ms_per_step']}", flush=True
                )
            if jpath.exists() and not stalled:
                entry["metrics"] = json.loads(jpath.read_text())["metrics"]
            summary["loads"][name] = entry
            m = entry.get("metrics", {})
            print(
                f"[{args.label}] {name}: stalled={stalled} completed={m.get('completed')} "
                f"failed={m.get('failed')} out_tok/s={m.get('output_throughput', 0):.0f} "
                f"req/s={m.get('request_throughput', 0):.2f} "
                f"ttft p50/p99={m.get('ttft_ms', {}).get('p50')}/{m.get('ttft_ms', {}).get('p99')} "
                f"itl p50/p99={m.get('itl_ms', {}).get('p50')}/{m.get('itl_ms', {}).get('p99')} "
                f"client_cpu={m.get('client_cpu_max')} server cpu={cpu}",
                flush=True,
            )
            if stalled or server.poll() is not None:
                break
        try:
            text = httpx.get(f"{base}/metrics", timeout=5).text
            summary["event_loop_lag"] = metric_lines(text, "vlmserve:event_loop_lag_seconds")
        except httpx.TransportError:
            pass
    finally:
        try:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(server.pid, signal.SIGKILL)
        (args.out / f"{args.label}-summary.json").write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
