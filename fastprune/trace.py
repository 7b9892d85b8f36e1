"""Trace one small forward pass at the aten level and relate every tensor dimension.

A :class:`TorchDispatchMode` sees each aten op with real (small) tensors.  Each tensor
dimension gets an atom in :class:`~fastprune.spaces.Spaces`; rules per op family relate
the atoms of inputs and outputs (contractions, broadcasts, views, slices, concatenation,
attention).  Parameters are recognised by identity, so no module names or model classes
are needed.  Ops without a rule block every atom they touch and are reported by name with
the module that ran them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from fastprune.spaces import Spaces

aten = torch.ops.aten

_SAME_DIMS = {
    "clone", "alias", "detach", "_to_copy", "contiguous", "lift_fresh", "lift_fresh_copy",
    "_softmax", "softmax", "_log_softmax", "log_softmax", "fill_", "zero_", "triu", "tril",
    "dropout", "native_dropout", "bernoulli", "bernoulli_", "copy_", "masked_fill", "masked_fill_",
    "cumsum", "_safe_softmax", "roll", "flip", "nan_to_num",
}
_REDUCE_ALONG = {"_softmax", "softmax", "_log_softmax", "log_softmax", "cumsum", "_safe_softmax"}
_REDUCTIONS = {"sum", "mean", "amax", "amin", "max", "min", "var_mean", "var", "std", "argmax", "argmin",
               "logsumexp", "norm", "linalg_vector_norm", "any", "all", "prod", "std_mean", "aminmax"}
_FACTORIES = {"arange", "zeros", "ones", "full", "empty", "scalar_tensor", "randint", "rand", "randn",
              "new_zeros", "new_ones", "new_empty", "new_full", "empty_strided", "linspace", "eye", "tensor"}
# shaped like their input at run time: the output dims are the input's spaces
_LIKE = {"zeros_like", "ones_like", "full_like", "empty_like", "rand_like", "randn_like"}
# data-dependent index computations (routing): values are positions or counts, so every input dim
# is fixed and the outputs are constants of the data
_DATA_INDEX = {"histc", "bincount", "nonzero", "argwhere", "_unique2", "unique_consecutive", "unique_dim"}
# scatter-like in-place writes: (dim argument position, source argument position or None)
_SCATTER = {"index_add": (1, 3), "index_copy": (1, 3), "index_fill": (1, None), "scatter": (1, 3),
            "scatter_add": (1, 3), "scatter_reduce": (1, 3), "index_reduce": (1, 3)}
_POINTWISE_NAMES = {"where", "clamp", "lerp", "addcmul", "addcdiv", "floor_divide", "remainder", "fmod"}
_SDPA = {"_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
         "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
         "_scaled_dot_product_attention_math", "_scaled_dot_product_fused_attention_overrideable",
         "scaled_dot_product_attention"}
_IGNORE = {"_local_scalar_dense", "is_nonzero", "sym_size", "sym_stride", "sym_numel", "equal",
           "_assert_async", "_assert_tensor_metadata", "set_", "resize_", "record_stream"}


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


class _Tracer(TorchDispatchMode):
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

    # ------------------------------------------------------------ helpers

    def atoms(self, t: torch.Tensor) -> list[int]:
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

    # ------------------------------------------------------------ dispatch

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.__name__.split(".")[0]
        self.namespace = getattr(func, "namespace", "aten")  # named in unmapped-op messages (custom ops too)
        if self.free_constants:
            inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
            if not any(id(t) in self.derived for t in inputs):
                return out  # computed from constants only (masks, ALiBi slopes): no coupling
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    self.derived.add(id(t))
        try:
            self.rule(func, name, args, kwargs, out)
        except Exception as exc:  # a rule that cannot relate shapes: block, never guess
            self.unknown(name, args, kwargs, out, f"{type(exc).__name__}: {exc}")
        return out

    def unknown(self, name, args, kwargs, out, why="no rule") -> None:
        flat, _ = tree_flatten((args, kwargs))
        for t in flat:
            if isinstance(t, torch.Tensor):
                for a in self.atoms(t):
                    self.sp.block(a)
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.fresh(t, blocked=True)
        self.unmapped.append(f"{self.namespace}.{name} in module {self.module_stack[-1] or '<root>'!r} ({why})")

    def rule(self, func, name, args, kwargs, out) -> None:
        if name in _IGNORE or not isinstance(out, (torch.Tensor, tuple, list)):
            return
        if name in _FACTORIES:
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    self.fresh(t, blocked=not self.free_constants)
            return
        tensors = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
        if name in _LIKE:
            self.set(out, list(self.atoms(args[0])), self.provenance(args[0]))
            return
        if name in _DATA_INDEX:
            for t in tensors:
                for a in self.atoms(t):
                    self.sp.block(a)
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    self.fresh(t, blocked=True)
            return
        base = name[:-1] if name.endswith("_") else name
        if base in _SCATTER:
            self.scatter(args, kwargs, out, *_SCATTER[base])
            return
        handler = getattr(self, f"op_{name}", None)
        if handler is not None:
            handler(args, kwargs, out)
            return
        if name in _SAME_DIMS:
            x = args[0]
            atoms = self.atoms(x)
            if name in _REDUCE_ALONG:
                self.reduced.add(self.sp.find(atoms[args[1] % x.dim()]))
            o = out[0] if isinstance(out, (tuple, list)) else out
            if o.shape == x.shape:
                others = [t for t in tensors[1:] if t.dim() > 0]
                atoms = self.broadcast([x, *others], list(x.shape)) if others else atoms
                self.set(o, list(atoms), self.provenance(x), self.pdims.get(id(x)))
                return
        if torch.Tag.pointwise in func.tags or name in _POINTWISE_NAMES:
            outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
            atoms = self.broadcast(tensors, list(outs[0].shape))
            for o in outs:
                self.set(o, list(atoms), self.provenance(*tensors))
            return
        if name in _REDUCTIONS:
            self.reduction(args, kwargs, out)
            return
        self.unknown(name, args, kwargs, out)

    # ------------------------------------------------------------ shapes

    def op_view(self, args, kwargs, out):
        x, shape = args[0], args[1]
        if isinstance(shape, torch.dtype):
            self.unknown("view.dtype", args, kwargs, out)
            return
        atoms = self.reshape(x, out)
        for k, s in enumerate(shape):
            if isinstance(s, int) and s > 1:
                self.view_literals.append((self.module_stack[-1], atoms[k], s))

    op__unsafe_view = op_view
    op_reshape = op_view

    def reshape(self, x: torch.Tensor, out: torch.Tensor) -> list[int]:
        a_in = self.atoms(x)
        xs, ys = list(x.shape), list(out.shape)
        out_atoms: list[int | None] = [None] * len(ys)
        i = j = 0
        while i < len(xs) or j < len(ys):
            if i < len(xs) and xs[i] == 1:
                i += 1
                continue
            if j < len(ys) and ys[j] == 1:
                out_atoms[j] = self.sp.new(1)
                j += 1
                continue
            gi, gj = [i], [j]
            pi, pj = xs[i], ys[j]
            i, j = i + 1, j + 1
            while pi != pj:
                if pi < pj:
                    gi.append(i)
                    pi *= xs[i]
                    i += 1
                else:
                    gj.append(j)
                    pj *= ys[j]
                    j += 1
            gi = [k for k in gi if xs[k] != 1]
            gj_real = [k for k in gj if ys[k] != 1]
            for k in gj:
                if ys[k] == 1:
                    out_atoms[k] = self.sp.new(1)
            if len(gi) == 1 and len(gj_real) == 1:
                out_atoms[gj_real[0]] = a_in[gi[0]]
            elif len(gi) == 1:
                new = [self.sp.new(ys[k]) for k in gj_real]
                self.sp.define(a_in[gi[0]], "prod", new)
                for k, a in zip(gj_real, new):
                    out_atoms[k] = a
            else:
                merged = self.sp.new(math.prod(xs[k] for k in gi))
                self.sp.define(merged, "prod", [a_in[k] for k in gi])
                if len(gj_real) == 1:
                    out_atoms[gj_real[0]] = merged
                else:
                    new = [self.sp.new(ys[k]) for k in gj_real]
                    self.sp.define(merged, "prod", new)
                    for k, a in zip(gj_real, new):
                        out_atoms[k] = a
        pd = self.pdims.get(id(x))
        keep_pd = None
        if pd is not None and [s for s in xs if s != 1] == [s for s in ys if s != 1]:
            real = [d for d, s in zip(pd, xs) if s != 1]
            keep_pd = [real.pop(0) if s != 1 else None for s in ys]
        self.set(out, out_atoms, self.provenance(x), keep_pd)
        return out_atoms

    def permuted(self, x, out, order):
        a = self.atoms(x)
        pd = self.pdims.get(id(x))
        self.set(out, [a[k] for k in order], self.provenance(x), [pd[k] for k in order] if pd else None)

    def op_t(self, args, kwargs, out):
        self.permuted(args[0], out, list(range(args[0].dim()))[::-1])

    def op_transpose(self, args, kwargs, out):
        x, d0, d1 = args[0], args[1] % max(args[0].dim(), 1), args[2] % max(args[0].dim(), 1)
        order = list(range(x.dim()))
        order[d0], order[d1] = order[d1], order[d0]
        self.permuted(x, out, order)

    def op_permute(self, args, kwargs, out):
        self.permuted(args[0], out, [d % args[0].dim() for d in args[1]])

    def op_unsqueeze(self, args, kwargs, out):
        x = args[0]
        a = list(self.atoms(x))
        pd = list(self.pdims.get(id(x), [None] * x.dim()))
        d = args[1] % out.dim()
        a.insert(d, self.sp.new(1))
        pd.insert(d, None)
        self.set(out, a, self.provenance(x), pd)

    def op_squeeze(self, args, kwargs, out):
        x = args[0]
        dims = range(x.dim()) if len(args) < 2 else ([args[1]] if isinstance(args[1], int) else args[1])
        dims = {d % x.dim() for d in dims if x.shape[d] == 1}
        a, pd = self.atoms(x), self.pdims.get(id(x), [None] * x.dim())
        keep = [k for k in range(x.dim()) if k not in dims]
        self.set(out, [a[k] for k in keep], self.provenance(x), [pd[k] for k in keep])

    def op_expand(self, args, kwargs, out):
        x = args[0]
        a = self.atoms(x)
        lead = out.dim() - x.dim()
        atoms = [self.sp.new(out.shape[k]) for k in range(lead)]
        for k in range(x.dim()):
            if x.shape[k] == out.shape[lead + k]:
                atoms.append(a[k])
            else:  # a broadcast copy count (e.g. query heads per kv head): may be a module attribute
                atoms.append(self.sp.new(out.shape[lead + k]))
                if isinstance(args[1][lead + k], int):
                    self.view_literals.append((self.module_stack[-1], atoms[-1], out.shape[lead + k]))
        self.set(out, atoms, self.provenance(x))

    def op_slice(self, args, kwargs, out):
        x = args[0]
        dim = (args[1] if len(args) > 1 else 0) % x.dim()
        n = x.shape[dim]
        start = args[2] if len(args) > 2 and args[2] is not None else 0
        end = args[3] if len(args) > 3 and args[3] is not None else n
        step = args[4] if len(args) > 4 else 1
        start, end = (start + n if start < 0 else start), (end + n if end < 0 else end)
        start, end = max(0, min(start, n)), max(0, min(end, n))
        a = list(self.atoms(x))
        if step != 1:
            self.sp.block(a[dim], "strided slice")
            a[dim] = self.sp.new(out.shape[dim], blocked=True)
        elif (start, end) != (0, n):
            a[dim] = self.piece(a[dim], n, start, end)
        self.set(out, a, self.provenance(x))

    def piece(self, atom: int, n: int, start: int, end: int) -> int:
        parts = [(0, start), (start, end), (end, n)]
        atoms = [self.sp.new(b - s) for s, b in parts]
        self.sp.define(atom, "cat", [a for a, (s, b) in zip(atoms, parts) if b > s])
        return atoms[1]

    def op_split(self, args, kwargs, out):
        x, size = args[0], args[1]
        dim = (args[2] if len(args) > 2 else kwargs.get("dim", 0)) % x.dim()
        n = x.shape[dim]
        sizes = size if isinstance(size, (list, tuple)) else [min(size, n - s) for s in range(0, n, size)]
        a = self.atoms(x)
        pieces = [self.sp.new(s) for s in sizes]
        self.sp.define(a[dim], "cat", pieces)
        if isinstance(size, int):  # a split width held by the module (e.g. GPT-2's split_size)
            self.view_literals.append((self.module_stack[-1], pieces[0], size))
        for t, p in zip(out, pieces):
            atoms = list(a)
            atoms[dim] = p
            self.set(t, atoms, self.provenance(x))

    op_split_with_sizes = op_split

    def op_chunk(self, args, kwargs, out):
        x, chunks = args[0], args[1]
        dim = (args[2] if len(args) > 2 else 0) % x.dim()
        self.op_split([x, math.ceil(x.shape[dim] / chunks), dim], {}, out)

    def op_select(self, args, kwargs, out):
        x, dim = args[0], args[1] % args[0].dim()
        a = list(self.atoms(x))
        pd = list(self.pdims.get(id(x), [None] * x.dim()))
        self.sp.block(a[dim])  # a fixed index of a space: that space cannot shrink
        del a[dim], pd[dim]  # the other dims stay (one expert of a stacked expert weight)
        self.set(out, a, self.provenance(x), pd)

    def op_unbind(self, args, kwargs, out):
        x = args[0]
        dim = (args[1] if len(args) > 1 else 0) % x.dim()
        a = list(self.atoms(x))
        pd = list(self.pdims.get(id(x), [None] * x.dim()))
        self.sp.block(a[dim])
        del a[dim], pd[dim]
        for t in out:
            self.set(t, list(a), self.provenance(x), list(pd))

    def op_cat(self, args, kwargs, out):
        ts = [t for t in args[0] if not (t.dim() == 1 and t.shape[0] == 0)]
        dim = (args[1] if len(args) > 1 else kwargs.get("dim", 0)) % out.dim()
        first = self.atoms(ts[0])
        atoms = []
        for k in range(out.dim()):
            if k == dim:
                atoms.append(self.sp.new(out.shape[k]))
                self.sp.define(atoms[-1], "cat", [self.atoms(t)[k] for t in ts])
            else:
                for t in ts[1:]:
                    if t.shape[k] == out.shape[k] and out.shape[k] != 1:
                        self.sp.union(first[k], self.atoms(t)[k])
                atoms.append(first[k])
        self.set(out, atoms, self.provenance(*ts))

    def op_stack(self, args, kwargs, out):
        ts = args[0]
        dim = (args[1] if len(args) > 1 else 0) % out.dim()
        atoms = self.broadcast(ts, list(ts[0].shape))
        atoms.insert(dim, self.sp.new(len(ts), blocked=True))
        self.set(out, atoms, self.provenance(*ts))

    def op_repeat(self, args, kwargs, out):
        x, reps = args[0], list(args[1])
        a = self.atoms(x)
        lead = len(reps) - x.dim()
        atoms = [self.sp.new(out.shape[k]) for k in range(lead)]
        for k in range(x.dim()):
            r = reps[lead + k]
            if r == 1:
                atoms.append(a[k])
            else:  # tiling: index = copy * n + i
                new = self.sp.new(out.shape[lead + k])
                self.sp.define(new, "prod", [self.sp.new(r), a[k]])
                atoms.append(new)
        self.set(out, atoms, self.provenance(x))

    def op_repeat_interleave(self, args, kwargs, out):
        x = args[0]
        dim = kwargs.get("dim", args[2] if len(args) > 2 else None)
        if not isinstance(x, torch.Tensor) or dim is None or not isinstance(args[1], int):
            self.unknown("repeat_interleave", args, kwargs, out)
            return
        dim %= x.dim()
        a = list(self.atoms(x))
        new = self.sp.new(out.shape[dim])
        self.sp.define(new, "prod", [a[dim], self.sp.new(args[1])])
        a[dim] = new
        self.set(out, a, self.provenance(x))

    def op_index_select(self, args, kwargs, out):
        x, dim = args[0], args[1] % args[0].dim()
        a = list(self.atoms(x))
        self.sp.block(a[dim])
        a[dim] = self.sp.new(out.shape[dim], blocked=True)
        self.set(out, a, self.provenance(x))

    def indexed(self, x: torch.Tensor, indices) -> tuple[list[int], list, int, int] | None:
        """What ``x[indices]`` keeps: atoms and param dims of the other dims, where the new dims go, how many.

        The indexed dims are blocked (positions chosen by data); the others pass through, so a
        token lookup (``hidden[token_idx]``) or an expert lookup (``w[expert_idx]``) keeps the
        channel spaces.  A boolean mask indexes as many dims as it has.  None when the indexed
        dims are not adjacent.
        """
        a = self.atoms(x)
        pd = self.pdims.get(id(x), [None] * x.dim())
        idx, shapes, pos = [], [], 0
        for t in indices:
            mask = t is not None and t.dtype in (torch.bool, torch.uint8)
            n = t.dim() if mask else 1
            if t is not None:
                idx.extend(range(pos, pos + n))
                shapes.append((int(t.count_nonzero()),) if mask else tuple(t.shape))
            pos += n
        if not idx or idx != list(range(idx[0], idx[0] + len(idx))):
            return None
        for k in idx:
            self.sp.block(a[k])
        keep = [k for k in range(x.dim()) if k not in idx]
        return [a[k] for k in keep], [pd[k] for k in keep], idx[0], len(torch.broadcast_shapes(*shapes))

    def op_index(self, args, kwargs, out):
        x, indices = args[0], args[1]
        found = self.indexed(x, indices)
        if found is not None:
            rest, pd, first, n_new = found
            new = [self.sp.new(out.shape[first + k], blocked=True) for k in range(n_new)]
            atoms = rest[:first] + new + rest[first:]
            if [self.sp.size[self.sp.find(q)] for q in atoms] == list(out.shape):
                self.set(out, atoms, self.provenance(x), pd[:first] + [None] * n_new + pd[first:])
                return
        self.unknown("index", args, kwargs, out)

    def op_index_put(self, args, kwargs, out):
        """``x[indices] = values``: values broadcast against ``x[indices]``, whose kept dims are x's."""
        x, indices, values = args[0], args[1], args[2]
        found = self.indexed(x, indices)
        if found is None:
            self.unknown("index_put", args, kwargs, out)
            return
        rest, _, first, n_new = found
        target = rest[:first] + [None] * n_new + rest[first:]  # None: a dim that runs over indexed positions
        va = self.atoms(values)
        for j in range(1, min(len(target), values.dim()) + 1):
            t, size = target[-j], values.shape[-j]
            if t is None:
                self.sp.block(va[-j])
            elif size != 1:
                self.sp.union(t, va[-j])
        for k in range(values.dim() - len(target)):
            self.sp.block(va[k])
        self.set(out, list(self.atoms(x)), self.provenance(x, values), self.pdims.get(id(x)))

    op_index_put_ = op_index_put
    op__index_put_impl_ = op_index_put

    def scatter(self, args, kwargs, out, dim_pos: int, src_pos: int | None) -> None:
        """``index_add_``/``scatter_``/...: writes along ``dim`` at data-chosen positions.

        ``dim`` is blocked in the target and the source; every other dim of the source (and of
        a scatter index) is the target's space where the sizes agree, blocked where they do not.
        """
        x = args[0]
        dim = (args[dim_pos] if len(args) > dim_pos else kwargs.get("dim", 0)) % x.dim()
        a = self.atoms(x)
        self.sp.block(a[dim])
        others = [args[2]] if len(args) > 2 and isinstance(args[2], torch.Tensor) else []
        if src_pos is not None and len(args) > src_pos and isinstance(args[src_pos], torch.Tensor):
            others.append(args[src_pos])
        for t in others:
            ta = self.atoms(t)
            if t.dim() != x.dim():  # index_add's 1-D index
                for q in ta:
                    self.sp.block(q)
                continue
            for k in range(x.dim()):
                if k == dim or t.shape[k] != x.shape[k]:
                    self.sp.block(ta[k])
                    if k != dim:
                        self.sp.block(a[k])
                elif t.shape[k] != 1:
                    self.sp.union(a[k], ta[k])
        o = out[0] if isinstance(out, (tuple, list)) else out
        self.set(o, list(a), self.provenance(x, *others), self.pdims.get(id(x)))

    def selection(self, args, kwargs, out, dim: int, size: int | None) -> None:
        """``topk``/``sort``: a data-dependent order along ``dim``; the other dims pass through."""
        x = args[0]
        dim %= max(x.dim(), 1)
        a = list(self.atoms(x))
        if x.dim():
            self.sp.block(a[dim])
            a[dim] = self.sp.new(size if size is not None else x.shape[dim], blocked=True)
        for o in tree_flatten(out)[0]:
            if isinstance(o, torch.Tensor):
                self.set(o, list(a), self.provenance(x))

    def op_topk(self, args, kwargs, out):
        self.selection(args, kwargs, out, args[2] if len(args) > 2 else kwargs.get("dim", -1), args[1])

    def op_sort(self, args, kwargs, out):
        dim = kwargs.get("dim", args[1] if len(args) > 1 and type(args[1]) is int else -1)
        self.selection(args, kwargs, out, dim, None)

    op_argsort = op_sort

    def op_embedding(self, args, kwargs, out):
        w, ids = args[0], args[1]
        wa = self.atoms(w)
        self.sp.block(wa[0])  # rows are looked up by value: never pruned
        self.role(w, 1, "other")
        self.set(out, [*self.atoms(ids), wa[1]])

    def reduction(self, args, kwargs, out):
        x = args[0]
        a = self.atoms(x)
        dims = args[1] if len(args) > 1 and not isinstance(args[1], (bool, float)) else kwargs.get("dim")
        if dims is None:
            dims = list(range(x.dim()))
        elif isinstance(dims, int):
            dims = [dims]
        dims = {d % max(x.dim(), 1) for d in dims}
        for d in dims:
            if x.shape[d] > 1:
                self.reduced.add(self.sp.find(a[d]))
        for o in tree_flatten(out)[0]:
            if not isinstance(o, torch.Tensor):
                continue
            if o.dim() == x.dim():
                atoms = [self.sp.new(1) if d in dims else a[d] for d in range(x.dim())]
            else:
                atoms = [a[d] for d in range(x.dim()) if d not in dims]
            if [self.sp.size[self.sp.find(q)] for q in atoms] != list(o.shape):
                atoms = [self.sp.new(s, blocked=True) for s in o.shape]
            self.set(o, atoms, self.provenance(x))

    # ------------------------------------------------------------ contractions

    def matmul(self, a, b, out, batch_dims: int) -> None:
        aa, ba = self.atoms(a), self.atoms(b)
        self.sp.union(aa[-1], ba[-2])
        for k in range(batch_dims):
            self.sp.union(aa[k], ba[k])
        self.role(b, b.dim() - 2, "in")
        self.role(b, b.dim() - 1, "out")
        self.role(a, a.dim() - 1, "in")
        self.role(a, a.dim() - 2, "out")
        b_param = self.pdims.get(id(b))
        a_param = self.pdims.get(id(a))
        if b_param is not None and b_param[-1] is not None:
            prov = frozenset([b_param[-1][0]])
        elif a_param is not None and a_param[-2] is not None:
            prov = frozenset([a_param[-2][0]])
        else:
            prov = self.provenance(a, b)
            if batch_dims:  # activation x activation with batch dims: attention scores/context
                for k in range(batch_dims):
                    self.sp.flag(aa[k], "attention")
                self.attention_params.update(self.provenance(a))
                # a head's own width is fixed whatever the head count: q @ k^T contracts over it,
                # probs @ v keeps it last (the other dim blocked here is a sequence, fixed anyway)
                self.fixed(aa[-1])
                self.fixed(ba[-1])
        self.set(out, [*aa[:batch_dims], aa[-2], ba[-1]], prov)

    def op_mm(self, args, kwargs, out):
        self.matmul(args[0], args[1], out, 0)

    def op_bmm(self, args, kwargs, out):
        self.matmul(args[0], args[1], out, 1)

    def op_addmm(self, args, kwargs, out):
        self.matmul(args[1], args[2], out, 0)
        bias = args[0]
        self.broadcast([out, bias], list(out.shape))
        if bias.dim() >= 1:
            self.role(bias, bias.dim() - 1, "out")
        self.prov[id(out)] = self.prov.get(id(out), frozenset()) | self.provenance(bias)

    def op__grouped_mm(self, args, kwargs, out):
        """Stacked experts: ``x [S, K] @ w [E, K, N] -> [S, N]``, rows grouped by expert offsets.

        The expert dim is blocked (which rows each expert takes is data); K and N are one space for
        every expert, so an expert's channel j is channel j of the whole stack.
        """
        a, b = args[0], args[1]
        bias = args[3] if len(args) > 3 else kwargs.get("bias")
        if a.dim() == 3 and b.dim() == 3 and bias is None:
            self.matmul(a, b, out, 1)
            return
        if a.dim() != 2 or b.dim() != 3:
            self.unknown("_grouped_mm", args, kwargs, out)
            return
        aa, ba = self.atoms(a), self.atoms(b)
        self.sp.union(aa[-1], ba[-2])
        self.sp.block(ba[0])
        self.role(b, 1, "in")
        self.role(b, 2, "out")
        self.role(a, 1, "in")
        pd = self.pdims.get(id(b))
        prov = frozenset([pd[2][0]]) if pd is not None and pd[2] is not None else self.provenance(a, b)
        self.set(out, [aa[0], ba[-1]], prov)
        if isinstance(bias, torch.Tensor):
            self.broadcast([out, bias], list(out.shape))

    op_grouped_mm_fallback = op__grouped_mm  # transformers' custom op for the same product (torch.compile)

    def op_baddbmm(self, args, kwargs, out):
        self.matmul(args[1], args[2], out, 1)
        self.broadcast([out, args[0]], list(out.shape))

    def op_native_layer_norm(self, args, kwargs, out):
        x, shape, w, b = args[0], args[1], args[2], args[3]
        a = self.atoms(x)
        n = len(shape)
        for p in (w, b):
            if p is not None:
                pa = self.atoms(p)
                for j in range(n):
                    self.sp.union(a[x.dim() - n + j], pa[j])
        for j in range(n):
            self.reduced.add(self.sp.find(a[x.dim() - n + j]))
        self.set(out[0], list(a), self.provenance(x))
        for o in out[1:]:
            self.fresh(o, blocked=True)

    def op__fused_rms_norm(self, args, kwargs, out):
        x, shape, w = args[0], args[1], args[2]
        a = self.atoms(x)
        n = len(shape)
        if w is not None:
            for j, pa in enumerate(self.atoms(w)):
                self.sp.union(a[x.dim() - n + j], pa)
        for j in range(n):
            self.reduced.add(self.sp.find(a[x.dim() - n + j]))
        outs = out if isinstance(out, (tuple, list)) else (out,)
        self.set(outs[0], list(a), self.provenance(x))
        for o in outs[1:]:
            self.fresh(o, blocked=True)

    def attention(self, q, k, v, out, mask=None):
        qa, ka, va = self.atoms(q), self.atoms(k), self.atoms(v)
        for x in range(q.dim() - 3):
            self.sp.union(qa[x], ka[x])
            self.sp.union(qa[x], va[x])
        hq, hk = qa[-3], ka[-3]
        self.sp.union(hk, va[-3])
        if q.shape[-3] == k.shape[-3]:
            self.sp.union(hq, hk)
        else:  # grouped-query attention: query head = kv head x repeat
            self.sp.define(hq, "prod", [hk, self.sp.new(q.shape[-3] // k.shape[-3])])
        self.sp.union(qa[-1], ka[-1])
        self.sp.union(ka[-2], va[-2])
        # head_dim is never pruned: with one head no head view splits it off, so block it here
        self.fixed(qa[-1])
        self.fixed(va[-1])
        self.sp.flag(hq, "attention")
        self.head_atoms.append(hq)
        self.attention_params.update(self.provenance(q) | self.provenance(k))
        if isinstance(mask, torch.Tensor):
            self.broadcast([mask], list(mask.shape))
        o = out[0] if isinstance(out, (tuple, list)) else out
        self.set(o, [*qa[:-1], va[-1]], self.provenance(v))
        if isinstance(out, (tuple, list)):
            for extra in out[1:]:
                if isinstance(extra, torch.Tensor):
                    self.fresh(extra, blocked=True)

    def __getattr__(self, name):
        if name.startswith("op_") and name[3:] in _SDPA:
            def handler(args, kwargs, out):
                self.attention(args[0], args[1], args[2], out, kwargs.get("attn_mask"))
            return handler
        raise AttributeError(name)


def trace_model(model: torch.nn.Module, input_ids: torch.Tensor, free_constants: bool = False,
                couplings: Sequence[tuple[tuple[str, int], tuple[str, int]]] = ()) -> TraceResult:
    """Run ``model(input_ids)`` under the tracer and return the related spaces.

    ``free_constants`` lets tensors made by factory ops follow the spaces they meet instead of
    blocking them; ``couplings`` declares ``(param, dim)`` pairs that share one space.
    """
    tracer = _Tracer(model, free_constants)
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
    return TraceResult(tracer.sp, tracer.param_atoms, tracer.param_roles, tracer.attention_params,
                       tracer.head_atoms, tracer.reduced, tracer.view_literals, tracer.unmapped)
