"""Write tiny random-weight Qwen2.5-VL checkpoints, offline and deterministic from a seed.

A checkpoint here is laid out exactly like a released one (config.json with text fields at the top level,
model.safetensors with the released tensor names, tokenizer.json + tokenizer_config.json with the chat
template, preprocessor_config.json, generation_config.json), so tests load it through the same code path as
the real model. The tensor names and shapes are listed here independently of the model code, which makes
loading them a check of the loader too.

    python -m vlmserve.testing.checkpoint OUT_DIR [--preset tiny|small-bench|7b] [--seed N] [--dtype ...]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from vlmserve.models.loader import dummy_tensor
from vlmserve.testing.tokenizer import build_tokenizer_files, write_preprocessor_config

PRESETS: dict[str, dict[str, Any]] = {
    # Small enough that a CPU forward takes milliseconds; every architectural feature still present:
    # GQA, window + full attention blocks, several windows per image, untied head.
    "tiny": {
        "text": dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            mrope_section=[2, 3, 3],
        ),
        "vision": dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            window_size=56,
            fullatt_block_indexes=[1],
        ),
        "vocab_size": 512,
        "max_pixels": 128 * 28 * 28,
    },
    # The CPU serving benchmark model (LM hidden 256, 4 layers, 4 heads of 64; vision hidden 128, depth 4).
    "small-bench": {
        "text": dict(
            hidden_size=256,
            intermediate_size=512,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            mrope_section=[8, 12, 12],
        ),
        "vision": dict(
            depth=4,
            hidden_size=128,
            intermediate_size=256,
            num_heads=4,
            window_size=112,
            fullatt_block_indexes=[3],
        ),
        "vocab_size": 2048,
        "max_pixels": 200704,
    },
    # The 7B architecture (random weights) for GPU benchmarks.
    "7b": {
        "text": dict(
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            mrope_section=[16, 24, 24],
            vocab_size=152064,
        ),
        "vision": dict(
            depth=32,
            hidden_size=1280,
            intermediate_size=3420,
            num_heads=16,
            window_size=112,
            fullatt_block_indexes=[7, 15, 23, 31],
        ),
        "vocab_size": 2048,
        "max_pixels": 12845056,
    },
}


def make_config(
    special: dict[str, int], text: dict[str, Any], vision: dict[str, Any], tie_word_embeddings: bool
) -> dict[str, Any]:
    """config.json as released: text fields flat at the top level, vision under vision_config."""
    t = dict(text)
    mrope = t.pop("mrope_section")
    vis = {
        "depth": 2,
        "hidden_act": "silu",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "in_chans": 3,
        "out_hidden_size": t["hidden_size"],
        "patch_size": 14,
        "spatial_merge_size": 2,
        "spatial_patch_size": 14,
        "temporal_patch_size": 2,
        "tokens_per_second": 2,
        "window_size": 112,
        "fullatt_block_indexes": [1],
        "model_type": "qwen2_5_vl",
    }
    vis.update(vision)
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "model_type": "qwen2_5_vl",
        "attention_dropout": 0.0,
        "bos_token_id": special["endoftext"],
        "eos_token_id": special["im_end"],
        "pad_token_id": special["endoftext"],
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "max_position_embeddings": 32768,
        "max_window_layers": t["num_hidden_layers"],
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "rope_scaling": {"type": "mrope", "mrope_section": mrope},
        "sliding_window": 32768,
        "use_sliding_window": False,
        "use_cache": True,
        "tie_word_embeddings": tie_word_embeddings,
        "torch_dtype": "bfloat16",
        "vision_start_token_id": special["vision_start"],
        "vision_end_token_id": special["vision_end"],
        "image_token_id": special["image_pad"],
        "video_token_id": special["video_pad"],
        **t,
        "vision_config": vis,
    }


def tensor_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every tensor of a released Qwen2.5-VL checkpoint, by name, with its shape."""
    v = config["vision_config"]
    vh, vi = v["hidden_size"], v["intermediate_size"]
    merged = vh * v["spatial_merge_size"] ** 2
    shapes: dict[str, tuple[int, ...]] = {
        "visual.patch_embed.proj.weight": (
            vh,
            v["in_chans"],
            v["temporal_patch_size"],
            v["patch_size"],
            v["patch_size"],
        ),
        "visual.merger.ln_q.weight": (vh,),
        "visual.merger.mlp.0.weight": (merged, merged),
        "visual.merger.mlp.0.bias": (merged,),
        "visual.merger.mlp.2.weight": (v["out_hidden_size"], merged),
        "visual.merger.mlp.2.bias": (v["out_hidden_size"],),
    }
    for i in range(v["depth"]):
        b = f"visual.blocks.{i}."
        shapes |= {
            b + "norm1.weight": (vh,),
            b + "norm2.weight": (vh,),
            b + "attn.qkv.weight": (3 * vh, vh),
            b + "attn.qkv.bias": (3 * vh,),
            b + "attn.proj.weight": (vh, vh),
            b + "attn.proj.bias": (vh,),
            b + "mlp.gate_proj.weight": (vi, vh),
            b + "mlp.gate_proj.bias": (vi,),
            b + "mlp.up_proj.weight": (vi, vh),
            b + "mlp.up_proj.bias": (vi,),
            b + "mlp.down_proj.weight": (vh, vi),
            b + "mlp.down_proj.bias": (vh,),
        }
    h, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    hd = h // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * hd
    shapes["model.embed_tokens.weight"] = (vocab, h)
    for i in range(config["num_hidden_layers"]):
        b = f"model.layers.{i}."
        shapes |= {
            b + "input_layernorm.weight": (h,),
            b + "post_attention_layernorm.weight": (h,),
            b + "self_attn.q_proj.weight": (h, h),
            b + "self_attn.q_proj.bias": (h,),
            b + "self_attn.k_proj.weight": (kv, h),
            b + "self_attn.k_proj.bias": (kv,),
            b + "self_attn.v_proj.weight": (kv, h),
            b + "self_attn.v_proj.bias": (kv,),
            b + "self_attn.o_proj.weight": (h, h),
            b + "mlp.gate_proj.weight": (inter, h),
            b + "mlp.up_proj.weight": (inter, h),
            b + "mlp.down_proj.weight": (h, inter),
        }
    shapes["model.norm.weight"] = (h,)
    if not config["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (vocab, h)
    return shapes


def write_checkpoint(
    out_dir: str | Path,
    preset: str = "tiny",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    tie_word_embeddings: bool = False,
    text: dict[str, Any] | None = None,
    vision: dict[str, Any] | None = None,
    max_pixels: int | None = None,
    min_pixels: int = 4 * 28 * 28,
    shards: int = 1,
    weights: bool = True,
) -> Path:
    """Write a complete checkpoint into `out_dir` and return it. `text` / `vision` override preset fields.
    weights=False writes everything but the tensors (for `load_format="dummy"`, e.g. the 7B benchmark)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    p = PRESETS[preset]
    text_cfg = {**p["text"], **(text or {})}
    special = build_tokenizer_files(out, vocab_size=p["vocab_size"], seed=seed)
    text_cfg.setdefault("vocab_size", special["vocab_size"])
    if text_cfg["vocab_size"] < special["vocab_size"]:
        raise ValueError(f"vocab_size {text_cfg['vocab_size']} < tokenizer size {special['vocab_size']}")
    config = make_config(special, text_cfg, {**p["vision"], **(vision or {})}, tie_word_embeddings)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    write_preprocessor_config(out, min_pixels=min_pixels, max_pixels=max_pixels or p["max_pixels"])

    if not weights:
        return out
    gen = torch.Generator().manual_seed(seed)
    shapes = tensor_shapes(config)
    tensors = {name: dummy_tensor(name, shape, gen).to(dtype) for name, shape in shapes.items()}
    if shards <= 1:
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    else:
        names = list(tensors)
        per = math.ceil(len(names) / shards)
        weight_map: dict[str, str] = {}
        for i in range(shards):
            fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            part = {n: tensors[n] for n in names[i * per : (i + 1) * per]}
            save_file(part, str(out / fname), metadata={"format": "pt"})
            weight_map |= dict.fromkeys(part, fname)
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Write a random-weight Qwen2.5-VL checkpoint.")
    ap.add_argument("out_dir")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    ap.add_argument("--shards", type=int, default=1)
    args = ap.parse_args(argv)
    path = write_checkpoint(
        args.out_dir, args.preset, args.seed, getattr(torch, args.dtype), shards=args.shards
    )
    print(path)


if __name__ == "__main__":
    main()
