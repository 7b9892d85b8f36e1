"""The equivalence harness: masking a plan's removed channels in the original model must give
the logits of the compacted model."""

from __future__ import annotations

import copy

import torch

from fastprune.apply import kept_indices
from fastprune.graph import PruningGraph
from fastprune.plan import Plan


def _kept_mean_norm(module: torch.nn.Module, kept: torch.Tensor, weight_attr: str, eps: float):
    """Replace an RMS-style norm's forward by one that averages over the kept channels only."""

    def forward(x):
        ms = x.float()[..., kept].pow(2).mean(-1, keepdim=True)
        out = x.float() * torch.rsqrt(ms + eps)
        return getattr(module, weight_attr) * out.to(x.dtype)

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
    if hidden:
        kept = torch.tensor(plan.keep[hidden[0].name])
        for mod in ref.modules():
            for attr, eps_attr in (("weight", "variance_epsilon"), ("gain", None)):
                w = getattr(mod, attr, None)
                if type(mod).__name__.endswith(("RMSNorm", "ScaleNorm")) and isinstance(w, torch.Tensor):
                    _kept_mean_norm(mod, kept, attr, getattr(mod, eps_attr, 1e-5) if eps_attr else 1e-5)
                    break
    if plan.remove_layers:
        layers = ref.get_submodule(graph.layer_container)
        for i in plan.remove_layers:
            layers[i].register_forward_hook(
                lambda mod, args, kwargs, out: args[0] if args else kwargs["hidden_states"], with_kwargs=True)
    return ref
