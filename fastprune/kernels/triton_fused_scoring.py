"""Taylor partials of a linear layer straight from its backward pass: the weight gradient is never stored.

A linear layer ``y = x W^T`` has the weight gradient ``G = gy^T x`` (summed over tokens).  The kernel
computes G tile by tile (BLOCK_R x BLOCK_C, a loop over tokens with ``tl.dot``, fp32 accumulation),
multiplies the tile by the weight tile and reduces p = w*g into |p|, p and p^2 row sums and column
sums in its epilogue, as :mod:`triton_taylor` does for a stored gradient.  Every partial slot is
written by exactly one program (no atomics, so the scores do not depend on scheduling); a second
stage adds them over programs and over ``row_block``/``col_block`` groups.

fp32 inputs (and every input under the interpreter, which has no bf16 matrix product) multiply in
full fp32 (``input_precision="ieee"``); fp16/bf16 on a GPU use the tensor-core product with fp32
accumulation.  This is an opt-in path (``fastprune.importance.score(fused_linear=True)``): it is
checked against an oracle under ``TRITON_INTERPRET=1`` on small shapes and has not run on a GPU yet.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_utils import device_guard


@triton.jit
def _wgrad_taylor_kernel(gy_ptr, x_ptr, w_ptr, row_part_ptr, col_part_ptr, T, R, C,
                         stride_gt, stride_gr, stride_xt, stride_xc, stride_wr, stride_wc,
                         FP32_DOT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                         BLOCK_T: tl.constexpr):
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    r_mask = r < R
    c_mask = c < C
    r64 = r.to(tl.int64)
    c64 = c.to(tl.int64)
    acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        t = (t0 + tl.arange(0, BLOCK_T)).to(tl.int64)
        t_mask = t < T
        gy_t = tl.load(gy_ptr + t[None, :] * stride_gt + r64[:, None] * stride_gr,
                       mask=r_mask[:, None] & t_mask[None, :], other=0.0)  # (BLOCK_R, BLOCK_T): gy^T
        x = tl.load(x_ptr + t[:, None] * stride_xt + c64[None, :] * stride_xc,
                    mask=t_mask[:, None] & c_mask[None, :], other=0.0)  # (BLOCK_T, BLOCK_C)
        if FP32_DOT:
            acc += tl.dot(gy_t.to(tl.float32), x.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(gy_t, x)
    mask = r_mask[:, None] & c_mask[None, :]
    w = tl.load(w_ptr + r64[:, None] * stride_wr + c64[None, :] * stride_wc, mask=mask, other=0.0).to(tl.float32)
    p = w * acc
    a = tl.abs(p)
    s = p * p
    row_base = row_part_ptr + pid_c.to(tl.int64) * 3 * R
    tl.store(row_base + r64, tl.sum(a, axis=1), mask=r_mask)
    tl.store(row_base + R + r64, tl.sum(p, axis=1), mask=r_mask)
    tl.store(row_base + 2 * R + r64, tl.sum(s, axis=1), mask=r_mask)
    col_base = col_part_ptr + pid_r.to(tl.int64) * 3 * C
    tl.store(col_base + c64, tl.sum(a, axis=0), mask=c_mask)
    tl.store(col_base + C + c64, tl.sum(p, axis=0), mask=c_mask)
    tl.store(col_base + 2 * C + c64, tl.sum(s, axis=0), mask=c_mask)


def linear_taylor_accumulate(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rows: torch.Tensor,
                             cols: torch.Tensor, row_block: int = 1, col_block: int = 1, *, block_r: int = 64,
                             block_c: int = 64, block_t: int = 32) -> None:
    """Add the Taylor partials of ``weight`` * (``grad_out``^T ``x``) into ``rows`` (3, R//row_block) and ``cols``.

    ``grad_out`` is (T, R), ``x`` (T, C), ``weight`` (R, C), one dtype; ``rows``/``cols`` fp32, as
    ``fastprune.ops.taylor_accumulate_`` takes them.  Block sizes are powers of two, at least 16.
    """
    T, R = grad_out.shape
    C = x.shape[1]
    if x.shape[0] != T or weight.shape != (R, C) or not (grad_out.dtype == x.dtype == weight.dtype):
        raise ValueError(f"linear_taylor_accumulate: grad_out (T, R), x (T, C) and weight (R, C) of one dtype, got "
                         f"{tuple(grad_out.shape)} {grad_out.dtype}, {tuple(x.shape)} {x.dtype}, "
                         f"{tuple(weight.shape)} {weight.dtype}")
    n_r, n_c = triton.cdiv(R, block_r), triton.cdiv(C, block_c)
    row_part = torch.empty(n_c, 3, R, dtype=torch.float32, device=weight.device)
    col_part = torch.empty(n_r, 3, C, dtype=torch.float32, device=weight.device)
    with device_guard(weight):
        _wgrad_taylor_kernel[(n_r, n_c)](
            grad_out, x, weight, row_part, col_part, T, R, C, grad_out.stride(0), grad_out.stride(1),
            x.stride(0), x.stride(1), weight.stride(0), weight.stride(1),
            FP32_DOT=weight.dtype == torch.float32 or not weight.is_cuda,
            BLOCK_R=block_r, BLOCK_C=block_c, BLOCK_T=block_t, num_warps=4)
    rows += row_part.sum(0).view(3, R // row_block, row_block).sum(2)
    cols += col_part.sum(0).view(3, C // col_block, col_block).sum(2)
