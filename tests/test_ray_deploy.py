"""The Ray Serve deployment end to end, on a real local Ray cluster (one for the whole module, lean enough
for 2 cores): deploy from Python and from a Serve YAML (`vlmserve run`), query with the openai client (stream,
image), autoscale 1 -> 2 -> 1, kill a replica and see it replaced, two models behind one ingress, runtime_env
in the replicas, and `vlmserve shutdown -y` leaving no process behind.

The cluster is started the way `vlmserve run` starts one (deploy/cluster.py) and recorded in a private
VLMSERVE_CACHE_DIR, so the CLI tests find it; the last test shuts it down through the CLI.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest

pytest.importorskip("ray.serve")

import ray
from ray import serve

from tests.conftest import free_port, random_image
from tests.test_structured_server import ITEM_SCHEMA, PARAMETERS, TIME, WEATHER
from vlmserve import LLMConfig, build_openai_app
from vlmserve.deploy import cluster
from vlmserve.deploy.ingress import STATS_REFRESH_S
from vlmserve.deploy.server import CHANNEL_IDLE_S, ReplicaState

pytestmark = pytest.mark.slow

ENGINE = {"max_model_len": 512, "kv_cache_memory_gb": 0.01, "max_num_seqs": 4}
NO_EOS = {"ignore_eos": True}


@dataclass(frozen=True)
class Cluster:
    address: str
    pid: int
    http_port: int
    cache_dir: Path
    record_path: Path

    def url(self, prefix: str) -> str:
        return f"http://127.0.0.1:{self.http_port}{prefix}"

    def cli(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "VLMSERVE_CACHE_DIR": str(self.cache_dir), "RAY_USAGE_STATS_ENABLED": "0"}
        return subprocess.run(
            [sys.executable, "-m", "vlmserve", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=self.cache_dir,
        )


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    cache_dir = tmp_path_factory.mktemp("vlmserve-cache")
    record_path = cache_dir / "ray" / "cluster.json"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_USAGE_STATS_ENABLED", "0")
        mp.setenv("RAY_DISABLE_USAGE_STATS", "1")
        # 4 logical CPUs on 2 cores: two apps of CPU replicas (one CPU each) fit while they idle.
        address, pid = cluster.start_local_cluster(num_cpus=4, log_path=cache_dir / "ray" / "ray-start.log")
        http_port = free_port()
        record = cluster.ClusterRecord(address, f"http://127.0.0.1:{http_port}/", pid)
        cluster.save_record(record, record_path)
        try:
            cluster.connect(address, quiet=True, started_here=True)
            serve.start(http_options={"host": "127.0.0.1", "port": http_port})
            yield Cluster(address, pid, http_port, cache_dir, record_path)
        finally:
            if ray.is_initialized():
                ray.shutdown()
            cluster.stop_local_cluster(record)


def wait_for(condition: Callable[[], bool], timeout: float, what: str, interval: float = 0.25) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def running_replicas(app: str, deployment: str) -> int:
    status = serve.status().applications[app].deployments[deployment]
    return sum(
        n for state, n in status.replica_states.items() if str(getattr(state, "value", state)) == "RUNNING"
    )


def replica_actor_names(app: str, deployment: str) -> set[str]:
    prefix = f"SERVE_REPLICA::{app}#{deployment}#"
    return {
        a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)
    }


def image_data_url(width: int = 64, height: int = 48) -> str:
    buf = io.BytesIO()
    random_image(width, height, seed=1).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


# --------------------------------------------------------------------------------------------- Python deploy


@pytest.fixture(scope="module")
def py_app(ray_cluster: Cluster, tiny_checkpoint: Path) -> Iterator[openai.OpenAI]:
    """Two models behind one ingress, deployed from Python; `b` sizes its KV cache from an env var that
    only its runtime_env sets."""
    a = LLMConfig(
        model_loading_config={"model_id": "a", "model_source": str(tiny_checkpoint)},
        # Room for the long streams the replica-kill test needs; every token on its own (the default).
        engine_kwargs={**ENGINE, "max_model_len": 2048},
    )
    b = LLMConfig(
        model_loading_config={"model_id": "b", "model_source": str(tiny_checkpoint)},
        engine_kwargs={k: v for k, v in ENGINE.items() if k != "kv_cache_memory_gb"},
        runtime_env={"env_vars": {"VLMSERVE_CPU_KV_CACHE_GB": "0.005"}},
        experimental_configs={"stream_batching_interval_ms": 50},  # Ray Serve LLM's window
    )
    serve.run(build_openai_app({"llm_configs": [a, b]}), name="py", route_prefix="/py")
    yield openai.OpenAI(base_url=ray_cluster.url("/py/v1"), api_key="placeholder", max_retries=0, timeout=60)
    if ray.is_initialized():
        serve.delete("py")


def test_models_lists_every_model(py_app: openai.OpenAI) -> None:
    assert sorted(m.id for m in py_app.models.list().data) == ["a", "b"]
    assert py_app.models.retrieve("b").max_model_len == 512  # type: ignore[attr-defined]


def test_chat_streams_token_by_token_with_an_image(py_app: openai.OpenAI) -> None:
    max_tokens = 12
    stream = py_app.chat.completions.create(
        model="a",
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": image_data_url()}},
                    {"type": "text", "text": "What is in this image?"},
                ],
            }
        ],
        max_tokens=max_tokens,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=NO_EOS,
    )
    chunks = list(stream)
    content = [c for c in chunks if c.choices and c.choices[0].delta.content]
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == max_tokens
    # One chunk per token (the detokenizer may hold back a token that ends mid-character), never lumps.
    assert len(content) >= max_tokens - 2
    assert chunks[-2].choices[0].finish_reason == "length"
    # The image reached the model: its tokens are part of the prompt.
    text_only = py_app.chat.completions.create(
        model="a", messages=[{"role": "user", "content": "What is in this image?"}], max_tokens=1
    )
    assert text_only.usage is not None and usage.prompt_tokens > text_only.usage.prompt_tokens


def test_stream_batching_window_sends_tokens_in_batches(py_app: openai.OpenAI) -> None:
    # Model b has Ray Serve LLM's default 50 ms window: all the tokens, in fewer chunks than tokens, the
    # same text as without streaming. (A warm-up first: a fresh replica's first request can take other
    # float paths, and greedy tokens of a random-weight model flip on the smallest difference.)
    max_tokens = 60
    greedy = {"model": "b", "prompt": "go", "max_tokens": max_tokens, "temperature": 0, "extra_body": NO_EOS}
    py_app.completions.create(**greedy)
    chunks = list(py_app.completions.create(**greedy, stream=True, stream_options={"include_usage": True}))
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == max_tokens
    texts = [c.choices[0].text for c in chunks if c.choices and c.choices[0].text]
    assert 1 <= len(texts) < max_tokens
    assert "".join(texts) == py_app.completions.create(**greedy).choices[0].text


def test_second_model_and_completions(py_app: openai.OpenAI) -> None:
    chat = py_app.chat.completions.create(
        model="b", messages=[{"role": "user", "content": "hi"}], max_tokens=5, extra_body=NO_EOS
    )
    assert chat.model == "b" and chat.usage is not None and chat.usage.completion_tokens == 5
    completion = py_app.completions.create(
        model="b", prompt="hello", max_tokens=4, echo=True, extra_body=NO_EOS
    )
    assert completion.choices[0].text.startswith("hello")
    two = py_app.completions.create(model="a", prompt=["one", "two"], max_tokens=3, extra_body=NO_EOS)
    assert sorted(c.index for c in two.choices) == [0, 1]


def test_errors_keep_their_status_through_ray(py_app: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError, match="The model `nope` does not exist"):
        py_app.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    # Raised in the replica (before the first token), arrives as the same 400 naming the parameter, also
    # for a streamed request (no 200 that then fails).
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as e:
            py_app.chat.completions.create(
                model="a", messages=[{"role": "user", "content": "hi"}], max_tokens=10_000, stream=stream
            )
        assert e.value.body["param"] == "max_tokens"  # type: ignore[index]
        assert e.value.body["code"] == "context_length_exceeded"  # type: ignore[index]


def test_json_schemas_and_tool_calls_through_ray(py_app: openai.OpenAI) -> None:
    # The constraint does the work (random weights): a streamed JSON-schema answer with an image that parses
    # and validates, a required tool call whose arguments match the function's parameters, and a schema the
    # grammar engine refuses answered 400 from the replica, as through `vlmserve serve`.
    image = {"type": "image_url", "image_url": {"url": image_data_url()}}
    stream = py_app.chat.completions.create(
        model="a",
        messages=[{"role": "user", "content": [image, {"type": "text", "text": "Extract the fields."}]}],
        max_tokens=200,
        stream=True,
        response_format={"type": "json_schema", "json_schema": {"name": "doc", "schema": ITEM_SCHEMA}},
    )
    chunks = [c for c in stream if c.choices]
    jsonschema.validate(json.loads("".join(c.choices[0].delta.content or "" for c in chunks)), ITEM_SCHEMA)
    assert chunks[-1].choices[0].finish_reason == "stop"
    out = py_app.chat.completions.create(
        model="a",
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=[WEATHER, TIME],
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=120,
    )
    assert out.choices[0].finish_reason == "tool_calls"
    (call,) = out.choices[0].message.tool_calls or []
    jsonschema.validate(json.loads(call.function.arguments), PARAMETERS[call.function.name])
    with pytest.raises(openai.BadRequestError) as e:
        py_app.chat.completions.create(
            model="a",
            messages=[{"role": "user", "content": "hi"}],
            extra_body={"guided_json": {"type": "array", "minItems": 4, "maxItems": 2}},
        )
    assert e.value.body["param"] == "guided_json"  # type: ignore[index]


def test_responses_tokenize_playground_and_batch_through_ray(
    ray_cluster: Cluster, py_app: openai.OpenAI, tmp_path: Path
) -> None:
    # The Responses API, built in the replica like chat (image fetched there), streamed and not.
    image = {"type": "input_image", "image_url": image_data_url()}
    content = [image, {"type": "input_text", "text": "What is this?"}]
    response = py_app.responses.create(
        model="a", input=[{"role": "user", "content": content}], max_output_tokens=16, extra_body=NO_EOS
    )
    assert response.usage is not None and response.usage.output_tokens == 16
    events = list(
        py_app.responses.create(model="b", input="hi", max_output_tokens=16, stream=True, extra_body=NO_EOS)
    )
    assert events[0].type == "response.created" and events[-1].type == "response.incomplete"
    with pytest.raises(openai.BadRequestError):
        py_app.responses.create(model="a", input="hi", previous_response_id="resp_1")
    # /tokenize runs in a replica (images are sized there: 64x48 -> 56x56, 2x2 tokens); /detokenize in the
    # ingress.
    message = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_data_url()}}]}
    tokenized = httpx.post(
        ray_cluster.url("/py/tokenize"), json={"model": "a", "messages": [message]}, timeout=60
    )
    assert tokenized.status_code == 200 and tokenized.json()["image_token_counts"] == [4], tokenized.text
    tokens = httpx.post(
        ray_cluster.url("/py/tokenize"), json={"model": "b", "prompt": "hi"}, timeout=60
    ).json()
    detok = httpx.post(
        ray_cluster.url("/py/detokenize"), json={"model": "b", "tokens": tokens["tokens"]}, timeout=60
    )
    assert detok.json() == {"prompt": "hi"}
    # The playground behind the route prefix.
    page = httpx.get(ray_cluster.url("/py/"), timeout=10)
    assert page.status_code == 200 and "vlmserve playground" in page.text
    # A batch job spread over the app's replicas by its ingress.
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, **NO_EOS}
    lines = [
        {"custom_id": f"r{i}", "url": "/v1/chat/completions", "body": {**chat, "model": "ab"[i % 2]}}
        for i in range(6)
    ]
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps(line) + "\n" for line in lines))
    done = ray_cluster.cli(
        "run-batch", "-i", str(inp), "-o", str(out), "--url", ray_cluster.url("/py"), "--no-progress"
    )
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["custom_id"] for r in records) == [f"r{i}" for i in range(6)]
    assert {r["response"]["body"]["model"] for r in records} == {"a", "b"}


def engine_stats(app: str, model: str) -> dict[str, float]:
    handle = serve.get_deployment_handle(f"LLMServer:{model}", app_name=app)
    state: ReplicaState = handle.replica_state.remote().result(timeout_s=30)
    return state.stats


def test_tokens_travel_on_the_ingress_channel_one_step_at_a_time(py_app: openai.OpenAI) -> None:
    # The first request opens the ingress's delta channel to the replica; the ones after it send their
    # deltas there (one Ray item per engine step for all of them), still one chunk per token to the client.
    handle = serve.get_deployment_handle("LLMServer:a", app_name="py")
    before: ReplicaState = handle.replica_state.remote().result(timeout_s=30)
    max_tokens = 16
    greedy = {"model": "a", "prompt": "go", "max_tokens": max_tokens, "temperature": 0, "extra_body": NO_EOS}
    expected = py_app.completions.create(**greedy).choices[0].text
    results: list[list[str]] = []

    def stream() -> None:
        results.append(
            [c.choices[0].text for c in py_app.completions.create(**greedy, stream=True) if c.choices]
        )

    workers = [threading.Thread(target=stream) for _ in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
    assert len(results) == 3
    for texts in results:
        assert "".join(texts) == expected
        # Token by token, not merged (a window would give 1-3 chunks); the detokenizer holds back a token that
        # ends mid-character, which a random-weight model's byte tokens often do.
        assert len([t for t in texts if t]) >= max_tokens // 2
    after: ReplicaState = handle.replica_state.remote().result(timeout_s=30)
    assert after.channel_requests - before.channel_requests >= 3


def test_runtime_env_reaches_the_replicas(py_app: openai.OpenAI) -> None:
    # a: kv_cache_memory_gb=0.01; b: VLMSERVE_CPU_KV_CACHE_GB=0.005 from its runtime_env only.
    a, b = engine_stats("py", "a")["num_kv_blocks"], engine_stats("py", "b")["num_kv_blocks"]
    assert abs(2 * b - a) <= 2, (a, b)


def test_client_disconnect_aborts_the_request_in_the_replica(
    ray_cluster: Cluster, py_app: openai.OpenAI
) -> None:
    # 48 choices of 480 tokens, four at a time (max_num_seqs): far more work than the abort takes to reach
    # the replica, however fast the engine runs (16 were once all generated before an abort arrived through
    # a Ray cluster on two busy cores; the test ends at the abort either way).
    n, max_tokens = 48, 480
    before = engine_stats("py", "b")["generation_tokens_total"]
    body = {"model": "b", "prompt": "go", "max_tokens": max_tokens, "n": n, "stream": True, **NO_EOS}
    with httpx.stream("POST", ray_cluster.url("/py/v1/completions"), json=body, timeout=60) as response:
        lines = response.iter_lines()
        for _ in range(6):  # a few tokens, then the client goes away
            next(lines)
    wait_for(lambda: engine_stats("py", "b")["num_requests_running"] == 0, timeout=30, what="the abort")
    generated = engine_stats("py", "b")["generation_tokens_total"] - before
    assert 0 < generated < n * max_tokens


def test_a_client_leaving_leaves_the_channel_to_the_streams_on_it(
    ray_cluster: Cluster, py_app: openai.OpenAI
) -> None:
    """The request whose first output opened the ingress's delta channel to a replica is abandoned by its
    client; a stream that sends its deltas on that channel goes on to its end. (Ray Serve cancels the calls a
    cancelled request made: the channel's call must not count among them. It did, and a client that left
    during autoscaling failed another stream with "stopped mid-stream".)"""
    handle = serve.get_deployment_handle("LLMServer:a", app_name="py")  # b sets a window: no channel
    # A channel left open by earlier tests idles out: the next request opens one.
    time.sleep(CHANNEL_IDLE_S + 1)
    before: ReplicaState = handle.replica_state.remote().result(timeout_s=30)
    url = ray_cluster.url("/py/v1/completions")
    body = {"model": "a", "prompt": "go", "max_tokens": 400, "stream": True, **NO_EOS}
    started = threading.Event()
    results: list[list[str] | Exception] = []
    second = threading.Thread(target=lambda: results.append(_stream_events(url, body, started)))
    with httpx.stream("POST", url, json=body, timeout=60) as opener:
        lines = opener.iter_lines()
        for _ in range(4):  # its first output is out: the ingress opens the channel behind it
            next(lines)
        time.sleep(0.5)
        second.start()
        assert started.wait(60)
    # The opener's client has gone, with the second stream running.
    second.join(60)
    events = results[0]
    assert isinstance(events, list) and events[-1] == "[DONE]", events
    chunks = [json.loads(e) for e in events[:-1]]
    assert not any("error" in c for c in chunks), [c for c in chunks if "error" in c]
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
    after: ReplicaState = handle.replica_state.remote().result(timeout_s=30)
    assert after.channel_requests - before.channel_requests == 1  # the second stream went on the channel


def test_health_and_metrics_cover_every_model(ray_cluster: Cluster, py_app: openai.OpenAI) -> None:
    assert httpx.get(ray_cluster.url("/py/health"), timeout=10).status_code == 200
    metrics = httpx.get(ray_cluster.url("/py/metrics"), timeout=10).text
    for model in ("a", "b"):
        assert f'vllm:num_requests_running{{model_name="{model}"}}' in metrics
        assert f'vllm:time_to_first_token_seconds_count{{model_name="{model}"}}' in metrics


def _stream_events(url: str, body: dict[str, object], started: threading.Event) -> list[str] | Exception:
    """A stream's `data:` payloads (or its error body), or the transport error that ended it; sets `started`
    at the first event, or when the request failed before any."""
    events: list[str] = []
    try:
        with httpx.stream("POST", url, json=body, timeout=60) as response:
            if response.status_code != 200:
                return [response.read().decode()]
            for line in response.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    started.set()
    except httpx.HTTPError as e:
        return e
    finally:
        started.set()
    return events


def test_killed_replica_is_replaced_while_the_app_answers(
    ray_cluster: Cluster, py_app: openai.OpenAI
) -> None:
    # Two streams are running on the replica when it is killed.
    url = ray_cluster.url("/py/v1/chat/completions")
    # Long enough that neither stream ends before the other started (tokens leave each engine step at once).
    body = {"model": "a", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1800, "stream": True}
    started = [threading.Event() for _ in range(2)]
    results: list[list[str] | Exception] = []
    streams = [
        threading.Thread(target=lambda s=s: results.append(_stream_events(url, {**body, **NO_EOS}, s)))
        for s in started
    ]
    for thread in streams:
        thread.start()
    assert all(s.wait(60) for s in started)
    assert all(thread.is_alive() for thread in streams), f"a stream was over before the kill: {results}"
    (victim,) = replica_actor_names("py", "LLMServer:a")
    ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
    # They end promptly, with an error event then [DONE] from the ingress: never a hang, never a broken
    # connection, never a finish as if nothing had happened.
    for thread in streams:
        thread.join(30)
        assert not thread.is_alive(), "a stream on the killed replica hung"
    for result in results:
        assert isinstance(result, list), result
        assert result[-1] == "[DONE]", result[-3:]
        error = json.loads(result[-2])["error"]
        assert error["code"] == "engine_error", result[-3:]
        # Ray's account of the death (actor ids, pids, node addresses) goes to the log, not to the client.
        assert error["message"].endswith("stopped mid-stream; retry the request."), error
        assert not re.search(r"actor|pid|\b\d+\.\d+\.\d+\.\d+\b", error["message"], re.I), error
    # The other model and the ingress answer while `a` is being replaced ...
    for _ in range(3):
        reply = py_app.chat.completions.create(
            model="b", messages=[{"role": "user", "content": "x"}], max_tokens=2
        )
        assert reply.choices[0].finish_reason is not None
    # ... and `a` answers again from a new replica.
    wait_for(
        lambda: (names := replica_actor_names("py", "LLMServer:a")) != {victim} and len(names) == 1,
        timeout=60,
        what="a new replica of LLMServer:a",
    )
    wait_for(lambda: running_replicas("py", "LLMServer:a") == 1, timeout=90, what="the new replica to run")
    reply = py_app.chat.completions.create(
        model="a", messages=[{"role": "user", "content": "x"}], max_tokens=2
    )
    assert reply.usage is not None and reply.usage.completion_tokens >= 1


# --------------------------------------------------------------------------------------------- tensor parallelism


def _tp_worker_actors() -> int:
    """Live tensor-parallel worker actors (runner/tensor_parallel.py names them)."""
    names = ray.util.list_named_actors(all_namespaces=True)
    return sum(1 for a in names if a["name"].startswith("vlmserve-tp-worker-"))


def test_tensor_parallel_replica_on_cpu_bundles(ray_cluster: Cluster, tiny_checkpoint: Path) -> None:
    """tensor_parallel_size=2 with two half-CPU bundles: the replica holds rank 0, a Ray actor in the second
    bundle rank 1; the app answers (an image, so the replicated vision tower runs on both), then deleting it
    stops the worker actor too."""
    config = LLMConfig(
        model_loading_config={"model_id": "tp", "model_source": str(tiny_checkpoint)},
        engine_kwargs={**ENGINE, "tensor_parallel_size": 2},
        placement_group_config={"bundles": [{"CPU": 0.5}, {"CPU": 0.5}], "strategy": "STRICT_PACK"},
    )
    serve.run(build_openai_app({"llm_configs": [config]}), name="tp", route_prefix="/tp")
    try:
        client = openai.OpenAI(base_url=ray_cluster.url("/tp/v1"), api_key="x", max_retries=0, timeout=120)
        reply = client.chat.completions.create(
            model="tp",
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": image_data_url()}},
                        {"type": "text", "text": "What is in this image?"},
                    ],
                }
            ],
            max_tokens=6,
            extra_body=NO_EOS,
        )
        assert reply.usage is not None and reply.usage.completion_tokens == 6
        assert _tp_worker_actors() == 1
        # The worker actor dies: the replica's engine is dead (a request fails at once, never hangs), so
        # Ray Serve's health check replaces the replica.
        [(name, namespace)] = [
            (a["name"], a["namespace"])
            for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith("vlmserve-tp-worker-")
        ]
        ray.kill(ray.get_actor(name, namespace=namespace), no_restart=True)
        with pytest.raises(openai.APIStatusError) as failed:
            client.chat.completions.create(
                model="tp", messages=[{"role": "user", "content": "x"}], max_tokens=2, extra_body=NO_EOS
            )
        assert failed.value.status_code >= 500
    finally:
        serve.delete("tp")
    wait_for(lambda: _tp_worker_actors() == 0, timeout=60, what="the worker actor to stop")


# --------------------------------------------------------------------------------------------- autoscaling


@pytest.mark.filterwarnings("ignore:The `metrics_interval_s` field:DeprecationWarning")
def metric_values(text: str, name: str) -> float:
    """The sum of a Prometheus series over its labels."""
    return sum(float(m.group(1)) for m in re.finditer(rf"^{re.escape(name)}{{[^}}]*}} (\S+)$", text, re.M))


def test_repeated_images_go_to_the_replica_that_has_them(ray_cluster: Cluster, tiny_checkpoint: Path) -> None:
    # Two replicas, three images sent three times each, one request at a time: the router sends an image's
    # repeats to the replica that encoded it, so each image is encoded once over both replicas (Ray's
    # default router, two random choices, encodes most images on both).
    config = LLMConfig(
        model_loading_config={"model_id": "d", "model_source": str(tiny_checkpoint)},
        engine_kwargs=ENGINE,
        deployment_config={"num_replicas": 2},
    )
    serve.run(build_openai_app({"llm_configs": [config]}), name="aff", route_prefix="/aff")
    try:
        client = openai.OpenAI(
            base_url=ray_cluster.url("/aff/v1"), api_key="placeholder", max_retries=0, timeout=60
        )
        urls = [image_data_url(40 + 8 * i, 32) for i in range(3)]
        for question in ("What is this?", "Describe it.", "Colours?"):
            for url in urls:
                content = [
                    {"type": "text", "text": question},
                    {"type": "image_url", "image_url": {"url": url}},
                ]
                client.chat.completions.create(
                    model="d", messages=[{"role": "user", "content": content}], max_tokens=2
                )
        handle = serve.get_deployment_handle("LLMServer:d", app_name="aff")
        states = handle.broadcast("replica_state").results(timeout_s=30)
        assert len({s.pid for s in states}) == 2
        # Every request found its image cached except the first of each image.
        assert sum(s.stats["images_encoded_total"] for s in states) == 3
        assert sum(s.stats["encoder_cache_hits_total"] for s in states) == 6

        def routed() -> dict[str, float]:
            text = httpx.get(ray_cluster.url("/aff/metrics"), timeout=10).text
            return {o: metric_values(text, f"vlmserve:router_affinity_{o}_total") for o in ("hit", "miss")}

        assert routed() == {"hit": 6, "miss": 3}
        # The engines' counters reach /metrics too (summed over replicas at the ingress's next refresh).
        wait_for(
            lambda: (
                metric_values(
                    httpx.get(ray_cluster.url("/aff/metrics"), timeout=10).text,
                    "vlmserve:encoder_cache_hits_total",
                )
                == 6
            ),
            timeout=30,
            what="the replicas' encoder-cache hits in /metrics",
        )
    finally:
        serve.delete("aff")


def test_autoscaling_up_under_load_and_down_when_idle(ray_cluster: Cluster, tiny_checkpoint: Path) -> None:
    # max_num_seqs=2 -> the default target is 1 ongoing request per replica, so 3 concurrent streams ask for
    # more replicas than max_replicas=2. Short delays and windows keep the test quick.
    config = LLMConfig(
        model_loading_config={"model_id": "c", "model_source": str(tiny_checkpoint)},
        engine_kwargs={**ENGINE, "max_num_seqs": 2},
        deployment_config={
            "autoscaling_config": {
                "min_replicas": 1,
                "max_replicas": 2,
                "upscale_delay_s": 0.5,
                "downscale_delay_s": 2,
                "metrics_interval_s": 0.5,
                "look_back_period_s": 1,
            }
        },
    )
    serve.run(build_openai_app({"llm_configs": [config]}), name="auto", route_prefix="/auto")
    client = openai.OpenAI(
        base_url=ray_cluster.url("/auto/v1"), api_key="placeholder", max_retries=0, timeout=120
    )
    deployment = "LLMServer:c"
    try:
        assert running_replicas("auto", deployment) == 1
        stop = threading.Event()
        errors: list[BaseException] = []

        def load() -> None:
            while not stop.is_set():
                try:
                    stream = client.completions.create(
                        model="c", prompt="load", max_tokens=150, stream=True, extra_body=NO_EOS
                    )
                    for _ in stream:
                        if stop.is_set():
                            stream.close()
                            break
                except Exception as e:
                    errors.append(e)
                    return

        workers = [threading.Thread(target=load, daemon=True) for _ in range(3)]
        for worker in workers:
            worker.start()
        try:
            wait_for(lambda: running_replicas("auto", deployment) == 2, timeout=120, what="scale up to 2")
        finally:
            stop.set()
            for worker in workers:
                worker.join(timeout=60)
        assert not errors, errors
        wait_for(lambda: running_replicas("auto", deployment) == 1, timeout=120, what="scale down to 1")
    finally:
        serve.delete("auto")


# --------------------------------------------------------------------------------------------- CLI


def test_vlmserve_run_a_serve_yaml(ray_cluster: Cluster, tiny_checkpoint: Path) -> None:
    models = ray_cluster.cache_dir / "models"
    models.mkdir()
    (models / "y.yaml").write_text(
        f"model_loading_config: {{model_id: y, model_source: {tiny_checkpoint}}}\n"
        "engine_kwargs: {max_model_len: 512, kv_cache_memory_gb: 0.01}\n"
    )
    config = ray_cluster.cache_dir / "serve_config.yaml"
    config.write_text(
        f"http_options: {{host: 127.0.0.1, port: {ray_cluster.http_port}}}\n"
        "applications:\n"
        "  - name: yaml\n"
        "    route_prefix: /yaml\n"
        "    import_path: vlmserve:build_openai_app\n"
        "    args:\n"
        "      llm_configs: [models/y.yaml]\n"
    )
    # No --address: `run` finds the cluster recorded in VLMSERVE_CACHE_DIR and deploys on it.
    result = ray_cluster.cli("run", str(config), "--non-blocking")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "using the local Ray cluster" in result.stdout
    assert "application 'yaml' is RUNNING" in result.stdout

    client = openai.OpenAI(base_url=ray_cluster.url("/yaml/v1"), api_key="placeholder", max_retries=0)
    reply = client.chat.completions.create(
        model="y", messages=[{"role": "user", "content": "hi"}], max_tokens=3
    )
    assert reply.model == "y"

    status = ray_cluster.cli("status")
    assert status.returncode == 0, status.stderr
    assert "yaml:\n    status: RUNNING" in status.stdout
    assert "LLMServer:y:" in status.stdout

    bad = ray_cluster.cache_dir / "bad.yaml"
    bad.write_text(config.read_text().replace("llm_configs:", "llm_config:"))
    failed = ray_cluster.cli("run", str(bad), "--non-blocking")
    assert failed.returncode == 1
    assert "llm_config: unknown key; did you mean 'llm_configs'?" in failed.stderr


def _descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [root]
    while todo:
        pid = todo.pop()
        for child in children.get(pid, []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads the process tree from /proc")
def test_shutdown_stops_serve_and_the_cluster(ray_cluster: Cluster) -> None:
    processes = _descendants(ray_cluster.pid) | {ray_cluster.pid}
    names = {Path(f"/proc/{p}/comm").read_text().strip() for p in processes if _alive(p)}
    assert {"gcs_server", "raylet"} <= names  # the check below looks at the right processes
    ray.shutdown()  # this test process is a driver of the cluster; let go of it first

    result = ray_cluster.cli("shutdown", "-y")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "local Ray cluster" in result.stdout and "stopped" in result.stdout
    wait_for(lambda: not any(_alive(p) for p in processes), timeout=30, what="every cluster process to exit")
    assert not ray_cluster.record_path.exists()
    with pytest.raises(httpx.TransportError):
        httpx.get(ray_cluster.url("/py/v1/models"), timeout=5)
    assert ray_cluster.cli("status").returncode == 1


def test_vlmserve_run_serves_one_app_through_direct_ingress(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """A cluster `vlmserve run` starts for one application: its ingress replica answers HTTP on the asked
    port itself (Ray Serve's proxy on another), tokens stream one at a time, a client leaving aborts its
    request, a second deploy asking another port is refused with what to do, one on the same port replaces
    the application, status and shutdown work."""
    port = free_port()
    cache = Cluster("", 0, port, tmp_path, tmp_path / "ray" / "cluster.json")
    config = tmp_path / "serve_config.yaml"
    config.write_text(
        f"http_options: {{host: 127.0.0.1, port: {port}}}\n"
        "applications:\n"
        "  - name: direct\n"
        "    route_prefix: /\n"
        "    import_path: vlmserve:build_openai_app\n"
        "    args:\n"
        f"      llm_configs: [{{model_loading_config: {{model_id: d, model_source: {tiny_checkpoint}}}, "
        "engine_kwargs: {max_model_len: 512, kv_cache_memory_gb: 0.01}}]\n"
    )
    result = cache.cli("run", str(config), "--non-blocking", "--num-cpus", "2")
    try:
        assert result.returncode == 0, result.stdout + result.stderr
        assert "starting a local Ray cluster" in result.stdout
        record = cluster.load_record(cache.record_path)
        assert record is not None and record.ingress_port == port
        assert record.proxy_port is not None and record.proxy_port != port

        client = openai.OpenAI(base_url=cache.url("/v1"), api_key="placeholder", max_retries=0, timeout=60)
        stream = client.chat.completions.create(
            model="d",
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=8,
            stream=True,
            stream_options={"include_usage": True},
            extra_body=NO_EOS,
        )
        chunks = list(stream)
        usage = chunks[-1].usage
        assert usage is not None and usage.completion_tokens == 8
        # one chunk per token (a token that ends mid-character is held back), not lumps
        assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) >= 6

        # A client that goes away mid-stream aborts its request in the engine (the direct-ingress server
        # passes the disconnect on as the proxy does). /metrics is refreshed every STATS_REFRESH_S on Ray:
        # two readings a refresh apart that agree, with nothing running, mean the engine stopped early.
        n, max_tokens = 32, 480
        body = {"model": "d", "prompt": "go", "max_tokens": max_tokens, "n": n, "stream": True, **NO_EOS}
        with httpx.stream("POST", cache.url("/v1/completions"), json=body, timeout=60) as response:
            lines = response.iter_lines()
            for _ in range(4):
                next(lines)

        def metric(name: str) -> float:
            text = httpx.get(cache.url("/metrics"), timeout=10).text
            return sum(float(v) for v in re.findall(rf"^{name}\{{[^}}]*\}} (\S+)$", text, re.M))

        time.sleep(STATS_REFRESH_S + 1)
        generated = metric("vllm:generation_tokens_total")
        time.sleep(STATS_REFRESH_S + 1)
        assert metric("vllm:num_requests_running") == 0
        assert metric("vllm:generation_tokens_total") == generated
        assert 0 < generated < n * max_tokens

        other = cache.cli("run", str(config), "--non-blocking", "--port", str(free_port()))
        assert other.returncode == 1
        assert f"direct ingress on port {port}" in other.stderr

        # Deploying again (an edited config) replaces the application on the same port.
        config.write_text(config.read_text().replace("max_model_len: 512", "max_model_len: 480"))
        again = cache.cli("run", str(config), "--non-blocking")
        assert again.returncode == 0, again.stdout + again.stderr
        assert "replacing application 'direct'" in again.stdout
        assert httpx.get(cache.url("/v1/models"), timeout=30).json()["data"][0]["max_model_len"] == 480

        status = cache.cli("status")
        assert status.returncode == 0 and "direct:\n    status: RUNNING" in status.stdout
    finally:
        stopped = cache.cli("shutdown", "-y")
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    with pytest.raises(httpx.TransportError):
        httpx.get(cache.url("/v1/models"), timeout=5)


def test_vlmserve_run_refuses_a_taken_port_before_starting_a_cluster(tmp_path: Path) -> None:
    """Direct ingress binds the asked port in a replica, where a taken port would only show as a failed
    deployment after Ray's retries: `vlmserve run` checks it first and says which port."""
    cache = Cluster("", 0, 0, tmp_path, tmp_path / "ray" / "cluster.json")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "serve_config.yaml"
        config.write_text(
            f"http_options: {{host: 127.0.0.1, port: {port}}}\n"
            "applications:\n"
            "  - {name: a, route_prefix: /, import_path: vlmserve:build_openai_app,\n"
            "     args: {llm_configs: [{model_loading_config: {model_id: a, model_source: demo}}]}}\n"
        )
        result = cache.cli("run", str(config), "--non-blocking")
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "starting a local Ray cluster" not in result.stdout
    assert not cache.record_path.exists()
