"""Importance scoring with the calibration batch split across data-parallel processes.

Every process holds a full copy of the model and its own shard of the calibration samples; the
scores every process returns equal those of :func:`fastprune.importance.score` on the whole batch.
Only what is linear in the data is summed across processes:

- ``element1`` and the first-order half of ``mix`` take |w*g| per weight, which does not add up
  over shards.  Each process back-propagates its shard's share of the global mean loss, and the
  streaming hook all-reduces the parameter's gradient (the sum over processes is the gradient of
  the whole batch) just before reducing it into row/column partials and freeing it.  One
  gradient is alive at a time, as in the single-process path.
- ``vectorwise`` is linear in the gradient: each process streams its partial sums of w*g, and only
  those (never |w*g|) are summed once at the end.
- ``element2`` and the second-order half of ``mix``: the Fisher diagonal is a sum over samples, so
  the per-process sums of (w*g_s)^2 are summed, then divided by the global sample count.
- ``l1``, ``l2`` and ``random`` read no data: every process computes them alone.

Shards may differ in size (each needs at least one sample).  Start the processes with ``torchrun``
and ``torch.distributed.init_process_group`` (gloo on CPUs, nccl on GPUs) before calling.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from fastprune.graph import PruningGraph
from fastprune.importance import (
    GRADIENT_FREE,
    Scores,
    _blocks,
    _check_calib,
    _checked_params,
    _lm_loss,
    _Partials,
    _reduced_scores,
    _scoring_state,
    _Stream,
    score,
)


class _AllReduceStream(_Stream):
    """The streaming hooks, with the gradient summed over processes before it is reduced."""

    def __init__(self, params: dict[str, torch.nn.Parameter], group: Any):
        self.group = group
        super().__init__(params)

    def _hook(self, name: str):
        reduce = super()._hook(name)

        def hook(p: torch.Tensor) -> None:
            if self.target is not None:
                dist.all_reduce(p.grad, group=self.group)
            reduce(p)

        return hook


def _sum_channel(acc: _Partials, channel: int, group: Any) -> None:
    for table in (acc.rows, acc.cols):
        for t in table.values():
            dist.all_reduce(t[channel], group=group)


def _partials(model, params, blocks, calib, n_total, criterion, batch_size, group, progress):
    from tqdm.auto import tqdm

    n = calib.shape[0]
    first = _Partials(params, blocks) if criterion in ("element1", "mix", "vectorwise") else None
    second = _Partials(params, blocks) if criterion in ("element2", "mix") else None
    batch = n if batch_size is None else max(1, min(batch_size, n))
    chunks = [calib[i:i + batch] for i in range(0, n, batch)] if first is not None else []
    linear = criterion == "vectorwise"
    stream = _Stream(params) if linear else _AllReduceStream(params, group)
    plain = _Stream(params) if second is not None else None
    try:
        with tqdm(total=len(chunks) + (n if second is not None else 0), desc=f"scoring ({criterion}, shard)",
                  disable=not progress) as bar:
            for i, chunk in enumerate(chunks):
                loss = _lm_loss(model, chunk) * (chunk.shape[0] / n_total)  # this shard's part of the global mean
                stream.backward(loss, first if (linear or i == len(chunks) - 1) else None)
                bar.update()
            if second is not None:
                stream.remove()  # per-sample passes: no gradient may be all-reduced
                for s in range(n):
                    plain.backward(_lm_loss(model, calib[s:s + 1]), second)
                    bar.update()
    finally:
        stream.remove()
        if plain is not None:
            plain.remove()
    if linear:
        _sum_channel(first, 1, group)
    if second is not None:
        _sum_channel(second, 2, group)
        for table in (second.rows, second.cols):
            for t in table.values():
                t[2] /= n_total
    return first, second


def score_distributed(model: torch.nn.Module, graph: PruningGraph, calib: torch.Tensor | None = None,
                      criterion: str = "element1", *, batch_size: int | None = None, seed: int = 0,
                      gradient_checkpointing: bool = False, progress: bool = True, group: Any = None) -> Scores:
    """:func:`fastprune.importance.score` over the union of every process's ``calib`` shard.

    Call it on every process of ``group`` (default: the world) with the same model weights and
    graph; each process returns the same scores.  Without an initialised process group (or with
    one process) this is ``score`` itself.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1 \
            or criterion in GRADIENT_FREE:
        return score(model, graph, calib, criterion, batch_size=batch_size, seed=seed,
                     gradient_checkpointing=gradient_checkpointing, progress=progress)
    params = _checked_params(model, graph, criterion, batch_size)
    calib = _check_calib(calib, model)
    count = torch.tensor([calib.shape[0]], dtype=torch.long, device=calib.device)
    dist.all_reduce(count, group=group)
    n_total = int(count)
    blocks = _blocks(graph, list(params))
    with _scoring_state(model, params, gradient_checkpointing), torch.enable_grad():
        first, second = _partials(model, params, blocks, calib, n_total, criterion, batch_size, group, progress)
    groups, layer_scores = _reduced_scores(graph, params, criterion, first, second, blocks)
    settings = {"seed": seed, "n_samples": n_total, "seq_len": calib.shape[1], "batch_size": batch_size,
                "gradient_checkpointing": gradient_checkpointing, "processes": dist.get_world_size(group)}
    return Scores(groups, layer_scores, criterion, graph.fingerprint, settings)
