"""Declarative help for what tracing alone cannot decide, per model family.

Discovery needs no model-specific code for most families.  Four things can still need help:

- a per-head constant built once for the whole model (BLOOM's ALiBi slopes, Baichuan-13B's ALiBi
  mask buffer): tracing blocks constants, because a fixed-size constant cannot shrink with a
  channel space.  ``free_constants=True`` lets such constants follow the spaces they meet; the
  override's ``adapt`` must then keep them in step after pruning (:func:`slice_head_rows` makes
  each pruned attention module select its kept heads' rows);
- a coupling the tracer cannot see (an op it has no rule for, e.g. a custom kernel):
  ``couplings`` declares pairs of ``(param, dim)`` that share one channel space.  A declared
  coupling is trusted: its space is pruned even where an unmapped op touched it;
- a module attribute that holds a width where tracing cannot see it (it is read in arithmetic, not
  passed as a size to ``view``/``expand``/``split``): ``widths`` declares ``{attribute: count}`` on
  the module of each heads group (``count``: ``"heads"``, ``"kv_heads"``) or MLP channel group
  (``"intermediate"``); ``"config.<field>"`` is a field of the config the module reads, which then
  becomes the module's own copy (Phi-3 slices its fused qkv by ``self.config.num_attention_heads``).
  The width resolver (:mod:`fastprune.widths`) keeps them in step and checkpoints carry them;
- state that ``adapt`` attaches to modules and a saved checkpoint must carry: ``save_state(model)``
  returns it as JSON-friendly data, stored in ``config.json``; ``restore(model, state)`` re-applies
  it when the checkpoint is loaded.  ``fastprune.load_pruned`` calls the registered ``restore``;
  ``from_pretrained(..., trust_remote_code=True)`` looks the key up in the copied
  ``modeling_fastprune.py`` (``RESTORERS``), which knows the built-in families only.

Register your own with :func:`register_override` (keyed by ``config.model_type`` or the model
class name; ``when`` narrows a key shared by variants that differ).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from fastprune.errors import FastpruneError
from fastprune.graph import PruningGraph
from fastprune.plan import Plan
from fastprune.remote import modeling_fastprune as remote


@dataclass
class Override:
    """What a family needs beyond tracing (see the module docstring)."""

    free_constants: bool = False
    couplings: list[tuple[tuple[str, int], tuple[str, int]]] = field(default_factory=list)
    widths: dict[str, str] = field(default_factory=dict)  # module attribute -> count it holds (see above)
    adapt: Callable[[torch.nn.Module, Plan, PruningGraph], None] | None = None
    save_state: Callable[[torch.nn.Module], dict[str, Any]] | None = None
    restore: Callable[[torch.nn.Module, dict[str, Any]], None] | None = None
    when: Callable[[torch.nn.Module], bool] | None = None


_OVERRIDES: dict[str, Override] = {}


def register_override(key: str, override: Override) -> None:
    """Use ``override`` for models whose ``config.model_type`` or class name is ``key``."""
    if (override.save_state is None) != (override.restore is None):
        raise FastpruneError(f"override {key!r}: save_state and restore go together (what is saved must be "
                             "restored on load)")
    _OVERRIDES[key] = override


def override_key(model: torch.nn.Module) -> str | None:
    """The key of the override registered for ``model`` (model type first, then class name), if any."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for key in (model_type, type(model).__name__):
        override = _OVERRIDES.get(key) if key else None
        if override is not None and (override.when is None or override.when(model)):
            return key
    return None


def registered_override(key: str | None) -> Override | None:
    """The override registered under ``key`` (None for None or an unknown key)."""
    return None if key is None else _OVERRIDES.get(key)


def override_for(model: torch.nn.Module) -> Override | None:
    """The registered override of ``model``, if any."""
    key = override_key(model)
    return None if key is None else _OVERRIDES[key]


def saved_state(model: torch.nn.Module) -> dict[str, Any]:
    """``{override key: state}`` for a checkpoint of ``model`` (empty when there is nothing to save)."""
    key = override_key(model)
    override = None if key is None else _OVERRIDES[key]
    if override is None or override.save_state is None:
        return {}
    state = override.save_state(model)
    return {key: state} if state else {}


def restore_state(model: torch.nn.Module, states: dict[str, Any]) -> None:
    """Re-apply the override states a checkpoint saved (see :func:`saved_state`)."""
    for key, state in states.items():
        override = _OVERRIDES.get(key)
        if override is None or override.restore is None:
            raise FastpruneError(f"the checkpoint carries state of override {key!r}, but no override with a restore "
                                 f"function is registered under that key: call fastprune.register_override({key!r}, "
                                 "Override(..., save_state=..., restore=...)) before loading")
        override.restore(model, state)


def unmapped_op_hint(model: torch.nn.Module, message: str) -> str:
    """``message`` (an op the tracer could not map, and its module) with what it means and the fix."""
    config = getattr(model, "config", None)
    key = getattr(config, "model_type", None) or type(model).__name__
    return (f"{message}: every dimension it touches stays unpruned unless a declared coupling names it. If the op "
            f"keeps channels apart (it works per channel), declare the coupling it hides: "
            f"fastprune.register_override({key!r}, fastprune.Override(couplings=[((producer_param, out_dim), "
            "(consumer_param, in_dim))]))")


def slice_head_rows(argument: str, layout: str) -> Callable[[torch.nn.Module, Plan, PruningGraph], None]:
    """An ``adapt``: each pruned attention module selects its kept heads' rows of ``argument``.

    ``argument`` is the attention module's forward argument holding the model-wide per-head tensor;
    ``layout`` is one of ``modeling_fastprune.HEAD_LAYOUTS``.  Iterative steps compose: the rows
    kept are always indices of the original heads.
    """
    if layout not in remote.HEAD_LAYOUTS:
        raise FastpruneError(f"unknown head layout {layout!r}; choose one of {remote.HEAD_LAYOUTS}")

    def adapt(model: torch.nn.Module, plan: Plan, graph: PruningGraph) -> None:
        for group in graph.groups_of("heads"):
            if group.name not in plan.keep or group.layer in plan.remove_layers:
                continue
            module = model.get_submodule(group.name)
            per = max(group.heads_per_element, 1)
            heads = [e * per + j for e in plan.keep[group.name] for j in range(per)]
            previous = remote.head_rows(module)
            remote.set_head_rows(module, heads if previous is None else [previous[h] for h in heads], argument,
                                 layout)

    return adapt


def _builds_alibi_mask(model: torch.nn.Module) -> bool:
    """Baichuan-13B and Baichuan2-13B (ALiBi) build their mask in ``get_alibi_mask``; the 7B models use RoPE."""
    return any(callable(getattr(m, "get_alibi_mask", None)) for m in model.modules())


def keep_dense_layers_listed(model: torch.nn.Module, plan: Plan, graph: PruningGraph) -> None:
    """An ``adapt`` for Qwen's MoE configs: ``mlp_only_layers`` lists the dense layers by index.

    Once layers are removed, the kept dense layers are listed by their new indices, and
    ``decoder_sparse_step`` (every step-th layer has experts) becomes 1, since the step pattern no
    longer describes the kept layers: the list says it all.
    """
    config = model.config
    if not plan.remove_layers or not isinstance(getattr(config, "mlp_only_layers", None), list):
        return
    layers = model.get_submodule(graph.layer_container)
    kept = [layer for i, layer in enumerate(layers) if i not in set(plan.remove_layers)]
    config.mlp_only_layers = [i for i, layer in enumerate(kept) if not any(p.dim() == 3 for p in layer.parameters())]
    if getattr(config, "decoder_sparse_step", 1) != 1:
        config.decoder_sparse_step = 1


# Phi-3 slices its fused qkv rows by its config's head count and its own kv head count (arithmetic)
register_override("phi3", Override(widths={"config.num_attention_heads": "heads", "num_key_value_heads": "kv_heads",
                                            "config.num_key_value_heads": "kv_heads"}))
for _qwen_moe in ("qwen2_moe", "qwen3_moe"):
    register_override(_qwen_moe, Override(adapt=keep_dense_layers_listed))
register_override("bloom", Override(free_constants=True, adapt=slice_head_rows("alibi", "batch_x_heads"),
                                    save_state=remote.head_rows_state, restore=remote.restore_head_rows))
register_override("baichuan", Override(free_constants=True, adapt=slice_head_rows("attention_mask", "heads_q_k"),
                                       save_state=remote.head_rows_state, restore=remote.restore_head_rows,
                                       when=_builds_alibi_mask))
