"""What every quantization method provides, and the model surgery they share.

A method owns three things: the layout of a quantized linear's weights in memory (its `nn.Module`), the loader
hook that turns a checkpoint's tensors (as released) into that layout, and the linear's forward (a kernel on a
GPU, dequantize-then-torch on a CPU). Models build plain `nn.Linear`s and never branch on the method: before
the weights are read, `replace_linears` swaps the ones the method quantizes for the method's module, by name.

Names: the loader hook sees checkpoint names (`...q_proj.weight`); the model's modules may fuse several of them
(`...qkv_proj`). Every quantized layout here keeps output channels on dim 0, so a shard of a fused projection is
a row range of each of its tensors, exactly as for a float weight, and the model's own `load_weights` places
it. This module does not know any model family: the name mapping comes from the model (`canonical_name`,
`FUSED`), or is the identity.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

Weights = Iterable[tuple[str, torch.Tensor]]


class QuantizationError(ValueError):
    """A quantization setting or checkpoint layout vlmserve cannot serve; the message says what would work."""


class QuantizedLinear(nn.Module, ABC):
    """Base of the methods' linear modules: the attributes models and the loader read off an nn.Linear."""

    in_features: int
    out_features: int

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"

    @abstractmethod
    def init_random(self, weight: torch.Tensor) -> None:
        """Fill from a float (out, in) weight (random weights for `load_format="dummy"`)."""

    def finalize(self) -> None:
        """Called once every weight is in place, on the device it runs on: derive what the kernels read
        beside the stored tensors."""


def frozen(t: torch.Tensor) -> nn.Parameter:
    """A parameter that autograd leaves alone (integer and float8 tensors cannot require grad)."""
    return nn.Parameter(t, requires_grad=False)


class QuantizationMethod(ABC):
    """One quantization format. Subclasses set `name` and implement `make_linear` and `convert`."""

    name: str = ""
    # What a GPU must have (compute capability, and the feature that needs it) to run it; None: any GPU
    # Triton runs on.
    min_capability: tuple[int, int] | None = None
    gpu_feature: str = ""

    def __init__(self, ignore: Iterable[str] = ()) -> None:
        # Module names (or "re:" regexes) the checkpoint leaves in float, as its quantization_config lists them.
        self.ignore = tuple(ignore)

    def describe(self) -> str:
        return self.name

    # --- which modules -------------------------------------------------------------------------------

    def quantizes(self, candidates: list[str]) -> bool:
        """Whether the linear known under these names (ours, and the checkpoint's for each fused shard) is
        quantized. The vision tower and lm_head stay in float: the released checkpoints keep them so, and
        compute_logits reads lm_head's weight directly; so do MoE routers (`mlp.gate`), as in vLLM."""
        first = candidates[0]
        if first.startswith("visual.") or first.endswith(("lm_head", ".mlp.gate")):
            return False
        return not any(_matches(entry, c) for entry in self.ignore for c in candidates)

    # --- building and loading ------------------------------------------------------------------------

    def check_device(self, device: torch.device) -> None:
        """Raise before any weight is read if `device` cannot run this method."""
        if device.type != "cuda" or self.min_capability is None:
            return
        index = device.index if device.index is not None else torch.cuda.current_device()
        cap = tuple(torch.cuda.get_device_capability(index))
        if cap < self.min_capability:
            need = ".".join(map(str, self.min_capability))
            raise QuantizationError(
                f"quantization {self.describe()!r} needs a GPU with {self.gpu_feature} (compute capability "
                f">= {need}); this GPU ({torch.cuda.get_device_name(index)}) has {cap[0]}.{cap[1]}. Use an AWQ "
                "checkpoint, or the unquantized model"
            )

    @abstractmethod
    def make_linear(self, linear: nn.Linear) -> QuantizedLinear:
        """The quantized module replacing `linear` (same shape and bias, on its device, weights unset)."""

    @abstractmethod
    def convert(self, weights: Weights, is_quantized: Callable[[str], bool]) -> Iterator[tuple[str, Any]]:
        """The loader hook: checkpoint tensors as released -> the tensors this method's modules hold, with
        the same module prefixes (so the model's load_weights maps them). `is_quantized(prefix)` says
        whether the model holds a quantized module for a checkpoint module prefix (`...q_proj`)."""


def _matches(entry: str, name: str) -> bool:
    """A skip-list entry against a module name: a "re:" regex (compressed-tensors), or a name matched on
    dot boundaries (`visual` matches `visual.blocks.0.attn.qkv`; `mlp.down_proj` matches
    `model.layers.3.mlp.down_proj`; `model.layers.1` does not match `model.layers.11.mlp`)."""
    if entry.startswith("re:"):
        return re.match(entry[3:], name) is not None
    return name == entry or name.startswith(entry + ".") or name.endswith("." + entry) or f".{entry}." in name


def module_aliases(model: nn.Module, name: str) -> list[str]:
    """Our module name followed by the names a checkpoint may use for it: each fused shard's, in the released
    and the transformers 5 layout (skip lists are written in the checkpoint's names)."""
    names = [name]
    for ckpt_part, fused_part, _ in getattr(model, "FUSED", ()):
        if fused_part in name + ".":
            names.append((name + ".").replace(fused_part, ckpt_part).rstrip("."))
    out = list(names)
    for n in names:
        if n.startswith("visual."):
            out.append("model." + n)
        elif n.startswith("model."):
            out.append("model.language_model." + n[len("model.") :])
    return out


def replace_linears(model: nn.Module, method: QuantizationMethod) -> list[str]:
    """Swap every nn.Linear the method quantizes for its module, in place; returns the names swapped."""
    swapped = []
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear or not method.quantizes(module_aliases(model, name)):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, method.make_linear(module))
        swapped.append(name)
    return swapped


def checkpoint_module_resolver(model: nn.Module) -> Callable[[str], bool]:
    """is_quantized for `QuantizationMethod.convert`: a checkpoint module prefix (`model.layers.0.self_attn.
    q_proj`, or its transformers 5 spelling) -> whether the model holds a quantized module there."""
    canonical = getattr(model, "canonical_name", lambda n: n)
    fused = getattr(model, "FUSED", ())

    def is_quantized(prefix: str) -> bool:
        name = canonical(prefix + ".")
        for ckpt_part, fused_part, _ in fused:
            if ckpt_part in name:
                name = name.replace(ckpt_part, fused_part)
                break
        try:
            return isinstance(model.get_submodule(name.rstrip(".")), QuantizedLinear)
        except AttributeError:
            return False

    return is_quantized


def split_name(name: str) -> tuple[str, str]:
    """'a.b.weight_scale' -> ('a.b', 'weight_scale')."""
    prefix, _, leaf = name.rpartition(".")
    return prefix, leaf
