"""A model's weights written as a released checkpoint of its family: our parameters under the released
tensor names (fused q/k/v and gate/up split back out, using the model's own FUSED table and shard slices),
checked name by name and shape by shape against the released layout (checkpoint.py's `tensor_shapes`) before
anything is written, so that a checkpoint HF could not load is never written.

Used by training (training/train.py saves the demo model with it). Does not know how the model was trained or
what its config means beyond the layout.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from vlmserve.checkpoints.checkpoint import tensor_shapes


def released_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Our parameters under the released checkpoint's names: fused q/k/v and gate/up split back out."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        shards = [(ckpt, fused, i) for ckpt, fused, i in model.FUSED if fused in name]
        if not shards:
            out[name] = tensor
            continue
        slices = model.shard_slices(name)
        for ckpt, fused, i in shards:
            out[name.replace(fused, ckpt)] = tensor[slices[i]]
    return out


def save_weights(model: nn.Module, config: dict[str, Any], out_dir: Path) -> Path:
    """Write model.safetensors (bfloat16, released names); checks names and shapes against the released
    layout first, so a checkpoint that HF could not load is never written."""
    tensors = {
        n: t.detach().to("cpu", torch.bfloat16).contiguous() for n, t in released_state_dict(model).items()
    }
    expected = tensor_shapes(config)
    if set(tensors) != set(expected):
        raise RuntimeError(
            f"exported names differ from the released layout: extra {sorted(set(tensors) - set(expected))[:5]}, "
            f"missing {sorted(set(expected) - set(tensors))[:5]}"
        )
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise RuntimeError(
                f"{name}: exported shape {tuple(tensors[name].shape)}, released layout {shape}"
            )
    path = out_dir / "model.safetensors"
    tmp = out_dir / "model.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    tmp.chmod(0o644)  # safetensors creates files readable by the owner only; this one ships in the package
    tmp.replace(path)  # a reader (or a crash) never sees half a file
    return path
