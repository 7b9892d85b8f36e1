"""Fused Taylor partial scores: one read of ``weight`` and ``grad``, row and column sums of w*g.

Design (deterministic two-stage reduction, no atomics):

* The (R, C) matrix is cut into BLOCK_R x BLOCK_C tiles.  Program ``(pr, pc)`` owns the row
  strip ``pr`` and a contiguous run of ``tiles_per_prog`` column tiles in it.  Per tile it
  loads w and g once (cast to fp32), forms p = w*g and reduces |p|, p and p^2

  - along columns into register row accumulators (kept across its column tiles), and
  - along rows into the column partials of that tile, stored once to ``col_part[pr]``.

  At the end it stores its row accumulators to ``row_part[pc]``.  Every partial slot is
  written by exactly one program, so the buffers need no zeroing.
* A small second stage (two ``torch.sum`` calls) adds the partials over programs and over
  ``row_block``/``col_block`` groups into the caller's accumulators.

Why not ``tl.atomic_add``: fp32 atomics make the scores depend on scheduling order, and
pruning ranks near-ties, so plans could change between runs.  The price of determinism is
the partial buffers: ``12 * R * C / BLOCK_R`` bytes of column partials, written once and read
once by the second stage (about 5 % on top of the 4 bytes per element of bf16 inputs at
BLOCK_R = 128), plus ``12 * R * split_c`` bytes of row partials.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_utils import device_guard, pow2_block, target_programs


@triton.jit
def _taylor_partials_kernel(w_ptr, g_ptr, row_part_ptr, col_part_ptr, R, C,
                            stride_wr, stride_wc, stride_gr, stride_gc, tiles_per_prog,
                            BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = r < R
    r64 = r.to(tl.int64)[:, None]
    w_rows = w_ptr + r64 * stride_wr
    g_rows = g_ptr + r64 * stride_gr
    row_abs = tl.zeros([BLOCK_R], dtype=tl.float32)
    row_lin = tl.zeros([BLOCK_R], dtype=tl.float32)
    row_sq = tl.zeros([BLOCK_R], dtype=tl.float32)
    col_base = col_part_ptr + pid_r.to(tl.int64) * 3 * C
    first_tile = pid_c * tiles_per_prog
    for t in range(0, tiles_per_prog):
        c = (first_tile + t) * BLOCK_C + tl.arange(0, BLOCK_C)
        c_mask = c < C
        c64 = c.to(tl.int64)[None, :]
        mask = r_mask[:, None] & c_mask[None, :]
        w = tl.load(w_rows + c64 * stride_wc, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_rows + c64 * stride_gc, mask=mask, other=0.0).to(tl.float32)
        p = w * g
        a = tl.abs(p)
        s = p * p
        row_abs += tl.sum(a, axis=1)
        row_lin += tl.sum(p, axis=1)
        row_sq += tl.sum(s, axis=1)
        tl.store(col_base + c, tl.sum(a, axis=0), mask=c_mask)
        tl.store(col_base + C + c, tl.sum(p, axis=0), mask=c_mask)
        tl.store(col_base + 2 * C + c, tl.sum(s, axis=0), mask=c_mask)
    row_base = row_part_ptr + pid_c.to(tl.int64) * 3 * R
    tl.store(row_base + r, row_abs, mask=r_mask)
    tl.store(row_base + R + r, row_lin, mask=r_mask)
    tl.store(row_base + 2 * R + r, row_sq, mask=r_mask)


def taylor_accumulate(weight: torch.Tensor, grad: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                      row_block: int = 1, col_block: int = 1, *, block_r: int | None = None,
                      block_c: int | None = None, split_c: int | None = None) -> None:
    """Add per-block sums of |w*g|, w*g, (w*g)^2 into ``rows`` (3, R//row_block) and ``cols``.

    Arguments as checked by ``fastprune.ops.check_taylor``.  ``block_r``/``block_c`` (powers of
    two) and ``split_c`` (programs per row strip) override the launch configuration; tests use
    them to exercise multi-tile paths on small shapes.
    """
    R, C = weight.shape
    if R == 0 or C == 0:
        return
    # Tiles are wide along the contiguous dim; 128 x 64 keeps ~64 fp32 values of w and g per
    # thread at 4 warps on H100 (fixed sizes: autotuning would re-run the kernel under the
    # interpreter and on every new shape during streaming scoring).
    block_r = block_r or pow2_block(R, 128)
    block_c = block_c or pow2_block(C, 64)
    n_row_tiles = triton.cdiv(R, block_r)
    n_col_tiles = triton.cdiv(C, block_c)
    if split_c is None:
        split_c = triton.cdiv(target_programs(weight), n_row_tiles)
    tiles_per_prog = triton.cdiv(n_col_tiles, max(1, min(split_c, n_col_tiles)))
    split_c = triton.cdiv(n_col_tiles, tiles_per_prog)
    row_part = torch.empty(split_c, 3, R, dtype=torch.float32, device=weight.device)
    col_part = torch.empty(n_row_tiles, 3, C, dtype=torch.float32, device=weight.device)
    with device_guard(weight):
        _taylor_partials_kernel[(n_row_tiles, split_c)](
            weight, grad, row_part, col_part, R, C, weight.stride(0), weight.stride(1),
            grad.stride(0), grad.stride(1), tiles_per_prog, BLOCK_R=block_r, BLOCK_C=block_c,
            num_warps=4)
    rows += row_part.sum(0).view(3, R // row_block, row_block).sum(2)
    cols += col_part.sum(0).view(3, C // col_block, col_block).sum(2)
