"""LLMConfig / LLMServingArgs / Serve YAML validation and the deployment options build_openai_app derives,
checked without a Ray cluster (ray[serve] must be installed: its schemas validate deployment options)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from pydantic import ValidationError

pytest.importorskip("ray.serve")

from vlmserve.deploy.builder import (
    build_openai_app,
    default_target_ongoing_requests,
    deployment_name,
    ingress_deployment_options,
    server_deployment_options,
)
from vlmserve.deploy.config import LLMConfig, LLMServingArgs, ServeConfigFile
from vlmserve.deploy.server import RemoteAPIError, _forward, merge_deltas
from vlmserve.engine.outputs import CompletionDelta, TokenLogprob

MODEL = {"model_id": "my-qwen-VL", "model_source": "Qwen/Qwen2.5-VL-7B-Instruct"}


def config(**fields: object) -> LLMConfig:
    return LLMConfig(model_loading_config=MODEL, **fields)  # type: ignore[arg-type]


def test_the_issue_example_validates() -> None:
    cfg = LLMConfig(
        model_loading_config=dict(model_id="my-qwen-VL", model_source="qwen/Qwen2.5-VL-7B-Instruct"),
        accelerator_type="L40S",
        deployment_config=dict(autoscaling_config=dict(min_replicas=1, max_replicas=2)),
        runtime_env=dict(env_vars={"HF_TOKEN": None}),  # os.environ.get("HF_TOKEN") where it is unset
        engine_kwargs=dict(max_model_len=8192, limit_mm_per_prompt={"image": 3}),
    )
    args = cfg.engine_args()
    assert (args.model, args.served_model_name, args.max_model_len) == (
        "qwen/Qwen2.5-VL-7B-Instruct",
        "my-qwen-VL",
        8192,
    )
    assert args.limit_mm_per_prompt == {"image": 3}
    assert cfg.runtime_env == {"env_vars": {}}  # an unset variable is left out, not sent as "None"


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"engine_kwarg": {}}, "engine_kwarg: unknown key; did you mean 'engine_kwargs'?"),
        ({"lora_config": {}}, "lora_config: LoRA adapters are not supported by vlmserve; remove lora_config"),
        (
            {"engine_kwargs": {"max_num_seq": 8}},
            "engine_kwargs.max_num_seq: unknown key; did you mean 'max_num_seqs'?",
        ),
        ({"engine_kwargs": {"max_num_seqs": 0}}, "engine_kwargs.max_num_seqs: Input should be greater than"),
        (
            {"engine_kwargs": {"model": "x"}},
            "engine_kwargs.model: set it as model_loading_config.model_source",
        ),
        (
            {"deployment_config": {"autoscaling_config": {"max_replica": 2}}},
            "deployment_config.autoscaling_config.max_replica: unknown key; did you mean 'max_replicas'?",
        ),
        (
            {"deployment_config": {"max_ongoing_request": 4}},
            "deployment_config.max_ongoing_request: unknown key; did you mean 'max_ongoing_requests'?",
        ),
        ({"deployment_config": {"max_ongoing_requests": -1}}, "deployment_config.max_ongoing_requests:"),
        (
            {"deployment_config": {"ray_actor_options": {"num_gpu": 1}}},
            "deployment_config.ray_actor_options.num_gpu: unknown key; did you mean 'num_gpus'?",
        ),
        ({"accelerator_type": "L40"}, "unknown accelerator_type 'L40'; did you mean 'L40S'?"),
        ({"llm_engine": "SGLang"}, "llm_engine 'SGLang' is not available"),
        (
            {"experimental_configs": {"stream_batching_interval": 50}},
            "experimental_configs.stream_batching_interval is not supported; the one vlmserve takes is "
            "stream_batching_interval_ms",
        ),
        (
            {"experimental_configs": {"stream_batching_interval_ms": -5}},
            "stream_batching_interval_ms must be a number of milliseconds >= 0, got -5",
        ),
        (
            {"experimental_configs": {"num_ingress_replicas": 2}},
            "give the ingress's replicas in build_openai_app's ingress_deployment_config",
        ),
    ],
)
def test_errors_name_the_field_and_the_fix(fields: dict[str, object], expected: str) -> None:
    with pytest.raises(ValidationError) as e:
        config(**fields)
    assert expected in str(e.value)


def test_model_loading_config_keys() -> None:
    with pytest.raises(ValidationError, match="tokenizer_source: the tokenizer is always read"):
        LLMConfig(model_loading_config={"model_id": "m", "tokenizer_source": "x"})
    with pytest.raises(ValidationError, match="cloud mirrors"):
        LLMConfig(model_loading_config={"model_id": "m", "model_source": {"bucket_uri": "s3://b/m"}})
    # Without model_source, the id is the source (Ray Serve LLM's rule).
    assert LLMConfig(model_loading_config={"model_id": "Qwen/x"}).engine_args().model == "Qwen/x"


def test_serving_args_reads_yaml_paths_relative_to_base_dir(tmp_path: Path) -> None:
    (tmp_path / "m.yaml").write_text(
        "model_loading_config: {model_id: m, model_source: /ckpt}\nengine_kwargs: {max_model_len: 512}\n"
    )
    args = LLMServingArgs.model_validate(
        {"llm_configs": ["m.yaml", {"model_loading_config": {"model_id": "n"}}]},
        context={"base_dir": tmp_path},
    )
    assert [c.model_id for c in args.llm_configs] == ["m", "n"]
    assert args.llm_configs[0].engine_args().max_model_len == 512
    with pytest.raises(ValidationError, match="two llm_configs use model_id 'm'"):
        LLMServingArgs.model_validate({"llm_configs": ["m.yaml", "m.yaml"]}, context={"base_dir": tmp_path})
    with pytest.raises(ValidationError, match=r"missing\.yaml: no such file"):
        LLMServingArgs.model_validate({"llm_configs": ["missing.yaml"]}, context={"base_dir": tmp_path})
    with pytest.raises(ValidationError, match="ingress_cls_config: the ingress is vlmserve's own"):
        LLMServingArgs.model_validate({"llm_configs": ["m.yaml"], "ingress_cls_config": {}})


def test_serve_yaml(tmp_path: Path) -> None:
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "m.yaml").write_text("model_loading_config: {model_id: m, model_source: /ckpt}\n")
    (tmp_path / "serve.yaml").write_text(
        "http_options: {port: 9000}\n"
        "applications:\n"
        "  - name: llm\n    route_prefix: /\n    import_path: vlmserve:build_openai_app\n"
        "    args: {llm_configs: [models/m.yaml]}\n"
    )
    cfg = ServeConfigFile.load(tmp_path / "serve.yaml")
    assert (cfg.http_options.host, cfg.http_options.port) == ("127.0.0.1", 9000)
    # Relative llm_configs paths are made relative to the YAML file, not to where the command runs.
    assert cfg.applications[0].args["llm_configs"] == [str((tmp_path / "models" / "m.yaml").resolve())]

    (tmp_path / "bad.yaml").write_text(
        "applications:\n  - import_path: vlmserve:build_openai_app\n    deployments: []\n"
    )
    with pytest.raises(ValidationError, match=r"deployments: set deployment options per model"):
        ServeConfigFile.load(tmp_path / "bad.yaml")
    (tmp_path / "typo.yaml").write_text("aplications: []\n")
    with pytest.raises(ValidationError, match="aplications: unknown key; did you mean 'applications'"):
        ServeConfigFile.load(tmp_path / "typo.yaml")


# --------------------------------------------------------------------------------------------- options


def test_accelerator_type_asks_for_one_gpu_of_that_type() -> None:
    options, engine_args = server_deployment_options(config(accelerator_type="L40S"), gpus_in_cluster=False)
    assert options["ray_actor_options"]["accelerator_type"] == "L40S"
    assert options["ray_actor_options"]["num_gpus"] == 1
    assert engine_args.device == "cuda"
    assert options["name"] == "LLMServer:my-qwen-VL"


def test_no_accelerator_and_no_gpu_gives_cpu_replicas() -> None:
    options, engine_args = server_deployment_options(config(), gpus_in_cluster=False)
    assert options["ray_actor_options"]["num_gpus"] == 0
    assert "accelerator_type" not in options["ray_actor_options"]
    assert engine_args.device == "cpu"
    options, engine_args = server_deployment_options(config(), gpus_in_cluster=True)
    assert (options["ray_actor_options"]["num_gpus"], engine_args.device) == (1, "cuda")


def test_cuda_device_without_a_gpu_is_refused() -> None:
    with pytest.raises(ValueError, match=r"engine_kwargs\.device is 'cuda' but its replicas get no GPU"):
        server_deployment_options(config(engine_kwargs={"device": "cuda"}), gpus_in_cluster=False)


def test_autoscaling_target_comes_from_the_engine_batch() -> None:
    options, _ = server_deployment_options(
        config(
            engine_kwargs={"max_num_seqs": 32},
            deployment_config={"autoscaling_config": {"min_replicas": 1, "max_replicas": 4}},
        ),
        gpus_in_cluster=False,
    )
    assert options["max_ongoing_requests"] == 64  # a batch running + a batch waiting
    assert options["autoscaling_config"] == {
        "min_replicas": 1,
        "max_replicas": 4,
        "target_ongoing_requests": 16,
    }
    # The user's own values are kept.
    options, _ = server_deployment_options(
        config(
            deployment_config={
                "max_ongoing_requests": 10,
                "autoscaling_config": {"max_replicas": 3, "target_ongoing_requests": 7},
            }
        ),
        gpus_in_cluster=False,
    )
    assert options["max_ongoing_requests"] == 10
    assert options["autoscaling_config"]["target_ongoing_requests"] == 7
    # max_ongoing_requests below the batch bounds the target; the target is never 0.
    assert default_target_ongoing_requests(max_num_seqs=64, max_ongoing_requests=6) == 3
    assert default_target_ongoing_requests(max_num_seqs=1, max_ongoing_requests=2) == 1
    # Fixed replicas: no autoscaling_config is invented.
    options, _ = server_deployment_options(
        config(deployment_config={"num_replicas": 2}), gpus_in_cluster=False
    )
    assert "autoscaling_config" not in options


def test_runtime_env_merges_into_the_actor_options() -> None:
    options, _ = server_deployment_options(
        config(
            runtime_env={"env_vars": {"HF_TOKEN": "t", "A": "config"}},
            deployment_config={"ray_actor_options": {"runtime_env": {"env_vars": {"A": "actor", "B": "b"}}}},
        ),
        gpus_in_cluster=False,
    )
    assert options["ray_actor_options"]["runtime_env"] == {
        "env_vars": {"A": "config", "B": "b", "HF_TOKEN": "t"}
    }


def test_ingress_options_and_names() -> None:
    args = LLMServingArgs(llm_configs=[config()], ingress_deployment_config={"max_ongoing_requests": 50})
    options = ingress_deployment_options(args)
    assert options["name"] == "OpenAiIngress"
    assert options["max_ongoing_requests"] == 50
    assert options["num_replicas"] == 1
    assert options["ray_actor_options"]["num_cpus"] == 0
    assert deployment_name("org/model.v1") == "LLMServer:org--model_v1"


def test_build_openai_app_without_a_cluster() -> None:
    from ray.serve.deployment import Application

    app = build_openai_app({"llm_configs": [config(engine_kwargs={"device": "cpu"})]})
    assert isinstance(app, Application)
    with pytest.raises(ValueError, match="both map to the deployment name"):
        build_openai_app(
            {
                "llm_configs": [
                    LLMConfig(model_loading_config={"model_id": "org/m.1"}),
                    LLMConfig(model_loading_config={"model_id": "org--m_1"}),
                ]
            }
        )


def test_remote_api_error_keeps_status_param_and_code() -> None:
    from vlmserve.api.errors import InvalidRequestError, ServiceUnavailableError

    err = RemoteAPIError.capture(
        InvalidRequestError("too long", param="max_tokens", code="context_length_exceeded")
    )
    back = err.to_exception()
    assert (back.status_code, back.error_type, back.param, back.code) == (
        400,
        "invalid_request_error",
        "max_tokens",
        "context_length_exceeded",
    )
    busy = RemoteAPIError.capture(ServiceUnavailableError("full", code="queue_full")).to_exception()
    assert busy.status_code == 503
    assert busy.response().headers["retry-after"] == "1"


# --------------------------------------------------------------------------------------------- examples, targets

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_example_serve_config_and_kuberay_manifest_validate() -> None:
    import yaml

    config = ServeConfigFile.load(EXAMPLES / "serve_config.yaml")
    manifest = yaml.safe_load((EXAMPLES / "kuberay_rayservice.yaml").read_text())
    kuberay = ServeConfigFile.model_validate(yaml.safe_load(manifest["spec"]["serveConfigV2"]))
    for app in (*config.applications, *kuberay.applications):
        assert app.import_path == "vlmserve:build_openai_app"
        (model,) = LLMServingArgs.model_validate(app.args).llm_configs
        options, engine_args = server_deployment_options(model, gpus_in_cluster=False)
        assert options["ray_actor_options"] == {"accelerator_type": "L40S", "num_gpus": 1}
        assert engine_args.model == "Qwen/Qwen2.5-VL-7B-Instruct"


def test_example_python_app_and_run_targets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ray.serve.deployment import Application

    from vlmserve.deploy import cluster

    # `vlmserve run serve_qwen_VL:app` imports the module from the working directory.
    monkeypatch.chdir(EXAMPLES)
    monkeypatch.syspath_prepend(str(EXAMPLES))
    (spec,), http = cluster.read_target("serve_qwen_VL:app")
    assert (spec.name, spec.route_prefix, http) == ("default", "/", None)
    assert isinstance(cluster.build_application(spec), Application)

    (spec,), http = cluster.read_target(str(EXAMPLES / "serve_config.yaml"))
    assert http == ("127.0.0.1", 8000)
    assert isinstance(cluster.build_application(spec), Application)  # builder called with the file's args

    with pytest.raises(cluster.ClusterError, match="neither a Serve YAML file nor module:attribute"):
        cluster.read_target("serve_qwen_VL")
    with pytest.raises(cluster.ClusterError, match="cannot import 'serve_qwen_VL:nope'"):
        cluster.build_application(cluster.AppSpec("x", "/", "serve_qwen_VL:nope", {}))
    with pytest.raises(cluster.ClusterError, match="is a built application; it takes no args"):
        cluster.build_application(cluster.AppSpec("x", "/", "serve_qwen_VL:app", {"llm_configs": []}))


def test_stream_batching_interval_reaches_the_replica() -> None:
    assert config().stream_batching_interval_s == 0.0  # every token when its step ends
    assert config(experimental_configs={"stream_batching_interval_ms": 0}).stream_batching_interval_s == 0.0
    cfg = config(experimental_configs={"stream_batching_interval_ms": 50}, engine_kwargs={"device": "cpu"})
    assert cfg.stream_batching_interval_s == 0.05
    app = build_openai_app({"llm_configs": [cfg]})
    server = app._bound_deployment.init_kwargs["llm_deployments"][cfg.model_id]
    assert server._bound_deployment.init_kwargs["stream_batching_interval_s"] == 0.05


def _delta(i: int, index: int = 0, finish: str | None = None) -> CompletionDelta:
    return CompletionDelta(
        "r",
        index,
        f"t{i} ",
        [i],
        [TokenLogprob(i, -0.1 * i)],
        finish,
        num_prompt_tokens=5,
        num_output_tokens=i + 1,
    )


def test_merge_deltas_joins_each_choice_in_order() -> None:
    merged = merge_deltas([_delta(0), _delta(1, index=1), _delta(2), _delta(3, index=1, finish="length")])
    assert [(d.index, d.text, d.token_ids, [lp.token_id for lp in d.logprobs]) for d in merged] == [
        (0, "t0 t2 ", [0, 2], [0, 2]),
        (1, "t1 t3 ", [1, 3], [1, 3]),
    ]
    assert merged[0].finish_reason is None and merged[1].finish_reason == "length"
    assert merged[1].num_output_tokens == 4


def test_windowed_forwarding_sends_the_first_token_at_once_then_batches() -> None:
    """Deltas 10 ms apart through a 50 ms window: the first alone, then ~5 per item, the last with its
    finish reason; every token arrives once and in order, and the source is closed at the end."""

    closed = []

    async def source():
        try:
            for i in range(20):
                await asyncio.sleep(0.01)
                yield _delta(i, finish="length" if i == 19 else None)
        finally:
            closed.append(True)

    async def run() -> list[tuple[float, CompletionDelta]]:
        loop = asyncio.get_running_loop()
        start = loop.time()
        return [(loop.time() - start, d) async for d in _forward(source(), 0.05)]

    items = asyncio.run(run())
    tokens = [t for _, d in items for t in d.token_ids]
    assert tokens == list(range(20))
    assert items[0][1].token_ids == [0]  # alone: not held for a window
    # ~200 ms of tokens in 50 ms windows: a handful of items (as many as the run took windows), not 20.
    elapsed = items[-1][0]
    assert 3 <= len(items) <= elapsed / 0.05 + 2 and len(items) <= 10
    assert items[-1][1].finish_reason == "length"
    assert closed == [True]


def test_windowed_forwarding_passes_on_a_failure_and_stops_the_source_when_closed() -> None:
    async def failing():
        yield _delta(0)
        await asyncio.sleep(0.005)
        yield _delta(1)
        raise RuntimeError("engine failed")

    async def drain(gen) -> list[CompletionDelta]:
        return [d async for d in gen]

    with pytest.raises(RuntimeError, match="engine failed"):
        asyncio.run(drain(_forward(failing(), 0.05)))

    closed = []

    async def endless():
        try:
            i = 0
            while True:
                await asyncio.sleep(0.001)
                yield _delta(i)
                i += 1
        finally:
            closed.append(True)

    async def take_two() -> None:
        gen = _forward(endless(), 0.02)
        await anext(gen)
        await anext(gen)
        await gen.aclose()  # what Ray does when the ingress's client goes away

    asyncio.run(take_two())
    assert closed == [True]


def test_windowed_forwarding_is_cancelled_even_as_a_delta_arrives() -> None:
    """Ray cancels the task that drives a replica's stream when its client leaves. A cancellation that lands
    in the same loop turn as a delta's arrival must still end the stream and close the source (which aborts
    the engine request): asyncio.wait_for on Python 3.11 returns the arrived item instead and drops the
    cancellation, and the request then ran to its end for nobody (a Ray test once saw all 48 x 480 tokens
    generated after the client had gone)."""
    closed = []
    stop = asyncio.Event()

    async def source(cancel_consumer):  # a delta every loop turn; cancels the consumer as one arrives
        try:
            i = 0
            while not stop.is_set():  # (only a lost cancellation needs this way out)
                await asyncio.sleep(0)
                if i == 3:
                    # Queued before the delta's own wake-ups: it runs after the delta reached the window's
                    # queue and before the consumer resumes.
                    asyncio.get_running_loop().call_soon(cancel_consumer)
                yield _delta(i)
                i += 1
        finally:
            closed.append(True)

    async def run() -> bool:
        task: asyncio.Task[None] | None = None

        async def consume() -> None:
            async for _ in _forward(source(lambda: task.cancel()), 0.05):  # type: ignore[union-attr]
                pass

        task = asyncio.create_task(consume())
        done, _ = await asyncio.wait([task], timeout=2)
        if not done:
            stop.set()
            await task
            return False
        return task.cancelled()

    assert asyncio.run(run()), "the cancellation was lost: the stream went on without its client"
    assert closed == [True]


# --------------------------------------------------------------------------------------------- tensor parallelism


def test_tensor_parallel_replicas_get_one_gpu_bundle_per_rank_strict_pack() -> None:
    options, engine_args = server_deployment_options(
        config(accelerator_type="H100", engine_kwargs={"tensor_parallel_size": 4}), gpus_in_cluster=True
    )
    gpu = {"GPU": 1, "accelerator_type:H100": 0.001}
    assert options["placement_group_bundles"] == [gpu] * 4
    assert options["placement_group_strategy"] == "STRICT_PACK"
    # The replica (rank 0) runs in bundle 0: its resources are that bundle's.
    assert options["ray_actor_options"] == {"accelerator_type": "H100", "num_gpus": 1, "num_cpus": 0}
    assert (engine_args.tensor_parallel_size, engine_args.device, engine_args.engine_process) == (
        4,
        "cuda",
        False,
    )


def test_placement_group_config_as_ray_serve_llm_takes_it() -> None:
    pg = {"bundles": [{"CPU": 2}, {"CPU": 1}], "strategy": "PACK"}
    options, engine_args = server_deployment_options(
        config(placement_group_config=pg, engine_kwargs={"tensor_parallel_size": 2}), gpus_in_cluster=False
    )
    assert options["placement_group_bundles"] == pg["bundles"]
    assert options["placement_group_strategy"] == "PACK"
    assert options["ray_actor_options"] == {"num_gpus": 0, "num_cpus": 2}
    assert engine_args.device == "cpu"
    # Without tensor parallelism a CPU cluster gets one CPU bundle per rank, too.
    options, _ = server_deployment_options(
        config(engine_kwargs={"tensor_parallel_size": 2}), gpus_in_cluster=False
    )
    assert options["placement_group_bundles"] == [{"CPU": 1}, {"CPU": 1}]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (
            {
                "placement_group_config": {"bundles": [{"GPU": 1}]},
                "engine_kwargs": {"tensor_parallel_size": 2},
            },
            r"placement_group_config has 1 bundle\(s\) for engine_kwargs.tensor_parallel_size 2",
        ),
        (
            {"placement_group_config": {"bundles": [{"GPU": 1}], "strategy": "TIGHT"}},
            "strategy 'TIGHT' is not",
        ),
        ({"placement_group_config": {"bundles": []}}, "bundles must be a non-empty list"),
        ({"placement_group_config": {"bundles": [{"GPU": -1}]}}, r"bundles\[0\]\.GPU must be a number >= 0"),
        ({"placement_group_config": {"bundle": [{"GPU": 1}]}}, "did you mean 'bundles'"),
        ({"engine_kwargs": {"tensor_parallel_size": 2, "async_scheduling": True}}, "async_scheduling is not"),
    ],
)
def test_bad_placement_group_configs_are_refused(fields: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        config(**fields)
