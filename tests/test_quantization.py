"""Quantized checkpoints (FP8 block-scaled, FP8 per-channel compressed-tensors, AWQ GEMM) and online FP8, on
the CPU reference path.

The oracle is the float32 checkpoint holding exactly the weights the quantized one encodes, dequantized by
the generator with its own code (checkpoints/quantized_checkpoint.py), loaded as a plain float model. The CPU path
dequantizes the same numbers and multiplies in float32, so logits agree to float32 rounding; a wrong nibble
order, scale row, group or fused-shard offset moves them by orders of magnitude more.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from tests.conftest import random_image
from vlmserve.checkpoints.checkpoint import write_checkpoint
from vlmserve.checkpoints.quantized_checkpoint import (
    write_dequantized_twin,
    write_fp8_channel_twin,
    write_quantized_checkpoint,
)
from vlmserve.config import EngineArgs
from vlmserve.llm import LLM
from vlmserve.models import loader
from vlmserve.models.generate import greedy_generate, prompt_embeddings
from vlmserve.models.layers.attention import ContiguousKVCache
from vlmserve.models.loader import CheckpointError, load_model
from vlmserve.models.processor import Qwen2_5_VLProcessor
from vlmserve.models.quantization import QuantizedLinear

# Inputs and outputs of 128 and 256: one AWQ group of 128 per row in most layers, two in down_proj; FP8 blocks
# of [128, 128] cover q / o exactly and k / v (64 rows each) partly.
TEXT = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2)
TEXT["mrope_section"] = [4, 6, 6]
# "+vision": the checkpoint quantizes the vision tower too (compressed-tensors targets every Linear); vlmserve
# runs it in float, dequantized while loading.
FORMATS = ["fp8-block", "fp8-channel", "fp8-tensor", "awq", "online-fp8", "fp8-channel+vision"]


@pytest.fixture(scope="module", params=FORMATS)
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """(quantized model, float reference model, processor, float model before quantization)."""
    root = tmp_path_factory.mktemp(request.param.replace("+", "-"))
    fmt, _, vision = request.param.partition("+")
    if fmt == "online-fp8":
        ckpt = write_checkpoint(root / "float", text=TEXT, seed=4)
        ref = write_fp8_channel_twin(ckpt, root / "ref")
        quantized = load_model(ckpt, "float32", progress=False, quantization="fp8")
        original = ckpt
    else:
        # One LM layer left unquantized in the checkpoint and named in its skip list: mixed models load.
        ignore = ["model.layers.1.mlp.down_proj"]
        ckpt = write_quantized_checkpoint(
            root / "q", fmt, ignore=ignore, quantize_vision=bool(vision), text=TEXT, seed=4
        )
        ref = write_dequantized_twin(ckpt, root / "ref")
        quantized = load_model(ckpt, "float32", progress=False)
        original = write_checkpoint(root / "float", text=TEXT, seed=4)
    return (
        quantized,
        load_model(ref, "float32", progress=False),
        Qwen2_5_VLProcessor.from_pretrained(ckpt),
        load_model(original, "float32", progress=False),
        fmt,
    )


def _logits(model, proc: Qwen2_5_VLProcessor, with_image: bool) -> torch.Tensor:
    content = [{"type": "image"}] if with_image else []
    content.append({"type": "text", "text": "What is in this picture, and what colour is it?"})
    text = proc.apply_chat_template([{"role": "user", "content": content}])
    inputs = proc.process(text, [random_image(64, 48, seed=1)] if with_image else [])
    with torch.inference_mode():
        x = prompt_embeddings(model, inputs.token_ids, inputs.images)
        cache = ContiguousKVCache(len(model.model.layers), model.model.layers[0].self_attn.head_dim ** -0.5)
        return model.compute_logits(model(x, inputs.mrope_positions, cache))


@pytest.mark.parametrize("with_image", [False, True], ids=["text", "image"])
def test_logits_equal_the_dequantized_float_reference(pair, with_image: bool) -> None:
    quantized, reference, proc, original, _ = pair
    got = _logits(quantized, proc, with_image)
    expected = _logits(reference, proc, with_image)
    scale = expected.abs().max().item()
    err = (got - expected).abs().max().item()
    # The quantization is real: the unquantized model's logits are far from both.
    drift = (_logits(original, proc, with_image) - expected).abs().max().item()
    print(f"max |diff| {err:.2e}, quantization moved logits by {drift:.2e} (max |logit| {scale:.1f})")
    assert err <= 1e-5 * max(1.0, scale)
    assert drift > 1e-3 * max(1.0, scale)


def test_greedy_tokens_equal_the_reference(pair) -> None:
    quantized, reference, proc, _, _ = pair
    content = [{"type": "image"}, {"type": "text", "text": "Describe it."}]
    inputs = proc.process(
        proc.apply_chat_template([{"role": "user", "content": content}]), [random_image(90, 70, seed=2)]
    )
    args = (inputs.token_ids, inputs.images, inputs.mrope_positions, inputs.mrope_delta, 24)
    assert greedy_generate(quantized, *args) == greedy_generate(reference, *args)


def test_quantized_modules_and_their_storage(pair) -> None:
    quantized, _, _, _, fmt = pair
    kinds = {name for name, m in quantized.named_modules() if isinstance(m, QuantizedLinear)}
    linears = {n for n, m in quantized.named_modules() if isinstance(m, nn.Linear | QuantizedLinear)}
    # The vision tower and lm_head stay float; every other LM linear is quantized but the skipped one.
    assert isinstance(quantized.lm_head, nn.Linear)
    skipped = set() if fmt == "online-fp8" else {"model.layers.1.mlp.down_proj"}
    assert kinds == {n for n in linears if n.startswith("model.layers.")} - skipped
    for m in quantized.modules():
        if isinstance(m, QuantizedLinear):
            stored = m.qweight if hasattr(m, "qweight") else m.weight
            assert stored.dtype in (torch.uint8, torch.float8_e4m3fn)
            assert stored.element_size() == 1


def test_engine_serves_a_quantized_checkpoint(tmp_path: Path) -> None:
    """Through LLM (EngineArgs -> EngineCore -> paged runner): greedy tokens equal the plain loop's."""
    from vlmserve.engine.sampling_params import SamplingParams

    ckpt = write_quantized_checkpoint(tmp_path / "awq", "awq", text=TEXT, seed=5)
    llm = LLM(str(ckpt), device="cpu", dtype="float32", max_model_len=512, num_kv_blocks=64)
    assert isinstance(llm.engine.model.model.layers[0].mlp.down_proj, QuantizedLinear)
    prompt = llm.processor.apply_chat_template([{"role": "user", "content": "Count to ten."}])
    out = llm.generate([prompt], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0]
    ids = llm.processor.process(prompt, []).token_ids
    assert out.outputs[0].token_ids == greedy_generate(llm.engine.model, ids, [], None, 0, 12)


@pytest.mark.parametrize("fmt", ["fp8-block", "awq"])
def test_dummy_weights_with_quantization(tmp_path: Path, fmt: str) -> None:
    """load_format=dummy on a quantized architecture: random weights quantized by the method (benchmarks)."""
    ckpt = write_quantized_checkpoint(tmp_path / fmt, fmt, text=TEXT, seed=0, weights=False)
    assert not (ckpt / "model.safetensors").exists()
    model = load_model(ckpt, "float32", progress=False, load_format="dummy")
    layer = model.model.layers[0].mlp.gate_up_proj
    assert isinstance(layer, QuantizedLinear)
    x = torch.randn(3, 128)
    with torch.inference_mode():
        y = layer(x)
    assert torch.isfinite(y).all() and y.abs().max() > 0


def test_dummy_block_fp8_weights_are_block_scaled_as_a_checkpoint_would_be() -> None:
    """Random weights of a block-scaled method get one scale per [128, 128] block, as the generator's
    checkpoints (and the released ones) have them, so that benchmarks on dummy weights run the block-scaled
    kernels a real checkpoint runs."""
    from vlmserve.checkpoints.quantized_checkpoint import fp8_block_quantize
    from vlmserve.models.quantization.fp8 import quantize_blocks

    w = torch.randn(300, 520)
    q, scale = quantize_blocks(w, (128, 128))
    ref_q, ref_inv = fp8_block_quantize(w, (128, 128))
    assert torch.equal(q.float(), ref_q.float())
    assert torch.equal(scale, ref_inv.repeat_interleave(128, 0)[:300])


def test_cublas_block_scales_only_for_whole_128x128_blocks() -> None:
    """The per-row scales laid out for cuBLASLt's 128x128 block scaling: (K/128, N/128) with stride
    (1, K/128), the block's scale in each place; None where the rows of a 128-row block differ (a fused
    projection whose shards start off a block boundary), for per-channel scales, other blocks, and K blocks
    no multiple of 4."""
    from vlmserve.models.quantization.fp8 import quantize_blocks, quantize_per_channel
    from vlmserve.models.quantization.kernels import cublas_block_scales

    w = torch.randn(384, 1536)  # 12 K blocks
    _, scale = quantize_blocks(w, (128, 128))
    got = cublas_block_scales(scale.t().contiguous().t(), 128)  # column-major, as Fp8Linear stores them
    assert got.shape == (12, 3) and got.stride() == (1, 12)
    assert torch.equal(got, scale[::128].t())
    # q (256 rows) then k and v of 64 rows each, each shard quantized on its own: k and v share a 128-row block
    shards = [quantize_blocks(torch.randn(r, 512), (128, 128))[1] for r in (256, 64, 64)]
    assert cublas_block_scales(torch.cat(shards), 128) is None
    assert cublas_block_scales(quantize_per_channel(w)[1], 1536) is None
    assert cublas_block_scales(quantize_blocks(w, (64, 64))[1], 64) is None
    assert cublas_block_scales(quantize_blocks(torch.randn(384, 1280), (128, 128))[1], 128) is None


def test_loading_lays_out_cublas_block_scales_where_the_blocks_are_whole(tmp_path: Path) -> None:
    """load_model runs each quantized linear's finalize: an FP8 checkpoint with [128, 128] blocks gets the
    cuBLASLt layout of its scales on o_proj, gate_up and down_proj, and none on q/k/v (k and v, 64 rows each,
    share a 128-row block). A derived buffer: not in the state dict, moved with the module."""
    from vlmserve.models.quantization.fp8 import Fp8Linear
    from vlmserve.models.quantization.kernels import cublas_block_scales

    text = dict(hidden_size=512, intermediate_size=1024, num_attention_heads=8, num_key_value_heads=1)
    text["mrope_section"] = [8, 12, 12]
    ckpt = write_quantized_checkpoint(tmp_path / "q", "fp8-block", text=text, seed=0)
    model = load_model(ckpt, "float32", progress=False)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, Fp8Linear)}
    blocked = {n.rsplit(".", 1)[-1] for n, m in linears.items() if m.cublas_block_scales is not None}
    assert blocked == {"o_proj", "gate_up_proj", "down_proj"}
    down = model.model.layers[0].mlp.down_proj
    assert torch.equal(down.cublas_block_scales, cublas_block_scales(down.weight_scale, 128))
    assert not any(k.endswith("cublas_block_scales") for k in model.state_dict())
    assert "cublas_block_scales" in dict(down.named_buffers())  # what .to(device) moves


# --- errors ---------------------------------------------------------------------------------------------


def _with_quant_config(src: Path, dst: Path, qcfg: dict) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["quantization_config"] = qcfg
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize(
    ("qcfg", "named"),
    [
        ({"quant_method": "gptq", "bits": 4}, r"quant_method 'gptq' is not supported"),
        ({"quant_method": "awq", "bits": 4, "version": "gemv"}, r"awq version 'gemv'"),
        ({"quant_method": "awq", "bits": 8, "version": "gemm"}, r"awq with bits=8"),
        ({"quant_method": "fp8", "fmt": "e5m2"}, r"fmt 'e5m2'"),
        ({"quant_method": "compressed-tensors", "format": "pack-quantized"}, r"format 'pack-quantized'"),
    ],
)
def test_unsupported_layout_names_itself_and_the_supported_ones(
    tmp_path: Path, tiny_checkpoint: Path, qcfg: dict, named: str
) -> None:
    path = _with_quant_config(tiny_checkpoint, tmp_path / "ck", qcfg)
    with pytest.raises(CheckpointError, match=named) as info:
        load_model(path, progress=False)
    for supported in ("fp8 (block-scaled", "compressed-tensors (float-quantized", "awq (AutoAWQ GEMM"):
        assert supported in str(info.value)


def test_quantization_argument_must_fit_the_checkpoint(tmp_path: Path, tiny_checkpoint: Path) -> None:
    with pytest.raises(CheckpointError, match=r"quantization='awq' needs a checkpoint quantized with it"):
        load_model(tiny_checkpoint, progress=False, quantization="awq")
    path = _with_quant_config(tiny_checkpoint, tmp_path / "fp8", {"quant_method": "fp8"})
    with pytest.raises(CheckpointError, match=r"quantization='awq' does not match .* 'fp8'"):
        load_model(path, progress=False, quantization="awq")
    with pytest.raises(CheckpointError, match=r"quantization 'int3' is not supported; use one of fp8, awq"):
        load_model(tiny_checkpoint, progress=False, quantization="int3")


def test_fp8_on_a_gpu_without_fp8_says_so_before_reading_weights(monkeypatch, tiny_checkpoint: Path) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "NVIDIA A100-SXM4-80GB")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)

    def no_reads(*args, **kwargs):
        raise AssertionError("weights were read before the device check")

    monkeypatch.setattr(loader, "iter_weights", no_reads)
    monkeypatch.setattr(loader, "safetensors_files", no_reads)
    with pytest.raises(CheckpointError, match=r"needs a GPU with FP8 support.*A100.*has 8\.0"):
        load_model(tiny_checkpoint, device="cuda:0", progress=False, quantization="fp8")


def test_quantized_weight_missing_its_scale_is_named(tmp_path: Path) -> None:
    ckpt = write_quantized_checkpoint(tmp_path / "q", "fp8-block", text=TEXT, seed=0)
    tensors = load_file(str(ckpt / "model.safetensors"))
    del tensors["model.layers.0.mlp.up_proj.weight_scale_inv"]
    save_file(tensors, str(ckpt / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"without their pair.*model\.layers\.0\.mlp\.up_proj"):
        load_model(ckpt, progress=False)


def test_engine_args_and_flags() -> None:
    import argparse

    from vlmserve.cli import add_engine_args, engine_args_from

    assert EngineArgs(quantization="awq").quantization == "awq"
    with pytest.raises(ValueError, match="quantization"):
        EngineArgs(quantization="gptq")
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    assert engine_args_from(parser.parse_args(["-q", "fp8"]), parser).quantization == "fp8"
    assert engine_args_from(parser.parse_args([]), parser).quantization is None


def test_transformers5_names_and_vision_stored_in_fp8(tmp_path: Path) -> None:
    """A checkpoint saved by transformers 5 (`model.language_model.*`, `model.visual.*`) whose vision tower is
    FP8 too: the same model as under the released names, the vision tower dequantized while loading."""
    ckpt = write_quantized_checkpoint(tmp_path / "q", "fp8-block", quantize_vision=True, text=TEXT, seed=6)
    tensors = load_file(str(ckpt / "model.safetensors"))
    assert tensors["visual.blocks.0.attn.qkv.weight"].dtype == torch.float8_e4m3fn
    expected = {k: v.clone() for k, v in load_model(ckpt, "float32", progress=False).state_dict().items()}

    def hf5(name: str) -> str:
        if name.startswith("model."):
            return "model.language_model." + name[len("model.") :]
        return "model." + name if name.startswith("visual.") else name

    save_file({hf5(k): v for k, v in tensors.items()}, str(ckpt / "model.safetensors"))
    got = load_model(ckpt, "float32", progress=False).state_dict()
    assert got.keys() == expected.keys()
    for k in got:
        assert torch.equal(got[k].float(), expected[k].float()), k


def test_compressed_tensors_block_and_skip_list_matching() -> None:
    from vlmserve.models.quantization import resolve_quantization
    from vlmserve.models.quantization.base import _matches

    group = {"targets": ["Linear"], "weights": {"type": "float", "num_bits": 8, "strategy": "block"}}
    group["weights"]["block_structure"] = [128, 128]
    qcfg = {"quant_method": "compressed-tensors", "format": "float-quantized", "config_groups": {"g": group}}
    method = resolve_quantization({"quantization_config": qcfg})
    assert method.block == (128, 128) and method.scale_leaf == "weight_scale"
    assert _matches("visual", "visual.blocks.0.attn.qkv")
    assert _matches("mlp.down_proj", "model.layers.3.mlp.down_proj")
    assert _matches("re:.*lm_head", "lm_head")
    assert not _matches("model.layers.1", "model.layers.11.mlp.down_proj")


# --- the demo model, quantized -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_baseline() -> float:
    from vlmserve.training.evaluate import run_eval

    return _key_accuracy(run_eval(LLM("demo", device="cpu"), DEMO_QUESTIONS))


DEMO_QUESTIONS = 16  # per category


def _key_accuracy(results) -> float:
    from vlmserve.training.data import CATEGORIES
    from vlmserve.training.evaluate import summarize

    table = summarize(results)
    return sum(table[k]["accuracy"] for k in CATEGORIES) / len(CATEGORIES)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["fp8-block", "fp8-channel", "awq", "online-fp8"])
def test_quantized_demo_model_keeps_its_heldout_accuracy(
    tmp_path: Path, demo_baseline: float, fmt: str
) -> None:
    """The trained demo model quantized to each format answers the held-out questions (colour, shape, count,
    position) within 3 points of the unquantized model, through the engine."""
    from vlmserve.checkpoints.quantized_checkpoint import quantize_checkpoint
    from vlmserve.demo import demo_checkpoint
    from vlmserve.training.evaluate import run_eval

    if fmt == "online-fp8":
        llm = LLM("demo", device="cpu", quantization="fp8")
    else:
        llm = LLM(str(quantize_checkpoint(demo_checkpoint(), tmp_path / fmt, fmt)), device="cpu")
    assert isinstance(llm.engine.model.model.layers[0].mlp.down_proj, QuantizedLinear)
    accuracy = _key_accuracy(run_eval(llm, DEMO_QUESTIONS))
    print(f"{fmt}: {accuracy:.1%} (unquantized {demo_baseline:.1%})")
    assert accuracy >= demo_baseline - 0.03


def test_sharded_quantized_checkpoint_with_weight_and_scale_in_different_files(tmp_path: Path) -> None:
    ckpt = write_quantized_checkpoint(tmp_path / "q", "fp8-block", text=TEXT, seed=8)
    expected = {k: v.clone() for k, v in load_model(ckpt, "float32", progress=False).state_dict().items()}
    tensors = load_file(str(ckpt / "model.safetensors"))
    # Every weight_scale_inv in the second shard, every other tensor in the first.
    parts = [{k: v for k, v in tensors.items() if not k.endswith("_scale_inv")}]
    parts.append({k: v for k, v in tensors.items() if k.endswith("_scale_inv")})
    weight_map = {}
    for i, part in enumerate(parts):
        name = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file(part, str(ckpt / name))
        weight_map |= dict.fromkeys(part, name)
    (ckpt / "model.safetensors").unlink()
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    got = load_model(ckpt, "float32", progress=False).state_dict()
    for k in expected:
        assert torch.equal(got[k].float(), expected[k].float()), k


@pytest.mark.parametrize(("fmt", "most_gib"), [("awq", 48), ("fp8-block", 80)])
def test_72b_architecture_fits_one_h200_when_quantized(tmp_path: Path, fmt: str, most_gib: int) -> None:
    """The weights vlmserve allocates for Qwen2.5-VL-72B (built on the meta device: nothing is allocated),
    against an H200's 141 GB: bf16 does not fit, AWQ leaves room for the KV cache, FP8 fits."""
    from vlmserve.checkpoints.quantized_checkpoint import EXTRA_PRESETS
    from vlmserve.models.loader import read_config
    from vlmserve.models.quantization import replace_linears, resolve_quantization
    from vlmserve.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration

    ckpt = write_quantized_checkpoint(tmp_path / fmt, fmt, weights=False, **EXTRA_PRESETS["72b"])
    config = read_config(ckpt)
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(config).to(torch.bfloat16)
    gib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    replace_linears(model, resolve_quantization(config.raw))
    quantized_gib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    print(f"72B {fmt}: {quantized_gib:.1f} GiB of weights (bf16: {gib:.1f} GiB)")
    assert gib > 130 and quantized_gib < most_gib


def test_serve_flags_quantized_checkpoint_and_fp8_kv_cache(tmp_path: Path) -> None:
    """`vlmserve serve CKPT --kv-cache-dtype fp8` on an AWQ checkpoint (detected from config.json: its qweight
    tensors load no other way), through HTTP: the answer is the in-process engine's with the same settings."""
    import httpx

    from tests.conftest import start_vlmserve, stop_process
    from vlmserve.engine.sampling_params import SamplingParams

    ckpt = write_quantized_checkpoint(tmp_path / "awq", "awq", text=TEXT, seed=9)
    flags = [
        "--dtype",
        "float32",
        "--max-model-len",
        "512",
        "--num-kv-blocks",
        "64",
        "--kv-cache-dtype",
        "fp8",
    ]
    messages = [{"role": "user", "content": "Name three colours."}]
    llm = LLM(
        str(ckpt), device="cpu", dtype="float32", max_model_len=512, num_kv_blocks=64, kv_cache_dtype="fp8"
    )
    expected = llm.chat([messages], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[0].text
    log = tmp_path / "server.log"
    process, base_url = start_vlmserve(ckpt, log, "--model-id", "q", "--log-level", "info", *flags)
    try:
        body = {"model": "q", "messages": messages, "max_tokens": 8, "temperature": 0, "ignore_eos": True}
        reply = httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=60).json()
        assert reply["choices"][0]["message"]["content"] == expected
        assert reply["usage"]["completion_tokens"] == 8
    finally:
        stop_process(process)


def test_block_fp8_layout_reads_as_hf_transformers_reads_it(tmp_path: Path) -> None:
    """An outside reading of the generator's block-FP8 layout: HF transformers' dequantization of each
    (weight, weight_scale_inv) pair equals the weight vlmserve's loaded module holds."""
    try:
        from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight
    except ImportError:
        pytest.skip("this transformers has no finegrained_fp8 dequantization")
    from vlmserve.models.quantization.fp8 import dequantize

    ckpt = write_quantized_checkpoint(tmp_path / "q", "fp8-block", text=TEXT, seed=10)
    tensors = load_file(str(ckpt / "model.safetensors"))
    model = load_model(ckpt, "float32", progress=False)
    attn = model.model.layers[0].self_attn.qkv_proj
    ours = dequantize(attn.weight, attn.weight_scale, attn.block_k)  # (q + k + v rows, K)
    p = "model.layers.0.self_attn."
    hf = torch.cat(
        [
            _dequantize_fp8_weight(
                tensors[f"{p}{n}.weight"], tensors[f"{p}{n}.weight_scale_inv"], [128, 128], torch.float32
            )
            for n in ("q_proj", "k_proj", "v_proj")
        ]
    )
    assert torch.equal(ours, hf)
