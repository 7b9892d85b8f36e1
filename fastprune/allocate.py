"""Adaptive allocation: how much each layer's attention and MLP give up, decided by measurement.

LLM-Pruner removes the same share of every group inside a hand-set layer range, which protects the
first and last layers by fiat and cuts attention and MLP alike.  :func:`sensitivity_scores` instead
*measures* how much each group (one layer's attention heads, one layer's MLP channels) costs: for every
group it silences a probe share of its lowest-scored elements (their input columns in the projection
that reads them, which is exactly what removing them does to the layer's output), measures the increase
of the calibration loss, and rescales the group's element scores so that the probe elements' scores sum
to that increase.  Selection then ranks every element of every layer globally by rescaled score per
parameter (``ranking="global"``, all layers, with a minimum width per group): a fragile layer, or a
model whose attention is expensive to cut (SmolLM2 has three kv groups per layer), keeps more, because
its measured loss says so.  The criterion still orders elements inside a group.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from fastprune.errors import FastpruneError
from fastprune.graph import Group, PruningGraph
from fastprune.importance import Scores, aggregate

PROBE = 0.25  # share of a group's elements silenced to measure its sensitivity (at least one element)


def _calib_loss(model: torch.nn.Module, tokens: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Mean next-token loss over ``tokens`` as a device tensor (no host sync)."""
    total = torch.zeros((), dtype=torch.float64, device=tokens.device)
    for i in range(0, tokens.shape[0], batch_size):
        ids = tokens[i:i + batch_size]
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1]
        total += torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten(),
                                                   reduction="sum").double()
    return total / (tokens.shape[0] * (tokens.shape[1] - 1))


def _consumer_columns(group: Group, params: dict[str, torch.nn.Parameter]):
    return [(params[sl.param], sl) for sl in group.slices if sl.role == "in" and sl.param in params]


def sensitivity_scores(model: torch.nn.Module, graph: PruningGraph, scores: Scores, calib: torch.Tensor,
                       groups: list[Group], *, aggregation: str = "sum", probe: float = PROBE, batch_size: int = 8,
                       progress: bool = True) -> Scores:
    """``scores`` with each of ``groups`` rescaled by its measured loss increase (see the module notes).

    Returns new :class:`Scores`; the model is left exactly as it was.
    """
    if not 0 < probe < 1:
        raise FastpruneError(f"probe must be in (0, 1), got {probe}")
    if not isinstance(calib, torch.Tensor) or calib.dim() != 2 or calib.dtype != torch.long:
        raise FastpruneError("sensitivity allocation needs calib: an (n, seq_len) LongTensor of token ids")
    agg = aggregate(scores, graph, aggregation)
    params = dict(model.named_parameters())
    device = next(model.parameters()).device
    calib = calib.to(device)
    was_training = model.training
    model.eval()
    rises = []
    probes = []
    try:
        with torch.no_grad():
            base = _calib_loss(model, calib, batch_size)
            for g in tqdm(groups, desc="sensitivity", unit="group", disable=not progress):
                n = max(1, int(round(probe * g.size))) if g.size > 1 else 0
                order = torch.sort(agg[g.name], stable=True).indices[:n]
                probes.append(order)
                saved = []
                for p, sl in _consumer_columns(g, params):
                    idx = sl.indices(order).to(device)
                    saved.append((p, sl.dim, idx, p.index_select(sl.dim, idx).clone()))
                    p.index_fill_(sl.dim, idx, 0)
                try:
                    rises.append(_calib_loss(model, calib, batch_size) - base if saved and n else base * 0)
                finally:
                    for p, dim, idx, old in saved:
                        p.index_copy_(dim, idx, old)
    finally:
        model.train(was_training)
    measured = torch.stack(rises).clamp_min(1e-9).cpu() if rises else torch.zeros(0)  # one host transfer
    out = {name: t.clone() for name, t in scores.groups.items()}
    for k, g in enumerate(groups):
        probe_sum = agg[g.name][probes[k]].sum().clamp_min(1e-30)
        out[g.name] = (scores.groups[g.name].double() * (measured[k] / probe_sum)).float()
    settings = dict(scores.settings, allocation="sensitivity", probe=probe,
                    sensitivity={g.name: float(v) for g, v in zip(groups, measured.tolist())})
    return Scores(out, scores.layer_scores, scores.criterion, scores.fingerprint, settings)
