"""Small launch helpers shared by the Triton kernels."""

from __future__ import annotations

import contextlib
import functools

import torch


def device_guard(t: torch.Tensor):
    """Make ``t``'s GPU the current one while launching (no-op for CPU tensors)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def target_programs(t: torch.Tensor) -> int:
    """About how many programs fill the device holding ``t`` (a few per SM)."""
    if t.is_cuda:
        return 4 * _sm_count(t.device.index)
    return 8  # interpreter: few programs keep it fast


def pow2_block(n: int, cap: int, floor: int = 16) -> int:
    """Smallest power of two >= ``n`` clamped to [floor, cap]."""
    return max(floor, min(cap, 1 << max(n - 1, 0).bit_length()))
