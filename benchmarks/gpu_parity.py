"""Our model vs HF transformers on the GPU, bf16, identical weights: the 7B architecture's dimensions with
fewer layers (so both fit and it runs in seconds). Prints relative logit error and greedy agreement.

    python benchmarks/gpu_parity.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration

from vlmserve.bench.offline import make_prompt
from vlmserve.models.generate import prompt_embeddings
from vlmserve.models.layers.attention import ContiguousKVCache
from vlmserve.models.loader import load_model
from vlmserve.models.processor import Qwen2_5_VLProcessor
from vlmserve.checkpoints.checkpoint import write_checkpoint


def main() -> None:
    ckpt = write_checkpoint(
        Path(tempfile.mkdtemp()) / "7b-short",
        preset="7b",
        text={"num_hidden_layers": 4},
        vision={"depth": 8, "fullatt_block_indexes": [3, 7]},
        weights=False,
    )
    cfg = AutoConfig.from_pretrained(ckpt)
    with torch.device("cuda"):
        ref = Qwen2_5_VLForConditionalGeneration._from_config(
            cfg, dtype=torch.bfloat16, attn_implementation="sdpa"
        )
    ref.eval()
    ours = load_model(ckpt, "bfloat16", "cuda", load_format="dummy")
    ours.load_weights((k, v) for k, v in ref.state_dict().items())
    proc = Qwen2_5_VLProcessor.from_pretrained(ckpt)
    prompt = make_prompt(proc, (1280, 720), 1235, seed=0)
    pp = proc.process(prompt.text, [prompt.image])
    ids = torch.tensor([pp.token_ids], device="cuda")
    pix = pp.images[0].data.values.to("cuda", torch.bfloat16)
    grid = torch.tensor([pp.images[0].data.grid_thw], device="cuda")
    with torch.inference_mode():
        expected = (
            ref(
                input_ids=ids,
                pixel_values=pix,
                image_grid_thw=grid,
                mm_token_type_ids=(ids == cfg.image_token_id).int(),
            )
            .logits[0]
            .float()
        )
        x = prompt_embeddings(ours, pp.token_ids, pp.images)
        cache = ContiguousKVCache(len(ours.model.layers), ours.model.layers[0].self_attn.head_dim ** -0.5)
        got = ours.compute_logits(ours(x, pp.mrope_positions.cuda(), cache)).float()
        # The float32 truth: HF's model upcast, same weights.
        truth = (
            ref.float()(
                input_ids=ids,
                pixel_values=pix.float(),
                image_grid_thw=grid,
                mm_token_type_ids=(ids == cfg.image_token_id).int(),
            )
            .logits[0]
            .float()
        )

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return ((a - b).norm() / b.norm()).item()

    def agree(a: torch.Tensor, b: torch.Tensor) -> float:
        return (a.argmax(-1) == b.argmax(-1)).float().mean().item()

    n = len(pp.token_ids)
    print(f"GPU parity on a {n}-token W1 prompt (7B dims, 4 LM layers, 8 vision blocks), vs float32 truth:")
    print(
        f"  ours bf16: relative logit error {rel(got, truth):.2e}, argmax agreement {agree(got, truth):.4f}"
    )
    print(
        f"  HF   bf16: relative logit error {rel(expected, truth):.2e}, argmax agreement {agree(expected, truth):.4f}"
    )
    print(f"  ours vs HF bf16: relative error {rel(got, expected):.2e}")


if __name__ == "__main__":
    main()
