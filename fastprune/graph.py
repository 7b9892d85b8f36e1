"""The pruning graph: coupled groups of parameter slices, as plain data.

A *group* is one channel space (an attention head group, an MLP channel, the hidden
dimension) together with every parameter slice that must shrink with it.  Element ``e``
of a group occupies, in each attached :class:`Slice`, the indices ``base + e * stride``
along ``slice.dim`` of that parameter.  This one affine form covers plain projections,
heads (``base = range(head_dim)``), GQA (a kv head owns ``rep`` query heads), fused
tensors (an offset in ``base``) and interleaved layouts (a stride larger than ``base``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from fastprune.widths import WidthMap

GROUP_KINDS = ("heads", "channels", "hidden")
LAYER_KINDS = ("heads", "channels")  # the kinds of group inside one layer (the block scope's)


def layer_of(param: str, container: str | None) -> int | None:
    """Index of the repeated block holding ``param`` (``container.<i>.…``), or None."""
    if container is None or not param.startswith(container + "."):
        return None
    head = param[len(container) + 1:].split(".", 1)[0]
    return int(head) if head.isdigit() else None


@dataclass(frozen=True)
class Slice:
    """The part of one parameter dimension that belongs to a group.

    ``role`` is ``"out"`` when the slice holds rows this parameter produces (a Linear's
    output rows, a bias), ``"in"`` when the dimension is contracted (a Linear's input
    columns), ``"other"`` otherwise (norm weights, embedding columns).
    """

    param: str
    dim: int
    base: tuple[int, ...]
    stride: int
    role: str = "other"

    def indices(self, elements: torch.Tensor | Iterable[int]) -> torch.Tensor:
        """Indices along ``dim`` occupied by ``elements`` (in element order)."""
        elements = torch.as_tensor(list(elements) if not isinstance(elements, torch.Tensor) else elements,
                                   dtype=torch.long)
        base = torch.tensor(self.base, dtype=torch.long)
        return (elements[:, None] * self.stride + base[None, :]).reshape(-1)

    @property
    def width(self) -> int:
        """Number of indices one element occupies."""
        return len(self.base)


@dataclass
class Group:
    """A set of ``size`` interchangeable elements and the slices they own.

    ``root`` lists the indices of the slices that open the group (the output rows of
    q/k for attention, of gate/up for an MLP channel); the ``first`` aggregation uses
    only those.  ``heads_per_element`` is the number of query heads one element
    removes (``rep`` under GQA, 1 under MHA) and is 0 for non-attention groups;
    ``kv_heads_per_element`` is 1 when an element owns its key/value head, 0 under multi-query
    attention (one shared kv head, query heads are the elements).  ``experts`` is the number of
    stacked experts (dim 0 of 3-D expert weights) a channel group spans, 0 for a dense MLP: element
    ``j`` is channel ``j`` of every expert of the layer.
    """

    name: str
    kind: str
    layer: int | None
    size: int
    slices: list[Slice]
    root: list[int] = field(default_factory=list)
    heads_per_element: int = 0
    kv_heads_per_element: int = 0  # 1 when an element is a kv head; 0 for multi-query query heads
    normalized: bool = False  # a norm averages over this space (hidden dim): not exact to mask
    experts: int = 0  # stacked experts whose channel j every element removes (MoE), 0 for dense

    def params_per_element(self, shapes: dict[str, tuple[int, ...]]) -> int:
        """Parameters one element of this group removes (each index counted once)."""
        total = 0
        for sl in self.slices:
            shape = shapes[sl.param]
            other = 1
            for d, n in enumerate(shape):
                if d != sl.dim:
                    other *= n
            total += sl.width * other
        return total


@dataclass
class PruningGraph:
    """Everything discovery found: the groups, the removable layers and model facts."""

    groups: list[Group]
    layer_container: str | None  # module path of the ModuleList holding the blocks
    num_layers: int
    param_shapes: dict[str, tuple[int, ...]]
    fingerprint: str
    warnings: list[str] = field(default_factory=list)
    # where each group's count lives outside the weights (module attributes, config fields), as
    # discovery resolved it; ``apply`` executes it
    widths: WidthMap = field(default_factory=WidthMap)

    def group(self, name: str) -> Group:
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(f"no group named {name!r}; groups are {[g.name for g in self.groups][:8]}...")

    def layer_of(self, param: str) -> int | None:
        """Index of the removable layer holding ``param``, or None."""
        return layer_of(param, self.layer_container)

    def groups_of(self, kind: str) -> list[Group]:
        return [g for g in self.groups if g.kind == kind]

    @property
    def total_params(self) -> int:
        total = 0
        for shape in self.param_shapes.values():
            n = 1
            for s in shape:
                n *= s
            total += n
        return total

    def describe(self, max_slices: int = 8) -> str:
        """A readable summary: one line per group with its size and attached slices."""
        lines = [f"PruningGraph: {len(self.groups)} groups, {self.num_layers} removable layers"
                 f" in {self.layer_container!r}, {self.total_params:,} parameters"]
        for kind in GROUP_KINDS:
            groups = self.groups_of(kind)
            if not groups:
                continue
            lines.append(f"{kind} ({len(groups)} groups):")
            for g in groups:
                where = "all layers" if g.layer is None else f"layer {g.layer}"
                unit = f" ({g.heads_per_element} query heads each)" if kind == "heads" else ""
                unit = f" (in each of {g.experts} experts)" if g.experts else unit
                lines.append(f"  {g.name}  [{where}]  {g.size} elements{unit} x "
                             f"{g.params_per_element(self.param_shapes):,} params")
                shown = []
                for i, sl in enumerate(g.slices[:max_slices]):
                    name = sl.param[len(g.name) + 1:] if sl.param.startswith(g.name + ".") else sl.param
                    offset = f"+{sl.base[0]}" if sl.base and sl.base[0] else ""
                    shown.append(f"{'*' if i in g.root else ''}{name}[dim {sl.dim}{offset}, {sl.width}/el]")
                more = f" ... +{len(g.slices) - max_slices} more" if len(g.slices) > max_slices else ""
                lines.append("      " + ", ".join(shown) + more)
        for w in self.warnings:
            lines.append(f"warning: {w}")
        lines.append("(* marks root slices, used by the 'first' aggregation)")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.describe()
