"""fastprune's hot paths as PyTorch operators, each declared once in the ``fastprune`` namespace.

Every op has a schema (from the signature below), a fake implementation (shapes only: meta and
fake tensors, ``torch.compile``) and a pure-PyTorch reference registered as its default kernel
(``CompositeExplicitAutograd``): the reference runs wherever no compiled kernel serves the tensors'
device, and it is the oracle the compiled kernels are checked against.  The compiled kernels (C++
on the CPU, CUDA, Triton) register per device type with PyTorch's dispatcher from
:mod:`fastprune.backends` when ``fastprune`` is imported; callers call the op and never branch on
what runs.

Arguments are validated in one place per op (:func:`check_taylor`, :func:`check_gather`), before
any backend runs: the default kernel calls it, and :mod:`fastprune.backends` wraps every compiled
kernel with it.  The checks read shapes, dtypes and devices only, never tensor data, so they cost
no device synchronisation; each backend refuses out-of-range gather indices itself as it reads
them (see :func:`gather`).

Ops
---
``taylor_accumulate_(weight, grad, rows, cols, row_block, col_block)``
    For 2-D ``weight``/``grad`` of shape (R, C) and fp32 accumulators ``rows`` (3, R //
    row_block) and ``cols`` (3, C // col_block), adds per block of rows/columns:
    channel 0: sum |w*g|, channel 1: sum w*g, channel 2: sum (w*g)^2.
``gather(src, dim, index) -> Tensor``
    ``src.index_select(dim, index)`` into a new contiguous tensor (the compaction copy);
    ``index`` is a 1-D int64 tensor on ``src``'s device, sorted and distinct by contract.
``taylor_partials(weight, grad, row_block, col_block) -> (rows, cols)``
    The Taylor sums into fresh zeroed accumulators (a plain function over the op).
"""

from __future__ import annotations

import torch

__all__ = ["check_gather", "check_taylor", "gather", "gather_reference", "taylor_accumulate_",
           "taylor_accumulate_reference", "taylor_partials"]


# ---------------------------------------------------------------- validation (the one place)

def check_taylor(weight: torch.Tensor, grad: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                 row_block: int = 1, col_block: int = 1) -> None:
    """Raise ``ValueError`` naming the first problem with ``taylor_accumulate_``'s arguments."""
    if weight.dim() != 2 or grad.shape != weight.shape:
        raise ValueError(f"taylor: weight must be 2-D and grad the same shape, got "
                         f"{tuple(weight.shape)} and {tuple(grad.shape)}")
    if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16) or grad.dtype != weight.dtype:
        raise ValueError(f"taylor: weight and grad must share one dtype of float32, float16 or bfloat16, got "
                         f"{weight.dtype} and {grad.dtype}")
    r, c = weight.shape
    if row_block < 1 or col_block < 1 or r % row_block or c % col_block:
        raise ValueError(f"taylor: blocks ({row_block}, {col_block}) must divide the shape ({r}, {c})")
    if rows.shape != (3, r // row_block) or cols.shape != (3, c // col_block):
        raise ValueError(f"taylor: accumulators must be (3, {r // row_block}) and (3, {c // col_block}), "
                         f"got {tuple(rows.shape)} and {tuple(cols.shape)}")
    if rows.dtype != torch.float32 or cols.dtype != torch.float32:
        raise ValueError("taylor: accumulators must be float32")
    for name, t in (("grad", grad), ("rows", rows), ("cols", cols)):
        if t.device != weight.device:
            raise ValueError(f"taylor: {name} must be on {weight.device} like weight, got {t.device}")


def check_gather(src: torch.Tensor, dim: int, index: torch.Tensor) -> None:
    """Raise ``ValueError`` naming the first problem with ``gather``'s arguments."""
    if index.dim() != 1 or index.dtype != torch.long:
        raise ValueError(f"gather: index must be 1-D int64, got {index.dim()}-D {index.dtype}")
    if not -src.dim() <= dim < src.dim():
        raise ValueError(f"gather: dim {dim} out of range for a {src.dim()}-D tensor")
    if index.device != src.device:
        raise ValueError(f"gather: index must be on {src.device} like src, got {index.device}")


# ---------------------------------------------------------------- references

def taylor_accumulate_reference(weight: torch.Tensor, grad: torch.Tensor, rows: torch.Tensor,
                                cols: torch.Tensor, row_block: int = 1, col_block: int = 1) -> None:
    """Pure-PyTorch ``taylor_accumulate_`` (fp32 accumulation); the default kernel."""
    wg = weight.float() * grad.float()
    r, c = wg.shape
    for k, term in enumerate((wg.abs(), wg, wg.square())):
        rows[k] += term.sum(1).view(r // row_block, row_block).sum(1)
        cols[k] += term.sum(0).view(c // col_block, col_block).sum(1)


def gather_reference(src: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
    """Pure-PyTorch ``gather``; the default kernel (``index_select`` refuses out-of-range indices)."""
    return src.index_select(dim, index).contiguous()


# ---------------------------------------------------------------- op declarations

@torch.library.custom_op("fastprune::taylor_accumulate_", mutates_args=("rows", "cols"))
def taylor_accumulate_(weight: torch.Tensor, grad: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                       row_block: int = 1, col_block: int = 1) -> None:
    """Add |w*g|, w*g and (w*g)^2 summed over row/column blocks into ``rows``/``cols``."""
    check_taylor(weight, grad, rows, cols, row_block, col_block)
    taylor_accumulate_reference(weight, grad, rows, cols, row_block, col_block)


@taylor_accumulate_.register_fake
def _(weight, grad, rows, cols, row_block=1, col_block=1):
    check_taylor(weight, grad, rows, cols, row_block, col_block)


@torch.library.custom_op("fastprune::gather", mutates_args=())
def gather(src: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
    """Copy ``src`` keeping ``index`` (sorted, distinct) along ``dim`` into a compact tensor."""
    check_gather(src, dim, index)
    return gather_reference(src, dim % src.dim(), index)


@gather.register_fake
def _(src, dim, index):
    check_gather(src, dim, index)
    shape = list(src.shape)
    shape[dim % src.dim()] = index.shape[0]
    return src.new_empty(shape)


def taylor_partials(weight: torch.Tensor, grad: torch.Tensor, row_block: int = 1,
                    col_block: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Fresh (3, R//row_block) and (3, C//col_block) fp32 Taylor partial sums of w*g."""
    r, c = weight.shape
    rows = torch.zeros(3, r // max(row_block, 1), dtype=torch.float32, device=weight.device)
    cols = torch.zeros(3, c // max(col_block, 1), dtype=torch.float32, device=weight.device)
    taylor_accumulate_(weight, grad, rows, cols, row_block, col_block)
    return rows, cols
