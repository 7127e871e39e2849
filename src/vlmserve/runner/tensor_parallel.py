"""Tensor-parallel workers: ranks 1 .. N-1 of a model sharded over N devices, started and supervised here.

    driver process (engine core)                 worker process, rank r (one per other device)
      scheduler, KV bookkeeping, sampling          load_model(tp=rank r): reads only its shards
      rank 0: ModelRunner(workers=WorkerGroup)     ModelRunner (same KV block count as rank 0)
        step -> StepInputs --- pipe (pickled) -->  loop: recv StepInputs -> runner.execute
        (at start: AllocateKVCache, ...)   ----->        or a runner call -> "ready"
        execute (its shard)  <== all-reduce / gather over gloo (CPU) or NCCL (GPU) ==> execute

Rank 0 runs in the driver's process (as vLLM's uniproc executor with multiproc workers does): the scheduler's
output never crosses a process boundary, only the step's plain inputs (token ids, positions, KV slots, block
tables, images to encode) do, once per step, to each worker. Every rank runs the same forward on the same
inputs in the same order, so their collectives meet; rank 0 alone samples (the logits are gathered to it).

Where workers run: spawned processes on this machine (rank r on GPU r), or, when the driver is a Ray actor in
a placement group (a Ray Serve replica with placement_group_bundles, deploy/builder.py), Ray actors in
bundles 1 .. N-1, each seeing its bundle's GPU, connected to the driver by an authenticated socket
(multiprocessing's Listener / Client) instead of a pipe. The loop they run is the same `worker_main`.

Process group: a TCPStore hosted by the driver and one gloo / NCCL ProcessGroup object per rank, used directly
(not torch.distributed's global default group), so several engines may live in one process.

Supervision: a thread watches the workers (process sentinels; a Ray actor's one long `run` call). A worker that dies (killed, out of memory, or a
step that raised: a worker exits rather than fall out of step with the others) marks the group dead; the
driver's next step, or the collective it is blocked in, fails with `WorkerDiedError`, which the engine treats
as fatal (engine/async_engine.py `step_or_fail`): every open request ends with an error and /health reports
the engine dead. Workers exit when the driver's pipe closes, so a killed driver leaves no orphans (Ray
actors are owned by the replica and end with it).

Does not know the scheduler or requests; the runner decides what a step's inputs are.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import multiprocessing as mp
import os
import pickle
import socket
import threading
import time
import weakref
from multiprocessing.connection import Connection, Listener, wait
from typing import Any

import torch
import torch.distributed as dist

from vlmserve.config import EngineConfig
from vlmserve.models.layers.parallel import TensorParallel

logger = logging.getLogger(__name__)

# Collectives give up after this long (a peer that hangs without dying); a dead peer fails them at once.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=10)
STARTUP_TIMEOUT_S = 600.0


class WorkerDiedError(RuntimeError):
    """A tensor-parallel worker is gone: the ranks cannot step together any more, the engine is dead."""

    fatal = True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_group(backend: str, rank: int, size: int, port: int, host: str = "127.0.0.1") -> TensorParallel:
    """This rank's ProcessGroup (rank 0 hosts the store) as a `TensorParallel`."""
    store = dist.TCPStore(host, port, size, rank == 0, timeout=COLLECTIVE_TIMEOUT)
    if backend == "nccl":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = COLLECTIVE_TIMEOUT
        group: Any = dist.ProcessGroupNCCL(store, rank, size, opts)
    else:
        group = dist.ProcessGroupGloo(store, rank, size, COLLECTIVE_TIMEOUT)
    return TensorParallel(rank, size, group)


def device_of_rank(config: EngineConfig, rank: int, one_gpu_visible: bool = False) -> torch.device:
    """Rank r's device: GPU r of the ones this process sees, or its only one (a Ray actor sees just its
    bundle's GPU)."""
    if config.device != "cuda":
        return torch.device("cpu")
    return torch.device("cuda", 0 if one_gpu_visible else rank)


class _LocalWorker:
    """A worker process started here (multiprocessing, spawn), talking over a pipe."""

    def __init__(self, config: EngineConfig, rank: int, host: str, port: int) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(
            target=worker_main,
            args=(config, rank, host, port, child),
            name=f"vlmserve-tp-worker-{rank}",
            daemon=True,  # ended with the driver's process whatever way it exits
        )
        with _children_allowed():
            self.proc.start()
        child.close()
        self.rank = rank

    @property
    def pid(self) -> int | None:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.is_alive()

    def describe_death(self) -> str:
        self.proc.join(timeout=1.0)
        return f"tensor-parallel worker {self.rank} (pid {self.proc.pid}) exited (exit code {self.proc.exitcode})"

    def stop(self) -> None:
        self.proc.join(timeout=10.0)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(timeout=5.0)


class _RayWorker:
    """A worker as a Ray actor in bundle `rank` of the replica's placement group, talking over a socket
    (multiprocessing's Connection, authenticated) to the driver's listener."""

    def __init__(
        self,
        config: EngineConfig,
        rank: int,
        host: str,
        port: int,
        listener: Listener,
        authkey: bytes,
        pg: Any,
    ) -> None:
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        bundle = pg.bundle_specs[rank]
        self.rank = rank
        self.actor = (
            ray.remote(_RayWorkerActor)
            .options(
                num_cpus=bundle.get("CPU", 0),
                num_gpus=bundle.get("GPU", 0),
                scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=rank),
                # Named so that operators (and tests) can find the ranks; owned by the replica actor, so Ray
                # ends them with it.
                name=f"vlmserve-tp-worker-{rank}-{os.urandom(4).hex()}",
            )
            .remote()
        )
        self.done = self.actor.run.remote(config, rank, host, port, listener.address, authkey)
        self.conn = listener.accept()  # this actor's: the next one is created after it connected
        self.pid = None

    def alive(self) -> bool:
        import ray

        ready, _ = ray.wait([self.done], timeout=0)
        return not ready

    def describe_death(self) -> str:
        import ray

        try:
            ray.get(self.done, timeout=1.0)
            how = "returned"
        except Exception as e:  # the actor died: Ray's error says how
            how = f"died: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        return f"tensor-parallel worker {self.rank} (Ray actor) {how}"

    def stop(self) -> None:
        import ray

        ray.wait([self.done], timeout=10.0)  # a clean exit first (it was sent None)
        ray.kill(self.actor)


class _RayWorkerActor:
    """The Ray actor class of a worker: one call, `run`, that lasts as long as the worker."""

    def run(
        self, config: EngineConfig, rank: int, host: str, port: int, address: Any, authkey: bytes
    ) -> None:
        from multiprocessing.connection import Client

        worker_main(config, rank, host, port, Client(address, authkey=authkey), one_gpu_visible=True)


def _ray_placement_group() -> Any:
    """The placement group this process runs in, when it is a Ray actor in one (a Ray Serve replica with
    placement_group_bundles); None otherwise."""
    try:
        import ray
        from ray.util.placement_group import get_current_placement_group
    except ImportError:
        return None
    if not ray.is_initialized():
        return None
    return get_current_placement_group()


class WorkerGroup:
    """The driver's side: starts ranks 1 .. N-1, joins the process group as rank 0 (`tp`), sends each step's
    inputs, watches the workers.

    Where the workers run: in a Ray placement group (a Ray Serve replica deployed with
    placement_group_bundles, deploy/builder.py), as Ray actors in bundles 1 .. N-1, each with its bundle's
    GPU; otherwise as processes started here, rank r on GPU r."""

    def __init__(self, config: EngineConfig) -> None:
        self.size = config.tensor_parallel_size
        self.dead_reason: str | None = None
        self._closing = False
        backend = "nccl" if config.device == "cuda" else "gloo"
        pg = _ray_placement_group() if self.size > 1 else None
        self._workers: list[Any] = []
        if pg is not None:
            import ray

            if len(pg.bundle_specs) < self.size:
                raise ValueError(
                    f"tensor_parallel_size {self.size} needs {self.size} placement group bundles, the replica's "
                    f"group has {len(pg.bundle_specs)}; give placement_group_config one bundle per rank"
                )
            host = ray.util.get_node_ip_address()
            port = _free_port()
            authkey = os.urandom(32)
            listener = Listener((host, 0), authkey=authkey)
            try:
                for rank in range(1, self.size):
                    self._workers.append(_RayWorker(config, rank, host, port, listener, authkey, pg))
            finally:
                listener.close()
            one_gpu_visible = True
        else:
            host, port = "127.0.0.1", _free_port()
            for rank in range(1, self.size):
                self._workers.append(_LocalWorker(config, rank, host, port))
            one_gpu_visible = False
        # Stop the workers when this group is dropped without shutdown() (an engine that failed to start).
        self._finalizer = weakref.finalize(self, _stop_workers, list(self._workers))
        if config.device == "cuda":
            torch.cuda.set_device(device_of_rank(config, 0, one_gpu_visible))
        self.tp = make_group(backend, 0, self.size, port, host)
        self._watcher = threading.Thread(target=self._watch, name="vlmserve-tp-watch", daemon=True)
        self._watcher.start()

    @property
    def pids(self) -> list[int | None]:
        """The workers' process ids (None for Ray actors)."""
        return [w.pid for w in self._workers]

    def start_runners(self, runner_kwargs: dict[str, Any]) -> None:
        """Tell every worker to build its runner (same KV cache size as rank 0's); the caller builds rank
        0's at the same time (CUDA-graph capture runs collectives on every rank)."""
        self._send_all(pickle.dumps(runner_kwargs))

    def wait_ready(self) -> None:
        for w in self._workers:
            if not w.conn.poll(STARTUP_TIMEOUT_S):
                raise WorkerDiedError(
                    f"tensor-parallel worker {w.rank} did not start in {STARTUP_TIMEOUT_S:.0f}s"
                )
            try:
                status, detail = w.conn.recv()
            except (EOFError, OSError):
                raise WorkerDiedError(w.describe_death()) from None
            if status != "ready":
                raise WorkerDiedError(f"tensor-parallel worker {w.rank} failed to start: {detail}")

    def send(self, step: Any) -> None:
        """Send one step's inputs to every worker (pickled once)."""
        self._send_all(pickle.dumps(step, protocol=pickle.HIGHEST_PROTOCOL))

    def _send_all(self, data: bytes) -> None:
        self.check()
        for w in self._workers:
            try:
                w.conn.send_bytes(data)
            except (BrokenPipeError, OSError):
                raise WorkerDiedError(w.describe_death()) from None

    def check(self) -> None:
        """Raise WorkerDiedError when a worker is gone."""
        if self.dead_reason is None:
            for w in self._workers:
                if not w.alive():
                    self.dead_reason = w.describe_death()
                    break
        if self.dead_reason is not None:
            raise WorkerDiedError(self.dead_reason)

    def failure(self, error: Exception, grace_s: float = 2.0) -> WorkerDiedError:
        """The fatal error to raise for `error`, raised by rank 0's part of a step: a collective with a
        rank that died fails (gloo) shortly before its process is seen gone, so wait a moment for that;
        whatever the cause, a step the ranks did not all finish leaves them out of step."""
        if isinstance(error, WorkerDiedError):
            return error
        deadline = time.monotonic() + grace_s
        while self.dead_reason is None and time.monotonic() < deadline:
            try:
                self.check()
            except WorkerDiedError as e:
                return e
            time.sleep(0.05)
        reason = (
            self.dead_reason or f"a tensor-parallel step failed on rank 0: {type(error).__name__}: {error}"
        )
        self.dead_reason = reason
        return WorkerDiedError(reason)

    def _watch(self) -> None:
        if not self._workers:
            return  # a world of one
        gone = _first_to_exit(self._workers)
        if self._closing:
            return
        self.dead_reason = gone.describe_death()
        logger.error("%s; the engine cannot step any more", self.dead_reason)
        # A collective rank 0 is blocked in would wait for the dead peer: NCCL's is aborted here (gloo's
        # fails by itself when the peer's connection closes).
        with contextlib.suppress(Exception):
            if self.tp.group.name() == "nccl":
                self.tp.group.abort()

    def shutdown(self) -> None:
        self._closing = True
        self._finalizer()


def _first_to_exit(workers: list[Any]) -> Any:
    """Block until one of the workers is gone (all of one kind); return it."""
    if isinstance(workers[0], _RayWorker):
        import ray

        ready, _ = ray.wait([w.done for w in workers], num_returns=1)
        return next(w for w in workers if w.done in ready)
    sentinels = wait([w.proc.sentinel for w in workers])
    return next(w for w in workers if w.proc.sentinel in sentinels)


@contextlib.contextmanager
def _children_allowed() -> Any:
    """multiprocessing refuses to start a child from a daemonic process, and the server's engine process
    (engine/engine_process.py) is one (so that it dies with the server). Its workers are children it
    supervises and stops itself (and they exit when its pipe closes), so the rule is lifted while starting
    them."""
    config = mp.current_process()._config  # type: ignore[attr-defined]
    was = config.get("daemon", False)
    config["daemon"] = False
    try:
        yield
    finally:
        config["daemon"] = was


def _stop_workers(workers: list[Any]) -> None:
    for w in workers:
        with contextlib.suppress(Exception):
            w.conn.send_bytes(pickle.dumps(None))
            w.conn.close()
    for w in workers:
        with contextlib.suppress(Exception):
            w.stop()


def worker_main(
    config: EngineConfig, rank: int, host: str, port: int, conn: Connection, one_gpu_visible: bool = False
) -> None:
    """A worker process: join the group, load this rank's shard, build the runner, then run every step the
    driver sends until it sends None or its pipe closes. Any failure exits the process (the driver's
    watcher fails the engine): a rank that skipped a step would leave the others' collectives waiting."""
    from vlmserve.memory import freeze_startup_heap
    from vlmserve.models.loader import load_model
    from vlmserve.models.processor import Qwen2_5_VLProcessor
    from vlmserve.runner.kv_quant import kv_storage_dtype
    from vlmserve.runner.model_runner import ModelRunner, StepInputs

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        device = device_of_rank(config, rank, one_gpu_visible)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        else:
            # The ranks share the machine's cores.
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // config.tensor_parallel_size))
        backend = "nccl" if device.type == "cuda" else "gloo"
        tp = make_group(backend, rank, config.tensor_parallel_size, port, host)
        torch.manual_seed(config.seed)
        model = load_model(
            config.model_path,
            config.dtype,
            device,
            progress=False,
            load_format=config.load_format,
            quantization=config.quantization,
            tp=tp,
        )
        kwargs = pickle.loads(conn.recv_bytes())
        if kwargs is None:
            return
        processor = Qwen2_5_VLProcessor.from_pretrained(config.model_path)
        dtype = kv_storage_dtype(config.kv_cache_dtype, next(model.parameters()).dtype, device)
        runner = ModelRunner(model, encoder_input=processor.encoder_input, kv_cache_dtype=dtype, **kwargs)
        # A full collection here would stall every rank's collectives: out of its reach, as in rank 0's
        # engine process (memory.py).
        freeze_startup_heap()
        conn.send(("ready", None))
    except BaseException as e:
        logger.exception("tensor-parallel worker %d failed to start", rank)
        with contextlib.suppress(Exception):
            conn.send(("failed", f"{type(e).__name__}: {e}"))
        os._exit(1)
    try:
        while True:
            try:
                data = conn.recv_bytes()
            except (EOFError, OSError):
                return  # the driver is gone
            step = pickle.loads(data)
            if step is None:
                return
            if isinstance(step, StepInputs):
                runner.run_worker_step(step)
                continue
            # A call outside the step loop (the KV cache sized at start): rank 0 waits for its answer.
            try:
                runner.run_worker_call(step)
            except BaseException as e:
                with contextlib.suppress(Exception):
                    conn.send(("failed", f"{type(e).__name__}: {e}"))
                raise
            conn.send(("ready", None))
    except BaseException:
        logger.exception("tensor-parallel worker %d: step failed; exiting", rank)
        os._exit(1)
