"""Opt-in scoring of linear layers inside their backward pass: the weight gradient is never written.

``score(..., fused_linear=True)`` routes every scored ``nn.Linear`` whose weight no other module
shares through :class:`_ScoredLinear`: its backward computes the input gradient as usual and, instead
of the weight gradient, hands ``grad_out`` and the saved input to the Triton kernel of
:mod:`fastprune.kernels.triton_fused_scoring`, which forms the weight gradient tile by tile and adds
its Taylor partials (|w*g|, w*g, (w*g)^2 row and column sums) to the scoring accumulators.  Those
weights get no ``.grad`` at all; the other parameters stream as before.

Each backward pass adds its own partials, so the path serves the criteria whose sums are linear in
what one pass contributes: vectorwise, element2 (per-sample passes) and element1/mix when the whole
calibration batch is one pass.  It is checked against the stored-gradient path under
``TRITON_INTERPRET=1`` (tests/test_fused_scoring.py); it has not run on a GPU yet, so it stays opt-in.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from fastprune.errors import FastpruneError


class _ScoredLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, sink: Callable):
        ctx.save_for_backward(x, weight)
        ctx.sink, ctx.has_bias = sink, bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight = ctx.saved_tensors
        gy = grad_out.reshape(-1, grad_out.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        grad_x = (gy @ weight).view(x.shape) if ctx.needs_input_grad[0] else None
        ctx.sink(gy, x2, weight)
        grad_b = gy.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, None, grad_b, None


def fusable_linears(model: torch.nn.Module, names: set[str]) -> dict[str, torch.nn.Linear]:
    """Scored parameter name -> its Linear module, for weights that exactly one module holds."""
    holders: dict[int, int] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            holders[id(p)] = holders.get(id(p), 0) + 1
    out = {}
    for module_name, module in model.named_modules():
        name = f"{module_name}.weight" if module_name else "weight"
        if type(module) is torch.nn.Linear and name in names and holders[id(module.weight)] == 1:
            out[name] = module
    return out


@contextmanager
def fused_linears(linears: dict[str, torch.nn.Linear], sink: Callable[[str], Callable]) -> Iterator[None]:
    """Inside the block each linear in ``linears`` runs through :class:`_ScoredLinear`, ``sink(name)`` receiving
    ``(grad_out (T, R), x (T, C), weight)`` in its backward."""
    try:
        from fastprune.kernels.triton_fused_scoring import linear_taylor_accumulate  # noqa: F401  (Triton present)
    except ImportError as exc:
        raise FastpruneError(f"fused_linear=True needs Triton ({exc})") from exc
    for name, module in linears.items():
        callback = sink(name)
        module.forward = lambda x, m=module, cb=callback: _ScoredLinear.apply(x, m.weight, m.bias, cb)
    try:
        yield
    finally:
        for module in linears.values():
            del module.forward
