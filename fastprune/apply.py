"""``apply(model, plan)``: validate the whole plan, then compact the model in place."""

from __future__ import annotations

from collections import defaultdict

import torch

from fastprune import graph_cache, ops
from fastprune.graph import PruningGraph
from fastprune.plan import Plan
from fastprune.plan_ops import kept_indices, validate
from fastprune.transfers import upload
from fastprune.widths import layer_widths, remove_layer_widths, update_config, write_widths

# layer_widths and update_config belong to the width resolver (fastprune.widths), validate and kept_indices
# to fastprune.plan_ops; importable here as before
__all__ = ["apply", "kept_indices", "layer_widths", "update_config", "validate"]


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
