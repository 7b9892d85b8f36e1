"""What a pruning ratio means for a model: the prunable part, and how hard each pruned layer is cut.

``ratio`` counts all parameters, embeddings included.  On a model whose embeddings are most of its
weights (a 262k-token vocabulary makes them about 63 % of a 270M model) a modest ratio of all
parameters removes most of every pruned layer.  :func:`ratio_meaning` states it in numbers before
anything changes, and :func:`cut_warning` turns it into a warning when any pruned layer would lose
more than :data:`HEAVY_CUT` of its prunable weights.
"""

from __future__ import annotations

from typing import Any

import torch

from fastprune.graph import LAYER_KINDS, PruningGraph
from fastprune.plan import Plan

HEAVY_CUT = 0.4
RATIO_OF = ("model", "prunable")


def embedding_params(model: torch.nn.Module) -> int:
    """Parameters of the model's embeddings and (untied) output embedding, each tensor counted once."""
    seen: dict[int, int] = {}
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    mods = [m for m in model.modules() if isinstance(m, torch.nn.Embedding)] + ([out] if out is not None else [])
    for m in mods:
        w = getattr(m, "weight", None)
        if w is not None:
            seen[id(w)] = w.numel()
    return sum(seen.values())


def ratio_meaning(model: torch.nn.Module, graph: PruningGraph, plan: Plan) -> dict[str, Any]:
    """Plain data: the embeddings' share of the model and, per layer the plan prunes, the share of its
    prunable weights (its head and MLP-channel groups) that goes."""
    total = graph.total_params
    per_layer: dict[int, list[int]] = {}
    for g in graph.groups:
        if g.kind not in LAYER_KINDS or g.layer is None:
            continue
        cost = g.params_per_element(graph.param_shapes)
        kept = len(plan.keep.get(g.name, range(g.size)))
        entry = per_layer.setdefault(g.layer, [0, 0])
        entry[0] += g.size * cost
        entry[1] += (g.size - kept) * cost
    cut = {i: removed / prunable for i, (prunable, removed) in sorted(per_layer.items()) if removed and prunable}
    return {"embedding_share": embedding_params(model) / total if total else 0.0,
            "prunable_share": sum(p for p, _ in per_layer.values()) / total if total else 0.0,
            "layer_cut": cut, "max_layer_cut": max(cut.values(), default=0.0),
            "removed_layers": sorted(plan.remove_layers)}


def cut_warning(meaning: dict[str, Any], ratio: float | None, ratio_of: str) -> str | None:
    """A warning naming the numbers when a pruned layer loses more than :data:`HEAVY_CUT`, else None."""
    cut = meaning["layer_cut"]
    if not cut or meaning["max_layer_cut"] <= HEAVY_CUT:
        return None
    heavy = [i for i, c in cut.items() if c > HEAVY_CUT]
    worst = max(cut, key=cut.get)
    what = "the plan" if ratio is None else (
        f"ratio={ratio} of {'all parameters' if ratio_of == 'model' else 'the prunable parameters'}")
    return (f"{what} removes more than {HEAVY_CUT:.0%} of the prunable weights (heads and MLP channels) of "
            f"{len(heavy)} of {len(cut)} pruned layers, up to {cut[worst]:.0%} in layer {worst}; embeddings are "
            f"{meaning['embedding_share']:.0%} of this model and heads and MLP channels "
            f"{meaning['prunable_share']:.0%}. Expect a large quality loss; a smaller ratio"
            + (" or ratio_of='prunable' (the ratio then counts prunable weights only)" if ratio_of == "model" else "")
            + " cuts less.")
