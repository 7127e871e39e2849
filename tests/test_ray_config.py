"""LLMConfig / LLMServingArgs / Serve YAML validation and the deployment options build_openai_app derives,
checked without a Ray cluster (ray[serve] must be installed: its schemas validate deployment options)."""

from __future__ import annotations

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
from vlmserve.deploy.server import RemoteAPIError

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
