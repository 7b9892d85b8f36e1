"""Criteria from activation statistics, the ones that pair with reconstruction (no gradients).

Both read the second moments of each consumer's inputs (the projection that reads a group's
channels: ``down_proj`` for MLP channels, ``o_proj`` for heads), gathered one layer at a time by
:mod:`fastprune.layerwise` like :func:`fastprune.reconstruct.reconstruct` does:

- ``fluctuation`` (FLAP's metric): for every input column j, the variance of x_j over the
  calibration tokens times the squared norm of the weight column, ``Var(x_j) * ||W[:, j]||^2``,
  summed over the element's columns.
- ``obs``: the output error of removing the element *after the optimal refit* of the other
  columns (Optimal Brain Surgeon, structured): with ``H = M + lambda I`` the regularised second
  moment and ``c`` the element's columns, ``tr(W_c [(H^-1)_cc]^-1 W_c^T)``.  It is what
  reconstruction leaves, element by element.

Scores land in :class:`fastprune.importance.Scores` on the consumer's slice row (other rows 0), so
use ``aggregation="sum"`` or ``"max"`` with them.  Per layer, the layer score is the sum of its
elements' scores.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from fastprune.errors import FastpruneError
from fastprune.graph import LAYER_KINDS, Group, PruningGraph
from fastprune.importance import Scores
from fastprune.layerwise import propagate, record_layer_calls
from fastprune.reconstruct import DEFAULT_RIDGE, GramStats, _conv1d_type

ACTIVATION_CRITERIA = ("fluctuation", "obs")


def _consumer_slices(model: torch.nn.Module, group: Group) -> list[tuple[int, str, int]]:
    """(slice index, module, input dim) of every Linear/Conv1D input slice of ``group``."""
    modules = dict(model.named_modules())
    conv1d = _conv1d_type()
    out = []
    for k, sl in enumerate(group.slices):
        owner, _, leaf = sl.param.rpartition(".")
        mod = modules.get(owner)
        in_dim = 1 if isinstance(mod, torch.nn.Linear) else 0 if conv1d and isinstance(mod, conv1d) else None
        if sl.role == "in" and leaf == "weight" and in_dim == sl.dim:
            out.append((k, owner, in_dim))
    return out


def _element_scores(criterion: str, weight: torch.Tensor, moments: torch.Tensor, cols: torch.Tensor,
                    ridge: float) -> torch.Tensor:
    """Per element (rows of ``cols``: the element's input columns) its score for one consumer."""
    w = weight.double()
    if criterion == "fluctuation":
        per_col = moments.diagonal() * w.square().sum(0)
        return per_col[cols].sum(1)
    lam = ridge * moments.diagonal().mean().clamp_min(1e-12)
    h = moments + lam * torch.eye(moments.shape[0], dtype=moments.dtype, device=moments.device)
    hinv = torch.cholesky_inverse(torch.linalg.cholesky_ex(h)[0])  # definite by the ridge: no check, no sync
    if cols.shape[1] == 1:
        c = cols[:, 0]
        return w[:, c].square().sum(0) / hinv.diagonal()[c]
    out = []
    for c in cols:
        wc = w[:, c]
        block = torch.linalg.cholesky_ex(hinv[c][:, c])[0]
        out.append((torch.cholesky_solve(wc.T, block) * wc.T).sum())
    return torch.stack(out)


def activation_scores(model: torch.nn.Module, graph: PruningGraph, calib: torch.Tensor, criterion: str = "obs",
                      *, ridge: float = DEFAULT_RIDGE, batch_size: int = 8, progress: bool = True) -> Scores:
    """Score every head and MLP-channel group of ``graph`` with an activation criterion (module notes)."""
    if criterion not in ACTIVATION_CRITERIA:
        raise FastpruneError(f"unknown activation criterion {criterion!r}; choose one of {ACTIVATION_CRITERIA}")
    if not isinstance(calib, torch.Tensor) or calib.dim() != 2 or calib.dtype != torch.long:
        raise FastpruneError(f"the {criterion} criterion needs calib: an (n, seq_len) LongTensor of token ids")
    if graph.layer_container is None:
        raise FastpruneError(f"the {criterion} criterion needs a model with repeated layers")
    modules = dict(model.named_modules())
    by_layer: dict[int, list[tuple[Group, list[tuple[int, str, int]]]]] = {}
    for g in graph.groups:
        if g.kind in LAYER_KINDS and g.layer is not None:
            found = _consumer_slices(model, g)
            if found:
                by_layer.setdefault(g.layer, []).append((g, found))
    groups = {g.name: torch.zeros(len(g.slices), g.size, dtype=torch.float64) for g in graph.groups}
    layers = model.get_submodule(graph.layer_container)
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(by_layer), desc=f"scoring ({criterion})", unit="layer", disable=not progress)
    results: list[tuple[str, int, torch.Tensor]] = []
    try:
        record = record_layer_calls(model, layers, calib.to(next(model.parameters()).device), batch_size)

        def visit(i: int, inputs: list[torch.Tensor]) -> list[torch.Tensor] | None:
            if i not in by_layer:
                return None
            names = {owner for _, found in by_layer[i] for _, owner, _ in found}
            stats = GramStats({n: modules[n] for n in names})
            try:
                outputs = [record.run(layers[i], i, j, h) for j, h in enumerate(inputs)]
            finally:
                stats.remove()
            for g, found in by_layer[i]:
                for k, owner, in_dim in found:
                    sl = g.slices[k]
                    moments, _ = stats.moments(owner, centred=criterion == "fluctuation")
                    w = modules[owner].weight if in_dim == 1 else modules[owner].weight.T
                    cols = sl.indices(range(g.size)).view(g.size, sl.width).to(moments.device)
                    results.append((g.name, k, _element_scores(criterion, w, moments, cols, ridge)))
            bar.update()
            return outputs

        propagate(layers, record, max(by_layer) + 1 if by_layer else 0, visit)
    finally:
        bar.close()
        model.train(was_training)
    if results:  # one host transfer for every score
        flat = torch.cat([values for _, _, values in results]).cpu()
        for (name, k, _), part in zip(results, flat.split([len(v) for _, _, v in results])):
            groups[name][k] = part
    layer_scores = torch.zeros(graph.num_layers, dtype=torch.float64)
    for g in graph.groups:
        if g.layer is not None and g.layer < graph.num_layers:
            layer_scores[g.layer] += groups[g.name].sum()
    return Scores({n: t.float() for n, t in groups.items()}, layer_scores.float(), criterion, graph.fingerprint,
                  {"n_samples": calib.shape[0], "seq_len": calib.shape[1], "ridge": ridge})
