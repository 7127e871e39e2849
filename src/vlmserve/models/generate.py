"""The plainest possible generation loop: one sequence, greedy, contiguous KV cache.

It is the oracle the engine's batched, paged, cached path is compared against, so it stays simple: no
batching, no sampling options, no stopping rules beyond EOS and a token count.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from vlmserve.models.layers.attention import ContiguousKVCache
from vlmserve.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration
from vlmserve.multimodal import ImageFeature


@torch.inference_mode()
def prompt_embeddings(
    model: Qwen2_5_VLForConditionalGeneration,
    token_ids: list[int],
    images: list[ImageFeature],
    encoder_input: Callable[[torch.Tensor, tuple[int, int, int]], torch.Tensor] | None = None,
) -> torch.Tensor:
    """(L, hidden) embeddings of a prompt with every image's placeholders replaced by its encoder output.

    Images carry float32 patches, or uint8 pixels (from a processor whose engine runs on a GPU) that
    `encoder_input` (the processor's) turns into patches."""
    device = next(model.parameters()).device
    ids = torch.tensor(token_ids, device=device)
    if not images:
        return model.embed(ids)
    parts = []
    for img in images:
        data = img.data.values
        if img.data.as_pixels:
            if encoder_input is None:
                raise ValueError(
                    "the images are uint8 pixels (EngineConfig.images_as_pixels, as for an engine on a GPU or in "
                    "its own process): pass encoder_input=processor.encoder_input"
                )
            data = encoder_input(data, tuple(img.data.grid_thw))
        parts.append(data)
    patches = torch.cat(parts).to(device)
    grids = [tuple(img.data.grid_thw) for img in images]
    embeds = torch.cat(model.encode_images(patches, grids))  # (image tokens, hidden)
    mask = torch.zeros(len(token_ids), dtype=torch.bool, device=device)
    for img in images:
        mask[img.offset : img.offset + img.length] = True
    return model.embed(ids, embeds, mask)


@torch.inference_mode()
def greedy_generate(
    model: Qwen2_5_VLForConditionalGeneration,
    token_ids: list[int],
    images: list[ImageFeature],
    positions: torch.Tensor | None,
    mrope_delta: int,
    max_new_tokens: int,
    eos_token_ids: tuple[int, ...] = (),
    encoder_input: Callable[[torch.Tensor, tuple[int, int, int]], torch.Tensor] | None = None,
) -> list[int]:
    """Greedy tokens after the prompt. positions (3, L) or None for text positions 0..L-1."""
    device = next(model.parameters()).device
    n = len(token_ids)
    if positions is None:
        positions = torch.arange(n).expand(3, n)
    cache = ContiguousKVCache(len(model.model.layers), scale=model.model.layers[0].self_attn.head_dim ** -0.5)
    x = prompt_embeddings(model, token_ids, images, encoder_input)
    pos = positions.to(device)
    out: list[int] = []
    for step in range(max_new_tokens):
        hidden = model(x, pos, cache)
        token = int(model.compute_logits(hidden[-1:]).argmax(-1))
        out.append(token)
        if token in eos_token_ids:
            break
        x = model.embed(torch.tensor([token], device=device))
        p = n + step + mrope_delta
        pos = torch.full((3, 1), p, device=device)
    return out
