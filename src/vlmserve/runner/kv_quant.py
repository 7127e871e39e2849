"""What a KV cache stores its keys and values in, and the conversions in and out of it.

`kv_cache_dtype="fp8"` stores e4m3 with a per-tensor scale: half the bytes of bf16, so twice the blocks in
the same memory. The scale is 1.0, vLLM's default for checkpoints that carry no calibrated k/v scales (no
released Qwen VL checkpoint does): e4m3 covers +-448 with 3 mantissa bits, and values beyond are clamped,
not turned into NaN (a plain cast to e4m3fn would). Attention reads the cache back through `from_cache`
(torch) or converts after its loads (the Triton decode kernel).
"""

from __future__ import annotations

import torch

from vlmserve.models.layers.fused import AVAILABLE as TRITON

if TRITON:
    import triton
    import triton.language as tl

FP8_KV = torch.float8_e4m3fn
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")
# The per-tensor scale of every layer's K and V (stored = value / scale).
FP8_KV_SCALE = 1.0
_FP8_MAX = torch.finfo(FP8_KV).max


def kv_storage_dtype(
    kv_cache_dtype: str, model_dtype: torch.dtype, device: torch.device | None = None
) -> torch.dtype:
    """'auto': the model's dtype; 'fp8' / 'fp8_e4m3': float8 e4m3 (on a GPU: one with FP8, 8.9+)."""
    if kv_cache_dtype == "auto":
        return model_dtype
    if kv_cache_dtype in ("fp8", "fp8_e4m3"):
        if device is not None and device.type == "cuda":
            cap = tuple(torch.cuda.get_device_capability(device))
            if cap < (8, 9):
                raise ValueError(
                    f"kv_cache_dtype={kv_cache_dtype!r} needs a GPU with FP8 (compute capability >= 8.9: Ada, "
                    f"Hopper or newer); this one has {cap[0]}.{cap[1]}. Use kv_cache_dtype='auto'"
                )
        return FP8_KV
    raise ValueError(
        f"kv_cache_dtype {kv_cache_dtype!r} is not supported; use one of {', '.join(KV_CACHE_DTYPES)}"
    )


def to_cache(x: torch.Tensor, cache_dtype: torch.dtype) -> torch.Tensor:
    """New keys / values in the cache's dtype (a no-op when they already are)."""
    if cache_dtype != FP8_KV:
        return x.to(cache_dtype)
    return (x.float() / FP8_KV_SCALE).clamp(-_FP8_MAX, _FP8_MAX).to(FP8_KV)


def from_cache(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cached keys / values in the compute dtype."""
    if x.dtype != FP8_KV:
        return x.to(dtype)
    out = x.to(dtype)
    return out if FP8_KV_SCALE == 1.0 else out * FP8_KV_SCALE


def write_slots(cache: torch.Tensor, slots: torch.Tensor, x: torch.Tensor) -> None:
    """cache (N, page, Hkv, D)[slot] = x (T, Hkv, D) in the cache's dtype, for each new token's slot."""
    _, _, hkv, dim = cache.shape
    new = to_cache(x, cache.dtype)
    if cache.dtype == FP8_KV:  # index_copy_ has no float8 kernel: copy the same bytes as uint8
        cache, new = cache.view(torch.uint8), new.view(torch.uint8)
    cache.view(-1, hkv, dim).index_copy_(0, slots, new)


if TRITON:

    @triton.jit
    def _write_kv_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, slots_ptr, stride_kt, stride_kh, stride_vt, stride_vh,
                         HEADS: tl.constexpr, DIM: tl.constexpr, BLOCK_H: tl.constexpr):  # fmt: skip
        # One program per token: its keys and values (all KV heads) into its cache slot.
        t = tl.program_id(0)
        slot = tl.load(slots_ptr + t)
        h = tl.arange(0, BLOCK_H)[:, None]
        d = tl.arange(0, DIM)[None, :]
        ok = h < HEADS
        dst = slot * (HEADS * DIM) + h * DIM + d
        tl.store(kc_ptr + dst, tl.load(k_ptr + t * stride_kt + h * stride_kh + d, mask=ok), mask=ok)
        tl.store(vc_ptr + dst, tl.load(v_ptr + t * stride_vt + h * stride_vh + d, mask=ok), mask=ok)


def write_kv(
    k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> None:
    """write_slots for the keys and the values at once: one launch on the GPU where the cache holds the
    model's dtype (a power-of-two head dim, unit last strides); otherwise the two copies."""
    _, _, hkv, dim = k_cache.shape
    if (
        TRITON
        and k_cache.is_cuda
        and k_cache.dtype == k.dtype == v.dtype
        and k.shape[0]
        and dim == triton.next_power_of_2(dim)
        and k.stride(2) == 1
        and v.stride(2) == 1
    ):
        _write_kv_kernel[(k.shape[0],)](
            k, v, k_cache, v_cache, slots, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            HEADS=hkv, DIM=dim, BLOCK_H=triton.next_power_of_2(hkv),
        )  # fmt: skip
        return
    write_slots(k_cache, slots, k)
    write_slots(v_cache, slots, v)


def gather(cache: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """cache.index_select(0, index), for FP8 caches too (gathered as bytes: float8 index kernels are not
    on every device)."""
    if cache.dtype == FP8_KV:
        return cache.view(torch.uint8).index_select(0, index).view(FP8_KV)
    return cache.index_select(0, index)
