"""Checkpoint tensors -> model parameters, shared by the model families.

Owns the rules every family's `load_weights` follows: checkpoint names as released or as transformers 5 saves
them, separately stored projections copied into one fused parameter (`merged_linear`), dtype casts, and the
errors for an unexpected tensor or a shape mismatch. A family says only what differs: which names fuse
(`FUSED`), how its names map to ours (`canonical_name`) and how a tensor stored in another layout is brought
into ours (`convert_tensor`). Does not know about files (models/loader.py reads them).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

import torch
from torch import nn


class LazyTensor(Protocol):
    """A checkpoint tensor not read yet (models/loader.py's `CheckpointSlice`): its full shape, and a read of
    some ranges of one dimension. Tensor-parallel ranks load from these, reading only their shard."""

    shape: tuple[int, ...]

    def read(self, dim: int | None = None, ranges: list[tuple[int, int]] | None = None) -> torch.Tensor: ...


def merged_linear(in_features: int, shard_sizes: list[int], bias: bool) -> nn.Linear:
    """A plain linear layer whose output rows are several checkpoint projections stacked (q, k, v or gate,
    up), `shard_sizes` rows each, in order. It stays an nn.Linear (whatever swaps linear layers, e.g. for
    quantization, sees one); the model records the sizes once built (`remember_fused_shards`)."""
    layer = nn.Linear(in_features, sum(shard_sizes), bias=bias)
    layer.shard_sizes = list(shard_sizes)  # type: ignore[assignment]
    return layer


def _slices(sizes: list[int]) -> list[slice]:
    out, start = [], 0
    for n in sizes:
        out.append(slice(start, start + n))
        start += n
    return out


class CheckpointLoadable(nn.Module):
    """Base class of the model classes: `load_weights` and `expected_weight_keys` for the loader."""

    FAMILY = "this model"
    # (checkpoint name fragment, fused parameter fragment, shard index) for separately stored projections.
    FUSED: tuple[tuple[str, str, int], ...] = (
        (".self_attn.q_proj.", ".self_attn.qkv_proj.", 0),
        (".self_attn.k_proj.", ".self_attn.qkv_proj.", 1),
        (".self_attn.v_proj.", ".self_attn.qkv_proj.", 2),
        (".mlp.gate_proj.", ".mlp.gate_up_proj.", 0),
        (".mlp.up_proj.", ".mlp.gate_up_proj.", 1),
    )

    @staticmethod
    def canonical_name(name: str) -> str:
        """Checkpoint names as released (`visual.`, `model.`) or as transformers 5 saves them
        (`model.visual.`, `model.language_model.`) -> our names."""
        if name.startswith("model.visual."):
            return name[len("model.") :]
        if name.startswith("model.language_model."):
            return "model." + name[len("model.language_model.") :]
        return name

    def convert_tensor(self, name: str, tensor: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
        """A checkpoint tensor in the layout of `param` (our name `name`); identity unless a family stores
        a tensor differently from how it computes with it."""
        return tensor

    def remember_fused_shards(self) -> None:
        """Record every merged_linear's shard rows by module name; the model calls it at the end of its
        __init__, before anything may replace its layers."""
        self.fused_shards = {
            name: _slices(module.shard_sizes)
            for name, module in self.named_modules()
            if isinstance(getattr(module, "shard_sizes", None), list)
        }

    def shard_slices(self, fused_name: str) -> list[slice]:
        """Row ranges of each shard inside a fused parameter."""
        return self.fused_shards[fused_name.rsplit(".", 1)[0]]

    def _tied(self) -> bool:
        return bool(self.config.text.tie_word_embeddings)  # type: ignore[attr-defined]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor | LazyTensor]]) -> set[str]:
        """Copy checkpoint tensors into parameters (casting dtype). Returns the parameter names written;
        raises on an unexpected tensor or a shape mismatch. A lazy tensor is read here, only the part the
        parameter's module holds (its `checkpoint_read`, models/layers/parallel.py), whole otherwise."""
        params = dict(self.named_parameters())
        modules = dict(self.named_modules())
        written: set[str] = set()
        for raw_name, tensor in weights:
            name = self.canonical_name(raw_name)
            if self._tied() and name == "lm_head.weight":
                continue  # tied: the embedding table is the head
            target, rows = name, slice(None)
            for ckpt_part, fused_part, shard in self.FUSED:
                if (
                    ckpt_part in name
                    and name.replace(ckpt_part, fused_part).rsplit(".", 1)[0] in self.fused_shards
                ):
                    target = name.replace(ckpt_part, fused_part)
                    rows = self.shard_slices(target)[shard]
                    break
            param = params.get(target)
            if param is None:
                raise ValueError(
                    f"unexpected tensor {raw_name!r} in the checkpoint: {self.FAMILY} has no such parameter "
                    "(is the config.json from the same model as the weights?)"
                )
            dest = param.data[rows]
            if not isinstance(tensor, torch.Tensor):
                owner, _, leaf = target.rpartition(".")
                reader = getattr(modules.get(owner), "checkpoint_read", None)
                shard = None if rows == slice(None) else self.shard_slices(target).index(rows)
                spec = None if reader is None else reader(leaf, shard, tuple(tensor.shape))
                tensor = tensor.read() if spec is None else tensor.read(*spec)
                if tensor.dim() and tensor.shape[0] < dest.shape[0] and tensor.shape[1:] == dest.shape[1:]:
                    # A vocabulary shard's zero padding past the vocabulary (the last rank's tail).
                    dest[tensor.shape[0] :].zero_()
                    dest = dest[: tensor.shape[0]]
            tensor = self.convert_tensor(target, tensor, dest)
            if dest.shape != tensor.shape:
                raise ValueError(
                    f"shape mismatch for {raw_name!r}: checkpoint has {tuple(tensor.shape)}, the model built "
                    f"from config.json expects {tuple(dest.shape)}"
                )
            dest.copy_(tensor)
            written.add(target if rows == slice(None) else f"{target}#{rows.start}")
        return written

    def expected_weight_keys(self) -> set[str]:
        """The `written` keys a complete checkpoint produces (fused parameters count once per shard)."""
        keys: set[str] = set()
        for name, _ in self.named_parameters():
            owner = name.rsplit(".", 1)[0]
            if owner in self.fused_shards:
                keys |= {f"{name}#{s.start}" for s in self.fused_shards[owner]}
            else:
                keys.add(name)
        return keys
