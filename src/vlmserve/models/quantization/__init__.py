"""Quantized linear layers: FP8 (checkpoints and online) and AWQ int4. See base.py for the contract."""

from vlmserve.models.quantization.base import (
    QuantizationError,
    QuantizationMethod,
    QuantizedLinear,
    checkpoint_module_resolver,
    replace_linears,
)
from vlmserve.models.quantization.config import QUANTIZATION_METHODS, resolve_quantization

__all__ = [
    "QUANTIZATION_METHODS",
    "QuantizationError",
    "QuantizationMethod",
    "QuantizedLinear",
    "checkpoint_module_resolver",
    "replace_linears",
    "resolve_quantization",
]
