"""Checkpoint loading: formats that must load, and the errors a user gets for everything that cannot."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from vlmserve.checkpoints.checkpoint import write_checkpoint
from vlmserve.models import loader
from vlmserve.models.loader import CheckpointError, load_model, resolve_dtype, resolve_model_path
from vlmserve.models.qwen2_5_vl import Qwen2_5_VLConfig


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def reference(tiny_checkpoint: Path) -> dict[str, torch.Tensor]:
    return _state(load_model(tiny_checkpoint, "float32", progress=False))


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("storage", [torch.bfloat16, torch.float16])
def test_half_precision_storage_loads_to_the_dtype_asked(tmp_path: Path, storage: torch.dtype) -> None:
    path = write_checkpoint(tmp_path / "ck", seed=3, dtype=storage)
    model = load_model(path, "float32", progress=False)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    raw = load_file(str(path / "model.safetensors"))
    q = raw["model.layers.0.self_attn.q_proj.weight"].float()
    torch.testing.assert_close(model.model.layers[0].self_attn.qkv_proj.weight[: q.shape[0]], q)
    assert load_model(path, "bfloat16", progress=False).model.norm.weight.dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("declared", "device", "native_bf16", "expected"),
    [
        ("bfloat16", "cuda", False, torch.bfloat16),
        ("float16", "cuda", False, torch.float16),
        ("float32", "cuda", False, torch.float32),
        ("bfloat16", "cpu", True, torch.bfloat16),  # AVX512-BF16 / AMX: the checkpoint's dtype, as vLLM's CPU
        ("float16", "cpu", True, torch.bfloat16),  # backend (it casts float16 to bfloat16 on a CPU)
        ("bfloat16", "cpu", False, torch.float32),  # emulated bf16 is slower than float32
        ("float32", "cpu", True, torch.float32),
    ],
)
def test_auto_dtype(
    monkeypatch, tiny_checkpoint: Path, declared: str, device: str, native_bf16: bool, expected: torch.dtype
) -> None:
    monkeypatch.setattr(loader, "cpu_has_native_bf16", lambda: native_bf16)
    cfg = json.loads((tiny_checkpoint / "config.json").read_text())
    config = Qwen2_5_VLConfig.from_dict({**cfg, "torch_dtype": declared})
    assert resolve_dtype("auto", config, torch.device(device)) == expected
    assert resolve_dtype("fp32", config, torch.device(device)) == torch.float32


def test_sharded_checkpoint_equals_single_file(tmp_path: Path, reference: dict[str, torch.Tensor]) -> None:
    path = write_checkpoint(tmp_path / "sharded", seed=0, shards=3)
    assert (path / "model.safetensors.index.json").is_file()
    assert not (path / "model.safetensors").exists()
    got = _state(load_model(path, "float32", progress=False))
    assert got.keys() == reference.keys()
    for k in got:
        torch.testing.assert_close(got[k], reference[k], rtol=0, atol=0)


def test_transformers5_tensor_names_load(tmp_path: Path, tiny_checkpoint: Path, reference) -> None:
    path = _copy(tiny_checkpoint, tmp_path / "hf5")
    tensors = load_file(str(path / "model.safetensors"))
    renamed = {
        (
            "model.language_model." + k[len("model.") :]
            if k.startswith("model.")
            else "model." + k
            if k.startswith("visual.")
            else k
        ): v
        for k, v in tensors.items()
    }
    save_file(renamed, str(path / "model.safetensors"))
    got = _state(load_model(path, "float32", progress=False))
    for k in got:
        torch.testing.assert_close(got[k], reference[k], rtol=0, atol=0)


def _edit_weights(path: Path, edit) -> None:
    tensors = load_file(str(path / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(path / "model.safetensors"))


def test_missing_tensor_is_named(tmp_path: Path, tiny_checkpoint: Path) -> None:
    path = _copy(tiny_checkpoint, tmp_path / "missing")
    _edit_weights(path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"lacks 1 tensor.*model\.layers\.1\.mlp\.gate_up_proj"):
        load_model(path, progress=False)


def test_unexpected_tensor_is_named(tmp_path: Path, tiny_checkpoint: Path) -> None:
    path = _copy(tiny_checkpoint, tmp_path / "unexpected")
    _edit_weights(
        path, lambda t: t.__setitem__("model.layers.0.self_attn.rotary_emb.inv_freq", torch.zeros(4))
    )
    with pytest.raises(
        ValueError, match=r"unexpected tensor 'model\.layers\.0\.self_attn\.rotary_emb\.inv_freq'"
    ):
        load_model(path, progress=False)


def test_shape_mismatch_names_both_shapes(tmp_path: Path, tiny_checkpoint: Path) -> None:
    path = _copy(tiny_checkpoint, tmp_path / "shape")
    _edit_weights(path, lambda t: t.__setitem__("model.norm.weight", torch.ones(7)))
    with pytest.raises(ValueError, match=r"model\.norm\.weight.*\(7,\).*\(64,\)"):
        load_model(path, progress=False)


def test_unsupported_architecture_names_the_supported_ones(tmp_path: Path, tiny_checkpoint: Path) -> None:
    path = _copy(tiny_checkpoint, tmp_path / "arch")
    cfg = json.loads((path / "config.json").read_text())
    cfg["architectures"] = ["LlavaForConditionalGeneration"]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        CheckpointError, match=r"LlavaForConditionalGeneration.*Qwen2_5_VLForConditionalGeneration"
    ):
        load_model(path, progress=False)


def test_missing_files_are_named(tmp_path: Path, tiny_checkpoint: Path) -> None:
    no_weights = _copy(tiny_checkpoint, tmp_path / "noweights")
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no weights in .*model\.safetensors"):
        load_model(no_weights, progress=False)
    no_config = tmp_path / "empty"
    no_config.mkdir()
    with pytest.raises(CheckpointError, match=r"has no config\.json"):
        resolve_model_path(no_config)


def test_unknown_source_and_offline_hub_errors_say_what_to_do(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    with pytest.raises(CheckpointError, match=r"neither an existing directory nor a Hugging Face repo id"):
        resolve_model_path("/no/such/dir")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(CheckpointError, match=r"not in the local Hugging Face cache"):
        resolve_model_path("some-org/some-model-that-is-not-cached")
