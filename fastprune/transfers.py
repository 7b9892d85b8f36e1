"""Host <-> device copies made once per batch of tensors, so the hot path does not synchronise per tensor.

A pageable host tensor copied to a GPU makes the host wait for the copy; pinned memory copied with
``non_blocking=True`` does not (PyTorch's caching host allocator keeps the pinned buffer alive until
the copy has run).  Several small tensors travel as one flat buffer.
"""

from __future__ import annotations

import torch


def upload(tensors: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Host ``tensors`` (one dtype) on ``device``, copied as one buffer without blocking the host."""
    if device.type == "cpu" or not tensors:
        return list(tensors)
    flat = torch.cat([t.reshape(-1) for t in tensors])
    if device.type == "cuda":
        flat = flat.pin_memory()
    flat = flat.to(device, non_blocking=True)
    return [part.view(t.shape) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors)]


def download(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """``tensors`` (one dtype) on the host, each device's share moved in one copy."""
    out: list[torch.Tensor | None] = [None] * len(tensors)
    by_device: dict[torch.device, list[int]] = {}
    for i, t in enumerate(tensors):
        by_device.setdefault(t.device, []).append(i)
    for device, positions in by_device.items():
        parts = [tensors[i] for i in positions]
        if device.type == "cpu":
            host = parts
        else:
            flat = torch.cat([t.reshape(-1) for t in parts]).cpu()
            host = [p.view(t.shape) for p, t in zip(flat.split([t.numel() for t in parts]), parts)]
        for i, t in zip(positions, host):
            out[i] = t
    return out  # type: ignore[return-value]
