"""Vision-tower pieces the Qwen-VL families share: the patch embedding, bidirectional attention with 2-D
rotary over packed images, and patch positions in the processor's merge-block order.

Each family's own file assembles its tower from these (its norms, MLP, merger and, for windowed towers,
its window order); nothing here knows about a particular family's config class.
"""

from __future__ import annotations

import torch
from torch import nn

from vlmserve.models.layers.attention import VarlenGroups, varlen_attention
from vlmserve.models.layers.rotary import apply_rotary, inverse_frequencies


class PatchEmbed(nn.Module):
    """(N, C*T*P*P) flattened patches -> (N, hidden). A Conv3d whose kernel equals its stride is a matmul."""

    def __init__(
        self, in_channels: int, temporal_patch_size: int, patch_size: int, hidden_size: int, bias: bool
    ) -> None:
        super().__init__()
        kernel = (temporal_patch_size, patch_size, patch_size)
        self.proj = nn.Conv3d(in_channels, hidden_size, kernel_size=kernel, stride=kernel, bias=bias)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        w = self.proj.weight  # (hidden, C, T, P, P)
        out = patches.to(w.dtype) @ w.view(w.shape[0], -1).t()  # (N, hidden)
        return out if self.proj.bias is None else out + self.proj.bias


class VisionAttention(nn.Module):
    """Fused qkv (with bias), 2-D rotary on q and k, attention within each packed sequence, output proj."""

    def __init__(self, hidden_size: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size, bias=True)
        self.proj = nn.Linear(hidden_size, hidden_size, bias=True)

    def forward(
        self, x: torch.Tensor, seqs: VarlenGroups, cos: torch.Tensor, sin: torch.Tensor
    ) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.qkv(x).view(n, 3, self.num_heads, self.head_dim).unbind(1)  # 3 x (N, H, D)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = varlen_attention(q, k, v, seqs, scale=self.head_dim**-0.5)  # (N, H, D)
        return self.proj(out.reshape(n, -1))


def patch_positions(grids: list[tuple[int, int, int]], merge: int) -> torch.Tensor:
    """(N, 2) (row, col) of every patch, in the processor's order: merge blocks in raster order, the
    merge x merge patches inside a block in raster order, frames one after another."""
    pos = []
    for t, h, w in grids:
        bh, bw = h // merge, w // merge
        rows = (
            torch.arange(h).view(bh, merge, 1, 1).expand(bh, merge, bw, merge).permute(0, 2, 1, 3).reshape(-1)
        )
        cols = (
            torch.arange(w).view(1, 1, bw, merge).expand(bh, merge, bw, merge).permute(0, 2, 1, 3).reshape(-1)
        )
        pos.append(torch.stack([rows, cols], dim=-1).repeat(t, 1))
    return torch.cat(pos)


def vision_rotary(pos_hw: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 2) patch (row, col) -> cos, sin (N, head_dim) float32: the first half of the rotary slots follow
    the row, the second half the column."""
    inv_freq = inverse_frequencies(head_dim // 2, theta, pos_hw.device)  # (D/4,)
    freqs = (pos_hw[..., None].float() * inv_freq).flatten(1)  # (N, D/2): [row freqs | col freqs]
    emb = torch.cat([freqs, freqs], dim=-1)  # (N, D)
    return emb.cos(), emb.sin()
