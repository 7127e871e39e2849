"""Write tiny random-weight checkpoints of each supported family (Qwen2.5-VL, Qwen2-VL, Qwen3-VL dense and
MoE), offline and deterministic from a seed.

A checkpoint here is laid out exactly like a released one of its family (config.json with text fields at the top level,
model.safetensors with the released tensor names, tokenizer.json + tokenizer_config.json with the chat
template, preprocessor_config.json, generation_config.json), so tests load it through the same code path as
the real model. The tensor names and shapes are listed here independently of the model code, which makes
loading them a check of the loader too.

    python -m vlmserve.checkpoints.checkpoint OUT_DIR [--family qwen2_5_vl|qwen2_vl|qwen3_vl|qwen3_vl_moe]
        [--preset tiny|small-bench|7b|...] [--seed N] [--dtype ...]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from vlmserve.checkpoints.tokenizer import (
    QWEN2_5_VL_CHAT_TEMPLATE,
    QWEN3_VL_CHAT_TEMPLATE,
    build_tokenizer_files,
    write_preprocessor_config,
)
from vlmserve.models.loader import dummy_tensor

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
    return shapes | qwen2_lm_shapes(config)


def qwen2_lm_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """The Qwen2 language model's tensors (Qwen2-VL and Qwen2.5-VL), text fields flat in `config`."""
    h, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    hd = h // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * hd
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, h)}
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


# ------------------------------------------------------------------------------------------ other families

FAMILY_PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "qwen2_vl": {
        # GQA, untied head, two full-attention vision blocks.
        "tiny": {
            "text": dict(
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                mrope_section=[2, 3, 3],
            ),
            "vision": dict(depth=2, embed_dim=32, mlp_ratio=2, num_heads=2),
            "vocab_size": 512,
            "max_pixels": 128 * 28 * 28,
        },
        # Qwen2-VL-7B-Instruct (random weights) for GPU benchmarks.
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
            "vision": dict(depth=32, embed_dim=1280, mlp_ratio=4, num_heads=16),
            "vocab_size": 2048,
            "max_pixels": 12845056,
        },
    },
    "qwen3_vl": {
        # head_dim (32) set apart from hidden / heads, interleaved M-RoPE, DeepStack into both LM layers.
        "tiny": {
            "text": dict(
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                head_dim=32,
                mrope_section=[6, 5, 5],
            ),
            "vision": dict(
                depth=3,
                hidden_size=32,
                intermediate_size=64,
                num_heads=2,
                num_position_embeddings=64,
                deepstack_visual_indexes=[0, 1],
            ),
            "vocab_size": 512,
            "max_pixels": 128 * 32 * 32,
        },
        # Qwen3-VL-8B-Instruct (random weights) for GPU benchmarks.
        "8b": {
            "text": dict(
                hidden_size=4096,
                intermediate_size=12288,
                num_hidden_layers=36,
                num_attention_heads=32,
                num_key_value_heads=8,
                head_dim=128,
                mrope_section=[24, 20, 20],
                vocab_size=151936,
                rope_theta=5000000.0,
                max_position_embeddings=262144,
            ),
            "vision": dict(
                depth=27,
                hidden_size=1152,
                intermediate_size=4304,
                num_heads=16,
                num_position_embeddings=2304,
                deepstack_visual_indexes=[8, 16, 24],
            ),
            "vocab_size": 2048,
            "max_pixels": 16777216,
        },
    },
    "qwen3_vl_moe": {
        # 8 experts, top-2; layer 1 is a dense MLP layer (mlp_only_layers), as the config allows.
        "tiny": {
            "text": dict(
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=3,
                num_attention_heads=4,
                num_key_value_heads=2,
                head_dim=32,
                mrope_section=[6, 5, 5],
                num_experts=8,
                num_experts_per_tok=2,
                moe_intermediate_size=48,
                decoder_sparse_step=1,
                mlp_only_layers=[1],
            ),
            "vision": dict(
                depth=3,
                hidden_size=32,
                intermediate_size=64,
                num_heads=2,
                num_position_embeddings=64,
                deepstack_visual_indexes=[0, 2],
            ),
            "vocab_size": 512,
            "max_pixels": 128 * 32 * 32,
        },
        # Qwen3-VL-30B-A3B-Instruct (random weights) for GPU benchmarks.
        "30b-a3b": {
            "text": dict(
                hidden_size=2048,
                intermediate_size=6144,
                num_hidden_layers=48,
                num_attention_heads=32,
                num_key_value_heads=4,
                head_dim=128,
                mrope_section=[24, 20, 20],
                vocab_size=151936,
                rope_theta=5000000.0,
                max_position_embeddings=262144,
                num_experts=128,
                num_experts_per_tok=8,
                moe_intermediate_size=768,
                decoder_sparse_step=1,
                mlp_only_layers=[],
            ),
            "vision": dict(
                depth=27,
                hidden_size=1152,
                intermediate_size=4304,
                num_heads=16,
                num_position_embeddings=2304,
                deepstack_visual_indexes=[8, 16, 24],
            ),
            "vocab_size": 2048,
            "max_pixels": 16777216,
        },
    },
}


def make_config_qwen2_vl(
    special: dict[str, int], text: dict[str, Any], vision: dict[str, Any], tie_word_embeddings: bool
) -> dict[str, Any]:
    """config.json as Qwen2-VL releases it: text fields flat, vision (embed_dim, mlp_ratio, the LM width as
    hidden_size) under vision_config."""
    cfg = make_config(special, text, {}, tie_word_embeddings)
    cfg["architectures"] = ["Qwen2VLForConditionalGeneration"]
    cfg["model_type"] = "qwen2_vl"
    cfg["vision_token_id"] = special["vision_start"] + 2  # <|vision_pad|>, as released
    vis = {
        "depth": 2,
        "embed_dim": 32,
        "mlp_ratio": 4,
        "num_heads": 2,
        "in_chans": 3,
        "hidden_size": cfg["hidden_size"],
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    }
    vis.update(vision)
    cfg["vision_config"] = vis
    return cfg


def tensor_shapes_qwen2_vl(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every tensor of a released Qwen2-VL checkpoint, by name, with its shape."""
    v = config["vision_config"]
    ve, vi = v["embed_dim"], int(v["embed_dim"] * v["mlp_ratio"])
    merged = ve * v["spatial_merge_size"] ** 2
    p, t = v["patch_size"], v["temporal_patch_size"]
    shapes: dict[str, tuple[int, ...]] = {
        "visual.patch_embed.proj.weight": (ve, v["in_chans"], t, p, p),
        "visual.merger.ln_q.weight": (ve,),
        "visual.merger.ln_q.bias": (ve,),
        "visual.merger.mlp.0.weight": (merged, merged),
        "visual.merger.mlp.0.bias": (merged,),
        "visual.merger.mlp.2.weight": (v["hidden_size"], merged),
        "visual.merger.mlp.2.bias": (v["hidden_size"],),
    }
    for i in range(v["depth"]):
        b = f"visual.blocks.{i}."
        shapes |= {
            b + "norm1.weight": (ve,),
            b + "norm1.bias": (ve,),
            b + "norm2.weight": (ve,),
            b + "norm2.bias": (ve,),
            b + "attn.qkv.weight": (3 * ve, ve),
            b + "attn.qkv.bias": (3 * ve,),
            b + "attn.proj.weight": (ve, ve),
            b + "attn.proj.bias": (ve,),
            b + "mlp.fc1.weight": (vi, ve),
            b + "mlp.fc1.bias": (vi,),
            b + "mlp.fc2.weight": (ve, vi),
            b + "mlp.fc2.bias": (ve,),
        }
    return shapes | qwen2_lm_shapes(config)


def make_config_qwen3_vl(
    special: dict[str, int], text: dict[str, Any], vision: dict[str, Any], tie_word_embeddings: bool
) -> dict[str, Any]:
    """config.json as Qwen3-VL releases it: text fields under text_config (rope_scaling with
    mrope_interleaved), vision under vision_config; MoE fields (num_experts, ...) select the MoE class."""
    t = dict(text)
    mrope = t.pop("mrope_section")
    moe = "num_experts" in t
    txt = {
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": special["endoftext"],
        "eos_token_id": special["im_end"],
        "dtype": "bfloat16",
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "max_position_embeddings": 32768,
        "model_type": "qwen3_vl_moe_text" if moe else "qwen3_vl_text",
        "rms_norm_eps": 1e-6,
        "rope_scaling": {"mrope_interleaved": True, "mrope_section": mrope, "rope_type": "default"},
        "rope_theta": 5000000.0,
        "tie_word_embeddings": tie_word_embeddings,
        "use_cache": True,
        **t,
    }
    vis = {
        "depth": 2,
        "hidden_act": "gelu_pytorch_tanh",
        "hidden_size": 32,
        "in_channels": 3,
        "initializer_range": 0.02,
        "intermediate_size": 64,
        "model_type": "qwen3_vl_moe" if moe else "qwen3_vl",
        "num_heads": 2,
        "num_position_embeddings": 64,
        "out_hidden_size": txt["hidden_size"],
        "patch_size": 16,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "deepstack_visual_indexes": [0],
    }
    vis.update(vision)
    return {
        "architectures": ["Qwen3VLMoeForConditionalGeneration" if moe else "Qwen3VLForConditionalGeneration"],
        "model_type": "qwen3_vl_moe" if moe else "qwen3_vl",
        "image_token_id": special["image_pad"],
        "video_token_id": special["video_pad"],
        "vision_start_token_id": special["vision_start"],
        "vision_end_token_id": special["vision_end"],
        "tie_word_embeddings": tie_word_embeddings,
        "text_config": txt,
        "vision_config": vis,
    }


def tensor_shapes_qwen3_vl(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every tensor of a released Qwen3-VL (dense or MoE) checkpoint, by name, with its shape. Released MoE
    experts are stacked per layer: gate_up_proj (experts, hidden, 2 * moe_intermediate) and down_proj
    (experts, moe_intermediate, hidden)."""
    v, c = config["vision_config"], config["text_config"]
    vh, vi = v["hidden_size"], v["intermediate_size"]
    merged = vh * v["spatial_merge_size"] ** 2
    p, t = v["patch_size"], v["temporal_patch_size"]
    pre = "model.visual."
    shapes: dict[str, tuple[int, ...]] = {
        pre + "patch_embed.proj.weight": (vh, v["in_channels"], t, p, p),
        pre + "patch_embed.proj.bias": (vh,),
        pre + "pos_embed.weight": (v["num_position_embeddings"], vh),
    }
    for i in range(v["depth"]):
        b = f"{pre}blocks.{i}."
        shapes |= {
            b + "norm1.weight": (vh,),
            b + "norm1.bias": (vh,),
            b + "norm2.weight": (vh,),
            b + "norm2.bias": (vh,),
            b + "attn.qkv.weight": (3 * vh, vh),
            b + "attn.qkv.bias": (3 * vh,),
            b + "attn.proj.weight": (vh, vh),
            b + "attn.proj.bias": (vh,),
            b + "mlp.linear_fc1.weight": (vi, vh),
            b + "mlp.linear_fc1.bias": (vi,),
            b + "mlp.linear_fc2.weight": (vh, vi),
            b + "mlp.linear_fc2.bias": (vh,),
        }
    mergers = [(pre + "merger.", vh)] + [
        (f"{pre}deepstack_merger_list.{j}.", merged) for j in range(len(v["deepstack_visual_indexes"]))
    ]
    for m, norm in mergers:
        shapes |= {
            m + "norm.weight": (norm,),
            m + "norm.bias": (norm,),
            m + "linear_fc1.weight": (merged, merged),
            m + "linear_fc1.bias": (merged,),
            m + "linear_fc2.weight": (v["out_hidden_size"], merged),
            m + "linear_fc2.bias": (v["out_hidden_size"],),
        }
    h, inter, vocab, hd = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["head_dim"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    lm = "model.language_model."
    shapes[lm + "embed_tokens.weight"] = (vocab, h)
    num_experts = c.get("num_experts", 0)
    for i in range(c["num_hidden_layers"]):
        b = f"{lm}layers.{i}."
        shapes |= {
            b + "input_layernorm.weight": (h,),
            b + "post_attention_layernorm.weight": (h,),
            b + "self_attn.q_proj.weight": (q, h),
            b + "self_attn.k_proj.weight": (kv, h),
            b + "self_attn.v_proj.weight": (kv, h),
            b + "self_attn.o_proj.weight": (h, q),
            b + "self_attn.q_norm.weight": (hd,),
            b + "self_attn.k_norm.weight": (hd,),
        }
        sparse = (
            num_experts > 0
            and i not in c.get("mlp_only_layers", [])
            and (i + 1) % c.get("decoder_sparse_step", 1) == 0
        )
        if sparse:
            mi = c["moe_intermediate_size"]
            shapes |= {
                b + "mlp.gate.weight": (num_experts, h),
                b + "mlp.experts.gate_up_proj": (num_experts, h, 2 * mi),
                b + "mlp.experts.down_proj": (num_experts, mi, h),
            }
        else:
            shapes |= {
                b + "mlp.gate_proj.weight": (inter, h),
                b + "mlp.up_proj.weight": (inter, h),
                b + "mlp.down_proj.weight": (h, inter),
            }
    shapes[lm + "norm.weight"] = (h,)
    if not config["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (vocab, h)
    return shapes


def _random_tensor(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """dummy_tensor, with released MoE expert stacks ((experts, in, out)) drawn as our (experts, out, in)
    layout and transposed, so that both are scaled by the same fan-in."""
    if ".mlp.experts." in name and len(shape) == 3:
        return dummy_tensor(name, (shape[0], shape[2], shape[1]), gen).transpose(1, 2).contiguous()
    return dummy_tensor(name, shape, gen)


# family -> (config writer, tensor list, chat template, preprocessor_config.json settings)
FAMILIES: dict[str, tuple[Any, Any, str, dict[str, Any]]] = {
    "qwen2_5_vl": (make_config, tensor_shapes, QWEN2_5_VL_CHAT_TEMPLATE, {}),
    "qwen2_vl": (
        make_config_qwen2_vl,
        tensor_shapes_qwen2_vl,
        QWEN2_5_VL_CHAT_TEMPLATE,  # Qwen2-VL ships the same template
        {"processor_class": "Qwen2VLProcessor"},
    ),
    "qwen3_vl": (
        make_config_qwen3_vl,
        tensor_shapes_qwen3_vl,
        QWEN3_VL_CHAT_TEMPLATE,
        {
            "patch_size": 16,
            "image_mean": (0.5, 0.5, 0.5),
            "image_std": (0.5, 0.5, 0.5),
            "processor_class": "Qwen3VLProcessor",
            "flat_pixel_fields": False,
        },
    ),
}
FAMILIES["qwen3_vl_moe"] = FAMILIES["qwen3_vl"]


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
    family: str = "qwen2_5_vl",
) -> Path:
    """Write a complete checkpoint of `family` into `out_dir` and return it. `text` / `vision` override
    preset fields. weights=False writes everything but the tensors (for `load_format="dummy"`, e.g. the 7B
    benchmark)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose one of {', '.join(FAMILIES)}")
    presets = PRESETS if family == "qwen2_5_vl" else FAMILY_PRESETS[family]
    if preset not in presets:
        raise ValueError(f"family {family} has no preset {preset!r}; choose one of {', '.join(presets)}")
    build_config, shapes_of, template, preprocessor = FAMILIES[family]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    p = presets[preset]
    text_cfg = {**p["text"], **(text or {})}
    special = build_tokenizer_files(out, vocab_size=p["vocab_size"], seed=seed, chat_template=template)
    text_cfg.setdefault("vocab_size", special["vocab_size"])
    if text_cfg["vocab_size"] < special["vocab_size"]:
        raise ValueError(f"vocab_size {text_cfg['vocab_size']} < tokenizer size {special['vocab_size']}")
    config = build_config(special, text_cfg, {**p["vision"], **(vision or {})}, tie_word_embeddings)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    factor = preprocessor.get("patch_size", 14) * 2
    write_preprocessor_config(
        out,
        min_pixels=min_pixels if family.startswith("qwen2") else max(min_pixels, 4 * factor * factor),
        max_pixels=max_pixels or p["max_pixels"],
        **preprocessor,
    )

    if not weights:
        return out
    gen = torch.Generator().manual_seed(seed)
    shapes = shapes_of(config)
    tensors = {name: _random_tensor(name, shape, gen).to(dtype) for name, shape in shapes.items()}
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
    ap = argparse.ArgumentParser(description="Write a random-weight checkpoint of a supported family.")
    ap.add_argument("out_dir")
    ap.add_argument("--family", choices=sorted(FAMILIES), default="qwen2_5_vl")
    ap.add_argument("--preset", default="tiny", help="tiny, small-bench, 7b (Qwen2.5-VL); 8b (Qwen3-VL) ...")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    ap.add_argument("--shards", type=int, default=1)
    ap.add_argument(
        "--no-weights", action="store_true", help="config and tokenizer only, for --load-format dummy"
    )
    args = ap.parse_args(argv)
    path = write_checkpoint(
        args.out_dir,
        args.preset,
        args.seed,
        getattr(torch, args.dtype),
        shards=args.shards,
        family=args.family,
        weights=not args.no_weights,
    )
    print(path)


if __name__ == "__main__":
    main()
