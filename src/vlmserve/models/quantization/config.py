"""Which quantization method a checkpoint needs: from config.json's `quantization_config`, or the engine's
`quantization` argument, with vLLM's names and errors that list what is supported.

    quant_method "fp8"                 block-scaled (`weight_block_size`, `weight_scale_inv`) or per-tensor
                                       (`weight_scale`) FP8 weights, e4m3
    quant_method "compressed-tensors"  FP8 weights per channel, per tensor or per block (llm-compressor's
                                       "float-quantized" format)
    quant_method "awq"                 AutoAWQ GEMM, 4 bits, zero points, any group size dividing the layers
    quantization="fp8" without a quantization_config: a float checkpoint quantized to FP8 while it loads
"""

from __future__ import annotations

from typing import Any

from vlmserve.models.quantization.awq import AwqMethod
from vlmserve.models.quantization.base import QuantizationError, QuantizationMethod
from vlmserve.models.quantization.fp8 import Fp8Method

# The values of the engine's `quantization` argument.
QUANTIZATION_METHODS = ("fp8", "awq", "compressed-tensors")
SUPPORTED_LAYOUTS = (
    "fp8 (block-scaled [n, k] with weight_scale_inv, or per-tensor weight_scale; e4m3)",
    "compressed-tensors (float-quantized FP8 weights per channel, per tensor or per block)",
    "awq (AutoAWQ GEMM, 4-bit, zero_point)",
)


def _unsupported(what: str) -> QuantizationError:
    return QuantizationError(f"{what} is not supported; vlmserve loads: {'; '.join(SUPPORTED_LAYOUTS)}")


def quantization_config(raw: dict[str, Any]) -> dict[str, Any] | None:
    """config.json's quantization_config (top level, or under text_config as some exports write it)."""
    qcfg = raw.get("quantization_config") or (raw.get("text_config") or {}).get("quantization_config")
    return dict(qcfg) if qcfg else None


def resolve_quantization(raw: dict[str, Any], requested: str | None = None) -> QuantizationMethod | None:
    """The method for a checkpoint whose config.json is `raw`; `requested` is the engine's `quantization`
    (None: whatever the checkpoint says). Raises QuantizationError naming the value and the alternatives."""
    if requested is not None and requested not in QUANTIZATION_METHODS:
        raise QuantizationError(
            f"quantization {requested!r} is not supported; use one of {', '.join(QUANTIZATION_METHODS)}, or "
            "leave it unset to use the checkpoint's quantization_config"
        )
    qcfg = quantization_config(raw)
    if qcfg is None:
        if requested is None:
            return None
        if requested == "fp8":
            return Fp8Method("fp8", online=True)
        raise QuantizationError(
            f"quantization={requested!r} needs a checkpoint quantized with it, and this config.json has no "
            "quantization_config; of the methods, only 'fp8' quantizes a float checkpoint while it loads"
        )
    method = str(qcfg.get("quant_method", "")).lower()
    if requested is not None and requested != method:
        raise QuantizationError(
            f"quantization={requested!r} does not match the checkpoint's quantization_config.quant_method "
            f"{method!r}; leave quantization unset (the checkpoint's method is used) or set it to {method!r}"
        )
    if method == "fp8":
        return _fp8(qcfg)
    if method == "awq":
        return _awq(qcfg)
    if method == "compressed-tensors":
        return _compressed_tensors(qcfg)
    raise _unsupported(f"quantization_config.quant_method {method!r}")


def _fp8(qcfg: dict[str, Any]) -> Fp8Method:
    fmt = str(qcfg.get("fmt", "e4m3")).lower()
    if fmt != "e4m3":
        raise _unsupported(f"fp8 quantization_config.fmt {fmt!r} (only e4m3 is)")
    block = qcfg.get("weight_block_size")
    if block is not None and (len(block) != 2 or min(block) < 1):
        raise _unsupported(f"fp8 quantization_config.weight_block_size {block!r} (a pair [n, k] is)")
    ignore = qcfg.get("ignored_layers") or qcfg.get("modules_to_not_convert") or ()
    return Fp8Method("fp8", block=tuple(block) if block else None, ignore=tuple(ignore))


def _awq(qcfg: dict[str, Any]) -> AwqMethod:
    bits = qcfg.get("bits", qcfg.get("w_bit", 4))
    version = str(qcfg.get("version", "gemm")).lower()
    zero_point = qcfg.get("zero_point", True)
    group = int(qcfg.get("group_size", qcfg.get("q_group_size", 128)))
    if bits != 4:
        raise _unsupported(f"awq with bits={bits}")
    if version != "gemm":
        raise _unsupported(f"awq version {version!r} (its packing differs from GEMM's)")
    if not zero_point:
        raise _unsupported("awq without zero_point")
    if group < 2:
        raise _unsupported(f"awq group_size {group}")
    return AwqMethod(group, ignore=tuple(qcfg.get("modules_to_not_convert") or ()))


def _compressed_tensors(qcfg: dict[str, Any]) -> Fp8Method:
    fmt = qcfg.get("format")
    if fmt != "float-quantized":
        raise _unsupported(f"compressed-tensors format {fmt!r} (of its formats only float-quantized FP8 is)")
    schemes = []
    for name, group in (qcfg.get("config_groups") or {}).items():
        w = group.get("weights") or {}
        if w.get("type") != "float" or w.get("num_bits") != 8:
            raise _unsupported(
                f"compressed-tensors config_groups.{name}.weights type={w.get('type')!r} "
                f"num_bits={w.get('num_bits')!r} (only type float with 8 bits is)"
            )
        strategy = w.get("strategy")
        if strategy == "block":
            block = tuple(w.get("block_structure") or ())
            if len(block) != 2:
                raise _unsupported(f"compressed-tensors block_structure {w.get('block_structure')!r}")
            schemes.append(block)
        elif strategy in ("channel", "tensor"):
            schemes.append(None)
        else:
            raise _unsupported(f"compressed-tensors config_groups.{name}.weights.strategy {strategy!r}")
        if "Linear" not in (group.get("targets") or []):
            raise _unsupported(f"compressed-tensors config_groups.{name}.targets {group.get('targets')!r}")
    if not schemes:
        raise _unsupported("a compressed-tensors quantization_config without config_groups")
    if len(set(schemes)) > 1:
        raise _unsupported("compressed-tensors with different weight strategies in different config_groups")
    if qcfg.get("kv_cache_scheme"):
        raise _unsupported("compressed-tensors kv_cache_scheme (a quantized KV cache in the checkpoint)")
    block = schemes[0]
    # compressed-tensors names a block's scale `weight_scale`, not `weight_scale_inv`: the same value.
    return Fp8Method(
        "compressed-tensors", block=block, ignore=tuple(qcfg.get("ignore") or ()), scale_leaf="weight_scale"
    )
