"""Compaction copy: ``src.index_select(dim, index)`` into a new contiguous tensor in one pass.

``src`` is viewed as (A, K, B) around ``dim`` (A = product of the dims before it, B of those
after it) and the output as a row-major 2-D matrix that is tiled BLOCK_M x BLOCK_N:

* ``B == 1`` (gathering the last dim, e.g. input columns of a weight): output (A, K'),
  element (a, k) reads ``src[a, index[k]]``.
* otherwise (e.g. output rows of a weight): output (A*K', B), row m = (a, k) reads the
  contiguous row ``src[a, index[k], :]``, so each tile reads whole runs along B.

Values are copied bit for bit through a same-width integer view, so any 1-, 2-, 4- or 8-byte
dtype works.  Wider elements (complex128) and N-D views whose dims around ``dim`` cannot be merged
into (A, K, B) without a copy go through ``index_select``, which is the reference's single copy.

Out-of-range indices: the kernel never reads outside ``src`` (an index outside [0, K) masks its
loads) and raises a flag, which ``torch._assert_async`` turns into an error without synchronising
the device (at once on the CPU, where Triton runs under its interpreter).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .triton_utils import device_guard, pow2_block

_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@triton.jit
def _gather_kernel(src_ptr, idx_ptr, out_ptr, bad_ptr, M, N, K_out, K_src, stride_a, stride_k, stride_b,
                   GATHER_LAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # One grid axis (CUDA caps the others at 65535), split into (tile of M, tile of N).
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(N, BLOCK_N)
    m = (pid // n_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
    n = (pid % n_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = m < M
    n_mask = n < N
    mask = m_mask[:, None] & n_mask[None, :]
    m64 = m.to(tl.int64)
    n64 = n.to(tl.int64)
    if GATHER_LAST:
        k = tl.load(idx_ptr + n64, mask=n_mask, other=0)
        bad = n_mask & ((k < 0) | (k >= K_src))
        tl.store(bad_ptr + n64 * 0, tl.full([BLOCK_N], 1, tl.int32), mask=bad)
        offs = m64[:, None] * stride_a + k[None, :] * stride_k
        mask = mask & ~bad[None, :]
    else:
        k = tl.load(idx_ptr + m64 % K_out, mask=m_mask, other=0)
        bad = m_mask & ((k < 0) | (k >= K_src))
        tl.store(bad_ptr + m64 * 0, tl.full([BLOCK_M], 1, tl.int32), mask=bad)
        offs = (m64 // K_out * stride_a + k * stride_k)[:, None] + n64[None, :] * stride_b
        mask = mask & ~bad[:, None]
    vals = tl.load(src_ptr + offs, mask=mask, other=0)
    tl.store(out_ptr + m64[:, None] * N + n64[None, :], vals, mask=mask)


def gather(src: torch.Tensor, dim: int, index: torch.Tensor, *, block_m: int | None = None,
           block_n: int | None = None) -> torch.Tensor:
    """Copy ``src`` keeping the sorted, distinct ``index`` along ``dim`` into a contiguous tensor.

    Arguments as checked by ``fastprune.ops.check_gather``; ``block_m``/``block_n`` (powers of two)
    override the tile size.
    """
    dim = dim % src.dim()
    shape = list(src.shape)
    A, K, B = math.prod(shape[:dim]), shape[dim], math.prod(shape[dim + 1:])
    shape[dim] = index.numel()
    int_dtype = _INT_OF_SIZE.get(src.element_size())
    try:
        src3 = src.view(A, K, B)
    except RuntimeError:
        src3 = None
    if int_dtype is None or src3 is None:
        return src.index_select(dim, index).contiguous()
    out = torch.empty(shape, dtype=src.dtype, device=src.device)
    if out.numel() == 0:
        return out
    src3 = src3.view(int_dtype)
    bad = torch.zeros(1, dtype=torch.int32, device=src.device)
    gather_last = B == 1
    M, N = (A, index.numel()) if gather_last else (A * index.numel(), B)
    block_m = block_m or pow2_block(M, 32, floor=1)
    block_n = block_n or pow2_block(N, 128)
    grid = (triton.cdiv(M, block_m) * triton.cdiv(N, block_n),)
    with device_guard(src):
        _gather_kernel[grid](src3, index, out.view(int_dtype), bad, M, N, index.numel(), K, src3.stride(0),
                             src3.stride(1), src3.stride(2), GATHER_LAST=gather_last,
                             BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4)
    torch._assert_async(bad[0] == 0, f"gather: index has values out of range [0, {K}) for dim {dim} of src with "
                        f"shape {tuple(src.shape)}")
    return out
