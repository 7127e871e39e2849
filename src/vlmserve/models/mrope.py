"""Qwen2-VL / Qwen2.5-VL multimodal RoPE positions for a prompt with still images (HF's get_rope_index).

Owns: (3, L) positions and the delta for generated tokens. Does not know: how the prompt was built or what
the images look like beyond their patch grids.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def get_rope_index(
    token_ids: Sequence[int],
    image_grid_thw: Sequence[tuple[int, int, int]],
    *,
    image_token_id: int,
    merge_size: int,
) -> tuple[torch.Tensor, int]:
    """Qwen2.5-VL multimodal RoPE positions (3, L) int64 and the delta for generated tokens.

    Text tokens advance all three axes together. An image's tokens, in grid order, get (t, h, w) positions
    offset by the position where the image starts (t stays at that offset for still images); the text
    after it resumes at that offset + max(grid_h, grid_w) / merge_size. Same as HF's get_rope_index.
    A token generated at index i >= L has position i + delta on all three axes.
    """
    ids = torch.as_tensor(list(token_ids), dtype=torch.long)  # (L,)
    length = ids.numel()
    positions = torch.empty(3, length, dtype=torch.long)  # (3, L)
    m = merge_size
    image_pos = torch.nonzero(ids == image_token_id).flatten().tolist()
    expected = sum(t * (h // m) * (w // m) for t, h, w in image_grid_thw)
    if len(image_pos) != expected:
        raise ValueError(
            f"The prompt has {len(image_pos)} image tokens but the {len(image_grid_thw)} image grid(s) "
            f"{list(image_grid_thw)} need {expected}; expand each image placeholder to its grid's token count."
        )
    cursor = 0  # index into image_pos
    text_start = 0  # first token not yet given a position
    current = 0  # next position value
    for t, h, w in image_grid_thw:
        llm_h, llm_w = h // m, w // m
        n = t * llm_h * llm_w
        start = image_pos[cursor]
        if image_pos[cursor + n - 1] != start + n - 1:
            raise ValueError(
                f"The {n} tokens of the image starting at index {start} are not contiguous; an image's "
                "placeholder tokens must follow each other."
            )
        positions[:, text_start:start] = torch.arange(current, current + start - text_start)
        current += start - text_start
        grid = positions[:, start : start + n].view(3, t, llm_h, llm_w)  # (3, T, H', W')
        grid[0] = torch.arange(t).view(t, 1, 1) + current
        grid[1] = torch.arange(llm_h).view(1, llm_h, 1) + current
        grid[2] = torch.arange(llm_w).view(1, 1, llm_w) + current
        current += max(h, w) // m
        text_start = start + n
        cursor += n
    positions[:, text_start:] = torch.arange(current, current + length - text_start)
    delta = int(positions.max()) + 1 - length if length else 0
    return positions, delta
