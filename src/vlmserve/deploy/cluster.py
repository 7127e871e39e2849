"""`vlmserve run | status | shutdown`: start or join a Ray cluster, deploy Serve apps on it, report, stop.

`run` deploys a built app (`module:app`) or every application of a Serve YAML file. Without --address it
reuses the local cluster an earlier `vlmserve run` started, or starts one: `ray start --head --block` as a
child process in its own session, with the dashboard and usage stats off, Ray's token authentication on
(its default), free ports (so it never collides with another Ray instance on the machine), sized to the
machine's cores (a 2-core laptop included: the ingress asks for no CPU, each CPU replica for one). Blocking (the default), it waits for
Ctrl-C / SIGTERM and then removes what it deployed and stops the cluster it started; with --non-blocking it
returns once the apps are RUNNING and leaves them serving.

A cluster `run` starts for one application serves it through Ray Serve's direct ingress: the app's ingress
replica answers HTTP on the given port itself, so a token crosses one Ray hop (replica -> ingress) instead of
two (and the HTTP proxy, ~35 ms of CPU a request, is out of the path; benchmarks/RESULTS.md). Ray allocates
direct-ingress ports from a range set when the cluster starts: here the one port asked for, while Serve's
proxy, which Ray still starts, listens on a free port of its own. Several applications, a joined cluster
(--address) or --no-direct-ingress use the proxy on the given port, as before. Deploying again on such a
cluster replaces the application (the old ingress replica stops first: the port is not shared).

What `run` started is recorded in VLMSERVE_CACHE_DIR/ray/cluster.json (address, HTTP URL, the pid of the
`ray start` process), so that `status` finds it and `shutdown` stops exactly that cluster: SIGTERM to the
recorded `ray start --block` process, which stops the GCS, raylet and the other processes it started (the
replicas die with their raylet). A cluster that was joined (--address) keeps running; only Serve stops.

Does not know: what the apps contain (builder.py), argument parsing (cli/).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from vlmserve import envs
from vlmserve.deploy.config import ServeConfigFile

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 60.0
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
_READY_LINE = "Ray runtime started"
_RAY_CLI = [sys.executable, "-m", "ray.scripts.scripts"]


class ClusterError(RuntimeError):
    """A cluster could not be started, reached or stopped; the message says why and what to do."""


# --------------------------------------------------------------------------------------------- the record


@dataclass(frozen=True)
class ClusterRecord:
    """The cluster `vlmserve run` last deployed to."""

    address: str  # GCS address, host:port
    http_url: str  # where clients send requests: the direct-ingress replica, else Ray Serve's HTTP proxy
    pid: int | None = None  # the `ray start --block` process vlmserve started; None: a joined cluster
    log_path: str | None = None
    ingress_port: int | None = None  # the one direct-ingress port the cluster was started with
    proxy_port: int | None = None  # Serve's proxy when it is not where clients go (direct ingress)

    @property
    def started_here(self) -> bool:
        return self.pid is not None


def default_record_path() -> Path:
    return envs.VLMSERVE_CACHE_DIR / "ray" / "cluster.json"


def load_record(path: Path) -> ClusterRecord | None:
    try:
        return ClusterRecord(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def save_record(record: ClusterRecord, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(record), indent=2))


# --------------------------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def check_port_free(host: str, port: int) -> None:
    """A port the cluster's ingress will listen on must be free before the cluster starts: taken, Ray would
    retry binding it for a while and then fail the deployment with no word about the port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(
            socket.SOL_SOCKET, socket.SO_REUSEADDR, 1
        )  # as the server sets it: TIME_WAIT is no owner
        try:
            s.bind((host, port))
        except OSError as e:
            raise ClusterError(f"cannot listen on {host}:{port} ({e.strerror}): choose another --port") from e


def is_our_ray_process(pid: int, address: str) -> bool:
    """Whether `pid` is alive and is the `ray start` of `address` (not a process that reused the pid)."""
    if not _alive(pid):
        return False
    _, command = _process(pid)
    port = address.rsplit(":", 1)[-1]
    return "ray.scripts.scripts" in command and f"--port={port}" in command


def _process(pid: int) -> tuple[str, str]:
    """(state letter, command line) of `pid`; ("", "") when it is gone. /proc where there is one, else ps."""
    proc = Path("/proc") / str(pid)
    if Path("/proc/self").is_dir():
        try:
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
            command = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError):
            return "", ""
        return state, command
    out = subprocess.run(
        ["ps", "-o", "stat=,command=", "-p", str(pid)], capture_output=True, text=True
    ).stdout
    state, _, command = out.strip().partition(" ")
    return state[:1], command


def start_local_cluster(
    num_cpus: int | None, log_path: Path, ingress_port: int | None = None
) -> tuple[str, int]:
    """Start a head node on this machine; return (GCS address, pid of `ray start --block`). ingress_port:
    Serve's direct ingress on, its ports limited to that one (the environment reaches every Ray process)."""
    port = free_port()
    cmd = [
        *_RAY_CLI,
        "start",
        "--head",
        "--block",
        f"--port={port}",
        f"--num-cpus={num_cpus or os.cpu_count() or 1}",
        "--include-dashboard=false",
        "--disable-usage-stats",
        # Ray's fixed default ports would collide with any other Ray instance on this machine.
        f"--ray-client-server-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}",
    ]
    env = {
        **os.environ,
        "RAY_USAGE_STATS_ENABLED": "0",
        # Serve is shut down before the cluster is stopped, so there is nothing left to drain on SIGTERM.
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
    }
    if ingress_port is not None:
        env["RAY_SERVE_ENABLE_DIRECT_INGRESS"] = "1"
        env["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"] = str(ingress_port)
        env["RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"] = str(ingress_port + 1)  # exclusive
        # Ray keeps a stopping ingress replica answering for 30 s by default, for an external load balancer
        # to notice; a local cluster has none, and shutdown would wait for it.
        env["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] = "1"
        # Ray holds a released port back for minutes (for its HAProxy mode, not used here): the replica that
        # replaces a dead or redeployed ingress must get the one port back at once.
        env["RAY_SERVE_PORT_QUARANTINE_S"] = "0"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if _READY_LINE in log_path.read_text(errors="replace"):
            return f"127.0.0.1:{port}", proc.pid
        if proc.poll() is not None:
            raise ClusterError(
                f"`ray start` exited with status {proc.returncode} before the cluster was up:\n"
                f"{_tail(log_path)}\n(full log: {log_path})"
            )
        time.sleep(0.2)
    proc.terminate()
    raise ClusterError(f"the Ray cluster did not start within {START_TIMEOUT_S:.0f}s; see {log_path}")


def stop_local_cluster(record: ClusterRecord) -> None:
    """Stop the cluster `record` says vlmserve started (GCS, raylet, workers), and wait until it is gone."""
    pid = record.pid
    if pid is None or not is_our_ray_process(pid, record.address):
        return
    # `ray start --block` stops every process it started when it gets SIGTERM.
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while time.monotonic() < deadline:
        if not _alive(pid):
            return
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)  # its own session: only the processes of this cluster
    logger.warning("the Ray cluster did not stop within %.0fs and was killed", STOP_TIMEOUT_S)


def _alive(pid: int) -> bool:
    # Reap it if it is our child; a zombie whose parent is another process still answers kill(pid, 0).
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    state, _ = _process(pid)
    return state not in ("", "Z")


def _tail(path: Path, lines: int = 20) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


# --------------------------------------------------------------------------------------------- Ray connection


def connect(address: str, *, quiet: bool, started_here: bool) -> None:
    """Connect this process to the cluster as a driver. `started_here`: a cluster vlmserve started."""
    import ray

    if started_here:
        # `ray start` enables token authentication and saves the token in ~/.ray/auth_token; ray.init turns
        # token mode on by itself only when it discovers a local cluster, never for an explicit address
        # (that would send the token wherever the address points). This address is our own local cluster.
        # NOTE: a private helper of Ray 2.60 (the version the `ray` extra pins); it is what ray.init runs.
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )

        # Its "token authentication is enabled" warning is expected here: vlmserve started the cluster that way.
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
        maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
    if quiet:
        logging.getLogger("ray.serve").setLevel(logging.WARNING)
    try:
        ray.init(
            address=address,
            logging_level=logging.WARNING if quiet else logging.INFO,
            log_to_driver=not quiet,
        )
    except (ConnectionError, RuntimeError) as e:
        raise ClusterError(
            f"cannot connect to the Ray cluster at {address}: {e} (a cluster with token authentication needs "
            "RAY_AUTH_MODE=token and its token, see https://docs.ray.io/en/latest/ray-security/token-auth.html)"
        ) from e


def disconnect() -> None:
    import ray

    ray.shutdown()


# --------------------------------------------------------------------------------------------- apps


@dataclass(frozen=True)
class AppSpec:
    name: str
    route_prefix: str
    import_path: str
    args: Mapping[str, Any]


def read_target(target: str) -> tuple[list[AppSpec], tuple[str, int] | None]:
    """The applications `target` names (a Serve YAML file or module:app), and the file's HTTP options."""
    if target.endswith((".yaml", ".yml", ".json")) or Path(target).is_file():
        config = ServeConfigFile.load(target)
        apps = [AppSpec(a.name, a.route_prefix, a.import_path, a.args) for a in config.applications]
        return apps, (config.http_options.host, config.http_options.port)
    if ":" not in target:
        raise ClusterError(
            f"{target!r} is neither a Serve YAML file nor module:attribute (e.g. serve_qwen_VL:app)"
        )
    return [AppSpec("default", "/", target, {})], None


def _import(import_path: str) -> Any:
    module_name, _, attr = import_path.partition(":")
    if not attr:
        module_name, _, attr = import_path.rpartition(".")
    # Like `serve run`: modules next to where the command runs are importable.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        raise ClusterError(f"cannot import {import_path!r}: {e}") from e
    return obj


def check_args(spec: AppSpec) -> None:
    """Validate the args of vlmserve's own builder before any cluster is started or joined."""
    from vlmserve.deploy.builder import build_openai_app
    from vlmserve.deploy.config import LLMServingArgs

    if spec.args and _import(spec.import_path) is build_openai_app:
        LLMServingArgs.model_validate(spec.args)


def one_ingress_replica(spec: AppSpec) -> bool:
    """Whether the application's ingress runs as one replica (direct ingress gives it the one port): vlmserve's
    builder unless ingress_deployment_config asks for more or for autoscaling; a built app by its ingress
    deployment's replica count."""
    from vlmserve.deploy.builder import build_openai_app
    from vlmserve.deploy.config import LLMServingArgs

    obj = _import(spec.import_path)
    if obj is build_openai_app:
        options = LLMServingArgs.model_validate(spec.args or {}).ingress_deployment_config
        return options.get("num_replicas", 1) == 1 and not options.get("autoscaling_config")
    deployment = getattr(obj, "_bound_deployment", None)  # a built Application
    return getattr(deployment, "num_replicas", 1) == 1


def build_application(spec: AppSpec) -> Any:
    """Import `spec.import_path`: a built Application is used as is, a builder is called with spec.args."""
    from ray.serve.deployment import Application

    obj = _import(spec.import_path)
    if isinstance(obj, Application):
        if spec.args:
            raise ClusterError(f"{spec.import_path} is a built application; it takes no args (remove them)")
        return obj
    if callable(obj):
        app = obj(dict(spec.args))
        if not isinstance(app, Application):
            raise ClusterError(
                f"{spec.import_path} returned {type(app).__name__}, not a Ray Serve Application"
            )
        return app
    raise ClusterError(f"{spec.import_path} is a {type(obj).__name__}, not an application or a builder")


def _url(host: str, port: int, prefix: str = "/") -> str:
    shown = "localhost" if host in ("0.0.0.0", "::") else host
    return f"http://{shown}:{port}{prefix}"


# --------------------------------------------------------------------------------------------- commands


def run(
    target: str,
    *,
    address: str | None,
    non_blocking: bool,
    host: str | None,
    port: int | None,
    num_cpus: int | None,
    record_path: Path,
    direct_ingress: bool = True,
) -> int:
    from ray import serve

    apps, file_http = read_target(target)
    for spec in apps:
        check_args(spec)
    host = host or (file_http[0] if file_http else DEFAULT_HOST)
    port = port if port is not None else (file_http[1] if file_http else DEFAULT_PORT)
    previous = load_record(record_path)
    previous_alive = (
        previous is not None
        and previous.pid is not None
        and is_our_ray_process(previous.pid, previous.address)
    )
    started_now = False
    if address is not None:
        record = ClusterRecord(address, _url(host, port))
        if not previous_alive:  # never forget a cluster vlmserve started and has to stop
            save_record(record, record_path)
    elif previous is not None and previous_alive:
        record = previous
        if record.ingress_port is not None and (len(apps) != 1 or port != record.ingress_port):
            raise ClusterError(
                f"the local Ray cluster serves one application through direct ingress on port "
                f"{record.ingress_port}: deploy a single application with --port {record.ingress_port}, or "
                "stop it first (`vlmserve shutdown -y`)"
            )
        print(f"using the local Ray cluster at {record.address} (started by an earlier `vlmserve run`)")
    else:
        direct = direct_ingress and len(apps) == 1 and one_ingress_replica(apps[0])
        if direct:
            check_port_free(host, port)
        log_path = record_path.parent / "ray-start.log"
        print("starting a local Ray cluster ...", flush=True)
        gcs, pid = start_local_cluster(num_cpus, log_path, ingress_port=port if direct else None)
        record = ClusterRecord(
            gcs,
            _url(host, port),
            pid,
            str(log_path),
            port if direct else None,
            free_port() if direct else None,
        )
        save_record(record, record_path)
        started_now = True
        print(f"Ray cluster at {gcs} (pid {pid}; log {log_path})")

    deployed: list[str] = []
    try:
        connect(record.address, quiet=non_blocking, started_here=record.started_here)
        serve.start(http_options={"host": host, "port": record.proxy_port or port})
        if record.ingress_port is not None:
            # One port, one ingress replica: a new one cannot start beside the old one (as a rolling update
            # would start it), so what the cluster serves goes first.
            for name in serve.status().applications:
                print(f"replacing application {name!r} (direct ingress serves one application on its port)")
                serve.delete(name)
        for spec in apps:
            app = build_application(spec)
            serve.run(app, name=spec.name, route_prefix=spec.route_prefix, blocking=False)
            deployed.append(spec.name)
            print(f"application {spec.name!r} is RUNNING at {record.http_url.rstrip('/')}{spec.route_prefix}")
    except BaseException:
        # Nothing half-deployed is left behind: a cluster started for this command goes with it.
        _teardown(deployed, record, stop_cluster=started_now, record_path=record_path)
        raise
    if non_blocking:
        disconnect()
        print("serving in the background; `vlmserve status` shows it, `vlmserve shutdown -y` stops it")
        return 0

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print("serving; Ctrl-C stops it" + (" and the local Ray cluster" if record.started_here else ""))
    while not stop.wait(1.0):
        if record.pid is not None and not _alive(record.pid):
            print("the local Ray cluster stopped", file=sys.stderr)
            record_path.unlink(missing_ok=True)
            return 1
    _teardown(deployed, record, stop_cluster=record.started_here, record_path=record_path)
    return 0


def _teardown(names: list[str], record: ClusterRecord, *, stop_cluster: bool, record_path: Path) -> None:
    import ray
    from ray import serve

    if ray.is_initialized():
        if stop_cluster:
            serve.shutdown()
        else:
            for name in names:
                serve.delete(name)
        disconnect()
    if stop_cluster:
        stop_local_cluster(record)
        record_path.unlink(missing_ok=True)


def status(*, address: str | None, record_path: Path) -> int:
    from ray import serve

    record = load_record(record_path)
    address = address or (record.address if record else None)
    ours = record is not None and record.address == address and record.started_here
    if address is None or (ours and record is not None and not is_our_ray_process(record.pid or 0, address)):
        print(
            "no Ray cluster started by `vlmserve run` is running (start one with `vlmserve run`, or give --address)"
        )
        return 1
    connect(address, quiet=True, started_here=ours)
    try:
        overview = serve.status()
    finally:
        disconnect()
    report: dict[str, Any] = {"ray_address": address}
    if record is not None and record.address == address:
        report["http_url"] = record.http_url
    report["applications"] = {
        name: {
            "status": _label(app.status),
            **({"message": app.message} if app.message else {}),
            "deployments": {
                dep_name: {
                    "status": _label(dep.status),
                    "replicas": {_label(state): count for state, count in dep.replica_states.items()},
                    **({"message": dep.message} if dep.message else {}),
                }
                for dep_name, dep in app.deployments.items()
            },
        }
        for name, app in overview.applications.items()
    }
    print(yaml.safe_dump(report, sort_keys=False).rstrip())
    return 0


def _label(value: Any) -> str:
    """An enum member's value (Ray's status enums), or the string itself."""
    return str(getattr(value, "value", value))


def shutdown(*, address: str | None, yes: bool, record_path: Path) -> int:
    from ray import serve

    record = load_record(record_path)
    address = address or (record.address if record else None)
    if address is None:
        print(
            "nothing to shut down: no Ray cluster was started by `vlmserve run` (give --address to stop Serve on another)"
        )
        return 0
    ours = record if record is not None and record.address == address and record.started_here else None
    reachable = ours is None or is_our_ray_process(ours.pid or 0, ours.address)
    if not yes:
        what = "the Serve applications and the local Ray cluster" if ours else "the Serve applications"
        answer = input(f"Shut down {what} at {address}? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("aborted")
            return 1
    if reachable:
        connect(address, quiet=True, started_here=ours is not None)
        try:
            serve.shutdown()
        finally:
            disconnect()
        print(f"Serve shut down on {address}")
    if ours is not None:
        stop_local_cluster(ours)
        print(f"local Ray cluster {address} stopped")
    if record is not None and record.address == address:
        record_path.unlink(missing_ok=True)
    return 0
