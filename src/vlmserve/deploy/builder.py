"""`build_openai_app`: LLMConfigs -> a Ray Serve Application (one ingress + one server deployment per model).

    app = build_openai_app({"llm_configs": [llm_config, ...]})     # or YAML file paths in llm_configs
    serve.run(app)   |   vlmserve run module:app   |   import_path: vlmserve:build_openai_app in a Serve YAML

Per model, the server deployment `LLMServer:<model id>` gets deployment_config as given, plus defaults for
what was left out:

- resources: accelerator_type X -> ray_actor_options {accelerator_type: X, num_gpus: 1} (Ray schedules the
  replica on a node with the `accelerator_type:X` resource). Without accelerator_type, one GPU per replica
  when the Ray cluster has GPUs, else a CPU replica (num_gpus 0). The engine's device follows. The cluster
  is read when Ray is initialized (`vlmserve run`, `serve run`, Serve YAML deploys); before ray.init, the
  local machine's CUDA availability decides. ray_actor_options.num_gpus, when given, always wins.
- max_ongoing_requests = 2 x max_num_seqs: a full batch running plus a full batch waiting in the engine, so
  the engine can refill its batch the moment a sequence finishes; beyond that requests wait in Ray's queue
  (capped by max_queued_requests) where any replica, including a new one, can take them.
- autoscaling: when autoscaling_config (or num_replicas="auto") is given without target_ongoing_requests,
  the target is half a replica's batch, ceil(0.5 x min(max_num_seqs, max_ongoing_requests)). Ray Serve
  LLM's default target (1e9) never scales up; Ray Serve's own default (2) would add replicas for a load one
  engine batches easily. At half a batch, a replica still has room for as many requests again while the
  next one starts (loading weights takes minutes for a 7B model), and a replica is removed only when the
  others can absorb its load.
- the replicas' runtime_env: ray_actor_options.runtime_env merged with LLMConfig.runtime_env (which wins).
- tensor parallelism (engine_kwargs.tensor_parallel_size N > 1): each replica gets a placement group, as
  Ray Serve LLM gives one: LLMConfig.placement_group_config as given, else N bundles of one GPU each (one CPU
  each on a CPU cluster), STRICT_PACK (one node: the ranks all-reduce every layer). accelerator_type adds its
  resource to every bundle. The replica actor runs in bundle 0 with rank 0 (its resources are bundle 0's);
  ranks 1 .. N-1 are Ray actors in the other bundles (runner/tensor_parallel.py). The engine then runs on a
  thread of the replica (engine_process off): the rank-0 driver must be in the Ray actor that owns the
  placement group to place its workers there.
- request_router_config: the image-aware router (deploy/router.py: a request goes to the replica holding
  its image's encoder output and prefix, spilling to the least loaded one), tunable through
  request_router_kwargs {spill_margin, max_keys}; a request_router_config given replaces it.

The ingress `OpenAiIngress` gets one replica that asks for no CPU (it only parses JSON and relays tokens:
requests wait in the model deployments' queues, not here), overridable with `ingress_deployment_config`.

Does not know: what the deployments do (server.py, ingress.py), how a cluster is started (cluster.py).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import Any

from ray import serve
from ray.serve.deployment import Application

from vlmserve.config import EngineArgs
from vlmserve.deploy.config import LLMConfig, LLMServingArgs
from vlmserve.deploy.ingress import ingress_class
from vlmserve.deploy.server import LLMServer

SERVER_NAME_PREFIX = "LLMServer:"
INGRESS_NAME = "OpenAiIngress"
# Autoscaling target, as a fraction of what one replica's engine runs in one batch.
DEFAULT_TARGET_FRACTION = 0.5
# Requests the engine may hold (running + waiting), in batches of max_num_seqs.
DEFAULT_ONGOING_BATCHES = 2
INGRESS_MAX_ONGOING_REQUESTS = 10_000
IMAGE_AFFINITY_ROUTER = "vlmserve.deploy.router.ImageAffinityRouter"


def cluster_has_gpus() -> bool:
    import ray

    if ray.is_initialized():
        return ray.cluster_resources().get("GPU", 0) > 0
    import torch

    return torch.cuda.is_available()


def deployment_name(model_id: str) -> str:
    """Ray Serve LLM's naming: LLMServer:<model id> with '/' -> '--' and '.' -> '_'."""
    return SERVER_NAME_PREFIX + model_id.replace("/", "--").replace(".", "_")


def default_target_ongoing_requests(max_num_seqs: int, max_ongoing_requests: int) -> int:
    return max(1, math.ceil(DEFAULT_TARGET_FRACTION * min(max_num_seqs, max_ongoing_requests)))


def server_deployment_options(
    config: LLMConfig, *, gpus_in_cluster: bool
) -> tuple[dict[str, Any], EngineArgs]:
    """Ray Serve deployment options of a model's server deployment, and its replicas' EngineArgs."""
    options = copy.deepcopy(config.deployment_config)
    actor = dict(options.pop("ray_actor_options", None) or {})
    if config.accelerator_type is not None:
        actor.setdefault("accelerator_type", config.accelerator_type)
        actor.setdefault("num_gpus", 1)
    elif "num_gpus" not in actor:
        actor["num_gpus"] = 1 if gpus_in_cluster else 0
    num_gpus = actor["num_gpus"] or 0
    if config.runtime_env:
        merged = {**(actor.get("runtime_env") or {}), **config.runtime_env}
        env_vars = {
            **(actor.get("runtime_env") or {}).get("env_vars", {}),
            **config.runtime_env.get("env_vars", {}),
        }
        if env_vars:
            merged["env_vars"] = env_vars
        actor["runtime_env"] = merged

    engine_args = config.engine_args()
    if engine_args.device == "auto":
        engine_args = config.engine_args(device="cuda" if num_gpus > 0 else "cpu")
    elif engine_args.device == "cuda" and num_gpus == 0:
        raise ValueError(
            f"{config.model_id}: engine_kwargs.device is 'cuda' but its replicas get no GPU; set "
            "accelerator_type (e.g. 'L40S') or deployment_config.ray_actor_options.num_gpus, or drop device"
        )

    if engine_args.tensor_parallel_size > 1 or config.placement_group_config is not None:
        actor = _placement_group(options, actor, config, engine_args.tensor_parallel_size, num_gpus > 0)
        if engine_args.tensor_parallel_size > 1:
            engine_args = config.engine_args(device=engine_args.device, engine_process=False)

    options.setdefault("max_ongoing_requests", DEFAULT_ONGOING_BATCHES * engine_args.max_num_seqs)
    if options.get("autoscaling_config") is not None or options.get("num_replicas") == "auto":
        autoscaling = dict(options.get("autoscaling_config") or {})
        autoscaling.setdefault(
            "target_ongoing_requests",
            default_target_ongoing_requests(engine_args.max_num_seqs, options["max_ongoing_requests"]),
        )
        options["autoscaling_config"] = autoscaling
    options.setdefault("name", deployment_name(config.model_id))
    # Requests with a repeated image go to the replica that has it cached (deploy/router.py); a
    # request_router_config of the user's own (e.g. its request_router_kwargs) replaces this one.
    options.setdefault("request_router_config", {"request_router_class": IMAGE_AFFINITY_ROUTER})
    options["ray_actor_options"] = actor
    return options, engine_args


def _placement_group(
    options: dict[str, Any], actor: dict[str, Any], config: LLMConfig, tp: int, gpus: bool
) -> dict[str, Any]:
    """Set the replica's placement group options (bundles, strategy); the replica actor's resources become
    bundle 0's (Ray Serve runs the replica in the first bundle and requires they fit there)."""
    pg = config.placement_group_config
    if pg is not None:
        bundles = [dict(b) for b in pg["bundles"]]
        strategy = pg["strategy"]
    else:
        bundles = [{"GPU": 1} if gpus else {"CPU": 1} for _ in range(tp)]
        strategy = "STRICT_PACK"
    if config.accelerator_type is not None:
        for bundle in bundles:
            bundle.setdefault(f"accelerator_type:{config.accelerator_type}", 0.001)
    options["placement_group_bundles"] = bundles
    options["placement_group_strategy"] = strategy
    first = bundles[0]
    actor = {k: v for k, v in actor.items() if k not in ("num_gpus", "num_cpus", "resources")}
    actor["num_gpus"] = first.get("GPU", 0)
    actor["num_cpus"] = first.get("CPU", 0)
    custom = {
        k: v for k, v in first.items() if k not in ("GPU", "CPU") and not k.startswith("accelerator_type:")
    }
    if custom:
        actor["resources"] = custom
    return actor


def ingress_deployment_options(args: LLMServingArgs) -> dict[str, Any]:
    options = copy.deepcopy(args.ingress_deployment_config)
    options.setdefault("name", INGRESS_NAME)
    options.setdefault("max_ongoing_requests", INGRESS_MAX_ONGOING_REQUESTS)
    if "autoscaling_config" not in options:
        options.setdefault("num_replicas", 1)
    actor = dict(options.get("ray_actor_options") or {})
    actor.setdefault("num_cpus", 0)
    options["ray_actor_options"] = actor
    return options


def build_openai_app(builder_config: Mapping[str, Any] | LLMServingArgs) -> Application:
    """An OpenAI-compatible Ray Serve app serving every model of `builder_config` (LLMServingArgs fields:
    llm_configs, given as LLMConfigs, dicts or YAML file paths; optional ingress_deployment_config)."""
    args = (
        builder_config
        if isinstance(builder_config, LLMServingArgs)
        else LLMServingArgs.model_validate(builder_config)
    )
    gpus = cluster_has_gpus()
    servers: dict[str, Application] = {}
    names: dict[str, str] = {}
    for config in args.llm_configs:
        options, engine_args = server_deployment_options(config, gpus_in_cluster=gpus)
        name = options["name"]
        if name in names:
            raise ValueError(
                f"models {names[name]!r} and {config.model_id!r} both map to the deployment name {name!r}; "
                "give one of them deployment_config.name"
            )
        names[name] = config.model_id
        servers[config.model_id] = (
            serve.deployment(LLMServer)
            .options(**options)
            .bind(engine_args, stream_batching_interval_s=config.stream_batching_interval_s)
        )
    ingress = serve.deployment(ingress_class()).options(**ingress_deployment_options(args))
    return ingress.bind(llm_deployments=servers)
