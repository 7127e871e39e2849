"""Tensor-parallel workers: ranks 1 .. N-1 of a model sharded over N devices, started and supervised here.

    driver process (engine core)                 worker process, rank r (one per other device)
      scheduler, KV bookkeeping, sampling          load_model(tp=rank r): reads only its shards
      rank 0: ModelRunner(workers=WorkerGroup)     ModelRunner (same KV block count as rank 0)
        step -> StepInputs --- pipe (pickled) -->  loop: recv StepInputs -> runner.execute
        execute (its shard)  <== all-reduce / gather over gloo (CPU) or NCCL (GPU) ==> execute

Rank 0 runs in the driver's process (as vLLM's uniproc executor with multiproc workers does): the scheduler's
output never crosses a process boundary, only the step's plain inputs (token ids, positions, KV slots, block
tables, images to encode) do, once per step, to each worker. Every rank runs the same forward on the same
inputs in the same order, so their collectives meet; rank 0 alone samples (the logits are gathered to it).

Process group: a TCPStore hosted by the driver and one gloo / NCCL ProcessGroup object per rank, used directly
(not torch.distributed's global default group), so several engines may live in one process.

Supervision: a thread watches the workers' process sentinels. A worker that dies (killed, out of memory, or a
step that raised: a worker exits rather than fall out of step with the others) marks the group dead; the
driver's next step, or the collective it is blocked in, fails with `WorkerDiedError`, which the engine treats
as fatal (engine/async_engine.py `step_or_fail`): every open request ends with an error and /health reports
the engine dead. Workers exit when the driver's pipe closes, so a killed driver leaves no orphans.

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
from multiprocessing.connection import Connection, wait
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


def device_of_rank(config: EngineConfig, rank: int) -> torch.device:
    return torch.device("cuda", rank) if config.device == "cuda" else torch.device("cpu")


class WorkerGroup:
    """The driver's side: starts ranks 1 .. N-1, joins the process group as rank 0 (`tp`), sends each step's
    inputs, watches the workers."""

    def __init__(self, config: EngineConfig) -> None:
        self.size = config.tensor_parallel_size
        self.dead_reason: str | None = None
        backend = "nccl" if config.device == "cuda" else "gloo"
        port = _free_port()
        ctx = mp.get_context("spawn")
        self._conns: list[Connection] = []
        self._procs: list[Any] = []
        for rank in range(1, self.size):
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=worker_main,
                args=(config, rank, port, child),
                name=f"vlmserve-tp-worker-{rank}",
                daemon=True,  # ended with the driver's process whatever way it exits
            )
            with _children_allowed():
                proc.start()
            child.close()
            self._conns.append(parent)
            self._procs.append(proc)
        self._closing = False
        # Stop the workers when this group is dropped without shutdown() (an engine that failed to start).
        self._finalizer = weakref.finalize(self, _stop_workers, list(self._conns), list(self._procs))
        if config.device == "cuda":
            torch.cuda.set_device(0)
        self.tp = make_group(backend, 0, self.size, port)
        self._watcher = threading.Thread(target=self._watch, name="vlmserve-tp-watch", daemon=True)
        self._watcher.start()

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    def start_runners(self, runner_kwargs: dict[str, Any]) -> None:
        """Tell every worker to build its runner (same KV cache size as rank 0's); the caller builds rank
        0's at the same time (CUDA-graph capture runs collectives on every rank)."""
        self._send_all(pickle.dumps(runner_kwargs))

    def wait_ready(self) -> None:
        for rank, conn in enumerate(self._conns, start=1):
            if not conn.poll(STARTUP_TIMEOUT_S):
                raise WorkerDiedError(
                    f"tensor-parallel worker {rank} did not start in {STARTUP_TIMEOUT_S:.0f}s"
                )
            try:
                status, detail = conn.recv()
            except (EOFError, OSError):
                raise WorkerDiedError(self._describe_death(rank)) from None
            if status != "ready":
                raise WorkerDiedError(f"tensor-parallel worker {rank} failed to start: {detail}")

    def send(self, step: Any) -> None:
        """Send one step's inputs to every worker (pickled once)."""
        self._send_all(pickle.dumps(step, protocol=pickle.HIGHEST_PROTOCOL))

    def _send_all(self, data: bytes) -> None:
        self.check()
        for rank, conn in enumerate(self._conns, start=1):
            try:
                conn.send_bytes(data)
            except (BrokenPipeError, OSError):
                raise WorkerDiedError(self._describe_death(rank)) from None

    def check(self) -> None:
        """Raise WorkerDiedError when a worker is gone."""
        if self.dead_reason is None:
            for rank, proc in enumerate(self._procs, start=1):
                if not proc.is_alive():
                    self.dead_reason = self._describe_death(rank)
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

    def _describe_death(self, rank: int) -> str:
        proc = self._procs[rank - 1]
        proc.join(timeout=1.0)
        return f"tensor-parallel worker {rank} (pid {proc.pid}) exited (exit code {proc.exitcode})"

    def _watch(self) -> None:
        sentinels = {p.sentinel: rank for rank, p in enumerate(self._procs, start=1)}
        if not sentinels:
            return  # a world of one
        ready = wait(list(sentinels))
        if self._closing:
            return
        rank = sentinels[ready[0]]
        self.dead_reason = self._describe_death(rank)
        logger.error("%s; the engine cannot step any more", self.dead_reason)
        # A collective rank 0 is blocked in would wait for the dead peer: NCCL's is aborted here (gloo's
        # fails by itself when the peer's connection closes).
        with contextlib.suppress(Exception):
            if self.tp.group.name() == "nccl":
                self.tp.group.abort()

    def shutdown(self) -> None:
        self._closing = True
        self._finalizer()


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


def _stop_workers(conns: list[Connection], procs: list[Any]) -> None:
    for conn in conns:
        with contextlib.suppress(Exception):
            conn.send_bytes(pickle.dumps(None))
            conn.close()
    for proc in procs:
        proc.join(timeout=10.0)
        if proc.is_alive():
            proc.kill()
            proc.join(timeout=5.0)


def worker_main(config: EngineConfig, rank: int, port: int, conn: Connection) -> None:
    """A worker process: join the group, load this rank's shard, build the runner, then run every step the
    driver sends until it sends None or its pipe closes. Any failure exits the process (the driver's
    watcher fails the engine): a rank that skipped a step would leave the others' collectives waiting."""
    from vlmserve.models.loader import load_model
    from vlmserve.models.processor import Qwen2_5_VLProcessor
    from vlmserve.runner.kv_quant import kv_storage_dtype
    from vlmserve.runner.model_runner import ModelRunner

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        device = device_of_rank(config, rank)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        else:
            # The ranks share the machine's cores.
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // config.tensor_parallel_size))
        backend = "nccl" if device.type == "cuda" else "gloo"
        tp = make_group(backend, rank, config.tensor_parallel_size, port)
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
        runner = ModelRunner(model, patchify=processor.patchify, kv_cache_dtype=dtype, **kwargs)
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
            runner.run_worker_step(step)
    except BaseException:
        logger.exception("tensor-parallel worker %d: step failed; exiting", rank)
        os._exit(1)
