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

The scoring engine is :func:`fastprune.importance.score` itself; this module hands it an all-reduce
as its ``shard_sum`` hook.  Shards may differ in size (each needs at least one sample).  Start the
processes with ``torchrun`` and ``torch.distributed.init_process_group`` (gloo on CPUs, nccl on GPUs)
before calling.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from fastprune.graph import PruningGraph
from fastprune.importance import GRADIENT_FREE, Scores, score


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

    def shard_sum(t: torch.Tensor) -> None:
        dist.all_reduce(t, group=group)

    scores = score(model, graph, calib, criterion, batch_size=batch_size, seed=seed,
                   gradient_checkpointing=gradient_checkpointing, progress=progress, shard_sum=shard_sum)
    scores.settings["processes"] = dist.get_world_size(group)
    return scores
