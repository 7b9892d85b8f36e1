"""The dispatch mode: tensor dimensions as atoms, and the dispatch of each aten call to its rule."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastprune.spaces import Spaces
from fastprune.trace.rules import IGNORED, rule_for

STRICT_ENV = "FASTPRUNE_STRICT_TRACE"  # "1": a rule that raises fails the trace (the test suite sets it)


class TraceRuleError(RuntimeError):
    """A tracer rule raised: a bug in fastprune's rule for that op (strict mode only)."""


def strict() -> bool:
    """Whether rule errors raise (:data:`STRICT_ENV` is ``"1"``) instead of becoming unmapped-op warnings."""
    return os.environ.get(STRICT_ENV) == "1"


@dataclass
class TraceResult:
    """What the trace learned: atoms of every parameter dimension and the facts around them."""

    spaces: Spaces
    param_atoms: dict[str, list[int]]
    param_roles: dict[tuple[str, int], str]
    attention_params: set[str]  # params whose outputs feed attention queries/keys
    head_atoms: list[int]  # query-head atoms seen in attention ops
    reduced_atoms: set[int]
    view_literals: list[tuple[str, int, int]]  # (module path, atom, literal size) of explicit view sizes
    unmapped: list[str] = field(default_factory=list)


def _tensors_in(value: Any, out: list[torch.Tensor]) -> list[torch.Tensor]:
    """Append the tensors in ``value`` (a tensor, or lists, tuples and dicts of them, at any depth) to ``out``.

    What ``torch.utils._pytree.tree_flatten`` would find among an aten call's arguments, at a fraction
    of its cost (the tracer looks at every call of the forward pass).
    """
    if isinstance(value, torch.Tensor):
        out.append(value)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _tensors_in(item, out)
    elif isinstance(value, dict):
        for item in value.values():
            _tensors_in(item, out)
    return out


@dataclass
class Call:
    """One aten call as a rule sees it: ``name`` is the overload packet's (``view``, ``index_add_``)."""

    func: Any
    name: str
    args: tuple
    kwargs: dict
    out: Any

    @cached_property
    def tensors(self) -> list[torch.Tensor]:
        """Every tensor among the arguments, in order."""
        return _tensors_in(self.kwargs, _tensors_in(self.args, []))

    @cached_property
    def outputs(self) -> list[torch.Tensor]:
        """Every tensor among the outputs, in order."""
        return _tensors_in(self.out, [])

    @property
    def first_output(self) -> torch.Tensor:
        return self.out[0] if isinstance(self.out, (tuple, list)) else self.out


class Tracer(TorchDispatchMode):
    """Gives every tensor dimension an atom and relates them through the rule of each aten call."""

    def __init__(self, model: torch.nn.Module, free_constants: bool = False) -> None:
        super().__init__()
        self.free_constants = free_constants
        self.derived: set[int] = set()  # tensors computed from parameters (with free_constants)
        self.sp = Spaces()
        self.dims: dict[int, tuple[torch.Tensor, list[int]]] = {}
        self.prov: dict[int, frozenset[str]] = {}  # activation -> params whose outputs it carries
        self.pdims: dict[int, list[tuple[str, int] | None]] = {}  # tensor dim -> param dim it is
        self.param_atoms: dict[str, list[int]] = {}
        self.param_roles: dict[tuple[str, int], str] = {}
        self.attention_params: set[str] = set()
        self.head_atoms: list[int] = []
        self.reduced: set[int] = set()
        self.view_literals: list[tuple[str, int, int]] = []
        self.unmapped: list[str] = []
        self.namespace = "aten"  # of the op being dispatched
        self.module_stack: list[str] = [""]
        seen = set()
        for name, p in model.named_parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            atoms = [self.sp.new(s) for s in p.shape]
            self.param_atoms[name] = atoms
            self.dims[id(p)] = (p, atoms)
            self.pdims[id(p)] = [(name, d) for d in range(p.dim())]
            self.derived.add(id(p))

    # ------------------------------------------------------------ helpers for rules

    def atoms(self, t: torch.Tensor) -> list[int]:
        """The atoms of ``t``'s dimensions (blocked ones for a tensor from outside the trace)."""
        if self.free_constants and id(t) not in self.derived:  # a constant: free, couples nothing
            return [self.sp.new(s) for s in t.shape]
        entry = self.dims.get(id(t))
        if entry is None:  # a buffer, an input or a constant made outside the trace: fixed
            atoms = [self.sp.new(s, blocked=True) for s in t.shape]
            self.dims[id(t)] = (t, atoms)
            return atoms
        return entry[1]

    def set(self, t: torch.Tensor, atoms: list[int], prov: frozenset[str] = frozenset(),
            pdims: list | None = None) -> None:
        """Record ``t``'s atoms, the parameters whose outputs it carries and which parameter dims it is."""
        assert len(atoms) == t.dim(), (len(atoms), t.shape)
        self.dims[id(t)] = (t, atoms)
        if prov:
            self.prov[id(t)] = prov
        if pdims is not None and any(x is not None for x in pdims):
            self.pdims[id(t)] = pdims

    def provenance(self, *ts) -> frozenset[str]:
        out = frozenset()
        for t in ts:
            if isinstance(t, torch.Tensor):
                out |= self.prov.get(id(t), frozenset())
        return out

    def fresh(self, t: torch.Tensor, blocked: bool = False) -> list[int]:
        atoms = [self.sp.new(s, blocked=blocked) for s in t.shape]
        self.set(t, atoms)
        return atoms

    def fixed(self, a: int) -> None:
        """Block ``a`` and every piece it is made of (e.g. the rotary and pass-through parts of a head)."""
        for d in self.sp.descendants(a):
            self.sp.block(d)

    def role(self, t: torch.Tensor, dim: int, role: str) -> None:
        pd = self.pdims.get(id(t))
        if pd is not None and pd[dim] is not None:
            self.param_roles.setdefault(pd[dim], role)

    def broadcast(self, inputs: Sequence[torch.Tensor], out_shape: Sequence[int]) -> list[int]:
        """Right-aligned broadcast: dims of equal (non-1) size are the same space."""
        n = len(out_shape)
        out = []
        for k in range(n):
            size = out_shape[k]
            members = []
            for t in inputs:
                j = t.dim() - n + k
                if j >= 0 and t.shape[j] == size and size != 1:
                    members.append(self.atoms(t)[j])
            if members:
                for m in members[1:]:
                    self.sp.union(members[0], m)
                out.append(members[0])
            else:
                out.append(self.sp.new(size))
        return out

    def unknown(self, call: Call, why: str = "no rule", name: str | None = None) -> None:
        """Block every atom the call touches and report it (by ``name``, default the op's) with its module."""
        for t in call.tensors:
            for a in self.atoms(t):
                self.sp.block(a)
        for t in call.outputs:
            self.fresh(t, blocked=True)
        where = self.module_stack[-1] or "<root>"
        self.unmapped.append(f"{self.namespace}.{name or call.name} in module {where!r} ({why})")

    # ------------------------------------------------------------ dispatch

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.__name__.split(".")[0]
        self.namespace = getattr(func, "namespace", "aten")  # named in unmapped-op messages (custom ops too)
        if self.free_constants:
            inputs = _tensors_in(kwargs, _tensors_in(args, []))
            if not any(id(t) in self.derived for t in inputs):
                return out  # computed from constants only (masks, ALiBi slopes): no coupling
            for t in _tensors_in(out, []):
                self.derived.add(id(t))
        if name in IGNORED or not isinstance(out, (torch.Tensor, tuple, list)):
            return out
        call = Call(func, name, args, kwargs, out)
        try:
            rule_for(call)(self, call)
        except Exception as exc:  # a bug in a rule: strict mode (tests) fails, users get a warning, never a guess
            where = self.module_stack[-1] or "<root>"
            if strict():
                raise TraceRuleError(f"the tracer's rule for {self.namespace}.{name} (in module {where!r}) raised "
                                     f"{type(exc).__name__}: {exc}") from exc
            self.unknown(call, f"its rule raised {type(exc).__name__}: {exc}; a fastprune bug, please report it")
        return out


def trace_model(model: torch.nn.Module, input_ids: torch.Tensor, free_constants: bool = False,
                couplings: Sequence[tuple[tuple[str, int], tuple[str, int]]] = ()) -> TraceResult:
    """Run ``model(input_ids)`` under the tracer and return the related spaces.

    ``free_constants`` lets tensors made by factory ops follow the spaces they meet instead of
    blocking them; ``couplings`` declares ``(param, dim)`` pairs that share one space.
    """
    tracer = Tracer(model, free_constants)
    for (p1, d1), (p2, d2) in couplings:
        tracer.sp.union(tracer.param_atoms[p1][d1], tracer.param_atoms[p2][d2])
    names = {id(m): n for n, m in model.named_modules()}
    handles = []

    def push(mod, *_):
        tracer.module_stack.append(names.get(id(mod), "?"))

    def pop(mod, *_):
        if len(tracer.module_stack) > 1:
            tracer.module_stack.pop()

    for m in model.modules():
        handles.append(m.register_forward_pre_hook(push))
        handles.append(m.register_forward_hook(pop, always_call=True))
    try:
        with torch.no_grad(), tracer:
            output = model(input_ids=input_ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    logits = output.logits if hasattr(output, "logits") else output[0]
    for a in tracer.atoms(logits):  # the model's output keeps its shape
        tracer.sp.block(a)
    for (p1, d1), (p2, d2) in couplings:  # a declared coupling is trusted, also where an unmapped op blocked it
        tracer.sp.union(tracer.param_atoms[p1][d1], tracer.param_atoms[p2][d2])
        tracer.sp.blocked[tracer.sp.find(tracer.param_atoms[p1][d1])] = False
    tracer.sp.freeze()  # what the trace related is final: layouts are computed once from here
    return TraceResult(tracer.sp, tracer.param_atoms, tracer.param_roles, tracer.attention_params,
                       tracer.head_atoms, tracer.reduced, tracer.view_literals, tracer.unmapped)
