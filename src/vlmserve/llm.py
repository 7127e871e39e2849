"""Offline use of the engine from Python, and the one place that turns `EngineArgs` into an `EngineConfig`.

from vlmserve import LLM, SamplingParams
llm = LLM("Qwen/Qwen2.5-VL-7B-Instruct")
out = llm.chat([{"role": "user", "content": [
    {"type": "image_url", "image_url": {"url": "file:///path/cat.jpg"}},
    {"type": "text", "text": "What is in this image?"}]}], SamplingParams(max_tokens=64, temperature=0))
print(out[0].text)
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from vlmserve import envs
from vlmserve.config import EngineArgs, EngineConfig
from vlmserve.engine.core import EngineCore
from vlmserve.engine.input_processor import InputProcessor
from vlmserve.engine.inputs import EngineRequest
from vlmserve.engine.outputs import CompletionDelta, TokenLogprob
from vlmserve.engine.sampling_params import SamplingParams
from vlmserve.models.loader import resolve_model_path
from vlmserve.models.processor import Qwen2_5_VLProcessor


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


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None
    finish_reason: str | None
    stop_reason: int | str | None


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    num_cached_tokens: int = 0

    @property
    def text(self) -> str:
        return self.outputs[0].text


class LLM:
    """Run the engine in this process, synchronously: batch many prompts, return when all are done."""

    def __init__(self, model: str = "demo", **engine_kwargs: Any) -> None:
        # The engine runs in this process, whatever engine_process says (that is how a server runs it).
        config = build_engine_config(EngineArgs(model=model, **engine_kwargs))
        self.config = dataclasses.replace(config, engine_process=False)
        self.processor = Qwen2_5_VLProcessor.from_pretrained(self.config.model_path)
        self.inputs = InputProcessor(self.processor, self.config)
        self.engine = EngineCore(self.config, self.processor)

    def make_request(
        self, prompt: str, images: list[Image.Image], params: SamplingParams, request_id: str | None = None
    ) -> EngineRequest:
        return self.inputs.make_request(self.inputs.process(prompt, images), params, request_id)

    def generate(
        self,
        prompts: list[str | tuple[str, list[Image.Image]]] | str,
        sampling_params: SamplingParams | None = None,
    ) -> list[RequestOutput]:
        """Prompts are raw text (already chat-formatted if needed), optionally with their images."""
        params = sampling_params or SamplingParams()
        if isinstance(prompts, str):
            prompts = [prompts]
        requests = []
        for p in prompts:
            text, images = (p, []) if isinstance(p, str) else p
            requests.append(self.make_request(text, list(images), params))
        return self.run(requests)

    def chat(
        self,
        messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
        sampling_params: SamplingParams | None = None,
    ) -> list[RequestOutput]:
        """OpenAI-style messages (one conversation, or a list of them). Images as image_url parts with a
        file path / file:// URL or a data: URL, or as PIL images in {"type": "image", "image": img}."""
        conversations = messages if messages and isinstance(messages[0], list) else [messages]
        params = sampling_params or SamplingParams()
        return self.run([self.inputs.chat(conv, params) for conv in conversations])  # type: ignore[arg-type]

    def run(self, requests: list[EngineRequest]) -> list[RequestOutput]:
        results = {
            r.request_id: RequestOutput(
                r.request_id,
                r.prompt_token_ids,
                [CompletionOutput(i, "", [], None, None, None) for i in range(r.sampling_params.n)],
            )
            for r in requests
        }
        for r in requests:
            self.engine.add_request(r)
        while self.engine.has_unfinished_requests():
            for d in self.engine.step():
                self._accumulate(results[d.request_id], d)
        return [results[r.request_id] for r in requests]

    @staticmethod
    def _accumulate(res: RequestOutput, d: CompletionDelta) -> None:
        out = res.outputs[d.index]
        out.text += d.text
        out.token_ids += d.token_ids
        if d.logprobs is not None:
            out.logprobs = (out.logprobs or []) + d.logprobs
        if d.finished:
            out.finish_reason, out.stop_reason = d.finish_reason, d.stop_reason
            res.num_cached_tokens = d.num_cached_tokens
            if d.error:
                raise RuntimeError(d.error)
