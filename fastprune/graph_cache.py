"""Discovery results kept for reuse, so that a model's forward pass is traced once, not once per step.

A graph describes a model's structure, never its weights: it is stored under the model's *structure
key* (its class, parameter names and shapes, its config without the fields that do not shape the
forward pass, and the family override in force) and handed out again, as a copy, for any model
with the same key: repeated prunes of copies of one model, sweeps, scoring after loading.

After ``apply`` the pruned model has new shapes, so a new key; instead of tracing it again,
:func:`remember_pruned` records under the new key how to derive its graph from the old one and the
plan (kept elements renumbered, removed layers dropped and the later ones renumbered); the first
lookup of that key derives it, so a prune that never discovers its result again pays nothing.  Where a
slice would stop being one affine run of indices, or a group is left with one element (discovery
offers none such, and what it held may become a group of its own: the query heads of the last kv
head), the derivation gives up and the next discovery traces.

``fastprune.discover(model, cache=False)`` always traces.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
from collections import OrderedDict

import numpy as np
import torch

from fastprune.discover import _common_prefix
from fastprune.graph import Group, PruningGraph, Slice
from fastprune.overrides import override_for
from fastprune.plan import Plan, model_fingerprint
from fastprune.widths import WidthMap

MAX_ENTRIES = 8
_IGNORED_CONFIG_KEYS = {"_name_or_path", "dtype", "torch_dtype", "transformers_version", "architectures"}


@dataclasses.dataclass(frozen=True)
class _Pending:
    """A graph not derived yet: ``plan`` applied to the stored ``graph`` gave a model of these shapes."""

    graph: PruningGraph
    plan: Plan
    shapes: dict[str, tuple[int, ...]]
    fingerprint: str


_graphs: OrderedDict[tuple, PruningGraph | _Pending] = OrderedDict()


def structure_key(model: torch.nn.Module) -> tuple:
    """What a model's graph depends on: class, parameter names and shapes, config, family override."""
    config = getattr(model, "config", None)
    described = None
    if config is not None and hasattr(config, "to_dict"):
        fields = {k: v for k, v in config.to_dict().items() if k not in _IGNORED_CONFIG_KEYS}
        fields["_attn_implementation"] = getattr(config, "_attn_implementation", None)
        described = json.dumps(fields, sort_keys=True, default=str)
    cls = type(model)
    return (f"{cls.__module__}.{cls.__qualname__}", model_fingerprint(model), described, id(override_for(model)))


def _copy(graph: PruningGraph) -> PruningGraph:
    groups = [dataclasses.replace(g, slices=list(g.slices), root=list(g.root)) for g in graph.groups]
    return dataclasses.replace(graph, groups=groups, param_shapes=dict(graph.param_shapes),
                               warnings=list(graph.warnings), widths=copy.deepcopy(graph.widths))


def _stored(key: tuple) -> PruningGraph | None:
    """The graph stored under ``key`` (derived now if it was pending), or None."""
    entry = _graphs.get(key)
    if isinstance(entry, _Pending):
        entry = derive(entry.graph, entry.plan, entry.shapes, entry.fingerprint)
        if entry is None:
            del _graphs[key]
        else:
            _graphs[key] = entry
    return entry


def lookup(key: tuple) -> PruningGraph | None:
    """A copy of the graph stored under ``key``, or None."""
    graph = _stored(key)
    if graph is None:
        return None
    _graphs.move_to_end(key)
    return _copy(graph)


def store(key: tuple, graph: PruningGraph | _Pending) -> None:
    """Keep a copy of ``graph`` under ``key`` (the least recently used of more than MAX_ENTRIES goes)."""
    _graphs[key] = graph if isinstance(graph, _Pending) else _copy(graph)
    _graphs.move_to_end(key)
    while len(_graphs) > MAX_ENTRIES:
        _graphs.popitem(last=False)


def clear() -> None:
    """Forget every stored graph."""
    _graphs.clear()


def remember_pruned(model: torch.nn.Module, graph: PruningGraph, plan: Plan, key_before: tuple) -> None:
    """Store how to derive the graph of ``model`` as ``apply(model, plan, graph)`` left it.

    Only a graph that discovery stored for the model before ``apply`` (``key_before``) is followed:
    a graph edited by hand may lack groups the model has.  The derivation runs at the first
    :func:`lookup` of the pruned model's key (and stores nothing where it fails).
    """
    stored = _stored(key_before)
    if stored is None or stored != graph:
        return
    key = structure_key(model)
    plan = dataclasses.replace(plan, keep={k: list(v) for k, v in plan.keep.items()},
                               remove_layers=list(plan.remove_layers))  # the caller may reuse its plan
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    store(key, _Pending(stored, plan, shapes, fingerprint=key[1]))  # key[1]: the model_fingerprint


def derive(graph: PruningGraph, plan: Plan, shapes: dict[str, tuple[int, ...]],
           fingerprint: str) -> PruningGraph | None:
    """The graph discovery would find after ``plan`` is applied (None where it cannot be derived).

    ``shapes`` are the pruned model's parameter shapes (checked against the derivation).
    """
    removed_layers = sorted(set(plan.remove_layers))
    rename = _renamer(graph, removed_layers)
    positions = _new_positions(graph, plan)
    groups: list[Group] = []
    used: set[str] = set()
    for g in graph.groups:
        if g.layer is not None and g.layer in removed_layers:
            continue
        kept = np.asarray(plan.keep.get(g.name, range(g.size)), dtype=np.int64)
        if kept.size <= 1:  # no group of one element; what it contains may become one (one kv head left:
            return None     # its query heads), so only a trace can tell
        slices, old_to_new = [], {}
        for i, sl in enumerate(g.slices):
            new_name = rename(sl.param)
            if new_name is None:
                continue  # in a removed layer (the hidden group's slices)
            moved = _moved_slice(sl, kept, positions.get((sl.param, sl.dim)), new_name)
            if moved is None:
                return None
            old_to_new[i] = len(slices)
            slices.append(moved)
        root = [old_to_new[i] for i in g.root if i in old_to_new] or list(range(len(slices)))
        layer = None if g.layer is None else g.layer - sum(r < g.layer for r in removed_layers)
        name = _group_name(g, slices, len(groups), used)
        groups.append(dataclasses.replace(g, name=name, layer=layer, size=int(kept.size), slices=slices, root=root))
    renamed = {old.name: new.name for old, new in zip(_surviving(graph, plan), groups)}
    expected = {}
    for name, shape in graph.param_shapes.items():
        new_name = rename(name)
        if new_name is not None:
            expected[new_name] = tuple(len(positions[(name, d)][positions[(name, d)] >= 0])
                                       if (name, d) in positions else n for d, n in enumerate(shape))
    if expected != shapes:
        return None
    links = []
    for link in graph.widths.links:
        new_module = rename(link.module + ".")  # a module path renames like a parameter name
        if new_module is not None and link.group in renamed:
            links.append(dataclasses.replace(link, module=new_module[:-1], group=renamed[link.group]))
    gone = set(removed_layers)
    renumber = {old: old - sum(r < old for r in removed_layers) for old in range(graph.num_layers)}
    widths = WidthMap(links=links, config_fields={k: list(v) for k, v in graph.widths.config_fields.items()},
                      layer_lists=list(graph.widths.layer_lists),
                      layer_index=[(renumber[i], path, attr) for i, path, attr in graph.widths.layer_index
                                   if i not in gone], override=graph.widths.override)
    return PruningGraph(groups=groups, layer_container=graph.layer_container,
                        num_layers=graph.num_layers - len(removed_layers), param_shapes=shapes,
                        fingerprint=fingerprint, warnings=list(graph.warnings), widths=widths)


def _surviving(graph: PruningGraph, plan: Plan) -> list[Group]:
    removed = set(plan.remove_layers)
    return [g for g in graph.groups if not (g.layer is not None and g.layer in removed)]


def _renamer(graph: PruningGraph, removed_layers: list[int]):
    """Old parameter (or module path + '.') name -> its name once layers are removed (None: removed)."""
    container = graph.layer_container
    if container is None or not removed_layers:
        return lambda name: name
    pattern = re.compile(re.escape(container) + r"\.(\d+)\.")
    removed = set(removed_layers)

    def rename(name: str) -> str | None:
        m = pattern.match(name)
        if m is None:
            return name
        i = int(m.group(1))
        if i in removed:
            return None
        return f"{container}.{i - sum(r < i for r in removed_layers)}." + name[m.end():]

    return rename


def _new_positions(graph: PruningGraph, plan: Plan) -> dict[tuple[str, int], np.ndarray]:
    """Per (parameter, dim) that shrinks: old index -> new index, -1 where removed."""
    keep_masks: dict[tuple[str, int], np.ndarray] = {}
    for g in graph.groups:
        kept = plan.keep.get(g.name)
        if kept is None or len(kept) == g.size:
            continue
        gone = np.setdiff1d(np.arange(g.size), np.asarray(kept, dtype=np.int64))
        for sl in g.slices:
            mask = keep_masks.setdefault((sl.param, sl.dim), np.ones(graph.param_shapes[sl.param][sl.dim], bool))
            mask[(gone[:, None] * sl.stride + np.asarray(sl.base)[None, :]).reshape(-1)] = False
    return {key: np.where(mask, np.cumsum(mask) - 1, -1) for key, mask in keep_masks.items()}


def _moved_slice(sl: Slice, kept: np.ndarray, positions: np.ndarray | None, name: str) -> Slice | None:
    """``sl`` for the kept elements renumbered 0..k-1 in a dimension renumbered by ``positions``."""
    old = kept[:, None] * sl.stride + np.asarray(sl.base)[None, :]
    new = old if positions is None else positions[old]
    if (new < 0).any():
        return None  # another group removed part of a kept element
    stride = int(new[1, 0] - new[0, 0])
    base = new[0]
    affine = (new == base[None, :] + stride * np.arange(len(kept))[:, None]).all()
    if not affine or (np.diff(base) != 1).any():
        return None
    return Slice(name, sl.dim, tuple(int(i) for i in base), stride, sl.role)


def _group_name(g: Group, slices: list[Slice], index: int, used: set[str]) -> str:
    """The name discovery gives a group with these slices (see ``discover._build_groups``)."""
    name = "hidden" if g.kind == "hidden" else _common_prefix([s.param for s in slices]) or f"group{index}"
    base, k = name, 1
    while name in used:
        name, k = f"{base}#{k}", k + 1
    used.add(name)
    return name
