"""Moving host tensors to a device without stalling the host."""

from __future__ import annotations

import torch


def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A host tensor on `device` without waiting for the device: a plain `.to(cuda)` from pageable memory
    synchronises the stream, which would stall the host until every queued kernel has run. Through pinned
    memory the copy is queued like a kernel."""
    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
