"""Declarative help for what tracing alone cannot decide, per model family.

Discovery needs no model-specific code for most families.  Two things can still need help:

- a per-head constant built inside the forward pass from factory ops (BLOOM's ALiBi slopes):
  tracing blocks factory-made constants, because a fixed-size constant cannot shrink with a
  channel space.  ``free_constants=True`` lets such constants follow the spaces they meet; the
  override's ``adapt`` must then keep them in step after pruning;
- a coupling the tracer cannot see (an op it has no rule for): ``couplings`` declares pairs of
  ``(param, dim)`` that share one channel space.

Register your own with :func:`register_override` (keyed by ``config.model_type`` or the model
class name).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from fastprune.graph import PruningGraph
from fastprune.plan import Plan


@dataclass
class Override:
    """What a family needs beyond tracing (see the module docstring)."""

    free_constants: bool = False
    couplings: list[tuple[tuple[str, int], tuple[str, int]]] = field(default_factory=list)
    adapt: Callable[[torch.nn.Module, Plan, PruningGraph], None] | None = None


_OVERRIDES: dict[str, Override] = {}


def register_override(key: str, override: Override) -> None:
    """Use ``override`` for models whose ``config.model_type`` or class name is ``key``."""
    _OVERRIDES[key] = override


def override_for(model: torch.nn.Module) -> Override | None:
    """The registered override of ``model``, if any."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return _OVERRIDES.get(model_type) or _OVERRIDES.get(type(model).__name__)


def _slice_alibi(model: torch.nn.Module, plan: Plan, graph: PruningGraph) -> None:
    """BLOOM builds ALiBi slopes once for all heads; each pruned layer keeps its heads' rows."""
    for group in graph.groups_of("heads"):
        if group.name not in plan.keep or group.layer in plan.remove_layers:
            continue
        attn = model.get_submodule(group.name)
        kept = torch.tensor(plan.keep[group.name], dtype=torch.long)
        previous = getattr(attn, "_fastprune_alibi_heads", None)
        attn._fastprune_alibi_heads = kept if previous is None else previous[kept]
        if previous is not None:
            continue  # already wrapped by an earlier step: the index above composes
        total = group.size * group.heads_per_element
        original = attn.forward

        def forward(*args, _attn=attn, _original=original, _total=total, **kwargs):
            alibi = kwargs["alibi"]
            rows = alibi.view(-1, _total, *alibi.shape[1:])
            heads = _attn._fastprune_alibi_heads.to(alibi.device)
            kwargs["alibi"] = rows.index_select(1, heads).reshape(-1, *alibi.shape[1:])
            return _original(*args, **kwargs)

        attn.forward = forward


register_override("bloom", Override(free_constants=True, adapt=_slice_alibi))
