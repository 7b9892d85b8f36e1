"""``apply(model, plan)``: validate the whole plan, then compact the model in place."""

from __future__ import annotations

from collections import defaultdict

import torch

from fastprune import graph_cache, ops
from fastprune.errors import FastpruneError
from fastprune.graph import PruningGraph
from fastprune.plan import Plan
from fastprune.transfers import upload
from fastprune.widths import layer_widths, remove_layer_widths, update_config, write_widths

# layer_widths and update_config belong to the width resolver (fastprune.widths); importable here as before
__all__ = ["apply", "kept_indices", "layer_widths", "update_config", "validate"]


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


def apply(model: torch.nn.Module, plan: Plan, graph: PruningGraph | None = None, *, progress: bool = False) -> None:
    """Prune ``model`` in place as ``plan`` says (validated first, one matrix at a time).

    ``progress`` shows a bar over the matrices being compacted.
    """
    from tqdm.auto import tqdm

    if graph is None:
        from fastprune.discover import discover
        graph = discover(model)
    validate(plan, graph)
    key_before = graph_cache.structure_key(model)
    keep = kept_indices(plan, graph)
    removed_layers = set(plan.remove_layers)
    params = dict(model.named_parameters())
    by_param: dict[str, list[tuple[int, torch.Tensor]]] = defaultdict(list)
    for (name, dim), idx in keep.items():
        if graph.layer_of(name) not in removed_layers:  # removed layers are dropped whole below
            by_param[name].append((dim, idx))
    with torch.no_grad():
        for name, dims in tqdm(list(by_param.items()), desc="compaction", unit="matrix", disable=not progress):
            p = params[name]
            data = p.data
            dims = sorted(dims, key=lambda x: x[0])
            # validated above: one upload of this matrix's indices, no check on the device
            for (dim, _), idx in zip(dims, upload([idx for _, idx in dims], data.device)):
                data = ops.gather(data, dim, idx)
            p.data = data  # the old storage is freed here: peak overhead is one matrix
            p.grad = None
    write_widths(model, plan, graph)
    if removed_layers:
        _remove_layers(model, graph, sorted(removed_layers))
    graph_cache.remember_pruned(model, graph, plan, key_before)  # the next discovery of this model needs no trace


def _remove_layers(model: torch.nn.Module, graph: PruningGraph, removed: list[int]) -> None:
    remove_layer_widths(model, graph, removed)
    container = model.get_submodule(graph.layer_container)
    new = torch.nn.ModuleList(m for i, m in enumerate(container) if i not in set(removed))
    parent_name, _, attr = graph.layer_container.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)
