"""``discover(model) -> PruningGraph``: coupled groups found by tracing, no model-specific code."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch

from fastprune.errors import FastpruneError
from fastprune.graph import Group, PruningGraph, Slice, layer_of
from fastprune.overrides import override_for, override_key, unmapped_op_hint
from fastprune.plan import model_fingerprint
from fastprune.trace import TraceResult, trace_model
from fastprune.widths import resolve_widths

# The traced batch: one sequence of two tokens.  Structure needs no more (a second token keeps the
# attention and its causal mask on the prefill path; the groups do not depend on the values or on which
# experts the tokens reach), and every linear layer of the trace is cheaper with fewer rows: on the CPU
# the 49k x 576 output head of SmolLM2 takes 7 ms for 2 rows and 28 ms for 14 (the 2 x 7 used before).
# The shape can choose the code path a model takes (two tokens inside a sliding window need no mask, and
# transformers 5.6 then runs SDPA's own GQA path): widths such a path does not show are bound by name
# (widths._named_head_counts); tests/test_fuzz.py runs 500 random models through this on two releases.
TRACE_SHAPE = (1, 2)


def find_layer_container(model: torch.nn.Module) -> tuple[str | None, int]:
    """The ModuleList of repeated blocks holding the most parameters (path, length)."""
    best, best_params, best_len = None, 0, 0
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.ModuleList) or len(mod) == 0:
            continue
        if len({type(m) for m in mod}) != 1:
            continue
        n = sum(p.numel() for p in mod.parameters())
        if n > best_params:
            best, best_params, best_len = name, n, len(mod)
    return best, best_len


def _common_prefix(names: list[str]) -> str:
    parts = [n.split(".")[:-1] for n in names]
    common = []
    for items in zip(*parts):
        if len(set(items)) != 1:
            break
        common.append(items[0])
    return ".".join(common)


def _trace_input(model: torch.nn.Module) -> torch.Tensor:
    emb = next((m for m in model.modules() if isinstance(m, torch.nn.Embedding)), None)
    vocab = emb.num_embeddings if emb is not None else getattr(getattr(model, "config", None), "vocab_size", 32)
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, TRACE_SHAPE, generator=gen).to(device)


def discover(model: torch.nn.Module, input_ids: torch.Tensor | None = None, *, cache: bool = True) -> PruningGraph:
    """Trace one small forward pass of ``model`` and derive its coupled pruning groups.

    A graph found (or derived by ``apply``) for a model of the same structure is reused without a
    trace (:mod:`fastprune.graph_cache`); ``cache=False`` or explicit ``input_ids`` always trace, and so
    does a model whose last trace warned (an override registered since may fix what it reported).
    """
    from fastprune import graph_cache

    key = graph_cache.structure_key(model) if cache and input_ids is None else None
    if key is not None and (cached := graph_cache.lookup(key)) is not None:
        return cached
    container, num_layers = find_layer_container(model)
    override = override_for(model)
    was_training = model.training
    model.eval()
    try:
        result = trace_model(model, input_ids if input_ids is not None else _trace_input(model),
                             free_constants=bool(override and override.free_constants),
                             couplings=override.couplings if override else ())
    finally:
        model.train(was_training)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    groups, leaves = _build_groups(result, shapes, container)
    if not groups and num_layers == 0:
        raise FastpruneError(f"nothing prunable found in {type(model).__name__}: no channel space is "
                             "free to shrink and no repeated layers")
    widths = resolve_widths(model, result, dict(zip(leaves, groups)), container, num_layers, override,
                            override_key(model))
    graph = PruningGraph(groups=groups, layer_container=container, num_layers=num_layers,
                         param_shapes=shapes, fingerprint=model_fingerprint(model),
                         warnings=[unmapped_op_hint(model, w) for w in dict.fromkeys(result.unmapped)],
                         widths=widths)
    if key is not None and not graph.warnings:  # an unmapped op or a failed rule: trace again next time
        graph_cache.store(key, graph)
    return graph


def _leaf_slices(result: TraceResult, shapes) -> tuple[dict[int, list[Slice]], set[int]]:
    sp = result.spaces
    slices: dict[int, list[Slice]] = defaultdict(list)
    blocked: set[int] = set()
    for name, atoms in result.param_atoms.items():
        for dim, atom in enumerate(atoms):
            if shapes[name][dim] <= 1:
                continue
            role = result.param_roles.get((name, dim), "other")
            for leaf, base, stride, blk, inner in sp.layout(atom):
                if blk or inner or leaf in blocked:  # a blocked leaf is no group: its slices are not needed
                    blocked.add(leaf)
                    continue
                size = sp.size[leaf]
                if size * len(base) > 1 << 24:  # a huge non-prunable space (e.g. a fused vocab): skip
                    blocked.add(leaf)
                    continue
                offsets = base.tolist()
                if _overlaps(offsets, stride, size):  # elements would overlap: not a removable unit
                    blocked.add(leaf)
                    continue
                if offsets == list(range(offsets[0], offsets[0] + len(offsets))):  # one run
                    slices[leaf].append(Slice(name, dim, tuple(offsets), int(stride), role))
                    continue
                # one slice per contiguous run of the base (fused [q; k; v] rows give three runs)
                cuts = [0, *(np.flatnonzero(np.diff(base) != 1) + 1).tolist(), len(offsets)]
                for start, end in zip(cuts, cuts[1:]):
                    slices[leaf].append(Slice(name, dim, tuple(offsets[start:end]), int(stride), role))
    return slices, blocked


def _overlaps(offsets: list[int], stride: int, size: int) -> bool:
    """Whether two of the ``size`` elements ``i * stride + offsets`` share an index."""
    if offsets and offsets[-1] - offsets[0] < stride and all(a < b for a, b in zip(offsets, offsets[1:])):
        return False  # increasing offsets within one stride: element i owns [i * stride, (i + 1) * stride)
    every = (np.arange(size)[:, None] * stride + np.asarray(offsets, dtype=np.int64)[None, :]).reshape(-1)
    return len(np.unique(every)) != len(every)


def _heads_per_element(slices: list[Slice], root: list[int]) -> int:
    """Query heads per element: q rows per element over k rows per element (GQA repeat)."""
    widths = [slices[i].width for i in root]
    return max(widths) // min(widths)


def _stacked_experts(slices: list[Slice], shapes) -> int:
    """Experts stacked along dim 0 of the 3-D weights a channel group lies in (0 when none)."""
    counts = {shapes[s.param][0] for s in slices if len(shapes[s.param]) == 3 and s.dim != 0}
    return counts.pop() if len(counts) == 1 else 0


def _build_groups(result: TraceResult, shapes, container: str | None) -> tuple[list[Group], list[int]]:
    """The groups, and the leaf atom each one is."""
    sp = result.spaces
    attention = set()
    for a in range(len(sp.parent)):
        if sp.find(a) == a and "attention" in sp.flags[a]:
            attention |= sp.descendants(a)
    reduced = set()
    for a in result.reduced_atoms:
        reduced |= sp.descendants(a)

    slices, blocked = _leaf_slices(result, shapes)
    param_order = {n: i for i, n in enumerate(shapes)}
    groups, leaves, used_names = [], [], set()
    for leaf in sorted(slices, key=lambda lf: min(param_order[s.param] for s in slices[lf])):
        size = sp.size[leaf]
        if leaf in blocked or size <= 1:
            continue
        sls = sorted(slices[leaf], key=lambda s: (param_order[s.param], s.dim))
        layers = {layer_of(s.param, container) for s in sls}
        if leaf in attention:
            kind = "heads"
        elif len(layers) > 1:
            kind = "hidden"
        else:
            kind = "channels"
        if leaf in reduced and kind != "hidden":
            continue  # something averages over this space inside a block: not removable exactly
        layer = next(iter(layers)) if len(layers) == 1 else None
        if kind == "heads":
            root = [i for i, s in enumerate(sls) if s.role == "out" and s.param in result.attention_params]
        elif kind == "channels":
            root = [i for i, s in enumerate(sls) if s.role == "out"]
        else:
            first = sls[0].param
            root = [i for i, s in enumerate(sls) if s.param == first]
        root = root or list(range(len(sls)))
        if kind == "hidden":
            name = "hidden"
        else:
            name = _common_prefix([s.param for s in sls]) or f"group{len(groups)}"
        base_name, k = name, 1
        while name in used_names:
            name, k = f"{base_name}#{k}", k + 1
        used_names.add(name)
        groups.append(Group(name=name, kind=kind, layer=layer, size=size, slices=sls, root=root,
                            heads_per_element=_heads_per_element(sls, root) if kind == "heads" else 0,
                            kv_heads_per_element=int(kind == "heads" and len(root) > 1),
                            normalized=leaf in reduced,
                            experts=_stacked_experts(sls, shapes) if kind == "channels" else 0))
        leaves.append(leaf)
    return groups, leaves
