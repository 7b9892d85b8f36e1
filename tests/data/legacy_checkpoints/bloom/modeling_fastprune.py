"""Modeling file that fastprune copies into checkpoints that a plain config cannot describe.

``config.json`` names :class:`FastpruneForCausalLM` in ``auto_map``, so
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` comes here.  It builds the
original architecture (``config.architectures``, else the auto mapping of the config's class) from
the config, then gives the tensors and integer module attributes listed under ``config.fastprune``
their pruned values, sets the float values the config would compute differently (``values``:
Gemma's embedding scale, which stays ``sqrt`` of the original hidden size), and re-applies the
per-layer state that family overrides saved under ``config.fastprune["overrides"]`` (BLOOM's and
Baichuan-13B's ALiBi rows of each layer's kept heads).  Only torch and transformers are needed:
fastprune itself does not have to be installed where the checkpoint is loaded.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch

SPEC_KEY = "fastprune"  # config attribute: {"tensors": {name: shape}, "attributes": {module: {attr: value}},
#                         "values": {module: {float attribute or buffer: value}}, "overrides": {key: state}}


def base_class(config) -> type:
    """The architecture class the checkpoint was pruned from."""
    import transformers
    from transformers import AutoModelForCausalLM, PreTrainedModel

    for name in getattr(config, "architectures", None) or ():
        cls = getattr(transformers, name, None)
        if isinstance(cls, type) and issubclass(cls, PreTrainedModel):
            return cls
    return AutoModelForCausalLM._model_mapping[type(config)]


def _resized(old: torch.Tensor, shape: list[int]) -> torch.Tensor:
    """A tensor of ``shape`` holding the overlapping corner of ``old`` (zeros elsewhere)."""
    new = old.new_zeros(shape)
    overlap = tuple(slice(0, min(a, b)) for a, b in zip(old.shape, shape))
    with torch.no_grad():
        new[overlap] = old[overlap]
    return new


def restore_pruned_shapes(model: torch.nn.Module, spec: dict) -> None:
    """Resize the listed tensors and set the listed module attributes and values; tied tensors stay tied."""
    modules = dict(model.named_modules())
    replaced: dict[int, torch.Tensor] = {}
    for name, shape in spec.get("tensors", {}).items():
        module_name, _, attr = name.rpartition(".")
        module = modules[module_name]
        old = getattr(module, attr)
        if id(old) not in replaced:
            new = _resized(old, shape)
            if isinstance(old, torch.nn.Parameter):
                new = torch.nn.Parameter(new, requires_grad=old.requires_grad)
            replaced[id(old)] = new
        if attr in module._parameters:
            module._parameters[attr] = replaced[id(old)]
        else:
            module._buffers[attr] = replaced[id(old)]
    for module_name, attrs in spec.get("attributes", {}).items():
        module = modules[module_name]
        for attr, value in attrs.items():
            setattr(module, attr, tuple(value) if isinstance(getattr(module, attr, None), tuple) else value)
    restore_values(model, spec)


def restore_values(model: torch.nn.Module, spec: dict) -> None:
    """Set the float module attributes and non-persistent buffers listed under ``spec["values"]``.

    Transformers re-initializes non-persistent buffers from the config after ``from_pretrained``
    has built the model, so this runs again once loading is done.
    """
    for module_name, values in spec.get("values", {}).items():
        module = model.get_submodule(module_name)
        for name, value in values.items():
            old = module._buffers.get(name)
            if old is None:
                setattr(module, name, value)
            else:
                module._buffers[name] = torch.tensor(value, dtype=old.dtype, device=old.device)


# ---------------------------------------------------------------------------------------------- head rows

# How a per-head tensor built once for the whole model (ALiBi slopes or mask) lays out its heads.
HEAD_LAYOUTS = ("batch_x_heads", "heads_q_k")  # BLOOM: [batch * heads, 1, k]; Baichuan-13B: [(b,) heads, q, k]


def _select_head_rows(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """Forward pre-hook: keep the rows of this layer's heads in the model-wide per-head argument."""
    rows = module._fastprune_head_rows
    name, layout = rows["argument"], rows["layout"]
    position = None
    if name in kwargs:
        value = kwargs[name]
    else:
        params = list(inspect.signature(module.forward).parameters)
        if name not in params:
            raise TypeError(f"{type(module).__name__}.forward takes no argument {name!r}, whose head rows "
                            "fastprune must select")
        position = params.index(name)
        value = args[position] if position < len(args) else None
    if not isinstance(value, torch.Tensor):
        return None
    index = module._fastprune_head_index
    if index.device != value.device:
        index = module._fastprune_head_index = index.to(value.device)
    if layout == "batch_x_heads":
        hidden = args[0] if args else kwargs["hidden_states"]
        per_batch = value.view(hidden.shape[0], -1, *value.shape[1:])
        value = per_batch.index_select(1, index).reshape(-1, *value.shape[1:])
    else:
        dim = value.dim() - 3
        if value.shape[dim] == 1:  # a mask shared by all heads: nothing to select
            return None
        value = value.index_select(dim, index)
    if position is None:
        kwargs[name] = value
    else:
        args = (*args[:position], value, *args[position + 1:])
    return args, kwargs


def head_rows(module: torch.nn.Module) -> list[int] | None:
    """The original head indices ``module`` keeps of the model-wide per-head tensor, if set."""
    rows = getattr(module, "_fastprune_head_rows", None)
    return None if rows is None else list(rows["heads"])


def set_head_rows(module: torch.nn.Module, heads: list[int], argument: str, layout: str) -> None:
    """Make ``module`` see only rows ``heads`` (original head indices) of its ``argument`` tensor."""
    if layout not in HEAD_LAYOUTS:
        raise ValueError(f"unknown head layout {layout!r}; choose one of {HEAD_LAYOUTS}")
    first = getattr(module, "_fastprune_head_rows", None) is None
    module._fastprune_head_rows = {"argument": argument, "layout": layout, "heads": [int(h) for h in heads]}
    module._fastprune_head_index = torch.tensor(module._fastprune_head_rows["heads"], dtype=torch.long)
    if first:
        module.register_forward_pre_hook(_select_head_rows, with_kwargs=True)


def head_rows_state(model: torch.nn.Module) -> dict[str, Any]:
    """JSON state of every module's kept head rows: ``{"modules": {path: {argument, layout, heads}}}``."""
    modules = {name: dict(m._fastprune_head_rows) for name, m in model.named_modules()
               if getattr(m, "_fastprune_head_rows", None) is not None}
    return {"modules": modules} if modules else {}


def restore_head_rows(model: torch.nn.Module, state: dict[str, Any]) -> None:
    """Re-apply :func:`head_rows_state` to a freshly built model."""
    for path, rows in state.get("modules", {}).items():
        set_head_rows(model.get_submodule(path), rows["heads"], rows["argument"], rows["layout"])


# override key (config.model_type or class name, as fastprune registered it) -> restore function
RESTORERS: dict[str, Callable[[torch.nn.Module, dict[str, Any]], None]] = {
    "bloom": restore_head_rows,
    "baichuan": restore_head_rows,
}


def restore_overrides(model: torch.nn.Module, spec: dict, restorers: dict | None = None) -> None:
    """Re-apply every override state saved under ``spec["overrides"]``."""
    table = RESTORERS if restorers is None else restorers
    for key, state in (spec.get("overrides") or {}).items():
        restore = table.get(key)
        if restore is None:
            raise ValueError(f"this checkpoint needs the state of fastprune override {key!r} restored, which this "
                             f"modeling file does not know; load it with fastprune.load_pruned after "
                             f"fastprune.register_override({key!r}, Override(..., restore=...))")
        restore(model, state)


# ---------------------------------------------------------------------------------------------- classes

_PRUNED_CLASSES: dict[type, type] = {}


def pruned_class(base: type) -> type:
    """A subclass of ``base`` whose ``__init__`` re-creates the pruned shapes from the config.

    It carries the name and module of ``base``, so transformers treats it as ``base``: the same
    weight conversion mapping (e.g. per-expert MoE tensors saved as legacy names, GPT-NeoX's
    ``embed_out``) and none of the special cases of custom code.
    """
    if base not in _PRUNED_CLASSES:

        def __init__(self, config, *args, **kwargs):
            base.__init__(self, config, *args, **kwargs)
            restore_pruned_shapes(self, getattr(config, SPEC_KEY, None) or {})

        _PRUNED_CLASSES[base] = type(base.__name__, (base,), {
            "__init__": __init__, "__module__": base.__module__, "__qualname__": base.__qualname__,
            "_fastprune_base": base})
    return _PRUNED_CLASSES[base]


def _restore_after_loading(loaded, config):
    """Re-apply what loading re-initialized or never knew; ``loaded`` may be ``(model, loading info)``."""
    model = loaded[0] if isinstance(loaded, tuple) else loaded
    spec = getattr(config, SPEC_KEY, None) or {}
    restore_values(model, spec)
    restore_overrides(model, spec)
    return loaded


class FastpruneForCausalLM:
    """The ``auto_map`` entry: hands loading to the pruned subclass of the original architecture."""

    @classmethod
    def from_pretrained(cls, path, *args, config, **kwargs):
        loaded = pruned_class(base_class(config)).from_pretrained(path, *args, config=config, **kwargs)
        return _restore_after_loading(loaded, config)

    @classmethod
    def _from_config(cls, config, **kwargs):
        model = pruned_class(base_class(config))._from_config(config, **kwargs)
        return _restore_after_loading(model, config)

    @classmethod
    def register_for_auto_class(cls, auto_class: object = None) -> None:
        """Nothing to register: the pruned class is made per architecture when loading."""
