"""Find a checkpoint (local directory or Hugging Face repo id) and load it into the model.

Owns: resolving `model_source`, reading config.json, reading safetensors (single file or sharded index),
dtype and device placement, and the errors a user gets when any of that is wrong. Does not know about the
engine, the processor or serving.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from vlmserve.models.layers.parallel import TensorParallel
from vlmserve.models.quantization import (
    QuantizationError,
    QuantizationMethod,
    QuantizedLinear,
    checkpoint_module_resolver,
    replace_linears,
    resolve_quantization,
)
from vlmserve.models.registry import family_for_config

logger = logging.getLogger(__name__)

# What a checkpoint needs at run time; nothing else is downloaded.
CHECKPOINT_PATTERNS = (
    "config.json",
    "generation_config.json",
    "preprocessor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.json",
    "chat_template.jinja",
    "*.safetensors",
    "model.safetensors.index.json",
)

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be found or loaded; the message says what to do."""


def resolve_model_path(source: str | Path, revision: str | None = None, token: str | None = None) -> Path:
    """A local checkpoint directory, or a Hugging Face repo id downloaded (or found in the local HF cache).

    huggingface_hub itself honours HF_TOKEN, HF_HOME and HF_HUB_OFFLINE.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CheckpointError(f"{path} has no config.json: point model_source at a checkpoint directory")
        return path.resolve()
    source = str(source)
    if not _REPO_ID.match(source):
        raise CheckpointError(
            f"model_source {source!r} is neither an existing directory nor a Hugging Face repo id "
            "(like 'Qwen/Qwen2.5-VL-7B-Instruct')"
        )
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return Path(
            snapshot_download(
                source, revision=revision, token=token, allow_patterns=list(CHECKPOINT_PATTERNS)
            )
        )
    except GatedRepoError as e:
        raise CheckpointError(
            f"{source} is a gated model: accept its license at https://huggingface.co/{source} and set "
            "HF_TOKEN to a token of that account (in Ray: runtime_env.env_vars.HF_TOKEN)"
        ) from e
    except RepositoryNotFoundError as e:
        raise CheckpointError(
            f"Hugging Face repo {source!r} does not exist or is private: check the id, or set HF_TOKEN "
            "to a token that can read it"
        ) from e
    except RevisionNotFoundError as e:
        raise CheckpointError(f"revision {revision!r} does not exist in {source}") from e
    except LocalEntryNotFoundError as e:
        raise CheckpointError(
            f"{source} is not in the local Hugging Face cache and cannot be downloaded (offline: "
            "HF_HUB_OFFLINE is set or the hub is unreachable). Download it on a connected machine "
            "(`huggingface-cli download " + source + "`) or pass a local directory"
        ) from e


def read_config(path: Path) -> Any:
    """The parsed config.json of the checkpoint's family (see models/registry.py)."""
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"missing config.json in {path}")
    try:
        raw = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_file} is not valid JSON: {e}") from e
    gen_file = path / "generation_config.json"
    if gen_file.is_file():
        eos = json.loads(gen_file.read_text()).get("eos_token_id")
        if eos is not None:
            raw = {**raw, "eos_token_id": eos}
    try:
        return family_for_config(raw).parse_config(raw)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{cfg_file}: {e}") from e


def safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = sorted({path / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index} lists shards that are missing from {path}: {', '.join(missing)}")
        return files
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    shards = sorted(path.glob("*.safetensors"))
    if shards:
        return shards
    raise CheckpointError(f"no weights in {path}: expected model.safetensors or model.safetensors.index.json")


def iter_weights(files: list[Path], progress: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    with tqdm(total=len(files), desc="Loading weights", unit="file", disable=not progress) as bar:
        for f in files:
            with safe_open(str(f), framework="pt") as st:
                for name in st.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    yield name, st.get_tensor(name)
            bar.update(1)


def read_checkpoint_slice(
    part: Any, dim: int | None = None, ranges: list[tuple[int, int]] | None = None
) -> torch.Tensor:
    """Read ranges of one dimension of a safetensors tensor (`safe_open(...).get_slice(name)`), concatenated;
    the whole tensor when `dim` is None. Only the bytes of those ranges are read from the file."""
    if dim is None or ranges is None:
        return part[:]
    lead = (slice(None),) * dim
    pieces = [part[(*lead, slice(a, b))] for a, b in ranges]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=dim)


class CheckpointSlice:
    """A tensor of an open safetensors file, read when (and as far as) the model asks (`LazyTensor`)."""

    def __init__(self, part: Any) -> None:
        self.part = part
        self.shape = tuple(part.get_shape())

    def read(self, dim: int | None = None, ranges: list[tuple[int, int]] | None = None) -> torch.Tensor:
        return read_checkpoint_slice(self.part, dim, ranges)


def iter_weight_slices(files: list[Path], progress: bool = True) -> Iterator[tuple[str, CheckpointSlice]]:
    """Like iter_weights, but nothing is read until the model reads its part of each tensor (a tensor-parallel
    rank reads only its shard: a 72B checkpoint does not pass whole through every rank's memory)."""
    with tqdm(total=len(files), desc="Loading weights", unit="file", disable=not progress) as bar:
        for f in files:
            with safe_open(str(f), framework="pt") as st:
                for name in st.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    yield name, CheckpointSlice(st.get_slice(name))
            bar.update(1)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX); without it bf16 is emulated and
    slower than float32."""
    cpu = torch.cpu
    return any(
        getattr(cpu, name, lambda: False)()
        for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    )


def resolve_dtype(dtype: str | torch.dtype, config: Any, device: torch.device) -> torch.dtype:
    """'auto' is the checkpoint's dtype (as in HF transformers and vLLM), except on a CPU without native bf16,
    where it is float32; a float16 checkpoint runs in bfloat16 on a CPU (vLLM's CPU backend does the same)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        declared = DTYPES.get(config.torch_dtype, torch.bfloat16)
        if device.type == "cuda" or declared == torch.float32:
            return declared
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    if dtype not in DTYPES:
        raise CheckpointError(
            f"dtype {dtype!r} is not supported; use one of auto, {', '.join(sorted(DTYPES))}"
        )
    return DTYPES[dtype]


def dummy_tensor(
    name: str, shape: tuple[int, ...], gen: torch.Generator | None = None, device: torch.device | None = None
) -> torch.Tensor:
    """A random weight for `name`, scaled so activations stay O(1) through the stack and logits are decisive
    (top-2 gaps far above float32 rounding, so greedy parity tests are not decided by noise)."""
    randn = torch.randn(shape, generator=gen, device=device)
    if name.endswith(".bias"):  # also LayerNorm biases: centred at 0 like any bias
        return 0.1 * randn
    if "norm" in name or name.endswith("ln_q.weight"):
        return 1.0 + 0.1 * randn
    if "embed_tokens" in name:
        return randn
    if len(shape) == 3:
        # Stacked expert weights (experts, out, in): each expert is a linear layer of fan-in `in`.
        return randn / math.sqrt(shape[-1])
    return randn / math.sqrt(math.prod(shape[1:]))


def load_model(
    path: str | Path,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "cpu",
    progress: bool = True,
    load_format: str = "auto",
    quantization: str | None = None,
    tp: TensorParallel | None = None,
) -> Any:
    """Build the model of the checkpoint's family (models/registry.py) from `path`/config.json and fill it
    from the safetensors in `path`.

    load_format="dummy" fills random weights on the device instead (benchmarks of an architecture whose
    weights are not at hand; what vLLM calls --load-format dummy). `quantization` names the method (vLLM's
    names); None uses the checkpoint's quantization_config, if it has one. `tp`: build and load this rank's
    shard of a tensor-parallel model (each weight read only as far as this rank holds it)."""
    path = Path(path)
    device = torch.device(device)
    config = read_config(path)
    method = quantization_method(path, config.raw, quantization, device)
    torch_dtype = resolve_dtype(dtype, config, device)
    family = family_for_config(config.raw)
    if tp is not None and method is not None:
        raise CheckpointError(
            f"{path}: quantization {method.describe()} with tensor_parallel_size {tp.size} is not supported "
            "yet; serve the float checkpoint with tensor parallelism, or the quantized one on one device"
        )
    with torch.device("meta"):
        model = (family.model_class(config) if tp is None else family.model_class(config, tp)).to(torch_dtype)
    if method is not None:
        # On the meta device still: a float copy of the weights the method replaces is never allocated.
        swapped = replace_linears(model, method)
        logger.info("quantization %s: %d linear layers", method.describe(), len(swapped))
    model = model.to_empty(device=device)
    model.model.rotary.rebuild(device)
    if load_format == "dummy":
        fill_dummy(model, device)
        return finalize_quantized(model).eval()
    if load_format != "auto":
        raise CheckpointError(f"load_format {load_format!r} is not supported; use auto or dummy")
    files = safetensors_files(path)
    weights: Any = iter_weights(files, progress) if tp is None else iter_weight_slices(files, progress)
    if method is not None:
        # The conversions (unpacking, transposes, online quantization) run where the weights go: on a GPU,
        # a 72B checkpoint's are seconds instead of minutes of CPU time.
        on_device = ((name, t.to(device)) for name, t in weights)
        weights = method.convert(on_device, checkpoint_module_resolver(model))
    try:
        written = model.load_weights(weights)
    except QuantizationError as e:
        raise CheckpointError(f"{path}: {e}") from e
    missing = sorted(model.expected_weight_keys() - written)
    if missing:
        shown = ", ".join(m.split("#")[0] for m in missing[:5])
        raise CheckpointError(
            f"the checkpoint in {path} lacks {len(missing)} tensor(s) the model needs, e.g. {shown} "
            "(incomplete download, or weights of another model?)"
        )
    return finalize_quantized(model).eval()


def finalize_quantized(model: torch.nn.Module) -> torch.nn.Module:
    """Each quantized linear's post-load step (QuantizedLinear.finalize), once all weights are in place."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, QuantizedLinear):
                module.finalize()
    return model


def quantization_method(
    path: Path, raw_config: dict[str, Any], quantization: str | None, device: torch.device
) -> QuantizationMethod | None:
    """The checkpoint's quantization method (from its config.json, `raw_config`, and the engine's
    `quantization`), checked against the device before any weight is read."""
    try:
        method = resolve_quantization(raw_config, quantization)
        if method is not None:
            method.check_device(device)
    except QuantizationError as e:
        raise CheckpointError(f"{path / 'config.json'}: {e}") from e
    return method


def fill_dummy(model: torch.nn.Module, device: torch.device) -> None:
    """Random weights; a quantized linear gets a random float weight quantized by its method."""
    gen = torch.Generator(device=device).manual_seed(0)
    quantized = {name: m for name, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    with torch.no_grad():
        for name, module in quantized.items():
            shape = (module.out_features, module.in_features)
            module.init_random(dummy_tensor(f"{name}.weight", shape, gen, device))
        for name, param in model.named_parameters():
            if name.rpartition(".")[0] in quantized and not name.endswith(".bias"):
                continue
            param.copy_(dummy_tensor(name, tuple(param.shape), gen, device))
