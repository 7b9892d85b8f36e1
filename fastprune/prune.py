"""``fastprune.prune(model, ratio)``: discover, score, select and apply, in a row."""

from __future__ import annotations

import copy
import dataclasses
import math
import warnings
from collections.abc import Callable
from typing import Any

import torch

from fastprune import presets
from fastprune.activation_scores import ACTIVATION_CRITERIA
from fastprune.apply import apply, layer_widths, update_config
from fastprune.discover import discover
from fastprune.errors import FastpruneError
from fastprune.graph import LAYER_KINDS, PruningGraph
from fastprune.importance import GRADIENT_FREE
from fastprune.plan import Plan
from fastprune.plan_ops import kept_indices, predicted_params
from fastprune.presets import ALLOCATIONS, DEFAULT_METHOD
from fastprune.ratio import RATIO_OF, cut_warning, ratio_meaning
from fastprune.reconstruct import attach_biases
from fastprune.reconstruct import reconstruct as run_reconstruction
from fastprune.report import PruneReport, StageStat, stage


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


_UNSET: Any = None  # an option left to the method's preset


def _groups_to_score(graph: PruningGraph, scope: str) -> list[str] | None:
    """The groups to score: for the block scope every group but the hidden one, so the embeddings and
    the output head take no gradient (a vocab x hidden buffer held through the whole backward pass; the
    heads and channels score the same).  The other scopes score everything (the layer scope's layer
    totals would move by float rounding, which can reorder near-tied layers)."""
    if scope != "block":
        return None
    return [g.name for g in graph.groups if g.kind in LAYER_KINDS]


def prune(model: torch.nn.Module, ratio: float | None = 0.2, *, method: str = DEFAULT_METHOD,
          criterion: str | None = _UNSET, scope: str | None = _UNSET, ranking: str | None = _UNSET,
          aggregation: str | None = _UNSET, layers: tuple[int, int] | None = _UNSET, round_to: int = 1,
          group_ratio: float | None = None, calib: torch.Tensor | str | None = _UNSET, tokenizer: Any = None,
          n_samples: int | None = _UNSET, seq_len: int | None = _UNSET, steps: int = 1, seed: int = 0,
          scores: Any = None, plan: Plan | None = None, dry_run: bool = False, uniform: bool = False,
          progress: bool = True, reconstruct: bool | None = _UNSET, recon_calib: Any = _UNSET,
          recon_samples: int | None = _UNSET, recon_seq_len: int | None = _UNSET, ridge: float | None = _UNSET,
          recon_bias: bool | None = _UNSET, sequential: bool | None = _UNSET,
          max_group_ratio: float | None = _UNSET, allocation: str | None = _UNSET,
          ratio_of: str = "model", loss_chunk: int | None = None,
          gradient_checkpointing: bool = False) -> PruneReport:
    """Prune ``model`` in place so that about ``ratio`` of its parameters are removed.

    ``method`` names a recipe (:mod:`fastprune.presets`: ``refit``, the default, or ``llm-pruner``);
    every option left as None takes the recipe's value.  ``criterion``: random, l1, l2, element1,
    element2, mix, vectorwise (LLM-Pruner's) or fluctuation, obs (activation statistics, see
    :mod:`fastprune.activation_scores`).  ``scope``: block (attention head groups and MLP channels
    inside ``layers``), channel (hidden dimension) or layer (whole layers).  ``ranking``: local (one
    ratio per group) or global.  ``max_group_ratio`` caps the share of any group that may go.
    ``allocation="sensitivity"`` measures each layer's attention and MLP on the calibration text and
    ranks every element of every layer (``layers`` default: all) globally by its rescaled score
    (:mod:`fastprune.allocate`); ``"fixed"`` is LLM-Pruner's (``ranking`` inside ``layers``).
    ``steps > 1`` prunes iteratively with fresh scores each step.  ``scores`` reuses saved scores (one
    step only); ``plan`` applies a ready plan; ``dry_run`` computes the plan and the report without
    touching the model.  ``uniform`` prunes every layer by the same amount (block scope), so the
    result saves with a plain config that any Hugging Face loader reads; what that config cannot
    express (BLOOM derives head_dim from hidden/n_head and has no MLP width field) is left
    unpruned, with a warning.

    ``reconstruct`` refits the consumers of the pruned channels before compaction
    (:mod:`fastprune.reconstruct`) on ``recon_samples`` x ``recon_seq_len`` tokens of ``recon_calib``
    (default: the generic mix of :mod:`fastprune.data`; a LongTensor or any calibration source),
    with ridge term ``ridge``, a bias term (``recon_bias``) and optionally ``sequential`` statistics.

    ``loss_chunk`` scores with the calibration loss computed that many tokens of logits at a time and
    ``gradient_checkpointing`` recomputes activations in the backward pass instead of keeping them (see
    :func:`fastprune.importance.score`).

    ``ratio_of="prunable"`` counts ``ratio`` over the parameters the scope can remove instead of all
    parameters.  Before anything changes, the report states what the ratio means (the embeddings'
    share, the share of each pruned layer's heads and channels that goes:
    ``report.settings["ratio_meaning"]``) and warns when a pruned layer would lose more than 40 %.
    Warnings (also discovery's) are issued and kept in ``report.settings["warnings"]``.
    Returns a :class:`PruneReport` (the plan is in ``report.settings``).
    """
    from fastprune.importance import score
    from fastprune.select import select

    opts = presets.resolve(method, dict(
        criterion=criterion, scope=scope, ranking=ranking, aggregation=aggregation, layers=layers, calib=calib,
        n_samples=n_samples, seq_len=seq_len, reconstruct=reconstruct, recon_calib=recon_calib,
        recon_samples=recon_samples, recon_seq_len=recon_seq_len, ridge=ridge, recon_bias=recon_bias,
        sequential=sequential, max_group_ratio=max_group_ratio, allocation=allocation))
    if recon_calib is None and isinstance(calib, torch.Tensor):
        opts["recon_calib"] = calib  # the caller's own tokens serve reconstruction too
    criterion, scope, ranking, aggregation = opts["criterion"], opts["scope"], opts["ranking"], opts["aggregation"]
    layers, calib, n_samples, seq_len = opts["layers"], opts["calib"], opts["n_samples"], opts["seq_len"]
    _check_ratio(ratio)
    if ratio_of not in RATIO_OF:
        raise FastpruneError(f"ratio_of must be one of {RATIO_OF}, got {ratio_of!r}")
    if steps < 1:
        raise FastpruneError(f"steps must be at least 1, got {steps}")
    if (scores is not None or plan is not None) and steps != 1:
        raise FastpruneError("saved scores or a ready plan can only be used with steps=1")
    if dry_run and steps != 1:
        raise FastpruneError("dry_run previews one step; use steps=1")
    if opts["allocation"] not in ALLOCATIONS:
        raise FastpruneError(f"unknown allocation {opts['allocation']!r}; choose one of {ALLOCATIONS}")
    adaptive = opts["allocation"] == "sensitivity"
    if adaptive and scope != "block":
        raise FastpruneError("allocation='sensitivity' shares the budget between layers' heads and MLP channels: "
                             "it needs scope='block'")
    if adaptive:
        ranking = "global"
    do_reconstruct = bool(opts["reconstruct"])
    if do_reconstruct and scope != "block":
        raise FastpruneError(f"reconstruction refits the consumers of pruned heads and MLP channels (block scope); "
                             f"scope={scope!r} has none: pass method='llm-pruner' (or reconstruct=False and "
                             "a gradient criterion)")
    activation = criterion in ACTIVATION_CRITERIA and scores is None and plan is None  # scores to compute
    if activation and scope != "block":
        raise FastpruneError(f"criterion={criterion!r} scores attention heads and MLP channels (block scope); for "
                             f"scope={scope!r} pass a gradient criterion (e.g. criterion='element1') or "
                             "method='llm-pruner'")
    if (do_reconstruct or activation) and not isinstance(opts["recon_calib"], torch.Tensor) and tokenizer is None:
        raise FastpruneError("reconstruction and activation criteria need calibration text: pass tokenizer=... "
                             "or recon_calib=<LongTensor of token ids>")
    device = next(model.parameters()).device
    heads = getattr(getattr(model, "config", None), "num_attention_heads", None)
    if scope == "channel" and isinstance(heads, int) and heads > 0:
        round_to = math.lcm(round_to, heads)  # configs require hidden_size % num_attention_heads == 0
    stages: dict[str, StageStat] = {}
    with stage(stages, "discovery", device):
        graph = discover(model)
    original = graph
    if adaptive and layers is None:
        layers = (0, graph.num_layers)  # measurement, not a fixed range, protects the fragile layers
    if adaptive and opts["max_group_ratio"] is None:
        opts["max_group_ratio"] = presets.ADAPTIVE_MAX_GROUP_RATIO
    params_before = graph.total_params
    widths_before = layer_widths(model, graph)
    plans: list[Plan] = []
    notes: list[str] = []
    _note(notes, graph.warnings)
    excluded: dict[str, str] = {}  # uniform: group kinds the config cannot express -> why
    if uniform and plan is None:
        excluded = _config_limits(model, graph, notes)
    requested = ratio if plan is None else None
    if ratio is not None and ratio_of == "prunable":
        from fastprune.select import prunable_params
        ratio = ratio * prunable_params(graph, scope, layers, uniform) / params_before
    reserve = 0  # parameters the refit's bias term will add: selection removes that many more
    if do_reconstruct and opts["recon_bias"] and ratio and plan is None and group_ratio is None:
        from fastprune.reconstruct import bias_overhead
        reserve = bias_overhead(model, graph)
    recon_tokens = None
    recon_reports = []
    meaning: dict[str, Any] = {}
    for step in range(1, steps + 1):
        if plan is not None:
            step_plan = plan
        else:
            step_scores = scores
            if (do_reconstruct or activation) and recon_tokens is None:
                with stage(stages, "calibration", device):
                    recon_tokens = _recon_calibration(opts, tokenizer, seed)
            if step_scores is None:
                tokens = None
                if activation:
                    from fastprune.activation_scores import activation_scores
                    with stage(stages, "scoring", device):
                        step_scores = activation_scores(model, graph, recon_tokens, criterion, ridge=opts["ridge"],
                                                        progress=progress)
                else:
                    if criterion not in GRADIENT_FREE or adaptive:
                        with stage(stages, "calibration", device):
                            tokens = _calibration(model, calib, tokenizer, n_samples, seq_len, seed + step - 1)
                    with stage(stages, "scoring", device):
                        step_scores = score(model, graph, tokens, criterion=criterion, seed=seed + step - 1,
                                            progress=progress, loss_chunk=loss_chunk,
                                            gradient_checkpointing=gradient_checkpointing,
                                            groups=_groups_to_score(graph, scope))
                if adaptive:
                    from fastprune.allocate import sensitivity_scores
                    from fastprune.select import scope_groups
                    if tokens is None:  # activation criteria: their own tokens, the first windows
                        tokens = recon_tokens[: max(1, n_samples)]
                    with stage(stages, "allocation", device):
                        step_scores = sensitivity_scores(model, graph, step_scores, tokens,
                                                         scope_groups(graph, scope, layers)[0],
                                                         aggregation=aggregation, progress=progress)
            target = None
            if ratio is not None and steps == 1:
                target = ratio + reserve / params_before
            elif ratio is not None:  # the cumulative target, as a fraction of the current model
                remaining = params_before * (1 - ratio * step / steps) - reserve
                target = max(0.0, 1 - remaining / graph.total_params)
            step_group_ratio = None if group_ratio is None else 1 - (1 - group_ratio) ** (1 / steps)

            def choose(view: PruningGraph, step_scores=step_scores, target=target,
                       step_group_ratio=step_group_ratio) -> Plan:
                return select(view, step_scores, target if group_ratio is None else None,
                              group_ratio=step_group_ratio, scope=scope, layers=layers, ranking=ranking,
                              aggregation=aggregation, round_to=round_to, uniform=uniform,
                              max_group_ratio=opts["max_group_ratio"])

            with stage(stages, "selection", device):
                step_plan = _uniform_plan(model, graph, choose, excluded) if uniform else choose(graph)
        plans.append(step_plan)
        step_widths = layer_widths(model, graph, step_plan)  # before apply: the config still matches the graph
        if step == 1:
            meaning = ratio_meaning(model, graph, step_plan)
            _note(notes, [w for w in [cut_warning(meaning, requested, ratio_of)] if w])
        if dry_run:
            break
        recon = None
        if do_reconstruct:
            if recon_tokens is None:
                with stage(stages, "calibration", device):
                    recon_tokens = _recon_calibration(opts, tokenizer, seed)
            with stage(stages, "reconstruction", device):
                recon = run_reconstruction(model, graph, step_plan, recon_tokens, ridge=opts["ridge"],
                                           bias=opts["recon_bias"], sequential=opts["sequential"], progress=progress,
                                           require_bias=uniform)
            recon_reports.append(recon.summary())
            _note(notes, recon.skipped)
        with stage(stages, "compaction", device):
            apply(model, step_plan, graph, progress=progress)
        if recon is not None:
            attach_biases(model, recon, step_plan, graph)
        if step < steps:
            with stage(stages, "discovery", device):
                graph = discover(model)
            _note(notes, graph.warnings)
    last = plans[-1]
    if dry_run:
        params_after = predicted_params(graph, last)
    else:
        params_after = sum(p.numel() for p in model.parameters())
    # widths after the last plan, keyed by the layer's index in the original model
    original_index = list(range(original.num_layers))
    for p in plans[:-1]:
        original_index = [x for j, x in enumerate(original_index) if j not in set(p.remove_layers)]
    widths_after = {original_index[i]: w for i, w in step_widths.items()}
    hidden_after = _hidden_size(graph, last)
    layers_after = graph.num_layers - len(last.remove_layers)
    settings = {"method": method, "criterion": criterion, "scope": scope, "ranking": ranking,
                "aggregation": aggregation, "ratio": ratio, "ratio_of": ratio_of, "group_ratio": group_ratio,
                "steps": steps, "n_samples": n_samples, "seq_len": seq_len, "seed": seed, "round_to": round_to,
                "uniform": uniform, "max_group_ratio": opts["max_group_ratio"], "reconstruct": do_reconstruct,
                "allocation": opts["allocation"],
                "plans": [p.to_json() for p in plans], "warnings": notes, "ratio_meaning": meaning}
    if do_reconstruct:
        settings["reconstruction"] = {"calib": _source_name(opts["recon_calib"]), "n_samples": opts["recon_samples"],
                                      "seq_len": opts["recon_seq_len"], "ridge": opts["ridge"],
                                      "bias": opts["recon_bias"], "sequential": opts["sequential"],
                                      "steps": recon_reports}
    return PruneReport(params_before=params_before, params_after=params_after,
                       ratio_target=ratio if ratio is not None else float("nan"),
                       widths_before=widths_before, widths_after=widths_after,
                       hidden_before=_hidden_size(original), hidden_after=hidden_after,
                       layers_before=original.num_layers, layers_after=layers_after, stages=stages,
                       settings=settings, dry_run=dry_run)


def _source_name(source: Any) -> Any:
    if isinstance(source, torch.Tensor):
        return f"tensor {tuple(source.shape)}"
    return [str(s) for s in source] if isinstance(source, (list, tuple)) else str(source)


def _recon_calibration(opts: dict[str, Any], tokenizer: Any, seed: int) -> torch.Tensor:
    """The reconstruction / activation-criteria calibration tokens (their own budget and mix)."""
    from fastprune import data

    source = opts["recon_calib"]
    if isinstance(source, torch.Tensor):
        return data.calibration_batch(tokenizer, source)
    return data.calibration_batch(tokenizer, source, n_samples=opts["recon_samples"], seq_len=opts["recon_seq_len"],
                                  seed=seed, bos=None)


def _note(notes: list[str], new: list[str]) -> None:
    """Keep and issue each warning once."""
    for text in new:
        if text not in notes:
            notes.append(text)
            warnings.warn(text, stacklevel=3)


_KIND_NAMES = {"heads": "attention heads", "channels": "MLP channels", "hidden": "hidden channels"}


def _config_limits(model: torch.nn.Module, graph: PruningGraph, notes: list[str]) -> dict[str, str]:
    """Block-scope kinds that ``uniform`` cannot prune because the model's config cannot express them.

    Each kind is probed with plans that leave every group of that kind the same smaller width (the
    reason kept is a shape mismatch where some width builds at all).  Raises when no kind is left.
    """
    groups = [g for g in graph.groups if g.kind in LAYER_KINDS and g.size > 1]
    sizes = {g.name: g.size for g in graph.groups}
    limits: dict[str, str] = {}
    for kind in sorted({g.kind for g in groups}):
        members = [g for g in groups if g.kind == kind]
        smallest = min(g.size for g in members)
        reasons = []
        for width in range(smallest - 1, max(smallest - 9, 0), -1):
            probe = Plan(fingerprint=graph.fingerprint, keep={g.name: list(range(width)) for g in members},
                         group_sizes=sizes)
            why, built = _mismatches(model, graph, probe).get(kind, (None, True))
            if built:  # expressible (why is None), or the config builds and the shapes say why not
                break
            reasons.append(why)
        else:
            why = reasons[0] if reasons else None
        if why is not None:
            limits[kind] = why
    config_name = type(getattr(model, "config", None)).__name__
    if limits and set(limits) >= {g.kind for g in groups}:
        why = "; ".join(f"{_KIND_NAMES[k]}: {v}" for k, v in sorted(limits.items()))
        raise FastpruneError(f"uniform=True: {config_name} cannot express any block-scope pruning ({why}). Use "
                             "uniform=False (the checkpoint then loads with trust_remote_code=True or "
                             "fastprune.load_pruned) or scope='layer' (a plain config describes removed layers)")
    _note(notes, [f"uniform=True: {config_name} cannot express pruned {_KIND_NAMES[k]} ({v}); they are left "
                  "unpruned" for k, v in sorted(limits.items())])
    return limits


def _uniform_plan(model: torch.nn.Module, graph: PruningGraph, choose: Callable[[PruningGraph], Plan],
                  excluded: dict[str, str]) -> Plan:
    """A uniform plan over the kinds the config can express, checked before any weight is touched."""
    view = graph
    if excluded:
        view = dataclasses.replace(graph, groups=[g for g in graph.groups if g.kind not in excluded])
    try:
        plan = choose(view)
    except FastpruneError as exc:
        if not excluded:
            raise
        left = ", ".join(sorted(_KIND_NAMES[k] for k in LAYER_KINDS if k not in excluded))
        raise FastpruneError(f"{exc} (uniform=True prunes only {left} here: the config cannot express "
                             f"{', '.join(_KIND_NAMES[k] for k in sorted(excluded))})") from exc
    bad = inexpressible(model, graph, plan)
    if bad:
        why = "; ".join(f"{_KIND_NAMES[k]}: {v}" for k, v in sorted(bad.items()))
        raise FastpruneError(f"uniform=True: the plan's widths cannot be expressed by the model's config ({why}); "
                             "use uniform=False")
    return plan


def inexpressible(model: torch.nn.Module, graph: PruningGraph, plan: Plan) -> dict[str, str]:
    """Group kinds ``plan`` prunes that the model's own config class cannot describe, each with the reason.

    For each kind, the config is updated as :func:`fastprune.apply.apply` would for that kind's part
    of the plan, the architecture is built from it on the meta device, and its parameter shapes are
    compared with the shapes the plan leaves.  Models without a Hugging Face config give ``{}``.
    """
    return {kind: why for kind, (why, _) in _mismatches(model, graph, plan).items()}


def _mismatches(model: torch.nn.Module, graph: PruningGraph, plan: Plan) -> dict[str, tuple[str, bool]]:
    """Per inexpressible kind: why, and whether the config built a model at all."""
    config = getattr(model, "config", None)
    base = getattr(type(model), "_fastprune_base", type(model))
    if config is None or not hasattr(base, "_from_config"):
        return {}
    kinds = {g.name: g.kind for g in graph.groups}
    bad: dict[str, tuple[str, bool]] = {}
    for kind in sorted({kinds[n] for n, kept in plan.keep.items() if len(kept) < plan.group_sizes.get(n, 0)}):
        part = dataclasses.replace(plan, keep={n: k for n, k in plan.keep.items() if kinds[n] == kind},
                                   remove_layers=[])
        found = _shape_mismatch(model, base, config, graph, part)
        if found is not None:
            bad[kind] = found
    return bad


def _shape_mismatch(model: torch.nn.Module, base: type, config: Any, graph: PruningGraph,
                    plan: Plan) -> tuple[str, bool] | None:
    """Why a model built from the config updated for ``plan`` would not have its shapes (and whether
    it built at all), or None."""
    updated = copy.deepcopy(config)
    update_config(updated, plan, graph, layer_widths(model, graph, plan))
    try:
        with torch.device("meta"):
            reference = base._from_config(updated)
    except Exception as exc:  # the config class itself refuses these widths
        return f"{type(exc).__name__}: {exc}", False
    theirs = {n: list(p.shape) for n, p in reference.named_parameters(remove_duplicate=False)}
    kept = kept_indices(plan, graph)
    for name in sorted({name for name, _ in kept}):
        shape = [len(kept[(name, d)]) if (name, d) in kept else n for d, n in enumerate(graph.param_shapes[name])]
        if name in theirs and theirs[name] != shape:
            return f"{name} would be {theirs[name]} under the saved config, the pruned model has {shape}", True
    return None
