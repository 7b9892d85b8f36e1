"""A plan read on a graph: whole-plan validation, the kept indices per parameter dimension, the
parameter count after it.  Used by ``select`` (which makes plans), ``apply`` (which executes them)
and ``reconstruct``; imports neither."""

from __future__ import annotations

import torch

from fastprune.errors import FastpruneError
from fastprune.graph import PruningGraph
from fastprune.plan import Plan

__all__ = ["kept_indices", "predicted_params", "validate"]


def validate(plan: Plan, graph: PruningGraph) -> None:
    """Raise :class:`FastpruneError` naming the first problem; never touches the model."""
    if plan.fingerprint != graph.fingerprint:
        raise FastpruneError(f"this plan was made for a different model (plan fingerprint "
                             f"{plan.fingerprint}, model {graph.fingerprint})")
    known = {g.name: g for g in graph.groups}
    for name, size in plan.group_sizes.items():
        if name in known and known[name].size != size:
            raise FastpruneError(f"group {name!r} has {known[name].size} elements in this model, "
                                 f"the plan expects {size}")
    for name, kept in plan.keep.items():
        group = known.get(name)
        if group is None:
            raise FastpruneError(f"the plan names group {name!r}, which this model does not have")
        if not kept:
            what = "head group" if group.kind == "heads" else "element"
            raise FastpruneError(f"the plan removes every {what} of {name!r}; keep at least one")
        if any(type(i) is not int for i in kept):
            raise FastpruneError(f"kept indices of {name!r} must be integers")
        if any(b <= a for a, b in zip(kept, kept[1:])):
            raise FastpruneError(f"kept indices of {name!r} must be sorted and distinct (duplicates or "
                                 f"disorder found)")
        if kept[0] < 0 or kept[-1] >= group.size:
            bad = kept[0] if kept[0] < 0 else kept[-1]
            raise FastpruneError(f"kept index {bad} of {name!r} is out of range [0, {group.size})")
    layers = plan.remove_layers
    if layers:
        if graph.layer_container is None:
            raise FastpruneError("the plan removes layers but the model has no repeated layers")
        if len(set(layers)) != len(layers):
            raise FastpruneError("the plan removes a layer twice")
        bad = [i for i in layers if not 0 <= i < graph.num_layers]
        if bad:
            raise FastpruneError(f"layer {bad[0]} is out of range [0, {graph.num_layers})")
        if len(layers) >= graph.num_layers:
            raise FastpruneError("the plan removes every layer")


def kept_indices(plan: Plan, graph: PruningGraph) -> dict[tuple[str, int], torch.Tensor]:
    """Per (parameter, dim) the sorted indices that stay, for every dimension that shrinks."""
    masks: dict[tuple[str, int], torch.Tensor] = {}
    for group in graph.groups:
        kept = plan.keep.get(group.name)
        if kept is None or len(kept) == group.size:
            continue
        removed = torch.ones(group.size, dtype=torch.bool)
        removed[torch.tensor(kept, dtype=torch.long)] = False
        removed_elements = removed.nonzero().flatten()
        for sl in group.slices:
            key = (sl.param, sl.dim)
            if key not in masks:
                masks[key] = torch.ones(graph.param_shapes[sl.param][sl.dim], dtype=torch.bool)
            masks[key][sl.indices(removed_elements)] = False
    return {k: m.nonzero().flatten() for k, m in masks.items()}


def predicted_params(graph: PruningGraph, plan: Plan) -> int:
    """Parameters left after ``plan``: per parameter, the product of its kept sizes per dim.

    A weight index removed by two groups (a q_proj row of a removed head and a column of a
    removed hidden channel) is counted once.
    """
    kept = kept_indices(plan, graph)
    dropped = set(plan.remove_layers)
    total = 0
    for name, shape in graph.param_shapes.items():
        if graph.layer_of(name) in dropped:
            continue
        n = 1
        for d, size in enumerate(shape):
            idx = kept.get((name, d))
            n *= size if idx is None else len(idx)
        total += n
    return total
