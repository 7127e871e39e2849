"""Configuration, validated once at the edge.

`EngineArgs` is what users write (CLI flags, `engine_kwargs` of an LLMConfig), with vLLM's names; pydantic
checks it and names the field and the fix when a value is wrong; an unknown key is an error. Inside the
stack everything reads the frozen `EngineConfig` it produces.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

DEFAULT_MAX_PIXELS = 12845056  # Qwen2.5-VL's released preprocessor default (16384 * 28 * 28)


class EngineArgs(BaseModel):
    """Engine options, with the names vLLM users already write (`engine_kwargs`, `vllm serve` flags)."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    model: str = Field("demo", description="checkpoint directory or Hugging Face repo id")
    served_model_name: str | None = Field(None, description="model id in the API; default: `model`")
    revision: str | None = None
    load_format: Literal["auto", "dummy"] = Field("auto", description="dummy: random weights (benchmarks)")
    dtype: Literal["auto", "float32", "bfloat16", "float16", "fp32", "bf16", "fp16", "half", "float"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    quantization: Literal["fp8", "awq", "compressed-tensors"] | None = Field(
        None,
        description="weight quantization; default: the checkpoint's quantization_config. fp8 on a float "
        "checkpoint quantizes it while loading",
    )
    kv_cache_dtype: Literal["auto", "fp8", "fp8_e4m3"] = Field(
        "auto", description="KV cache storage; fp8: e4m3 (half the bytes of bf16, twice the blocks)"
    )
    max_model_len: int | None = Field(None, ge=16, description="context length; default: the model's")
    max_num_seqs: int = Field(64, ge=1, description="most requests in one batch")
    max_num_batched_tokens: int | None = Field(
        None, ge=16, description="token budget per step (chunked prefill); default 8192 on GPU, 2048 on CPU"
    )
    block_size: int = Field(16, ge=1, le=256)
    gpu_memory_utilization: float = Field(0.9, gt=0.0, le=1.0)
    kv_cache_memory_gb: float | None = Field(
        None, gt=0.0, description="KV cache size on CPU (GPU sizes it from gpu_memory_utilization)"
    )
    num_kv_blocks: int | None = Field(None, ge=2, description="override the number of KV blocks")
    enable_prefix_caching: bool = True
    encoder_cache_tokens: int | None = Field(
        None, ge=1, description="vision-encoder cache capacity in embedding rows; default 4x the token budget"
    )
    limit_mm_per_prompt: dict[str, int] = Field(default_factory=lambda: {"image": 4})
    mm_processor_kwargs: dict[str, int] = Field(default_factory=dict)
    image_resize: Literal["auto", "host", "device"] = Field(
        "auto",
        description="where images are resized, to the same pixels either way (PIL's arithmetic): host (PIL on "
        "the serving front) or device (the engine's device; the front then does no per-pixel work); "
        "auto: device on a GPU",
    )
    max_queued_requests: int | None = Field(
        None, ge=1, description="waiting requests before 503; None: no cap"
    )
    seed: int = 0
    tensor_parallel_size: int = Field(
        1,
        ge=1,
        description="shard the model over this many devices (GPUs; CPU processes on a CPU): one driver "
        "and N-1 worker processes",
    )
    enforce_eager: bool = False
    async_scheduling: bool | None = Field(
        None,
        description="queue each step while the previous one runs (host work overlaps the GPU); "
        "default: on for CUDA, off on CPU",
    )
    engine_process: bool = Field(
        True,
        description="serve with the engine's step loop in its own process (no GIL shared with the HTTP "
        "front); off: a thread of the server process",
    )
    engine_stall_timeout_s: float = Field(
        60.0,
        gt=0.0,
        description="seconds without a completed engine step, with requests in flight, after which /health "
        "reports the engine stalled (503) and the log names what it waits on",
    )
    trust_remote_code: bool = Field(False, description="accepted for vLLM compatibility; never needed")
    enable_auto_tool_choice: bool = Field(
        False,
        description='parse tool calls out of the output for tool_choice "auto" (needs tool_call_parser)',
    )
    tool_call_parser: Literal["hermes"] | None = Field(
        None, description="how tool calls are written in the output: hermes (Qwen2.5's <tool_call> blocks)"
    )

    @field_validator("limit_mm_per_prompt", "mm_processor_kwargs", mode="before")
    @classmethod
    def _json_string(cls, v: Any) -> Any:
        if isinstance(v, str):
            try:
                return json.loads(v)
            except json.JSONDecodeError as e:
                raise ValueError(f'expected a JSON object such as {{"image": 3}}, got {v!r}') from e
        return v

    @field_validator("limit_mm_per_prompt")
    @classmethod
    def _limits(cls, v: dict[str, int]) -> dict[str, int]:
        unknown = set(v) - {"image", "video"}
        if unknown:
            raise ValueError(f"unknown modality {sorted(unknown)}; supported: image")
        if any(n < 0 for n in v.values()):
            raise ValueError("limits must be >= 0")
        return v

    @field_validator("mm_processor_kwargs")
    @classmethod
    def _mm_kwargs(cls, v: dict[str, int]) -> dict[str, int]:
        unknown = set(v) - {"min_pixels", "max_pixels"}
        if unknown:
            raise ValueError(
                f"unknown mm_processor_kwargs {sorted(unknown)}; supported: min_pixels, max_pixels"
            )
        return v

    @model_validator(mode="after")
    def _consistent(self) -> EngineArgs:
        mp = self.mm_processor_kwargs
        if "min_pixels" in mp and "max_pixels" in mp and mp["min_pixels"] > mp["max_pixels"]:
            raise ValueError(
                f"mm_processor_kwargs.min_pixels ({mp['min_pixels']}) exceeds max_pixels ({mp['max_pixels']})"
            )
        if self.tensor_parallel_size > 1 and self.async_scheduling:
            raise ValueError(
                "async_scheduling is not supported with tensor_parallel_size > 1 yet; drop async_scheduling"
            )
        if self.enable_auto_tool_choice and self.tool_call_parser is None:
            raise ValueError("enable_auto_tool_choice needs tool_call_parser (hermes for Qwen2.5-VL)")
        return self


@dataclass(frozen=True)
class EngineConfig:
    """Resolved engine settings (after the model and the device are known). Frozen: read, never changed."""

    @property
    def images_as_pixels(self) -> bool:
        """Whether requests carry images as resized uint8 pixels that the runner patchifies on its device,
        rather than float32 patches made by the input processor: on a GPU (an eighth of the bytes to copy,
        no normalise / patchify pass on the host) and across the pipe to an engine process (an eighth of
        the bytes to pickle), and whenever the engine resizes images itself (`image_resize="device"`). The one
        place this is decided; the input processor and the engine read it."""
        return self.device == "cuda" or self.engine_process or self.image_resize == "device"

    @property
    def resize_images_on_device(self) -> bool:
        """Whether images reach the engine as decoded and are resized on its device (`image_resize`)."""
        return self.image_resize == "device"

    model_path: str
    served_model_name: str
    load_format: str
    dtype: str
    device: str
    max_model_len: int
    max_num_seqs: int
    max_num_batched_tokens: int
    block_size: int
    gpu_memory_utilization: float
    kv_cache_memory_bytes: int
    num_kv_blocks: int | None
    enable_prefix_caching: bool
    encoder_cache_tokens: int
    quantization: str | None = None
    kv_cache_dtype: str = "auto"
    limit_mm_per_prompt: dict[str, int] = field(default_factory=dict)
    mm_processor_kwargs: dict[str, int] = field(default_factory=dict)
    image_resize: str = "host"  # "host" or "device" ("auto" resolved by build_config.py)
    max_queued_requests: int | None = None
    seed: int = 0
    enforce_eager: bool = False
    async_scheduling: bool = False
    engine_process: bool = False  # how a server runs it (ModelServer.from_config); LLM always runs in-process
    enable_auto_tool_choice: bool = False
    tool_call_parser: str | None = None
    engine_stall_timeout_s: float = 60.0
    tensor_parallel_size: int = 1  # ranks 1 .. N-1 are worker processes (runner/tensor_parallel.py)
