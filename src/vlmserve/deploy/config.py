"""What users write to deploy on Ray Serve, with Ray Serve LLM's names, validated once at the edge.

    LLMConfig(
        model_loading_config=dict(model_id="my-qwen-VL", model_source="Qwen/Qwen2.5-VL-7B-Instruct"),
        accelerator_type="L40S",
        deployment_config=dict(autoscaling_config=dict(min_replicas=1, max_replicas=2)),
        runtime_env=dict(env_vars={"HF_TOKEN": os.environ.get("HF_TOKEN")}),
        engine_kwargs=dict(max_model_len=8192, limit_mm_per_prompt={"image": 3}),
    )

Owns: `LLMConfig` (one model: id, source, engine kwargs, Ray deployment options), `LLMServingArgs` (the
`args` of `build_openai_app`: LLMConfigs inline or as YAML file paths), and `ServeConfigFile` (the Serve YAML
of `vlmserve run config.yaml`). An unknown or unsupported key is an error that names it, suggests the key
that was probably meant and says what to do; `engine_kwargs` are checked by `EngineArgs` (vLLM's names);
deployment options by Ray Serve's own schemas. Ray Serve's schemas silently ignore unknown keys, so the
allowed keys are checked here against their field lists.

Does not know: how options become Ray deployments (builder.py), how engines run.
"""

from __future__ import annotations

import difflib
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from vlmserve.config import EngineArgs

# --------------------------------------------------------------------------------------------- key checks


def _suggest(key: str, allowed: Collection[str]) -> str:
    close = difflib.get_close_matches(key, list(allowed), n=1, cutoff=0.6)
    return f"did you mean {close[0]!r}? " if close else ""


def reject_unknown_keys(
    where: str, given: Mapping[str, Any], allowed: Collection[str], unsupported: Mapping[str, str] = {}
) -> None:
    """Raise ValueError naming every key of `given` (found at `where`) that is not in `allowed`."""
    problems = []
    for key in given:
        if key in allowed:
            continue
        path = f"{where}.{key}" if where else key
        if key in unsupported:
            problems.append(f"{path}: {unsupported[key]}")
        else:
            problems.append(
                f"{path}: unknown key; {_suggest(str(key), allowed)}allowed keys: {', '.join(sorted(allowed))}"
            )
    if problems:
        raise ValueError("; ".join(problems))


def describe_validation_error(error: ValidationError, where: str, known: Collection[str] = ()) -> str:
    """One line per problem, each starting with the full path of the field (`engine_kwargs.max_num_seqs`)."""
    parts = []
    for err in error.errors():
        loc = ".".join(str(p) for p in err["loc"])
        path = ".".join(p for p in (where, loc) if p)
        if err["type"] == "extra_forbidden":
            key = str(err["loc"][-1]) if err["loc"] else ""
            parts.append(
                f"{path}: unknown key; {_suggest(key, known)}allowed keys: {', '.join(sorted(known))}"
            )
            continue
        message = str(err["msg"]).removeprefix("Value error, ")
        if not loc:  # a check across fields: its input is the whole mapping, already named by `where`
            parts.append(f"{path}: {message}")
            continue
        shown = repr(err.get("input"))
        if len(shown) > 80:
            shown = shown[:77] + "..."
        parts.append(f"{path}: {message} (got {shown})")
    return "; ".join(parts)


# --------------------------------------------------------------------------------------------- deployment options

# Ray Serve deployment options an LLMConfig may set (Ray Serve LLM's documented list, minus user_config).
DEPLOYMENT_CONFIG_KEYS = frozenset(
    {
        "name",
        "num_replicas",
        "ray_actor_options",
        "max_ongoing_requests",
        "max_queued_requests",
        "autoscaling_config",
        "health_check_period_s",
        "health_check_timeout_s",
        "graceful_shutdown_wait_loop_s",
        "graceful_shutdown_timeout_s",
        "logging_config",
        "request_router_config",
        "max_replicas_per_node",
    }
)
_DEPLOYMENT_UNSUPPORTED = {
    "user_config": "the vlmserve server deployment has no reconfigure(); put engine options in engine_kwargs",
    "placement_group_bundles": "give the replica's bundles as LLMConfig.placement_group_config.bundles "
    "(as in Ray Serve LLM)",
    "placement_group_strategy": "give the strategy as LLMConfig.placement_group_config.strategy (as in Ray "
    "Serve LLM)",
}

PLACEMENT_STRATEGIES = ("PACK", "STRICT_PACK", "SPREAD", "STRICT_SPREAD")


def validate_deployment_config(value: Any, where: str) -> dict[str, Any]:
    """Check a Ray Serve deployment options dict (keys and values) with Ray's own schemas."""
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import DeploymentSchema, RayActorOptionsSchema

    if not isinstance(value, Mapping):
        raise ValueError(f"{where} must be a mapping of Ray Serve deployment options, got {value!r}")
    value = dict(value)
    reject_unknown_keys(where, value, DEPLOYMENT_CONFIG_KEYS, _DEPLOYMENT_UNSUPPORTED)
    autoscaling = value.get("autoscaling_config")
    if autoscaling is not None:
        if not isinstance(autoscaling, Mapping):
            raise ValueError(f"{where}.autoscaling_config must be a mapping, got {autoscaling!r}")
        reject_unknown_keys(f"{where}.autoscaling_config", autoscaling, AutoscalingConfig.model_fields)
        try:
            AutoscalingConfig(**autoscaling)
        except ValidationError as e:
            raise ValueError(describe_validation_error(e, f"{where}.autoscaling_config")) from None
    actor_options = value.get("ray_actor_options")
    if actor_options is not None:
        if not isinstance(actor_options, Mapping):
            raise ValueError(f"{where}.ray_actor_options must be a mapping, got {actor_options!r}")
        reject_unknown_keys(f"{where}.ray_actor_options", actor_options, RayActorOptionsSchema.model_fields)
    try:
        DeploymentSchema(**{"name": "check", **value})
    except ValidationError as e:
        raise ValueError(describe_validation_error(e, where)) from None
    return value


# --------------------------------------------------------------------------------------------- LLMConfig


def _known_accelerators() -> frozenset[str]:
    import ray.util.accelerators.accelerators as accelerators

    return frozenset(
        v
        for k, v in vars(accelerators).items()
        if k.isupper() and isinstance(v, str) and not k.startswith("_")
    )


class ModelLoadingConfig(BaseModel):
    """Which model to serve and under which id."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    model_id: str = Field(min_length=1, description="the id clients put in the `model` field")
    model_source: str | None = Field(
        None, description="checkpoint directory or Hugging Face repo id; default: model_id"
    )

    @model_validator(mode="before")
    @classmethod
    def _keys(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            reject_unknown_keys(
                "model_loading_config",
                data,
                cls.model_fields,
                {
                    "tokenizer_source": "the tokenizer is always read from model_source (its tokenizer.json); "
                    "remove tokenizer_source"
                },
            )
        return data

    @field_validator("model_source", mode="before")
    @classmethod
    def _plain_source(cls, value: Any) -> Any:
        if isinstance(value, Mapping):
            raise ValueError(
                "cloud mirrors (bucket_uri) are not supported; give a local checkpoint directory or a Hugging "
                "Face repo id (download from a bucket into the image or a shared volume first)"
            )
        return value

    @property
    def source(self) -> str:
        return self.model_source or self.model_id


# Tokens leave one engine step at a time, as from `vlmserve serve`: a replica sends an ingress's deltas on
# one channel, one Ray item per step for all its requests (deploy/server.py), so a window is no longer what
# keeps the Ray path's CPU cost down. A window (Ray Serve LLM's default is 50 ms) trades smooth streams for
# fewer SSE chunks, and is an operator's opt-in.
DEFAULT_STREAM_BATCHING_INTERVAL_MS = 0

_LLM_CONFIG_UNSUPPORTED = {
    "lora_config": "LoRA adapters are not supported by vlmserve; remove lora_config",
    "accelerator_config": "give the GPU type as accelerator_type (e.g. 'L40S') instead",
    "server_cls": "the server deployment is vlmserve's own (vlmserve.deploy.server.LLMServer); remove server_cls",
    "log_engine_metrics": "engine metrics are always exported on the app's /metrics; remove log_engine_metrics",
    "callback_config": "vlmserve has no model-initialization callbacks; remove callback_config",
}


class LLMConfig(BaseModel):
    """One model of a Ray Serve app: the fields of `ray.serve.llm.LLMConfig` that vlmserve implements."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    model_loading_config: ModelLoadingConfig
    engine_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="EngineArgs fields (vLLM's names), e.g. max_model_len, max_num_seqs"
    )
    accelerator_type: str | None = Field(
        None, description="GPU type (Ray's accelerator names: L4, L40S, A10G, A100, H100...): one per replica"
    )
    deployment_config: dict[str, Any] = Field(
        default_factory=dict,
        description="Ray Serve deployment options: autoscaling_config, max_ongoing_requests, "
        "max_queued_requests, health_check_period_s, graceful_shutdown_timeout_s, ray_actor_options, ...",
    )
    runtime_env: dict[str, Any] | None = Field(
        None, description="Ray runtime_env of the replicas, e.g. {'env_vars': {'HF_TOKEN': ...}}"
    )
    placement_group_config: dict[str, Any] | None = Field(
        None,
        description="a replica's placement group, as in Ray Serve LLM: {'bundles': [{'GPU': 1}, ...], "
        "'strategy': 'STRICT_PACK'}, one bundle per tensor-parallel rank (the replica runs in the first); "
        "default with engine_kwargs.tensor_parallel_size N > 1: N bundles of one GPU (one CPU on a CPU "
        "cluster), STRICT_PACK",
    )
    llm_engine: str = Field(
        "vlmserve", description="accepted so that Ray Serve LLM files load unchanged: 'vLLM' or 'vlmserve'"
    )
    experimental_configs: dict[str, Any] = Field(
        default_factory=dict,
        description="Ray Serve LLM's opt-in knobs; vlmserve takes stream_batching_interval_ms: a replica sends a "
        "stream's tokens to the ingress merged over windows of this many milliseconds (the first token goes at "
        f"once; Ray Serve LLM's default is 50) instead of each engine step's; default "
        f"{DEFAULT_STREAM_BATCHING_INTERVAL_MS}: every token when its step ends, as `vlmserve serve` sends it",
    )

    @model_validator(mode="before")
    @classmethod
    def _keys(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            reject_unknown_keys("", data, cls.model_fields, _LLM_CONFIG_UNSUPPORTED)
        return data

    @field_validator("experimental_configs", mode="before")
    @classmethod
    def _experimental(cls, value: Any) -> dict[str, Any]:
        value = dict(value or {})
        for key in value:
            if key == "num_ingress_replicas":
                raise ValueError(
                    "experimental_configs.num_ingress_replicas: give the ingress's replicas in "
                    "build_openai_app's ingress_deployment_config instead"
                )
            if key != "stream_batching_interval_ms":
                raise ValueError(
                    f"experimental_configs.{key} is not supported; the one vlmserve takes is "
                    "stream_batching_interval_ms"
                )
        interval = value.get("stream_batching_interval_ms", DEFAULT_STREAM_BATCHING_INTERVAL_MS)
        if isinstance(interval, bool) or not isinstance(interval, (int, float)) or interval < 0:
            raise ValueError(
                f"experimental_configs.stream_batching_interval_ms must be a number of milliseconds >= 0, got "
                f"{interval!r}"
            )
        return value

    @property
    def stream_batching_interval_s(self) -> float:
        ms = self.experimental_configs.get("stream_batching_interval_ms", DEFAULT_STREAM_BATCHING_INTERVAL_MS)
        return float(ms) / 1e3

    @field_validator("llm_engine")
    @classmethod
    def _engine(cls, value: str) -> str:
        if value not in ("vLLM", "vlmserve"):
            raise ValueError(
                f"llm_engine {value!r} is not available; the engine is vlmserve's own (engine_kwargs take "
                "vLLM's names), so leave llm_engine out or set it to 'vLLM'"
            )
        return value

    @field_validator("accelerator_type")
    @classmethod
    def _accelerator(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = "A10G" if value == "A10" else value  # Ray Serve LLM's alias: the A10 of the clouds is an A10G
        known = _known_accelerators()
        if value not in known:
            raise ValueError(
                f"unknown accelerator_type {value!r}; {_suggest(value, known)}use one of Ray's accelerator "
                f"names: {', '.join(sorted(known))}"
            )
        return value

    @field_validator("deployment_config", mode="before")
    @classmethod
    def _deployment(cls, value: Any) -> dict[str, Any]:
        return validate_deployment_config(value or {}, "deployment_config")

    @field_validator("placement_group_config", mode="before")
    @classmethod
    def _placement(cls, value: Any) -> dict[str, Any] | None:
        if value is None:
            return None
        if not isinstance(value, Mapping):
            raise ValueError(
                "placement_group_config must be a mapping such as {'bundles': [{'GPU': 1}, {'GPU': 1}], "
                f"'strategy': 'STRICT_PACK'}}, got {value!r}"
            )
        reject_unknown_keys("placement_group_config", value, ("bundles", "strategy"))
        bundles = value.get("bundles")
        if not isinstance(bundles, list) or not bundles:
            raise ValueError(
                f"placement_group_config.bundles must be a non-empty list of mappings, got {bundles!r}"
            )
        for i, bundle in enumerate(bundles):
            if not isinstance(bundle, Mapping) or not bundle:
                raise ValueError(
                    f"placement_group_config.bundles[{i}] must map resources to amounts, e.g. {{'GPU': 1}}, "
                    f"got {bundle!r}"
                )
            for name, amount in bundle.items():
                if isinstance(amount, bool) or not isinstance(amount, (int, float)) or amount < 0:
                    raise ValueError(
                        f"placement_group_config.bundles[{i}].{name} must be a number >= 0, got {amount!r}"
                    )
        strategy = value.get("strategy", "PACK")
        if strategy not in PLACEMENT_STRATEGIES:
            raise ValueError(
                f"placement_group_config.strategy {strategy!r} is not one of {', '.join(PLACEMENT_STRATEGIES)}"
            )
        return {"bundles": [dict(b) for b in bundles], "strategy": strategy}

    @field_validator("runtime_env", mode="before")
    @classmethod
    def _runtime_env(cls, value: Any) -> dict[str, Any] | None:
        if value is None:
            return None
        if not isinstance(value, Mapping):
            raise ValueError(f"runtime_env must be a mapping such as {{'env_vars': {{...}}}}, got {value!r}")
        env = dict(value)
        env_vars = env.get("env_vars")
        if env_vars is not None:
            if not isinstance(env_vars, Mapping):
                raise ValueError(f"runtime_env.env_vars must map names to strings, got {env_vars!r}")
            # None means "not set here": `os.environ.get("HF_TOKEN")` on a machine without the variable.
            env["env_vars"] = {str(k): str(v) for k, v in env_vars.items() if v is not None}
        return env

    @model_validator(mode="after")
    def _engine_kwargs(self) -> LLMConfig:
        for key, where in (
            ("model", "model_loading_config.model_source"),
            ("served_model_name", "model_loading_config.model_id"),
        ):
            if key in self.engine_kwargs:
                raise ValueError(f"engine_kwargs.{key}: set it as {where} instead")
        args = self.engine_args()
        pg = self.placement_group_config
        if pg is not None and len(pg["bundles"]) < args.tensor_parallel_size:
            raise ValueError(
                f"placement_group_config has {len(pg['bundles'])} bundle(s) for engine_kwargs."
                f"tensor_parallel_size {args.tensor_parallel_size}: give one bundle per rank"
            )
        return self

    @property
    def model_id(self) -> str:
        return self.model_loading_config.model_id

    def engine_args(self, **overrides: Any) -> EngineArgs:
        """The engine options of this model (EngineArgs: model_source, model_id, engine_kwargs, overrides)."""
        kwargs = {**self.engine_kwargs, **overrides}
        try:
            return EngineArgs(
                model=self.model_loading_config.source, served_model_name=self.model_id, **kwargs
            )
        except ValidationError as e:
            raise ValueError(
                describe_validation_error(
                    e, "engine_kwargs", EngineArgs.model_fields.keys() - {"model", "served_model_name"}
                )
            ) from None

    @classmethod
    def from_file(cls, path: str | Path) -> LLMConfig:
        """An LLMConfig from a YAML (or JSON) file holding its fields."""
        return cls.model_validate(_load_mapping(Path(path), "an LLMConfig"))


# --------------------------------------------------------------------------------------------- LLMServingArgs


class LLMServingArgs(BaseModel):
    """The `args` of build_openai_app: the models (inline, or YAML file paths) and the ingress's options.

    Relative file paths are resolved against `context={"base_dir": ...}` when given (the Serve YAML's
    directory), else against the working directory.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    llm_configs: list[LLMConfig] = Field(min_length=1)
    ingress_deployment_config: dict[str, Any] = Field(
        default_factory=dict, description="Ray Serve deployment options of the ingress (OpenAiIngress)"
    )

    @model_validator(mode="before")
    @classmethod
    def _keys(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            reject_unknown_keys(
                "",
                data,
                cls.model_fields,
                {
                    "ingress_cls_config": "the ingress is vlmserve's own OpenAI app (the same as `vlmserve "
                    "serve`); remove ingress_cls_config"
                },
            )
        return data

    @field_validator("llm_configs", mode="before")
    @classmethod
    def _files(cls, value: Any, info: ValidationInfo) -> Any:
        if not isinstance(value, list):
            raise ValueError(f"llm_configs must be a list of LLMConfigs or YAML file paths, got {value!r}")
        base = Path((info.context or {}).get("base_dir", "."))
        return [LLMConfig.from_file(base / item) if isinstance(item, str | Path) else item for item in value]

    @field_validator("ingress_deployment_config", mode="before")
    @classmethod
    def _ingress(cls, value: Any) -> dict[str, Any]:
        return validate_deployment_config(value or {}, "ingress_deployment_config")

    @model_validator(mode="after")
    def _unique(self) -> LLMServingArgs:
        seen: set[str] = set()
        for config in self.llm_configs:
            if config.model_id in seen:
                raise ValueError(
                    f"two llm_configs use model_id {config.model_id!r}; each model needs its own id"
                )
            seen.add(config.model_id)
        return self


# --------------------------------------------------------------------------------------------- Serve YAML


class HTTPOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = Field("127.0.0.1", description="address Ray Serve's HTTP proxy listens on")
    port: int = Field(8000, ge=0, le=65535)


class ServeApplication(BaseModel):
    """One entry of `applications:`; `args` go to the builder named by `import_path`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field("default", min_length=1)
    route_prefix: str = "/"
    import_path: str = Field(description="module:attribute, e.g. vlmserve:build_openai_app")
    args: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _keys(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            reject_unknown_keys(
                "applications[]",
                data,
                cls.model_fields,
                {
                    "runtime_env": "set runtime_env per model, in args.llm_configs[].runtime_env",
                    "deployments": "set deployment options per model, in args.llm_configs[].deployment_config "
                    "(the ingress's in args.ingress_deployment_config)",
                },
            )
        return data

    @field_validator("route_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError(f"route_prefix must start with '/', got {value!r}")
        return value

    @field_validator("import_path")
    @classmethod
    def _import_path(cls, value: str) -> str:
        module, sep, attr = value.partition(":")
        if not (sep and module and attr) and value.count(".") < 1:
            raise ValueError(f"import_path must look like 'module:attribute', got {value!r}")
        return value


class ServeConfigFile(BaseModel):
    """A Serve YAML file: `http_options` and `applications` (Ray Serve's config file format)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    http_options: HTTPOptions = Field(default_factory=HTTPOptions)
    applications: list[ServeApplication] = Field(min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _keys(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            reject_unknown_keys(
                "",
                data,
                cls.model_fields,
                {
                    "proxy_location": "`vlmserve run` runs one HTTP proxy on the head node; remove proxy_location",
                    "grpc_options": "vlmserve serves HTTP only; remove grpc_options",
                    "logging_config": "set logging per model in args.llm_configs[].deployment_config.logging_config",
                    "target_capacity": "remove target_capacity (use autoscaling_config per model)",
                },
            )
        return data

    @model_validator(mode="after")
    def _unique(self) -> ServeConfigFile:
        for field in ("name", "route_prefix"):
            values = [getattr(app, field) for app in self.applications]
            duplicates = sorted({v for v in values if values.count(v) > 1})
            if duplicates:
                raise ValueError(f"applications share the {field} {duplicates}; each needs its own")
        return self

    @classmethod
    def load(cls, path: str | Path) -> ServeConfigFile:
        """Read a Serve YAML file; relative llm_configs file paths are made relative to the file."""
        path = Path(path)
        data = _load_mapping(path, "a Serve config (applications: [...])")
        for app in data.get("applications") or []:
            args = app.get("args") if isinstance(app, dict) else None
            configs = args.get("llm_configs") if isinstance(args, dict) else None
            if isinstance(configs, list):
                args["llm_configs"] = [
                    str((path.parent / c).resolve()) if isinstance(c, str) else c for c in configs
                ]
        return cls.model_validate(data)


def _load_mapping(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise ValueError(f"{path}: no such file (expected {what} in YAML)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected {what} as a YAML mapping, got {type(data).__name__}")
    return data
