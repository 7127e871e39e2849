"""EngineArgs (what a user asks for: flags, engine_kwargs, LLM's keyword arguments) -> EngineConfig (what
the engine runs with): the model's directory resolved, the device chosen, defaults that depend on the device
and the checkpoint filled in. Shared by the HTTP server, the Ray replicas, LLM and the benchmarks.

Does not know: the request formats (api/, llm.py) or how the engine is driven.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from vlmserve import envs
from vlmserve.config import EngineArgs, EngineConfig
from vlmserve.models.loader import resolve_model_path


def resolve_model_source(model: str, revision: str | None = None) -> Path:
    """`demo` is the model that ships with vlmserve; anything else is a directory or a hub repo id."""
    if model == "demo":
        from vlmserve.demo import demo_checkpoint

        return demo_checkpoint()
    return resolve_model_path(model, revision=revision)


def build_engine_config(args: EngineArgs) -> EngineConfig:
    path = resolve_model_source(args.model, args.revision)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = json.loads((path / "config.json").read_text())
    model_max = int((cfg.get("text_config") or cfg).get("max_position_embeddings", 32768))
    max_model_len = args.max_model_len or model_max
    if max_model_len > model_max:
        raise ValueError(
            f"max_model_len {max_model_len} exceeds the model's max_position_embeddings {model_max}; lower it"
        )
    budget = args.max_num_batched_tokens or (8192 if device == "cuda" else 2048)
    kv_gb = args.kv_cache_memory_gb or envs.VLMSERVE_CPU_KV_CACHE_GB
    return EngineConfig(
        model_path=str(path),
        served_model_name=args.served_model_name or args.model,
        load_format=args.load_format,
        dtype=args.dtype,
        quantization=args.quantization,
        kv_cache_dtype=args.kv_cache_dtype,
        device=device,
        max_model_len=max_model_len,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=budget,
        block_size=args.block_size,
        gpu_memory_utilization=args.gpu_memory_utilization,
        kv_cache_memory_bytes=int(kv_gb * 2**30),
        num_kv_blocks=args.num_kv_blocks,
        enable_prefix_caching=args.enable_prefix_caching,
        encoder_cache_tokens=args.encoder_cache_tokens or 4 * max(budget, 16384),
        limit_mm_per_prompt=dict(args.limit_mm_per_prompt),
        mm_processor_kwargs=dict(args.mm_processor_kwargs),
        # On a GPU the resize costs the device a fraction of a millisecond and saves the front ~25 ms of one
        # core per 1280x720 image (PIL's resize); on a CPU it would only move that work into the engine.
        image_resize=("device" if device == "cuda" else "host")
        if args.image_resize == "auto"
        else args.image_resize,
        max_queued_requests=args.max_queued_requests,
        seed=args.seed,
        enforce_eager=args.enforce_eager,
        # Tensor parallelism steps synchronously (its ranks get each step's tokens from the host).
        async_scheduling=device == "cuda" and args.tensor_parallel_size == 1
        if args.async_scheduling is None
        else args.async_scheduling,
        engine_process=args.engine_process,
        enable_auto_tool_choice=args.enable_auto_tool_choice,
        tool_call_parser=args.tool_call_parser,
        engine_stall_timeout_s=args.engine_stall_timeout_s,
        tensor_parallel_size=args.tensor_parallel_size,
    )
