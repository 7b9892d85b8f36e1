"""``fastprune.prune(model, ratio)``: discover, score, select and apply, in a row."""

from __future__ import annotations

import math
from typing import Any

import torch

from fastprune.apply import apply, layer_widths
from fastprune.discover import discover
from fastprune.errors import FastpruneError
from fastprune.graph import PruningGraph
from fastprune.plan import Plan
from fastprune.report import PruneReport, StageStat, stage

GRADIENT_FREE = {"random", "l1", "l2"}


def _check_ratio(ratio: float | None) -> None:
    if ratio is None:
        return
    if not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
        raise FastpruneError(f"ratio must be a fraction in [0, 1), got {ratio!r}")


def _calibration(model, calib, tokenizer, n_samples, seq_len, seed) -> torch.Tensor:
    from fastprune import data

    if isinstance(calib, torch.Tensor):
        return data.calibration_batch(tokenizer, calib, n_samples=n_samples, seq_len=seq_len, seed=seed)
    if tokenizer is None:
        raise FastpruneError("gradient-based criteria need calibration text: pass calib=<LongTensor of "
                             "token ids> or a tokenizer (and optionally calib=<source name or file>)")
    return data.calibration_batch(tokenizer, calib or "wiki", n_samples=n_samples, seq_len=seq_len, seed=seed)


def _hidden_size(graph: PruningGraph, plan: Plan | None = None) -> int | None:
    for g in graph.groups:
        if g.kind == "hidden":
            return len(plan.keep[g.name]) if plan and g.name in plan.keep else g.size
    return None


def prune(model: torch.nn.Module, ratio: float | None = 0.2, *, criterion: str = "element1",
          scope: str = "block", ranking: str = "local", aggregation: str = "sum",
          layers: tuple[int, int] | None = None, round_to: int = 1, group_ratio: float | None = None,
          calib: torch.Tensor | str | None = None, tokenizer: Any = None, n_samples: int = 10,
          seq_len: int = 64, steps: int = 1, seed: int = 0, scores: Any = None, plan: Plan | None = None,
          dry_run: bool = False, uniform: bool = False, progress: bool = True) -> PruneReport:
    """Prune ``model`` in place so that about ``ratio`` of its parameters are removed.

    ``criterion``: random, l1, l2, element1, element2, mix, vectorwise.  ``scope``: block
    (attention head groups and MLP channels inside ``layers``), channel (hidden dimension) or
    layer (whole layers).  ``ranking``: local (one ratio per group) or global.  ``steps > 1``
    prunes iteratively with fresh scores each step.  ``scores`` reuses saved scores (one step
    only); ``plan`` applies a ready plan; ``dry_run`` computes the plan and the report without
    touching the model.  ``uniform`` prunes every layer by the same amount (block scope), so the
    result saves with a plain config that any Hugging Face loader reads.
    Returns a :class:`PruneReport` (the plan is in ``report.settings``).
    """
    from fastprune.importance import score
    from fastprune.select import select

    _check_ratio(ratio)
    if steps < 1:
        raise FastpruneError(f"steps must be at least 1, got {steps}")
    if (scores is not None or plan is not None) and steps != 1:
        raise FastpruneError("saved scores or a ready plan can only be used with steps=1")
    if dry_run and steps != 1:
        raise FastpruneError("dry_run previews one step; use steps=1")
    device = next(model.parameters()).device
    heads = getattr(getattr(model, "config", None), "num_attention_heads", None)
    if scope == "channel" and isinstance(heads, int) and heads > 0:
        round_to = math.lcm(round_to, heads)  # configs require hidden_size % num_attention_heads == 0
    stages: dict[str, StageStat] = {}
    with stage(stages, "discovery", device):
        graph = discover(model)
    original = graph
    params_before = graph.total_params
    widths_before = layer_widths(model, graph)
    plans: list[Plan] = []
    for step in range(1, steps + 1):
        if plan is not None:
            step_plan = plan
        else:
            step_scores = scores
            if step_scores is None:
                tokens = None
                if criterion not in GRADIENT_FREE:
                    with stage(stages, "calibration", device):
                        tokens = _calibration(model, calib, tokenizer, n_samples, seq_len, seed + step - 1)
                with stage(stages, "scoring", device):
                    step_scores = score(model, graph, tokens, criterion=criterion, seed=seed + step - 1,
                                        progress=progress)
            target = None
            if ratio is not None and steps == 1:
                target = ratio
            elif ratio is not None:  # the cumulative target, as a fraction of the current model
                remaining = params_before * (1 - ratio * step / steps)
                target = max(0.0, 1 - remaining / graph.total_params)
            step_group_ratio = None if group_ratio is None else 1 - (1 - group_ratio) ** (1 / steps)
            with stage(stages, "selection", device):
                step_plan = select(graph, step_scores, target if group_ratio is None else None,
                                   group_ratio=step_group_ratio, scope=scope, layers=layers,
                                   ranking=ranking, aggregation=aggregation, round_to=round_to,
                                   uniform=uniform)
        plans.append(step_plan)
        if dry_run:
            break
        with stage(stages, "compaction", device):
            apply(model, step_plan, graph)
        if step < steps:
            with stage(stages, "discovery", device):
                graph = discover(model)
    last = plans[-1]
    if dry_run:
        from fastprune.select import predicted_params
        params_after = predicted_params(graph, last)
    else:
        params_after = sum(p.numel() for p in model.parameters())
    # widths after the last plan, keyed by the layer's index in the original model
    original_index = list(range(original.num_layers))
    for p in plans[:-1]:
        original_index = [x for j, x in enumerate(original_index) if j not in set(p.remove_layers)]
    widths_after = {original_index[i]: w for i, w in layer_widths(model, graph, last).items()}
    hidden_after = _hidden_size(graph, last)
    layers_after = graph.num_layers - len(last.remove_layers)
    settings = {"criterion": criterion, "scope": scope, "ranking": ranking, "aggregation": aggregation,
                "ratio": ratio, "group_ratio": group_ratio, "steps": steps, "n_samples": n_samples,
                "seq_len": seq_len, "seed": seed, "round_to": round_to, "uniform": uniform,
                "plans": [p.to_json() for p in plans]}
    return PruneReport(params_before=params_before, params_after=params_after,
                       ratio_target=ratio if ratio is not None else float("nan"),
                       widths_before=widths_before, widths_after=widths_after,
                       hidden_before=_hidden_size(original), hidden_after=hidden_after,
                       layers_before=original.num_layers, layers_after=layers_after, stages=stages,
                       settings=settings, dry_run=dry_run)
