"""The tracer's rules, one table: aten op name -> rule, grouped by kind.

A rule relates the atoms (:class:`~fastprune.spaces.Spaces`) of a call's inputs and outputs:
``rule(tracer, call)``.  :func:`rule_for` looks the op up in :data:`RULES`; an op with no entry
is elementwise when torch tags it ``pointwise``, else it has no rule: every atom it touches is
blocked and it is reported with its module.  To add a rule, write the function in its group and
add it to the group's table (a name in two groups is an error at import); the test to copy is
``tests/test_trace_rules.py``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from fastprune.trace.tracer import Call, Tracer

    Rule = Callable[[Tracer, Call], None]


# ---------------------------------------------------------------------------------------------- shape and view

def view(tr: Tracer, c: Call) -> None:
    x, shape = c.args[0], c.args[1]
    if isinstance(shape, torch.dtype):
        tr.unknown(c, name="view.dtype")
        return
    atoms = _reshape(tr, x, c.out)
    for k, s in enumerate(shape):
        if isinstance(s, int) and s > 1:
            tr.view_literals.append((tr.module_stack[-1], atoms[k], s))


def _reshape(tr: Tracer, x: torch.Tensor, out: torch.Tensor) -> list[int]:
    a_in = tr.atoms(x)
    xs, ys = list(x.shape), list(out.shape)
    out_atoms: list[int | None] = [None] * len(ys)
    i = j = 0
    while i < len(xs) or j < len(ys):
        if i < len(xs) and xs[i] == 1:
            i += 1
            continue
        if j < len(ys) and ys[j] == 1:
            out_atoms[j] = tr.sp.new(1)
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
                out_atoms[k] = tr.sp.new(1)
        if len(gi) == 1 and len(gj_real) == 1:
            out_atoms[gj_real[0]] = a_in[gi[0]]
        elif len(gi) == 1:
            new = [tr.sp.new(ys[k]) for k in gj_real]
            tr.sp.define(a_in[gi[0]], "prod", new)
            for k, a in zip(gj_real, new):
                out_atoms[k] = a
        else:
            merged = tr.sp.new(math.prod(xs[k] for k in gi))
            tr.sp.define(merged, "prod", [a_in[k] for k in gi])
            if len(gj_real) == 1:
                out_atoms[gj_real[0]] = merged
            else:
                new = [tr.sp.new(ys[k]) for k in gj_real]
                tr.sp.define(merged, "prod", new)
                for k, a in zip(gj_real, new):
                    out_atoms[k] = a
    pd = tr.pdims.get(id(x))
    keep_pd = None
    if pd is not None and [s for s in xs if s != 1] == [s for s in ys if s != 1]:
        real = [d for d, s in zip(pd, xs) if s != 1]
        keep_pd = [real.pop(0) if s != 1 else None for s in ys]
    tr.set(out, out_atoms, tr.provenance(x), keep_pd)
    return out_atoms


def _permuted(tr: Tracer, x, out, order):
    a = tr.atoms(x)
    pd = tr.pdims.get(id(x))
    tr.set(out, [a[k] for k in order], tr.provenance(x), [pd[k] for k in order] if pd else None)


def transpose_all(tr: Tracer, c: Call) -> None:
    _permuted(tr, c.args[0], c.out, list(range(c.args[0].dim()))[::-1])


def transpose(tr: Tracer, c: Call) -> None:
    x, d0, d1 = c.args[0], c.args[1] % max(c.args[0].dim(), 1), c.args[2] % max(c.args[0].dim(), 1)
    order = list(range(x.dim()))
    order[d0], order[d1] = order[d1], order[d0]
    _permuted(tr, x, c.out, order)


def permute(tr: Tracer, c: Call) -> None:
    _permuted(tr, c.args[0], c.out, [d % c.args[0].dim() for d in c.args[1]])


def unsqueeze(tr: Tracer, c: Call) -> None:
    x = c.args[0]
    a = list(tr.atoms(x))
    pd = list(tr.pdims.get(id(x), [None] * x.dim()))
    d = c.args[1] % c.out.dim()
    a.insert(d, tr.sp.new(1))
    pd.insert(d, None)
    tr.set(c.out, a, tr.provenance(x), pd)


def squeeze(tr: Tracer, c: Call) -> None:
    x = c.args[0]
    dims = range(x.dim()) if len(c.args) < 2 else ([c.args[1]] if isinstance(c.args[1], int) else c.args[1])
    dims = {d % x.dim() for d in dims if x.shape[d] == 1}
    a, pd = tr.atoms(x), tr.pdims.get(id(x), [None] * x.dim())
    keep = [k for k in range(x.dim()) if k not in dims]
    tr.set(c.out, [a[k] for k in keep], tr.provenance(x), [pd[k] for k in keep])


def expand(tr: Tracer, c: Call) -> None:
    x = c.args[0]
    a = tr.atoms(x)
    lead = c.out.dim() - x.dim()
    atoms = [tr.sp.new(c.out.shape[k]) for k in range(lead)]
    for k in range(x.dim()):
        if x.shape[k] == c.out.shape[lead + k]:
            atoms.append(a[k])
        else:  # a broadcast copy count (e.g. query heads per kv head): may be a module attribute
            atoms.append(tr.sp.new(c.out.shape[lead + k]))
            if isinstance(c.args[1][lead + k], int):
                tr.view_literals.append((tr.module_stack[-1], atoms[-1], c.out.shape[lead + k]))
    tr.set(c.out, atoms, tr.provenance(x))


SHAPE_RULES: dict[str, Rule] = {
    "view": view, "_unsafe_view": view, "reshape": view, "t": transpose_all, "transpose": transpose,
    "permute": permute, "unsqueeze": unsqueeze, "squeeze": squeeze, "expand": expand,
}


# ------------------------------------------------------------------------------- slicing, indexing, copies

def slice_(tr: Tracer, c: Call) -> None:
    x = c.args[0]
    dim = (c.args[1] if len(c.args) > 1 else 0) % x.dim()
    n = x.shape[dim]
    start = c.args[2] if len(c.args) > 2 and c.args[2] is not None else 0
    end = c.args[3] if len(c.args) > 3 and c.args[3] is not None else n
    step = c.args[4] if len(c.args) > 4 else 1
    start, end = (start + n if start < 0 else start), (end + n if end < 0 else end)
    start, end = max(0, min(start, n)), max(0, min(end, n))
    a = list(tr.atoms(x))
    if step != 1:
        tr.sp.block(a[dim], "strided slice")
        a[dim] = tr.sp.new(c.out.shape[dim], blocked=True)
    elif (start, end) != (0, n):
        a[dim] = _piece(tr, a[dim], n, start, end)
    tr.set(c.out, a, tr.provenance(x))


def _piece(tr: Tracer, atom: int, n: int, start: int, end: int) -> int:
    parts = [(0, start), (start, end), (end, n)]
    atoms = [tr.sp.new(b - s) for s, b in parts]
    tr.sp.define(atom, "cat", [a for a, (s, b) in zip(atoms, parts) if b > s])
    return atoms[1]


def split(tr: Tracer, c: Call) -> None:
    x, size = c.args[0], c.args[1]
    _split(tr, x, size, (c.args[2] if len(c.args) > 2 else c.kwargs.get("dim", 0)) % x.dim(), c.out)


def _split(tr: Tracer, x: torch.Tensor, size, dim: int, outs) -> None:
    n = x.shape[dim]
    sizes = size if isinstance(size, (list, tuple)) else [min(size, n - s) for s in range(0, n, size)]
    a = tr.atoms(x)
    pieces = [tr.sp.new(s) for s in sizes]
    tr.sp.define(a[dim], "cat", pieces)
    if isinstance(size, int):  # a split width held by the module (e.g. GPT-2's split_size)
        tr.view_literals.append((tr.module_stack[-1], pieces[0], size))
    for t, p in zip(outs, pieces):
        atoms = list(a)
        atoms[dim] = p
        tr.set(t, atoms, tr.provenance(x))


def chunk(tr: Tracer, c: Call) -> None:
    x, chunks = c.args[0], c.args[1]
    dim = (c.args[2] if len(c.args) > 2 else 0) % x.dim()
    _split(tr, x, math.ceil(x.shape[dim] / chunks), dim, c.out)


def select(tr: Tracer, c: Call) -> None:
    x, dim = c.args[0], c.args[1] % c.args[0].dim()
    a = list(tr.atoms(x))
    pd = list(tr.pdims.get(id(x), [None] * x.dim()))
    tr.sp.block(a[dim])  # a fixed index of a space: that space cannot shrink
    del a[dim], pd[dim]  # the other dims stay (one expert of a stacked expert weight)
    tr.set(c.out, a, tr.provenance(x), pd)


def unbind(tr: Tracer, c: Call) -> None:
    x = c.args[0]
    dim = (c.args[1] if len(c.args) > 1 else 0) % x.dim()
    a = list(tr.atoms(x))
    pd = list(tr.pdims.get(id(x), [None] * x.dim()))
    tr.sp.block(a[dim])
    del a[dim], pd[dim]
    for t in c.out:
        tr.set(t, list(a), tr.provenance(x), list(pd))


def cat(tr: Tracer, c: Call) -> None:
    ts = [t for t in c.args[0] if not (t.dim() == 1 and t.shape[0] == 0)]
    dim = (c.args[1] if len(c.args) > 1 else c.kwargs.get("dim", 0)) % c.out.dim()
    first = tr.atoms(ts[0])
    atoms = []
    for k in range(c.out.dim()):
        if k == dim:
            atoms.append(tr.sp.new(c.out.shape[k]))
            tr.sp.define(atoms[-1], "cat", [tr.atoms(t)[k] for t in ts])
        else:
            for t in ts[1:]:
                if t.shape[k] == c.out.shape[k] and c.out.shape[k] != 1:
                    tr.sp.union(first[k], tr.atoms(t)[k])
            atoms.append(first[k])
    tr.set(c.out, atoms, tr.provenance(*ts))


def stack(tr: Tracer, c: Call) -> None:
    ts = c.args[0]
    dim = (c.args[1] if len(c.args) > 1 else 0) % c.out.dim()
    atoms = tr.broadcast(ts, list(ts[0].shape))
    atoms.insert(dim, tr.sp.new(len(ts), blocked=True))
    tr.set(c.out, atoms, tr.provenance(*ts))


def repeat(tr: Tracer, c: Call) -> None:
    x, reps = c.args[0], list(c.args[1])
    a = tr.atoms(x)
    lead = len(reps) - x.dim()
    atoms = [tr.sp.new(c.out.shape[k]) for k in range(lead)]
    for k in range(x.dim()):
        r = reps[lead + k]
        if r == 1:
            atoms.append(a[k])
        else:  # tiling: index = copy * n + i
            new = tr.sp.new(c.out.shape[lead + k])
            tr.sp.define(new, "prod", [tr.sp.new(r), a[k]])
            atoms.append(new)
    tr.set(c.out, atoms, tr.provenance(x))


def repeat_interleave(tr: Tracer, c: Call) -> None:
    x = c.args[0]
    dim = c.kwargs.get("dim", c.args[2] if len(c.args) > 2 else None)
    if not isinstance(x, torch.Tensor) or dim is None or not isinstance(c.args[1], int):
        tr.unknown(c, name="repeat_interleave")
        return
    dim %= x.dim()
    a = list(tr.atoms(x))
    new = tr.sp.new(c.out.shape[dim])
    tr.sp.define(new, "prod", [a[dim], tr.sp.new(c.args[1])])
    a[dim] = new
    tr.set(c.out, a, tr.provenance(x))


def index_select(tr: Tracer, c: Call) -> None:
    x, dim = c.args[0], c.args[1] % c.args[0].dim()
    a = list(tr.atoms(x))
    tr.sp.block(a[dim])
    a[dim] = tr.sp.new(c.out.shape[dim], blocked=True)
    tr.set(c.out, a, tr.provenance(x))


def _indexed(tr: Tracer, x: torch.Tensor, indices) -> tuple[list[int], list, int, int] | None:
    """What ``x[indices]`` keeps: atoms and param dims of the other dims, where the new dims go, how many.

    The indexed dims are blocked (positions chosen by data); the others pass through, so a
    token lookup (``hidden[token_idx]``) or an expert lookup (``w[expert_idx]``) keeps the
    channel spaces.  A boolean mask indexes as many dims as it has.  None when the indexed
    dims are not adjacent.
    """
    a = tr.atoms(x)
    pd = tr.pdims.get(id(x), [None] * x.dim())
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
        tr.sp.block(a[k])
    keep = [k for k in range(x.dim()) if k not in idx]
    return [a[k] for k in keep], [pd[k] for k in keep], idx[0], len(torch.broadcast_shapes(*shapes))


def index(tr: Tracer, c: Call) -> None:
    x, indices = c.args[0], c.args[1]
    found = _indexed(tr, x, indices)
    if found is not None:
        rest, pd, first, n_new = found
        new = [tr.sp.new(c.out.shape[first + k], blocked=True) for k in range(n_new)]
        atoms = rest[:first] + new + rest[first:]
        if [tr.sp.size[tr.sp.find(q)] for q in atoms] == list(c.out.shape):
            tr.set(c.out, atoms, tr.provenance(x), pd[:first] + [None] * n_new + pd[first:])
            return
    tr.unknown(c, name="index")


def index_put(tr: Tracer, c: Call) -> None:
    """``x[indices] = values``: values broadcast against ``x[indices]``, whose kept dims are x's."""
    x, indices, values = c.args[0], c.args[1], c.args[2]
    found = _indexed(tr, x, indices)
    if found is None:
        tr.unknown(c, name="index_put")
        return
    rest, _, first, n_new = found
    target = rest[:first] + [None] * n_new + rest[first:]  # None: a dim that runs over indexed positions
    va = tr.atoms(values)
    for j in range(1, min(len(target), values.dim()) + 1):
        t, size = target[-j], values.shape[-j]
        if t is None:
            tr.sp.block(va[-j])
        elif size != 1:
            tr.sp.union(t, va[-j])
    for k in range(values.dim() - len(target)):
        tr.sp.block(va[k])
    tr.set(c.out, list(tr.atoms(x)), tr.provenance(x, values), tr.pdims.get(id(x)))


def embedding(tr: Tracer, c: Call) -> None:
    w, ids = c.args[0], c.args[1]
    wa = tr.atoms(w)
    tr.sp.block(wa[0])  # rows are looked up by value: never pruned
    tr.role(w, 1, "other")
    tr.set(c.out, [*tr.atoms(ids), wa[1]])


SLICING_RULES: dict[str, Rule] = {
    "slice": slice_, "split": split, "split_with_sizes": split, "chunk": chunk, "select": select, "unbind": unbind,
    "cat": cat, "stack": stack, "repeat": repeat, "repeat_interleave": repeat_interleave,
    "index_select": index_select, "index": index, "index_put": index_put, "index_put_": index_put,
    "_index_put_impl_": index_put, "embedding": embedding,
}


# ---------------------------------------------------------------------------------------------- contractions

def _matmul(tr: Tracer, a, b, out, batch_dims: int) -> None:
    aa, ba = tr.atoms(a), tr.atoms(b)
    tr.sp.union(aa[-1], ba[-2])
    for k in range(batch_dims):
        tr.sp.union(aa[k], ba[k])
    tr.role(b, b.dim() - 2, "in")
    tr.role(b, b.dim() - 1, "out")
    tr.role(a, a.dim() - 1, "in")
    tr.role(a, a.dim() - 2, "out")
    b_param = tr.pdims.get(id(b))
    a_param = tr.pdims.get(id(a))
    if b_param is not None and b_param[-1] is not None:
        prov = frozenset([b_param[-1][0]])
    elif a_param is not None and a_param[-2] is not None:
        prov = frozenset([a_param[-2][0]])
    else:
        prov = tr.provenance(a, b)
        if batch_dims:  # activation x activation with batch dims: attention scores/context
            for k in range(batch_dims):
                tr.sp.flag(aa[k], "attention")
            tr.attention_params.update(tr.provenance(a))
            # a head's own width is fixed whatever the head count: q @ k^T contracts over it,
            # probs @ v keeps it last (the other dim blocked here is a sequence, fixed anyway)
            tr.fixed(aa[-1])
            tr.fixed(ba[-1])
    tr.set(out, [*aa[:batch_dims], aa[-2], ba[-1]], prov)


def mm(tr: Tracer, c: Call) -> None:
    _matmul(tr, c.args[0], c.args[1], c.out, 0)


def bmm(tr: Tracer, c: Call) -> None:
    _matmul(tr, c.args[0], c.args[1], c.out, 1)


def addmm(tr: Tracer, c: Call) -> None:
    _matmul(tr, c.args[1], c.args[2], c.out, 0)
    bias = c.args[0]
    tr.broadcast([c.out, bias], list(c.out.shape))
    if bias.dim() >= 1:
        tr.role(bias, bias.dim() - 1, "out")
    tr.prov[id(c.out)] = tr.prov.get(id(c.out), frozenset()) | tr.provenance(bias)


def baddbmm(tr: Tracer, c: Call) -> None:
    _matmul(tr, c.args[1], c.args[2], c.out, 1)
    tr.broadcast([c.out, c.args[0]], list(c.out.shape))


def grouped_mm(tr: Tracer, c: Call) -> None:
    """Stacked experts: ``x [S, K] @ w [E, K, N] -> [S, N]``, rows grouped by expert offsets.

    The expert dim is blocked (which rows each expert takes is data); K and N are one space for
    every expert, so an expert's channel j is channel j of the whole stack.
    """
    a, b = c.args[0], c.args[1]
    bias = c.args[3] if len(c.args) > 3 else c.kwargs.get("bias")
    if a.dim() == 3 and b.dim() == 3 and bias is None:
        _matmul(tr, a, b, c.out, 1)
        return
    if a.dim() != 2 or b.dim() != 3:
        tr.unknown(c, name="_grouped_mm")
        return
    aa, ba = tr.atoms(a), tr.atoms(b)
    tr.sp.union(aa[-1], ba[-2])
    tr.sp.block(ba[0])
    tr.role(b, 1, "in")
    tr.role(b, 2, "out")
    tr.role(a, 1, "in")
    pd = tr.pdims.get(id(b))
    prov = frozenset([pd[2][0]]) if pd is not None and pd[2] is not None else tr.provenance(a, b)
    tr.set(c.out, [aa[0], ba[-1]], prov)
    if isinstance(bias, torch.Tensor):
        tr.broadcast([c.out, bias], list(c.out.shape))


CONTRACTION_RULES: dict[str, Rule] = {
    "mm": mm, "bmm": bmm, "addmm": addmm, "baddbmm": baddbmm, "_grouped_mm": grouped_mm,
    "grouped_mm_fallback": grouped_mm,  # transformers' custom op for the same product (torch.compile)
}


# ---------------------------------------------------------------------------------------------- attention

def _attention(tr: Tracer, q, k, v, out, mask=None):
    qa, ka, va = tr.atoms(q), tr.atoms(k), tr.atoms(v)
    for x in range(q.dim() - 3):
        tr.sp.union(qa[x], ka[x])
        tr.sp.union(qa[x], va[x])
    hq, hk = qa[-3], ka[-3]
    tr.sp.union(hk, va[-3])
    if q.shape[-3] == k.shape[-3]:
        tr.sp.union(hq, hk)
    else:  # grouped-query attention: query head = kv head x repeat
        tr.sp.define(hq, "prod", [hk, tr.sp.new(q.shape[-3] // k.shape[-3])])
    tr.sp.union(qa[-1], ka[-1])
    tr.sp.union(ka[-2], va[-2])
    # head_dim is never pruned: with one head no head view splits it off, so block it here
    tr.fixed(qa[-1])
    tr.fixed(va[-1])
    tr.sp.flag(hq, "attention")
    tr.head_atoms.append(hq)
    tr.attention_params.update(tr.provenance(q) | tr.provenance(k))
    if isinstance(mask, torch.Tensor):
        tr.broadcast([mask], list(mask.shape))
    o = out[0] if isinstance(out, (tuple, list)) else out
    tr.set(o, [*qa[:-1], va[-1]], tr.provenance(v))
    if isinstance(out, (tuple, list)):
        for extra in out[1:]:
            if isinstance(extra, torch.Tensor):
                tr.fresh(extra, blocked=True)


def sdpa(tr: Tracer, c: Call) -> None:
    _attention(tr, c.args[0], c.args[1], c.args[2], c.out, c.kwargs.get("attn_mask"))


ATTENTION_RULES: dict[str, Rule] = {name: sdpa for name in (
    "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_attention_math", "_scaled_dot_product_fused_attention_overrideable",
    "scaled_dot_product_attention")}


# ---------------------------------------------------------------------------------------------- norms and elementwise

def native_layer_norm(tr: Tracer, c: Call) -> None:
    x, shape, w, b = c.args[0], c.args[1], c.args[2], c.args[3]
    a = tr.atoms(x)
    n = len(shape)
    for p in (w, b):
        if p is not None:
            pa = tr.atoms(p)
            for j in range(n):
                tr.sp.union(a[x.dim() - n + j], pa[j])
    for j in range(n):
        tr.reduced.add(tr.sp.find(a[x.dim() - n + j]))
    tr.set(c.out[0], list(a), tr.provenance(x))
    for o in c.out[1:]:
        tr.fresh(o, blocked=True)


def fused_rms_norm(tr: Tracer, c: Call) -> None:
    x, shape, w = c.args[0], c.args[1], c.args[2]
    a = tr.atoms(x)
    n = len(shape)
    if w is not None:
        for j, pa in enumerate(tr.atoms(w)):
            tr.sp.union(a[x.dim() - n + j], pa)
    for j in range(n):
        tr.reduced.add(tr.sp.find(a[x.dim() - n + j]))
    outs = c.out if isinstance(c.out, (tuple, list)) else (c.out,)
    tr.set(outs[0], list(a), tr.provenance(x))
    for o in outs[1:]:
        tr.fresh(o, blocked=True)


def pointwise(tr: Tracer, c: Call) -> None:
    """Right-aligned broadcast of every input to the outputs (ops tagged ``pointwise``, ``where``...)."""
    outs = c.outputs
    atoms = tr.broadcast(c.tensors, list(outs[0].shape))
    for o in outs:
        tr.set(o, list(atoms), tr.provenance(*c.tensors))


_REDUCE_ALONG = {"_softmax", "softmax", "_log_softmax", "log_softmax", "cumsum", "_safe_softmax"}


def same_dims(tr: Tracer, c: Call) -> None:
    """Output dims are the first input's (copies, softmax, masking); a softmax records the dim it normalises."""
    x = c.args[0]
    atoms = tr.atoms(x)
    if c.name in _REDUCE_ALONG:
        tr.reduced.add(tr.sp.find(atoms[c.args[1] % x.dim()]))
    o = c.first_output
    if o.shape != x.shape:  # e.g. a broadcasting copy_: elementwise where torch says so
        elementwise(tr, c)
        return
    others = [t for t in c.tensors[1:] if t.dim() > 0]
    atoms = tr.broadcast([x, *others], list(x.shape)) if others else atoms
    tr.set(o, list(atoms), tr.provenance(x), tr.pdims.get(id(x)))


def _reduction(tr: Tracer, c: Call) -> None:
    args, x = c.args, c.args[0]
    a = tr.atoms(x)
    dims = args[1] if len(args) > 1 and not isinstance(args[1], (bool, float)) else c.kwargs.get("dim")
    if dims is None:
        dims = list(range(x.dim()))
    elif isinstance(dims, int):
        dims = [dims]
    dims = {d % max(x.dim(), 1) for d in dims}
    for d in dims:
        if x.shape[d] > 1:
            tr.reduced.add(tr.sp.find(a[d]))
    for o in c.outputs:
        if o.dim() == x.dim():
            atoms = [tr.sp.new(1) if d in dims else a[d] for d in range(x.dim())]
        else:
            atoms = [a[d] for d in range(x.dim()) if d not in dims]
        if [tr.sp.size[tr.sp.find(q)] for q in atoms] != list(o.shape):
            atoms = [tr.sp.new(s, blocked=True) for s in o.shape]
        tr.set(o, atoms, tr.provenance(x))


def reduction(tr: Tracer, c: Call) -> None:
    """A reduction over dims (``sum``, ``mean``, ``max.dim``...); the binary overloads (``max.other``) are pointwise."""
    if torch.Tag.pointwise in c.func.tags:
        pointwise(tr, c)
    else:
        _reduction(tr, c)


def elementwise(tr: Tracer, c: Call) -> None:
    """Ops with no entry: pointwise when torch tags them so, else unmapped."""
    if torch.Tag.pointwise in c.func.tags:
        pointwise(tr, c)
    else:
        tr.unknown(c)


NORM_ELEMENTWISE_RULES: dict[str, Rule] = {
    "native_layer_norm": native_layer_norm, "_fused_rms_norm": fused_rms_norm,
    **{name: same_dims for name in (
        "clone", "alias", "detach", "_to_copy", "contiguous", "lift_fresh", "lift_fresh_copy", "_softmax", "softmax",
        "_log_softmax", "log_softmax", "fill_", "zero_", "triu", "tril", "dropout", "native_dropout", "bernoulli",
        "bernoulli_", "copy_", "masked_fill", "masked_fill_", "cumsum", "_safe_softmax", "roll", "flip", "nan_to_num")},
    **{name: pointwise for name in (
        "where", "clamp", "lerp", "addcmul", "addcdiv", "floor_divide", "remainder", "fmod")},
    **{name: reduction for name in (
        "sum", "mean", "amax", "amin", "max", "min", "var_mean", "var", "std", "argmax", "argmin", "logsumexp", "norm",
        "linalg_vector_norm", "any", "all", "prod", "std_mean", "aminmax")},
}


# ------------------------------------------------------------------------------- routing (data-dependent positions)

def _selection(tr: Tracer, c: Call, dim: int, size: int | None) -> None:
    """``topk``/``sort``: a data-dependent order along ``dim``; the other dims pass through."""
    x = c.args[0]
    dim %= max(x.dim(), 1)
    a = list(tr.atoms(x))
    if x.dim():
        tr.sp.block(a[dim])
        a[dim] = tr.sp.new(size if size is not None else x.shape[dim], blocked=True)
    for o in c.outputs:
        tr.set(o, list(a), tr.provenance(x))


def topk(tr: Tracer, c: Call) -> None:
    _selection(tr, c, c.args[2] if len(c.args) > 2 else c.kwargs.get("dim", -1), c.args[1])


def sort(tr: Tracer, c: Call) -> None:
    dim = c.kwargs.get("dim", c.args[1] if len(c.args) > 1 and type(c.args[1]) is int else -1)
    _selection(tr, c, dim, None)


def _scatter(tr: Tracer, c: Call, dim_pos: int, src_pos: int | None) -> None:
    """``index_add_``/``scatter_``/...: writes along ``dim`` at data-chosen positions.

    ``dim`` is blocked in the target and the source; every other dim of the source (and of
    a scatter index) is the target's space where the sizes agree, blocked where they do not.
    """
    args, x = c.args, c.args[0]
    dim = (args[dim_pos] if len(args) > dim_pos else c.kwargs.get("dim", 0)) % x.dim()
    a = tr.atoms(x)
    tr.sp.block(a[dim])
    others = [args[2]] if len(args) > 2 and isinstance(args[2], torch.Tensor) else []
    if src_pos is not None and len(args) > src_pos and isinstance(args[src_pos], torch.Tensor):
        others.append(args[src_pos])
    for t in others:
        ta = tr.atoms(t)
        if t.dim() != x.dim():  # index_add's 1-D index
            for q in ta:
                tr.sp.block(q)
            continue
        for k in range(x.dim()):
            if k == dim or t.shape[k] != x.shape[k]:
                tr.sp.block(ta[k])
                if k != dim:
                    tr.sp.block(a[k])
            elif t.shape[k] != 1:
                tr.sp.union(a[k], ta[k])
    tr.set(c.first_output, list(a), tr.provenance(x, *others), tr.pdims.get(id(x)))


def data_index(tr: Tracer, c: Call) -> None:
    """Positions or counts computed from data (``nonzero``, ``histc``...): inputs fixed, outputs constants."""
    for t in c.tensors:
        for a in tr.atoms(t):
            tr.sp.block(a)
    for t in c.outputs:
        tr.fresh(t, blocked=True)


def _scatter_rule(dim_pos: int, src_pos: int | None) -> Rule:
    def rule(tr: Tracer, c: Call) -> None:
        _scatter(tr, c, dim_pos, src_pos)

    return rule


# scatter-like writes: (dim argument position, source argument position or None), in place or not
_SCATTER = {"index_add": (1, 3), "index_copy": (1, 3), "index_fill": (1, None), "scatter": (1, 3),
            "scatter_add": (1, 3), "scatter_reduce": (1, 3), "index_reduce": (1, 3)}

ROUTING_RULES: dict[str, Rule] = {
    "topk": topk, "sort": sort, "argsort": sort,
    **{name: data_index for name in ("histc", "bincount", "nonzero", "argwhere", "_unique2", "unique_consecutive",
                                     "unique_dim")},
    **{name + suffix: _scatter_rule(*where) for name, where in _SCATTER.items() for suffix in ("", "_")},
}


# ---------------------------------------------------------------------------------------------- constants


def factory(tr: Tracer, c: Call) -> None:
    """``arange``, ``zeros``...: a fixed-size constant cannot shrink with a channel space (blocked)."""
    for t in c.outputs:
        tr.fresh(t, blocked=not tr.free_constants)


def like(tr: Tracer, c: Call) -> None:
    """``zeros_like``...: shaped like the input at run time, so the input's spaces."""
    tr.set(c.out, list(tr.atoms(c.args[0])), tr.provenance(c.args[0]))


CONSTANT_RULES: dict[str, Rule] = {
    **{name: factory for name in ("arange", "zeros", "ones", "full", "empty", "scalar_tensor", "randint", "rand",
                                  "randn", "new_zeros", "new_ones", "new_empty", "new_full", "empty_strided",
                                  "linspace", "eye", "tensor")},
    **{name: like for name in ("zeros_like", "ones_like", "full_like", "empty_like", "rand_like", "randn_like")},
}

# ops that relate no dimension (scalar reads, asserts, storage bookkeeping)
IGNORED = frozenset({"_local_scalar_dense", "is_nonzero", "sym_size", "sym_stride", "sym_numel", "equal",
                     "_assert_async", "_assert_tensor_metadata", "set_", "resize_", "record_stream"})


def _merge(*tables: dict[str, Rule]) -> dict[str, Rule]:
    merged: dict[str, Rule] = {}
    for table in tables:
        twice = merged.keys() & table.keys()
        if twice:
            raise RuntimeError(f"tracer rules for {sorted(twice)} are defined in two groups")
        merged.update(table)
    return merged


RULES: dict[str, Rule] = _merge(SHAPE_RULES, SLICING_RULES, CONTRACTION_RULES, ATTENTION_RULES,
                                NORM_ELEMENTWISE_RULES, ROUTING_RULES, CONSTANT_RULES)


def rule_for(call: Call) -> Rule:
    """The rule of ``call``'s op: its table entry, else :func:`elementwise` (pointwise-tagged or unmapped)."""
    return RULES.get(call.name, elementwise)
