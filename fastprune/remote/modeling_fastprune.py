"""Modeling file that fastprune copies into checkpoints whose layers have different widths.

``config.json`` names :class:`FastpruneForCausalLM` in ``auto_map``, so
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` comes here.  It builds the
original architecture (``config.architectures``, else the auto mapping of the config's class) from
the config, then gives the tensors and integer module attributes listed under ``config.fastprune``
their pruned values.  Only torch and transformers are needed: fastprune itself does not have to be
installed where the checkpoint is loaded.
"""

from __future__ import annotations

import torch
import transformers
from transformers import AutoModelForCausalLM, PreTrainedModel

SPEC_KEY = "fastprune"  # config attribute: {"tensors": {name: shape}, "attributes": {module: {attr: value}}}


def base_class(config) -> type[PreTrainedModel]:
    """The architecture class the checkpoint was pruned from."""
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
    """Resize the listed tensors and set the listed module attributes; tied tensors stay tied."""
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


_PRUNED_CLASSES: dict[type, type] = {}


def pruned_class(base: type[PreTrainedModel]) -> type[PreTrainedModel]:
    """A subclass of ``base`` whose ``__init__`` re-creates the pruned shapes from the config."""
    if base not in _PRUNED_CLASSES:

        def __init__(self, config, *args, **kwargs):
            base.__init__(self, config, *args, **kwargs)
            restore_pruned_shapes(self, getattr(config, SPEC_KEY, None) or {})

        name = f"Pruned{base.__name__}"
        _PRUNED_CLASSES[base] = type(name, (base,), {"__init__": __init__, "__module__": __name__,
                                                     "__qualname__": name, "_fastprune_base": base})
    return _PRUNED_CLASSES[base]


class FastpruneForCausalLM:
    """The ``auto_map`` entry: hands loading to the pruned subclass of the original architecture."""

    @classmethod
    def from_pretrained(cls, path, *args, config, **kwargs) -> PreTrainedModel:
        return pruned_class(base_class(config)).from_pretrained(path, *args, config=config, **kwargs)

    @classmethod
    def _from_config(cls, config, **kwargs) -> PreTrainedModel:
        return pruned_class(base_class(config))._from_config(config, **kwargs)

    @classmethod
    def register_for_auto_class(cls, auto_class: object = None) -> None:
        """Nothing to register: the pruned class is made per architecture when loading."""
