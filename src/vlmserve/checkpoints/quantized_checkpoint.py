"""Tiny quantized checkpoints in the layouts Qwen and the quantization tools release, and their float twins.

A quantized checkpoint here is a float checkpoint from checkpoint.py whose language-model linears were
quantized the way the released tools do it, stored under the released tensor names, dtypes and shapes, with
the `quantization_config` those checkpoints carry in config.json:

    fp8-block    FP8 e4m3 weights in [128, 128] blocks, `weight_scale_inv` (Qwen3-VL-*-FP8, DeepSeek-V3)
    fp8-channel  compressed-tensors "float-quantized": FP8 weights per output channel, `weight_scale` (N, 1)
                 (llm-compressor's FP8_DYNAMIC scheme)
    fp8-tensor   FP8 weights with one `weight_scale` per tensor and a static `input_scale` (quant_method
                 "fp8", activation_scheme "static": the older per-tensor FP8 checkpoints vLLM reads)
    awq          AutoAWQ GEMM: `qweight` (K, N/8) int32, `qzeros` (K/g, N/8) int32 packed in AutoAWQ's nibble
                 order, `scales` (K/g, N) float16; group size 128 (Qwen2.5-VL-*-AWQ)

`write_dequantized_twin` writes the float checkpoint whose weights are exactly what the quantized one means
(dequantized here, with code independent of the loader's): the reference a quantized model must match.
The vision tower and lm_head stay in float, as in the released checkpoints.

    python -m vlmserve.checkpoints.quantized_checkpoint OUT_DIR --format awq [--preset tiny] [--seed N] [--no-weights]
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from vlmserve.checkpoints.checkpoint import write_checkpoint

FORMATS = ("fp8-block", "fp8-channel", "fp8-tensor", "awq")
# Architectures beyond checkpoint.py's presets, as overrides of one of them (for config-only benchmark
# checkpoints): Qwen2.5-VL-72B's language model on the 7B preset's vision tower.
EXTRA_PRESETS: dict[str, dict[str, Any]] = {
    "72b": {
        "preset": "7b",
        "text": dict(
            hidden_size=8192,
            intermediate_size=29568,
            num_hidden_layers=80,
            num_attention_heads=64,
            num_key_value_heads=8,
            mrope_section=[16, 24, 24],
            vocab_size=152064,
        ),
        "vision": dict(out_hidden_size=8192),
    },
}
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
# The language-model linears the released tools quantize.
QUANTIZED = re.compile(r"^model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight$")
# The vision tower's linears, for checkpoints that quantize them too (compressed-tensors targets "Linear").
VISION_LINEARS = re.compile(
    r"^visual\.(blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(gate|up|down)_proj)|merger\.mlp\.\d)\.weight$"
)
# AutoAWQ packs output column order[i] of each group of eight into bits 4i..4i+3 of an int32.
AWQ_PACK_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


# --- FP8 -------------------------------------------------------------------------------------------------


def fp8_block_quantize(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float -> (N, K) fp8 and (ceil(N/bn), ceil(K/bk)) float32 `weight_scale_inv` (the amax of each
    block maps to 448)."""
    n, k = w.shape
    bn, bk = block
    nb, kb = math.ceil(n / bn), math.ceil(k / bk)
    padded = torch.zeros(nb * bn, kb * bk)
    padded[:n, :k] = w.float()
    blocks = padded.view(nb, bn, kb, bk)
    scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / FP8_MAX  # (nb, kb)
    q = (blocks / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q.view(nb * bn, kb * bk)[:n, :k].contiguous(), scale


def fp8_block_dequantize(q: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    n, k = q.shape
    full = scale_inv.float().repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)[:n, :k]
    return q.float() * full


def fp8_channel_quantize(w: torch.Tensor, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float -> (N, K) fp8 and (N, 1) `weight_scale` (as llm-compressor stores it, in `scale_dtype`)."""
    scale = (w.float().abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp(min=1e-12).to(scale_dtype)
    return (w.float() / scale.float()).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def fp8_channel_dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.float()


def fp8_tensor_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float -> (N, K) fp8 and a () float32 `weight_scale` for the whole tensor."""
    scale = (w.float().abs().amax() / FP8_MAX).clamp(min=1e-12)
    return (w.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


# --- AWQ -------------------------------------------------------------------------------------------------


def _awq_pack(values: torch.Tensor) -> torch.Tensor:
    """(R, C) ints 0..15 -> (R, C/8) int32, AutoAWQ's order within each eight columns."""
    r, c = values.shape
    v = values.to(torch.int64).view(r, c // 8, 8)
    packed = torch.zeros(r, c // 8, dtype=torch.int64)
    for i, col in enumerate(AWQ_PACK_ORDER):
        packed |= v[:, :, col] << (4 * i)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)  # the bit pattern as int32


def _awq_unpack(packed: torch.Tensor) -> torch.Tensor:
    r, c8 = packed.shape
    p = packed.to(torch.int64) & 0xFFFFFFFF
    out = torch.zeros(r, c8, 8, dtype=torch.int64)
    for i, col in enumerate(AWQ_PACK_ORDER):
        out[:, :, col] = (p >> (4 * i)) & 0xF
    return out.view(r, c8 * 8)


def awq_quantize(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, K) float -> qweight (K, N/8) int32, qzeros (K/g, N/8) int32, scales (K/g, N) float16: AutoAWQ's
    asymmetric round-to-nearest per group of `group` inputs (its pseudo_quantize_tensor), packed as
    WQLinear_GEMM.from_linear packs."""
    n, k = w.shape
    g = w.float().reshape(n, k // group, group)
    lo, hi = g.amin(-1), g.amax(-1)  # (N, K/g)
    scales = ((hi - lo).clamp(min=1e-5) / 15).half()
    zeros = (-torch.round(lo / scales.float())).clamp(0, 15)
    q = (torch.round(g / scales.float()[..., None]) + zeros[..., None]).clamp(0, 15).reshape(n, k)
    return _awq_pack(q.t()), _awq_pack(zeros.t()), scales.t().contiguous()


def awq_dequantize(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group: int
) -> torch.Tensor:
    """AutoAWQ's dequantize_gemm: -> (N, K) float32 (nn.Linear's orientation)."""
    iw = _awq_unpack(qweight)  # (K, N)
    iz = _awq_unpack(qzeros).repeat_interleave(group, 0)  # (K, N)
    s = scales.float().repeat_interleave(group, 0)  # (K, N)
    return ((iw - iz).float() * s).t().contiguous()


# --- checkpoints -----------------------------------------------------------------------------------------


def quantization_config(fmt: str, group: int, block: tuple[int, int], ignore: list[str]) -> dict[str, Any]:
    """config.json's quantization_config as the released checkpoints of each format carry it."""
    if fmt == "fp8-block":
        return {
            "quant_method": "fp8",
            "fmt": "e4m3",
            "activation_scheme": "dynamic",
            "weight_block_size": list(block),
            "modules_to_not_convert": ["lm_head", "visual", *ignore],
        }
    if fmt == "fp8-channel":
        scheme = {"dynamic": False, "num_bits": 8, "observer": "minmax", "strategy": "channel"}
        return {
            "quant_method": "compressed-tensors",
            "format": "float-quantized",
            "quantization_status": "compressed",
            "config_groups": {
                "group_0": {
                    "targets": ["Linear"],
                    "weights": {**scheme, "symmetric": True, "type": "float", "group_size": None},
                    "input_activations": {
                        "dynamic": True,
                        "num_bits": 8,
                        "strategy": "token",
                        "symmetric": True,
                        "type": "float",
                    },
                    "output_activations": None,
                }
            },
            "ignore": ["lm_head", "re:visual.*", *ignore],
            "kv_cache_scheme": None,
            "sparsity_config": {},
            "global_compression_ratio": None,
        }
    if fmt == "fp8-tensor":
        return {"quant_method": "fp8", "activation_scheme": "static", "ignored_layers": ["lm_head", *ignore]}
    if fmt == "awq":
        return {
            "quant_method": "awq",
            "bits": 4,
            "group_size": group,
            "version": "gemm",
            "zero_point": True,
            "modules_to_not_convert": ["visual", *ignore],
        }
    raise ValueError(f"unknown format {fmt!r}; one of {', '.join(FORMATS)}")


def write_quantized_checkpoint(
    out_dir: str | Path,
    fmt: str,
    group: int = 128,
    block: tuple[int, int] = (128, 128),
    ignore: list[str] | None = None,
    quantize_vision: bool = False,
    **checkpoint_kwargs: Any,
) -> Path:
    """A random float checkpoint (checkpoint.write_checkpoint with `checkpoint_kwargs`) quantized into `fmt`
    in place (see quantize_checkpoint); weights=False writes the config only (for load_format="dummy")."""
    out = write_checkpoint(out_dir, **checkpoint_kwargs)
    if not checkpoint_kwargs.get("weights", True):
        config = json.loads((out / "config.json").read_text())
        config["quantization_config"] = _config_for(fmt, group, block, list(ignore or []), quantize_vision)
        (out / "config.json").write_text(json.dumps(config, indent=2))
        return out
    return quantize_checkpoint(out, out, fmt, group, block, ignore, quantize_vision)


def _config_for(
    fmt: str, group: int, block: tuple[int, int], ignore: list[str], quantize_vision: bool
) -> dict[str, Any]:
    qcfg = quantization_config(fmt, group, block, ignore)
    if quantize_vision:
        for key in ("modules_to_not_convert", "ignore"):
            if key in qcfg:
                qcfg[key] = [m for m in qcfg[key] if m not in ("visual", "re:visual.*")]
    return qcfg


def quantize_checkpoint(
    src: str | Path,
    out_dir: str | Path,
    fmt: str,
    group: int = 128,
    block: tuple[int, int] = (128, 128),
    ignore: list[str] | None = None,
    quantize_vision: bool = False,
) -> Path:
    """The float checkpoint in `src` (one model.safetensors) with its language-model linears quantized into
    `fmt`, except the modules named in `ignore` (listed in the skip list), written to `out_dir` (may be
    `src`). quantize_vision: the vision tower's linears too (FP8 formats; not in the skip list then)."""
    src, out = Path(src), Path(out_dir)
    ignore = list(ignore or [])
    if out != src:
        out.mkdir(parents=True, exist_ok=True)
        for f in src.iterdir():
            if f.is_file() and f.suffix != ".safetensors":
                (out / f.name).write_bytes(f.read_bytes())
    tensors = load_file(str(src / "model.safetensors"))
    quantized: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        prefix = name.removesuffix(".weight")
        chosen = QUANTIZED.match(name) or (quantize_vision and VISION_LINEARS.match(name))
        if not chosen or any(prefix.endswith(i) for i in ignore):
            quantized[name] = t
        elif fmt == "fp8-block":
            quantized[name], quantized[prefix + ".weight_scale_inv"] = fp8_block_quantize(t, block)
        elif fmt == "fp8-channel":
            quantized[name], quantized[prefix + ".weight_scale"] = fp8_channel_quantize(t, torch.bfloat16)
        elif fmt == "fp8-tensor":
            quantized[name], quantized[prefix + ".weight_scale"] = fp8_tensor_quantize(t)
            quantized[prefix + ".input_scale"] = torch.tensor(0.05)  # static activation scale (unused)
        elif fmt == "awq":
            qw, qz, s = awq_quantize(t, group)
            quantized |= {prefix + ".qweight": qw, prefix + ".qzeros": qz, prefix + ".scales": s}
        else:
            raise ValueError(f"unknown format {fmt!r}; one of {', '.join(FORMATS)}")
    save_file(quantized, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = _config_for(fmt, group, block, ignore, quantize_vision)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def dequantized_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A quantized checkpoint's tensors with every quantized weight replaced by its float32 value."""
    config = json.loads((path / "config.json").read_text())
    q = config["quantization_config"]
    tensors = load_file(str(path / "model.safetensors"))
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        prefix, _, leaf = name.rpartition(".")
        if leaf in ("weight_scale_inv", "weight_scale", "input_scale", "qzeros", "scales"):
            continue
        if leaf == "qweight":
            out[prefix + ".weight"] = awq_dequantize(
                t, tensors[prefix + ".qzeros"], tensors[prefix + ".scales"], q["group_size"]
            )
        elif t.dtype == FP8 and "weight_block_size" in q:
            out[name] = fp8_block_dequantize(t, tensors[prefix + ".weight_scale_inv"], q["weight_block_size"])
        elif t.dtype == FP8:
            out[name] = fp8_channel_dequantize(t, tensors[prefix + ".weight_scale"])
        else:
            out[name] = t
    return out


def write_dequantized_twin(quantized: Path, out_dir: str | Path) -> Path:
    """The float32 checkpoint that holds exactly the weights `quantized` encodes (no quantization_config)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for f in quantized.iterdir():
        if f.is_file() and f.suffix != ".safetensors":
            (out / f.name).write_bytes(f.read_bytes())
    config = json.loads((quantized / "config.json").read_text())
    config.pop("quantization_config")
    (out / "config.json").write_text(json.dumps(config, indent=2))
    save_file(dequantized_tensors(quantized), str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def write_fp8_channel_twin(float_ckpt: Path, out_dir: str | Path) -> Path:
    """The float32 checkpoint holding `float_ckpt`'s weights after per-channel FP8 rounding of its
    language-model linears: what online FP8 quantization (`quantization="fp8"`) must compute with."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for f in float_ckpt.iterdir():
        if f.is_file() and f.suffix != ".safetensors":
            (out / f.name).write_bytes(f.read_bytes())
    tensors = load_file(str(float_ckpt / "model.safetensors"))
    rounded = {
        name: fp8_channel_dequantize(*fp8_channel_quantize(t, torch.float32)) if QUANTIZED.match(name) else t
        for name, t in tensors.items()
    }
    save_file(rounded, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Write a random-weight quantized Qwen2.5-VL checkpoint.")
    ap.add_argument("out_dir")
    ap.add_argument("--format", choices=FORMATS, required=True)
    ap.add_argument("--preset", default="tiny", help="a checkpoint.py preset, or 72b")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument(
        "--no-weights", action="store_true", help="config and tokenizer only (serve with --load-format dummy)"
    )
    args = ap.parse_args(argv)
    arch = EXTRA_PRESETS.get(args.preset, {"preset": args.preset})
    path = write_quantized_checkpoint(
        args.out_dir, args.format, args.group_size, seed=args.seed, weights=not args.no_weights, **arch
    )
    print(path)


if __name__ == "__main__":
    main()
