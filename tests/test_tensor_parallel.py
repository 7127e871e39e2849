"""Tensor parallelism on the CPU: two ranks over gloo (the driver's rank 0 and one worker process) against
one device, on tiny random checkpoints of each family.

The oracle is the same engine with tensor_parallel_size=1: greedy tokens identical, logprobs within float32
rounding (a row-parallel layer sums its partial products in another order). Prompts cover text only, one
image and several images, and repeat so that the second round hits the prefix cache and the encoder cache.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.conftest import random_image
from vlmserve.checkpoints.checkpoint import write_checkpoint
from vlmserve.engine.sampling_params import SamplingParams
from vlmserve.llm import LLM

ENGINE = dict(
    max_model_len=512,
    max_num_batched_tokens=128,
    max_num_seqs=8,
    device="cpu",
    dtype="float32",
    num_kv_blocks=96,
)


def _prompts(llm: LLM) -> list[tuple[str, list]]:
    def chat(question: str, images: list) -> tuple[str, list]:
        parts = [{"type": "image"} for _ in images] + [{"type": "text", "text": question}]
        return llm.processor.apply_chat_template([{"role": "user", "content": parts}]), images

    shared = random_image(56, 56, seed=11)
    return [
        chat("Tell me a story about a lighthouse keeper.", []),
        chat("What is this?", [shared]),
        chat("Compare these.", [random_image(60, 44, seed=12), shared, random_image(40, 70, seed=13)]),
    ]


def _run(llm: LLM) -> list[tuple[list[int], list[float]]]:
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=0)
    prompts = _prompts(llm)
    out = []
    # Twice: the second round reuses the first's KV blocks (prefix cache) and image rows (encoder cache).
    for _ in range(2):
        for r in llm.generate(prompts, params):
            c = r.outputs[0]
            out.append((c.token_ids, [lp.logprob for lp in c.logprobs or []]))
        out.append(([r.num_cached_tokens for r in llm.generate(prompts[1:2], params)], []))
    return out


def _compare(tp1: list, tp2: list) -> None:
    assert len(tp1) == len(tp2)
    for (ids1, lp1), (ids2, lp2) in zip(tp1, tp2, strict=True):
        assert ids1 == ids2
        assert torch.allclose(torch.tensor(lp1), torch.tensor(lp2), atol=1e-4)


@pytest.fixture(scope="module")
def few_kv_heads(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # One KV head, two ranks: the KV head is replicated on both. Tied embeddings: the vocab-parallel
    # embedding is the head. An odd vocabulary: the last rank's shard ends in a padding row.
    return write_checkpoint(
        tmp_path_factory.mktemp("tp-kv1"),
        preset="tiny",
        seed=3,
        text=dict(num_attention_heads=4, num_key_value_heads=1, vocab_size=1023),
        tie_word_embeddings=True,
    )


@pytest.fixture(scope="module")
def qwen3_moe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("tp-moe"), family="qwen3_vl_moe", seed=4)


def _llm(path: Path, tp: int) -> Iterator[LLM]:
    llm = LLM(str(path), tensor_parallel_size=tp, **ENGINE)
    try:
        yield llm
    finally:
        llm.engine.shutdown()


@pytest.mark.parametrize("checkpoint", ["tiny_checkpoint", "few_kv_heads", "qwen3_moe"])
def test_tp2_matches_tp1(checkpoint: str, request: pytest.FixtureRequest) -> None:
    path = request.getfixturevalue(checkpoint)
    ref = _run(next(_llm(path, 1)))
    gen = _llm(path, 2)
    llm = next(gen)
    try:
        assert llm.engine.workers is not None and len(llm.engine.workers.pids) == 1
        _compare(ref, _run(llm))
        assert ref[-1][0][0] > 0  # the repeated image prompt did hit the prefix cache
    finally:
        gen.close()


# --- sharded loading ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("checkpoint", ["tiny_checkpoint", "few_kv_heads", "qwen3_moe"])
def test_each_rank_reads_only_its_shards(
    checkpoint: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Loading is local to a rank (no collective): each rank of two loads with a group-less TensorParallel.
    Every byte read is counted; a rank reads half of every sharded tensor, and the two ranks' shards put
    together are the one-device model's weights."""
    from vlmserve.models import loader
    from vlmserve.models.layers.parallel import TensorParallel
    from vlmserve.models.loader import load_model

    path = request.getfixturevalue(checkpoint)
    full = load_model(path, "float32", "cpu", progress=False)
    real_read = loader.read_checkpoint_slice
    sizes = {name: t.numel() for name, t in loader.iter_weights(loader.safetensors_files(path), False)}
    total = sum(sizes.values())
    shards = []
    for rank in range(2):
        read: list[int] = []

        def counting(part, dim=None, ranges=None, read=read):  # type: ignore[no-untyped-def]
            t = real_read(part, dim, ranges)
            read.append(t.numel())
            return t

        monkeypatch.setattr(loader, "read_checkpoint_slice", counting)
        shards.append(load_model(path, "float32", "cpu", progress=False, tp=TensorParallel(rank, 2)))
        # Sharded: every attention and MLP projection of the language model and the embedding / head, which
        # hold most of the weights; the vision tower and the norms are replicated.
        replicated = sum(
            n
            for name, n in sizes.items()
            if "visual" in name
            or "norm" in name
            or "mlp.gate." in name  # the MoE router
            # One KV head for two ranks: both hold it.
            or (checkpoint == "few_kv_heads" and (".k_proj." in name or ".v_proj." in name))
        )
        assert len(read) == len(sizes)
        assert sum(read) <= replicated + (total - replicated) // 2 + 8 * 64  # + padding rows of a head shard
        assert sum(read) < total
    state = dict(full.named_parameters())
    for name, p0 in shards[0].named_parameters():
        p1 = dict(shards[1].named_parameters())[name]
        ref = state[name]
        if p0.shape == ref.shape:
            assert torch.equal(p0, ref) and torch.equal(p1, ref), name  # replicated
            continue
        dim = next(d for d in range(ref.dim()) if p0.shape[d] != ref.shape[d])
        owner = name.rsplit(".", 1)[0]
        if owner in full.fused_shards:  # q/k/v or gate/up: each rank's rows of each part, in order
            for shard in (shards[0], shards[1]):
                ranges = dict(shard.named_modules())[owner].row_ranges
                parts = [ref[sl][a:b] for sl, (a, b) in zip(full.fused_shards[owner], ranges, strict=True)]
                assert torch.equal(dict(shard.named_parameters())[name], torch.cat(parts)), name
            continue
        if "experts.gate_up" in name:
            continue  # [gate | up] halves per rank: checked through the forward (test_tp2_matches_tp1)
        joined = torch.cat([p0, p1], dim=dim).narrow(dim, 0, ref.shape[dim])  # vocab shards: padding dropped
        assert torch.equal(joined, ref), name


def test_quantized_checkpoint_with_tensor_parallelism_is_refused(tiny_checkpoint: Path) -> None:
    from vlmserve.models.layers.parallel import TensorParallel
    from vlmserve.models.loader import CheckpointError, load_model

    with pytest.raises(CheckpointError, match="tensor_parallel_size 2 is not supported yet"):
        load_model(tiny_checkpoint, "float32", "cpu", quantization="fp8", tp=TensorParallel(0, 2))


def test_sizes_that_do_not_divide_are_refused(tiny_checkpoint: Path) -> None:
    with pytest.raises(ValueError, match="tensor_parallel_size 3 does not divide num_attention_heads"):
        LLM(str(tiny_checkpoint), tensor_parallel_size=3, **ENGINE)


# --- supervision --------------------------------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    """Processes whose parent is `pid` (Linux /proc)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return out


def _running(pid: int) -> bool:
    """`pid` exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_killed_worker_fails_open_streams_and_health(tiny_checkpoint: Path) -> None:
    """A worker of the server's engine process dies (kill -9): the stream in flight ends with an SSE error
    and [DONE], /health turns 503 engine_dead, new requests get 503; the engine process exits."""
    import asyncio
    import json
    import os
    import signal

    import httpx

    from tests.stress.soak import LiveServer, wait_until
    from tests.test_reliability import chat, long_stream, make_server, sse_events
    from vlmserve.api.server import build_app
    from vlmserve.engine.engine_process import EngineProcess

    server = make_server(tiny_checkpoint, tensor_parallel_size=2)
    assert isinstance(server.engine, EngineProcess) and server.engine.pid is not None
    [worker] = [p for p in _children(server.engine.pid) if "spawn" in Path(f"/proc/{p}/cmdline").read_text()]
    try:
        with (
            LiveServer(build_app(server, shutdown_servers=False)) as live,
            httpx.Client(base_url=live.base_url, timeout=60) as http,
        ):
            with http.stream("POST", "/v1/chat/completions", json=long_stream(2000)) as victim:
                lines = victim.iter_lines()
                assert next(lines).startswith("data: ")
                os.kill(worker, signal.SIGKILL)
                events = sse_events(lines)
            assert events[-1] == "[DONE]"
            error = json.loads(events[-2])["error"]
            assert "tensor-parallel worker 1" in error["message"] and "exit code -9" in error["message"], (
                error
            )
            assert wait_until(lambda: not server.is_alive, 10)
            health = http.get("/health")
            assert health.status_code == 503 and health.json()["error"]["code"] == "engine_dead"
            r = http.post("/v1/chat/completions", json=chat(max_tokens=3))
            assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"
    finally:
        asyncio.run(server.aclose())


# --- a world of one: the tensor-parallel path (parallel layers, collectives, step inputs) on one device -------


def _world_of_one(path: Path, **engine: object) -> tuple[list, list]:
    """(plain engine's outputs, the same engine forced onto the tensor-parallel path with one rank)."""
    from vlmserve.engine.core import EngineCore

    llm = LLM(str(path), **engine)  # type: ignore[arg-type]
    ref = _run(llm)
    plain_graphs = llm.engine.runner.graphs is not None
    del llm.engine  # its KV cache and graphs: the next engine sizes nothing from memory, but frees it all
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    llm.engine = EngineCore(llm.config, llm.processor, force_tensor_parallel=True)
    try:
        assert llm.engine.workers is not None and llm.engine.model.tp is not None
        assert (llm.engine.runner.graphs is not None) == plain_graphs
        return ref, _run(llm)
    finally:
        llm.engine.shutdown()


def test_world_of_one_over_gloo_matches_the_plain_engine(tiny_checkpoint: Path) -> None:
    ref, tp = _world_of_one(tiny_checkpoint, **ENGINE)
    _compare(ref, tp)


GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@GPU
@pytest.mark.parametrize("checkpoint", ["tiny_checkpoint", "qwen3_moe"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_world_of_one_over_nccl_with_cuda_graphs(
    checkpoint: str, dtype: str, request: pytest.FixtureRequest
) -> None:
    """The NCCL path on one GPU: the all-reduces and the logits gather captured in the decode CUDA graphs,
    pixels patchified on the device; greedy tokens identical to the plain engine's (a world of one changes
    no arithmetic). Async scheduling off on both: tensor parallelism steps synchronously."""
    engine = {**ENGINE, "device": "cuda", "dtype": dtype, "async_scheduling": False, "num_kv_blocks": 256}
    ref, tp = _world_of_one(request.getfixturevalue(checkpoint), **engine)
    for (ids1, lp1), (ids2, lp2) in zip(ref, tp, strict=True):
        assert ids1 == ids2
        assert torch.allclose(
            torch.tensor(lp1), torch.tensor(lp2), atol=1e-2 if dtype == "bfloat16" else 1e-4
        )


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_tp2_over_nccl_matches_tp1(tiny_checkpoint: Path) -> None:
    """Two GPUs: a worker process on GPU 1, NCCL, CUDA graphs; float32 so that greedy tokens must match."""
    engine = {**ENGINE, "device": "cuda", "async_scheduling": False, "num_kv_blocks": 256}
    ref = _run(LLM(str(tiny_checkpoint), **engine))  # type: ignore[arg-type]
    llm = LLM(str(tiny_checkpoint), tensor_parallel_size=2, **engine)  # type: ignore[arg-type]
    try:
        assert llm.engine.runner.graphs is not None
        _compare(ref, _run(llm))
    finally:
        llm.engine.shutdown()


def test_workers_exit_when_the_engine_process_is_killed(tiny_checkpoint: Path) -> None:
    """The engine process dies (kill -9, no cleanup of its own): its worker sees the pipe close and exits."""
    import os
    import signal
    import time

    from vlmserve.config import EngineArgs
    from vlmserve.engine.engine_process import EngineProcess
    from vlmserve.llm import build_engine_config

    engine = EngineProcess(
        build_engine_config(EngineArgs(model=str(tiny_checkpoint), tensor_parallel_size=2, **ENGINE))
    )
    try:
        assert engine.pid is not None
        [worker] = [p for p in _children(engine.pid) if "spawn" in Path(f"/proc/{p}/cmdline").read_text()]
        os.kill(engine.pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while _running(worker):
            assert time.monotonic() < deadline, "the worker outlived its engine process"
            time.sleep(0.1)
    finally:
        engine.shutdown()
