"""Oracles for the kernel tests, written here independently of ``fastprune.ops``' references.

Taylor partials are formed in float64 (exact products of fp16/bf16 inputs, exact sums for these
sizes up to rounding far below any tolerance) block by block; the gather copies one slice at a time.
Inputs are fresh random tensors in odd, strided and transposed layouts.
"""

from __future__ import annotations

import math

import torch

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# relative to max(1, largest |w*g| block sum): kernels multiply in fp32 and add in fp32 in their own
# order, the oracle in float64; fp32 products round where fp16/bf16 ones are exact
TAYLOR_TOL = {torch.float32: 2e-5, torch.float16: 1e-5, torch.bfloat16: 1e-5}
LAYOUTS = ("contiguous", "transposed", "sliced")


def matrix(shape, dtype, layout="contiguous", device="cpu") -> torch.Tensor:
    """A fresh random (R, C) tensor: contiguous, a transposed view or a strided slice."""
    r, c = shape
    if layout == "transposed":
        return torch.randn(c, r, device=device).to(dtype).t()
    if layout == "sliced":
        return torch.randn(2 * r + 1, c + 3, device=device).to(dtype)[1::2, 2:-1]
    return torch.randn(r, c, device=device).to(dtype)


def taylor_oracle(w: torch.Tensor, g: torch.Tensor, row_block: int, col_block: int):
    """(3, R/row_block) and (3, C/col_block) float64 sums of |w*g|, w*g, (w*g)^2 per block."""
    p = w.double().cpu() * g.double().cpu()
    r, c = p.shape
    rows = torch.zeros(3, r // row_block, dtype=torch.float64)
    cols = torch.zeros(3, c // col_block, dtype=torch.float64)
    for b in range(r // row_block):
        block = p[b * row_block:(b + 1) * row_block]
        rows[:, b] = torch.stack([block.abs().sum(), block.sum(), (block * block).sum()])
    for b in range(c // col_block):
        block = p[:, b * col_block:(b + 1) * col_block]
        cols[:, b] = torch.stack([block.abs().sum(), block.sum(), (block * block).sum()])
    return rows, cols


def assert_taylor_close(rows, cols, rows0, cols0, w, g, row_block, col_block):
    """``rows``/``cols`` equal ``rows0``/``cols0`` plus the oracle's sums, within the dtype's tolerance."""
    want_rows, want_cols = taylor_oracle(w, g, row_block, col_block)
    scale = max(want_rows[0].max().item() if want_rows.numel() else 0.0,
                want_cols[0].max().item() if want_cols.numel() else 0.0, 1.0)
    tol = TAYLOR_TOL[w.dtype]
    for got, start, want in ((rows, rows0, want_rows), (cols, cols0, want_cols)):
        torch.testing.assert_close(got.double().cpu() - start.double().cpu(), want, rtol=tol, atol=tol * scale)


def gather_oracle(src: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
    """One slice per kept index, stacked back along ``dim``."""
    dim = dim % src.dim()
    picked = [src.select(dim, i) for i in index.tolist()]
    if not picked:
        shape = list(src.shape)
        shape[dim] = 0
        return src.new_empty(shape)
    return torch.stack(picked, dim)


def kept(n: int, kind: str = "random", device="cpu") -> torch.Tensor:
    """Sorted distinct indices into ``range(n)``: a random subset (never empty), all, one or none."""
    if kind == "all":
        return torch.arange(n, device=device)
    if kind == "empty":
        return torch.empty(0, dtype=torch.long, device=device)
    if kind == "one":
        return torch.randint(n, (1,), device=device)
    keep = torch.rand(n) < 0.6
    keep[torch.randint(n, (1,))] = True
    return keep.nonzero().flatten().to(device)


def poison_allocator(nbytes: int, device) -> None:
    """Fill and free a block, so that an output allocated next likely starts as NaN garbage."""
    junk = torch.full((max(nbytes, 4) // 4 + 64,), math.nan, device=device)
    del junk
