"""Rotary position embeddings: multimodal RoPE for the language model, 2-D RoPE for the vision tower.

Both use the "rotate half" layout: the head dim is split in two halves that rotate together.
"""

from __future__ import annotations

import torch

from vlmserve.models.layers import fused


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (T, H, D); cos, sin (T, D) in float32. Rotation in float32, result in x's dtype."""
    if fused.use_fused(x):
        return fused.rotary(x, cos, sin)
    if torch.is_grad_enabled():  # training: the out= writes below are not differentiable
        x32 = x.float()
        return (x32 * cos[:, None] + rotate_half(x32) * sin[:, None]).to(x.dtype)
    # x * cos + rotate_half(x) * sin, half by half: the two halves of cos / sin are equal, so
    #   out[:h] = x1 * cos - x2 * sin,  out[h:] = x2 * cos + x1 * sin
    # Multiplying a bf16 half by the float32 table computes in float32 without a float32 copy of x first, and
    # addcmul writes its float32 result straight into the output's dtype: two passes over half of x each,
    # instead of a float32 copy, a concatenation and four full-size temporaries (about 7x faster on CPU at a
    # vision tower's thousands of patches).
    half = x.shape[-1] // 2
    c, s = cos[:, None, :half], sin[:, None, :half]  # (T, 1, D/2)
    x1, x2 = x[..., :half], x[..., half:]
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    torch.addcmul(x1 * c, x2, s.neg(), out=out[..., :half])
    torch.addcmul(x2 * c, x1, s, out=out[..., half:])
    return out


def inverse_frequencies(dim: int, theta: float, device: torch.device | None = None) -> torch.Tensor:
    """(dim // 2,) float32 inverse frequencies for a rotary dim of `dim`."""
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))


class MRotaryEmbedding(torch.nn.Module):
    """Multimodal RoPE (Qwen2-VL): three position axes (temporal, height, width).

    The head dim's frequency slots are split into `mrope_section` = [t, h, w] groups; slot group i takes its
    angle from axis i. Text tokens have the same position on all three axes, which reduces to plain RoPE.
    cos / sin tables are precomputed up to `max_position` and gathered per step (no trig in the hot path).

    `interleaved` (Qwen3-VL) assigns the slots round-robin instead of in blocks: slot j follows the height
    axis when j % 3 == 1 and j < 3 * h, the width axis when j % 3 == 2 and j < 3 * w, else the temporal axis.
    """

    def __init__(
        self,
        head_dim: int,
        theta: float,
        mrope_section: list[int],
        max_position: int,
        interleaved: bool = False,
    ) -> None:
        super().__init__()
        if sum(mrope_section) != head_dim // 2:
            raise ValueError(
                f"mrope_section {mrope_section} must sum to head_dim // 2 = {head_dim // 2}; "
                "fix rope_scaling.mrope_section in config.json"
            )
        self.head_dim = head_dim
        self.theta = theta
        self.mrope_section = list(mrope_section)
        self.max_position = max_position
        self.interleaved = interleaved
        self.register_buffer("cos_sin_cache", self._table(torch.device("cpu")), persistent=False)
        # slot -> axis: which position axis drives each of the head_dim // 2 frequency slots.
        self.register_buffer("slot_axis", self._slot_axis(torch.device("cpu")), persistent=False)

    def _slot_axis(self, device: torch.device) -> torch.Tensor:
        if not self.interleaved:
            return torch.cat([torch.full((n,), i, device=device) for i, n in enumerate(self.mrope_section)])
        j = torch.arange(self.head_dim // 2, device=device)
        axis = torch.zeros_like(j)
        axis[(j % 3 == 1) & (j < 3 * self.mrope_section[1])] = 1
        axis[(j % 3 == 2) & (j < 3 * self.mrope_section[2])] = 2
        return axis

    def _table(self, device: torch.device) -> torch.Tensor:
        inv_freq = inverse_frequencies(self.head_dim, self.theta, device)
        t = torch.arange(self.max_position, dtype=torch.float32, device=device)
        freqs = torch.outer(t, inv_freq)  # (P, D/2)
        return torch.cat([freqs.cos(), freqs.sin()], dim=-1)  # (P, D)

    def rebuild(self, device: torch.device) -> None:
        """Recompute the tables on `device` (after the module was created on the meta device)."""
        self.cos_sin_cache = self._table(device)
        self.slot_axis = self._slot_axis(device)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (3, T) or (T,) int64 -> cos, sin (T, D) float32."""
        half = self.head_dim // 2
        if positions.dim() == 1:
            cs = self.cos_sin_cache[positions]  # (T, D)
            cos, sin = cs[:, :half], cs[:, half:]
        else:
            cs = self.cos_sin_cache[positions]  # (3, T, D)
            slots = torch.arange(half, device=positions.device)
            cos = cs[self.slot_axis, :, slots].transpose(0, 1)  # (T, D/2)
            sin = cs[self.slot_axis, :, half + slots].transpose(0, 1)
        return torch.cat([cos, cos], dim=-1), torch.cat([sin, sin], dim=-1)
