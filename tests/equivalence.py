"""The equivalence harness: masking a plan's removed channels in the original model must give
the logits of the compacted model."""

from __future__ import annotations

import copy

import torch

from fastprune.apply import kept_indices
from fastprune.graph import PruningGraph
from fastprune.plan import Plan


def _norm_over_kept(module: torch.nn.Module, kept: torch.Tensor) -> None:
    """Make a norm compute over the kept channels only (what the compacted model computes)."""
    compact = copy.deepcopy(module)
    with torch.no_grad():
        for p in compact.parameters(recurse=False):
            p.data = p.data[kept]
    if isinstance(compact, torch.nn.LayerNorm):
        compact.normalized_shape = (len(kept),)

    def forward(x, *args, **kwargs):
        y = compact(x[..., kept], *args, **kwargs)
        out = y.new_zeros(*y.shape[:-1], x.shape[-1])
        out[..., kept] = y
        return out

    module.forward = forward


def masked_reference(model: torch.nn.Module, plan: Plan, graph: PruningGraph) -> torch.nn.Module:
    """A copy of ``model`` with the plan's removed channels zeroed and removed layers skipped.

    Where the hidden dimension shrinks, RMS norms of the copy average over kept channels only,
    which is what the compacted model computes.
    """
    ref = copy.deepcopy(model)
    params = dict(ref.named_parameters())
    with torch.no_grad():
        for (name, dim), idx in kept_indices(plan, graph).items():
            p = params[name]
            mask = torch.zeros(p.shape[dim], dtype=p.dtype)
            mask[idx] = 1
            shape = [1] * p.dim()
            shape[dim] = -1
            p.mul_(mask.view(shape))
    hidden = [g for g in graph.groups if g.kind == "hidden" and g.name in plan.keep]
    if hidden:  # modules whose own 1-D parameters are hidden-dim scales are the norms
        kept = torch.tensor(plan.keep[hidden[0].name])
        scales = {s.param for s in hidden[0].slices if s.role == "other"}
        for name, mod in ref.named_modules():
            own = [f"{name}.{n}" if name else n for n, _ in mod.named_parameters(recurse=False)]
            if own and not isinstance(mod, torch.nn.Embedding) and all(p in scales for p in own):
                _norm_over_kept(mod, kept)
    if plan.remove_layers:
        layers = ref.get_submodule(graph.layer_container)
        for i in plan.remove_layers:
            layers[i].register_forward_hook(_skip_layer, with_kwargs=True)
    return ref


def _skip_layer(module, args, kwargs, out):
    """Make a layer pass its input through (its output structure kept)."""
    hidden = args[0] if args else kwargs["hidden_states"]
    return (hidden, *out[1:]) if isinstance(out, tuple) else hidden
