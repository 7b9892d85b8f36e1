"""Compiled hot paths, declared once with ``torch.library`` in the ``fastprune`` namespace.

Every op has a pure-PyTorch reference (the default implementation and the test oracle)
and a fake implementation.  Compiled backends (C++ on the CPU, CUDA, Triton) register
themselves with :func:`register_backend`; callers never branch on which one runs.

Backend choice: ``FASTPRUNE_BACKEND`` (or :func:`set_backend`) is one of ``auto``,
``reference``, ``cpp``, ``cuda``, ``triton``.  ``auto`` picks the C++ kernels for CPU
tensors when the extension is built and the reference elsewhere; the CUDA and Triton
backends are opt-in.  :func:`last_backend` says which implementation ran last per op.

Ops
---
``taylor_accumulate_(weight, grad, rows, cols, row_block, col_block)``
    For 2-D ``weight``/``grad`` of shape (R, C) and fp32 accumulators ``rows`` (3, R //
    row_block) and ``cols`` (3, C // col_block), adds per block of rows/columns:
    channel 0: sum |w*g|, channel 1: sum w*g, channel 2: sum (w*g)^2.
``taylor_partials(weight, grad, row_block, col_block) -> (rows, cols)``
    The same sums into fresh zeroed accumulators.
``gather(src, dim, index) -> Tensor``
    ``src.index_select(dim, index)`` into a new contiguous tensor (the compaction copy);
    ``index`` is a sorted 1-D int64 tensor of distinct in-range indices.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable

import torch

from fastprune.native_build import unavailable_message

BACKENDS = ("auto", "reference", "cpp", "cuda", "triton")
_backend_override: str | None = None
_impls: dict[str, dict[tuple[str, str], Callable]] = {"taylor_accumulate_": {}, "gather": {}}
_last: dict[str, str] = {}
_extension_tried = False


def set_backend(name: str | None) -> None:
    """Choose the backend for every op (``None`` returns to ``FASTPRUNE_BACKEND``/auto)."""
    if name is not None and name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {BACKENDS}")
    global _backend_override
    _backend_override = name


def get_backend() -> str:
    """The configured backend name (``auto`` unless set)."""
    name = _backend_override or os.environ.get("FASTPRUNE_BACKEND", "auto")
    if name not in BACKENDS:
        raise ValueError(f"FASTPRUNE_BACKEND={name!r} is not one of {BACKENDS}")
    return name


def last_backend(op: str) -> str | None:
    """Which implementation ran the last call of ``op`` (``reference``, ``cpp``, ...)."""
    return _last.get(op)


def register_backend(op: str, backend: str, device_type: str, fn: Callable) -> None:
    """Make ``fn`` the ``backend`` implementation of ``op`` for ``device_type`` tensors."""
    _impls[op][(backend, device_type)] = fn


def available_backends(device_type: str = "cpu") -> list[str]:
    """Backends with an implementation of every op for ``device_type``."""
    _load_extensions()
    names = ["reference"]
    for b in ("cpp", "cuda", "triton"):
        if all((b, device_type) in table for table in _impls.values()):
            names.append(b)
    return names


def _load_extensions() -> None:
    global _extension_tried
    if _extension_tried:
        return
    _extension_tried = True
    try:
        from fastprune import _native  # noqa: F401  (registers its backends on import)
    except ImportError as exc:
        warnings.warn(unavailable_message(exc), RuntimeWarning, stacklevel=3)
    try:
        import fastprune.kernels.registry  # noqa: F401  (Triton kernels; registers on import)
    except ImportError:
        pass


def _choose(op: str, device_type: str) -> tuple[str, Callable | None]:
    _load_extensions()
    name = get_backend()
    table = _impls[op]
    if name == "auto":
        name = "cpp" if device_type == "cpu" and ("cpp", "cpu") in table else "reference"
    if name == "reference":
        return name, None
    fn = table.get((name, device_type))
    if fn is None:
        raise RuntimeError(f"backend {name!r} has no {op} kernel for {device_type} tensors "
                           f"(available: {available_backends(device_type)})")
    return name, fn


# ---------------------------------------------------------------- references

def taylor_accumulate_reference(weight: torch.Tensor, grad: torch.Tensor, rows: torch.Tensor,
                                cols: torch.Tensor, row_block: int = 1, col_block: int = 1) -> None:
    """Pure-PyTorch oracle for ``taylor_accumulate_`` (fp32 accumulation)."""
    wg = weight.float() * grad.float()
    r, c = wg.shape
    for k, term in enumerate((wg.abs(), wg, wg.square())):
        rows[k] += term.sum(1).view(r // row_block, row_block).sum(1)
        cols[k] += term.sum(0).view(c // col_block, col_block).sum(1)


def gather_reference(src: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
    """Pure-PyTorch oracle for ``gather``."""
    return src.index_select(dim, index).contiguous()


# ---------------------------------------------------------------- op declarations

def _check_taylor(weight, grad, rows, cols, row_block, col_block):
    if weight.dim() != 2 or grad.shape != weight.shape:
        raise ValueError(f"taylor: weight must be 2-D and grad the same shape, got "
                         f"{tuple(weight.shape)} and {tuple(grad.shape)}")
    r, c = weight.shape
    if row_block < 1 or col_block < 1 or r % row_block or c % col_block:
        raise ValueError(f"taylor: blocks ({row_block}, {col_block}) must divide the shape ({r}, {c})")
    if rows.shape != (3, r // row_block) or cols.shape != (3, c // col_block):
        raise ValueError(f"taylor: accumulators must be (3, {r // row_block}) and (3, {c // col_block}), "
                         f"got {tuple(rows.shape)} and {tuple(cols.shape)}")
    if rows.dtype != torch.float32 or cols.dtype != torch.float32:
        raise ValueError("taylor: accumulators must be float32")


@torch.library.custom_op("fastprune::taylor_accumulate_", mutates_args=("rows", "cols"))
def taylor_accumulate_(weight: torch.Tensor, grad: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                       row_block: int = 1, col_block: int = 1) -> None:
    """Add |w*g|, w*g and (w*g)^2 summed over row/column blocks into ``rows``/``cols``."""
    _check_taylor(weight, grad, rows, cols, row_block, col_block)
    name, fn = _choose("taylor_accumulate_", weight.device.type)
    _last["taylor_accumulate_"] = name
    (fn or taylor_accumulate_reference)(weight, grad, rows, cols, row_block, col_block)


@taylor_accumulate_.register_fake
def _(weight, grad, rows, cols, row_block=1, col_block=1):
    return None


def taylor_partials(weight: torch.Tensor, grad: torch.Tensor, row_block: int = 1,
                    col_block: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Fresh (3, R//row_block) and (3, C//col_block) fp32 Taylor partial sums of w*g."""
    r, c = weight.shape
    rows = torch.zeros(3, r // max(row_block, 1), dtype=torch.float32, device=weight.device)
    cols = torch.zeros(3, c // max(col_block, 1), dtype=torch.float32, device=weight.device)
    taylor_accumulate_(weight, grad, rows, cols, row_block, col_block)
    return rows, cols


@torch.library.custom_op("fastprune::gather", mutates_args=())
def gather(src: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
    """Copy ``src`` keeping ``index`` (sorted, distinct) along ``dim`` into a compact tensor."""
    if index.dim() != 1 or index.dtype != torch.long:
        raise ValueError(f"gather: index must be 1-D int64, got {index.dim()}-D {index.dtype}")
    if not -src.dim() <= dim < src.dim():
        raise ValueError(f"gather: dim {dim} out of range for a {src.dim()}-D tensor")
    name, fn = _choose("gather", src.device.type)
    _last["gather"] = name
    return (fn or gather_reference)(src, dim % src.dim(), index)


@gather.register_fake
def _(src, dim, index):
    shape = list(src.shape)
    shape[dim % src.dim()] = index.shape[0]
    return src.new_empty(shape)
