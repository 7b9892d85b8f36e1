"""Run a model's repeated layers one at a time over calibration text, for any architecture.

Statistics that need one layer's activations at a time (Gram matrices for reconstruction, activation
criteria) come from driving the layers by hand: one cheap *recording pass* per micro-batch runs the
model's own forward with every layer replaced by a recorder, so the model computes whatever it hands
its layers (position embeddings, per-layer attention masks, ALiBi tensors) and the recorder keeps those
arguments; the pass stops after the last layer, so no logits are ever computed.  Then each layer runs
on the stored hidden states of every micro-batch with its own recorded arguments.  Only the hidden
states at one layer boundary (two copies: in and out) and one layer's activations are alive at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from fastprune.errors import FastpruneError


class _Stop(Exception):
    """Raised by the last recorder: the rest of the forward pass (norm, logits) is not needed."""


@dataclass
class LayerCalls:
    """Per micro-batch: the hidden states entering layer 0 and every layer's other call arguments."""

    hidden: list[torch.Tensor]
    calls: list[list[tuple[tuple, dict[str, Any]]]]  # [micro-batch][layer] -> (args, kwargs)
    tail: tuple | None  # what a tuple-returning layer returns after the hidden states; None: a tensor
    extras: dict[str, Any] = field(default_factory=dict)

    def run(self, layer: torch.nn.Module, index: int, batch: int, hidden: torch.Tensor) -> torch.Tensor:
        """Layer ``index`` on ``hidden`` with the arguments the model gave it for micro-batch ``batch``."""
        args, kwargs = self.calls[batch][index]
        out = layer(hidden, *args, **kwargs)
        return out[0] if isinstance(out, tuple) else out


def _split_hidden(args: tuple, kwargs: dict) -> tuple[torch.Tensor, tuple, dict]:
    if args:
        return args[0], args[1:], kwargs
    if "hidden_states" not in kwargs:
        raise FastpruneError("cannot drive the layers one at a time: the model calls its layers without "
                             "positional hidden states or a hidden_states keyword")
    rest = dict(kwargs)
    return rest.pop("hidden_states"), (), rest


def record_layer_calls(model: torch.nn.Module, layers: torch.nn.ModuleList, tokens: torch.Tensor,
                       batch_size: int) -> LayerCalls:
    """Run the recording pass over ``tokens`` in micro-batches of ``batch_size`` (see the module notes)."""
    device = next(model.parameters()).device
    hidden: list[torch.Tensor] = []
    calls: list[list[tuple[tuple, dict]]] = []
    tail: list[tuple | None] = [None]
    originals = [layer.forward for layer in layers]
    current: list[tuple[tuple, dict]] = []

    def recorder(i: int):
        def forward(*args, **kwargs):
            h, rest_args, rest_kwargs = _split_hidden(args, kwargs)
            current.append((rest_args, rest_kwargs))
            if i == 0:
                hidden.append(h.detach())
                out = originals[0](*args, **kwargs)  # learns what a layer returns
                tail[0] = tuple(out[1:]) if isinstance(out, tuple) else None
            if i == len(layers) - 1:
                raise _Stop
            return h if tail[0] is None else (h, *tail[0])
        return forward

    try:
        for i, layer in enumerate(layers):
            layer.forward = recorder(i)
        with torch.no_grad():
            for start in range(0, tokens.shape[0], batch_size):
                current = []
                try:
                    model(input_ids=tokens[start:start + batch_size].to(device), use_cache=False)
                except _Stop:
                    pass
                if len(current) != len(layers):
                    raise FastpruneError(f"the recording pass saw {len(current)} of {len(layers)} layer calls; "
                                         "this model does not call each layer once per forward pass")
                calls.append(current)
    finally:
        for layer in layers:
            if "forward" in vars(layer):
                del layer.forward
    return LayerCalls(hidden=hidden, calls=calls, tail=tail[0])


def propagate(layers: torch.nn.ModuleList, record: LayerCalls, end: int,
              visit: Callable[[int, list[torch.Tensor]], list[torch.Tensor] | None]) -> None:
    """Carry the recorded micro-batches through layers ``0..end-1``, calling ``visit(i, inputs)`` at each.

    ``visit`` gets layer i's inputs per micro-batch; it returns the inputs of layer i + 1 when it ran
    the layer itself (with statistics hooks, or after changing its weights), or None to let the layer
    run as it is now.
    """
    states = list(record.hidden)
    with torch.no_grad():
        for i in range(end):
            out = visit(i, states)
            states = out if out is not None else [record.run(layers[i], i, j, h) for j, h in enumerate(states)]
