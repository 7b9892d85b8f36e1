"""Importance scores of every group element: LLM-Pruner's criteria, computed by streaming.

``score`` returns :class:`Scores`: per group an fp32 tensor ``(n_slices, size)`` holding each
slice's score of each element, so the slice aggregation (:func:`aggregate`) can change
without recomputing, plus one score per layer for layer-wise pruning.

Criteria (``w`` a weight, ``g`` the gradient of the calibration loss, sums over the slice):

- ``random``: seeded uniform noise; ``l1``: sum |w|; ``l2``: sum w^2 (no gradients).
- ``element1``: sum |w*g|, ``g`` from one backward pass over the whole calibration batch.
- ``element2``: sum w^2 * F with the Fisher diagonal F = mean over samples of g_s^2 (g_s the
  gradient of sample s alone, one backward pass per sample; the mean as in LLM-Pruner).
  It is linear in F, so each pass adds sum (w*g_s)^2 into row/column partials: no
  parameter-sized buffer is ever kept.
- ``mix``: element1 - 0.5 * element2, each summed over the slice separately.  LLM-Pruner
  takes sum |w*g - 0.5 * w^2 * F| per weight; that needs F per weight, which streaming never
  stores, so the difference is taken after the sums (a lower bound of LLM-Pruner's value).
- ``vectorwise``: |sum w*g| over the slice's whole width (a head's head_dim rows together).

Streaming: a post-accumulate-grad hook on every parameter that needs scoring reduces its
gradient through :func:`fastprune.ops.taylor_accumulate_` into fp32 row/column partials and
sets ``param.grad = None``, so at most one gradient is alive at any time.  element1 and the
element1 half of mix take an absolute value per weight, which does not add up across
micro-batches: with ``batch_size`` smaller than the batch, gradients accumulate over the
micro-batches (all of them alive, as in plain training) and are reduced on the last one.
vectorwise is linear in ``g`` and streams every micro-batch.

Layer scores (layer-wise pruning): per layer, the criterion summed over every weight of every
parameter in that layer (vectorwise: |sum w*g| per parameter, summed over the parameters).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Collection
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F

from fastprune.errors import FastpruneError
from fastprune.graph import PruningGraph
from fastprune.ops import taylor_accumulate_
from fastprune.transfers import download, upload

CRITERIA = ("random", "l1", "l2", "element1", "element2", "mix", "vectorwise")
AGGREGATIONS = ("sum", "mean", "max", "prod", "first")
GRADIENT_FREE = ("random", "l1", "l2")
_FORMAT = "fastprune-scores-1"


@dataclass
class Scores:
    """Per group ``(n_slices, size)`` fp32 element scores and per layer fp32 scores."""

    groups: dict[str, torch.Tensor]
    layer_scores: torch.Tensor
    criterion: str
    fingerprint: str
    settings: dict[str, Any] = field(default_factory=dict)

    def save(self, path: str | os.PathLike) -> None:
        """Write the scores to a safetensors file (metadata as JSON, no pickle)."""
        from safetensors.torch import save_file

        tensors = {f"group:{name}": t.detach().float().contiguous().cpu() for name, t in self.groups.items()}
        tensors["layer_scores"] = self.layer_scores.detach().float().contiguous().cpu()
        meta = {"format": _FORMAT, "criterion": self.criterion, "fingerprint": self.fingerprint,
                "settings": json.dumps(self.settings, sort_keys=True)}
        save_file(tensors, os.fspath(path), metadata=meta)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Scores:
        """Read scores written by :meth:`save`."""
        from safetensors import safe_open

        try:
            with safe_open(os.fspath(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:  # safetensors raises its own error type for a damaged file
            raise FastpruneError(f"cannot read scores from {os.fspath(path)!r}: {exc}") from exc
        if meta.get("format") != _FORMAT or "layer_scores" not in tensors:
            raise FastpruneError(f"{os.fspath(path)!r} is not a fastprune scores file")
        groups = {k[len("group:"):]: v for k, v in tensors.items() if k.startswith("group:")}
        return cls(groups=groups, layer_scores=tensors["layer_scores"], criterion=meta["criterion"],
                   fingerprint=meta["fingerprint"], settings=json.loads(meta["settings"]))


# ---------------------------------------------------------------- partials

def _as_2d(t: torch.Tensor) -> torch.Tensor:
    return t.view(t.shape[0], -1) if t.dim() != 1 else t.view(-1, 1)


def _axis(shape, dim: int) -> int:
    """The partial (0: rows, 1: columns) that holds ``dim``; a 3-D expert stack [E, A, B] keeps A and B."""
    return dim - 1 if len(shape) == 3 and dim > 0 else dim


def _blocks(graph: PruningGraph, names: list[str]) -> dict[str, tuple[int, int]]:
    """Row/column block per parameter: the widest block every slice on that dim is made of.

    A slice whose elements are aligned contiguous runs (a head's head_dim rows) lets the
    kernel sum the run itself; a dimension no slice touches is reduced to one number.
    """
    on_dim: dict[tuple[str, int], list] = {}
    for g in graph.groups:
        for sl in g.slices:
            on_dim.setdefault((sl.param, sl.dim), []).append(sl)
    out = {}
    for name in names:
        shape = graph.param_shapes[name]
        extent = (shape[0], math.prod(shape[1:])) if len(shape) != 1 else (shape[0], 1)
        extent = tuple(shape[1:]) if len(shape) == 3 else extent  # experts summed, see _Partials.add
        blocks = []
        for d in (0, 1):
            slices = on_dim.get((name, d + (len(shape) == 3)))
            if not slices:
                blocks.append(extent[d])
                continue
            b = extent[d]
            for sl in slices:
                contiguous = all(y == x + 1 for x, y in zip(sl.base, sl.base[1:]))
                if not contiguous or sl.stride < sl.width:
                    b = 1
                    break
                b = math.gcd(b, sl.width, sl.base[0], sl.stride)
            blocks.append(b)
        out[name] = (blocks[0], blocks[1])
    return out


class _Partials:
    """fp32 (3, rows/block) and (3, cols/block) accumulators per parameter."""

    def __init__(self, params: dict[str, torch.nn.Parameter], blocks: dict[str, tuple[int, int]]):
        self.blocks = blocks
        self.rows: dict[str, torch.Tensor] = {}
        self.cols: dict[str, torch.Tensor] = {}
        self.shapes = {name: tuple(p.shape) for name, p in params.items()}
        for name, p in params.items():
            r, c = p.shape[1:] if p.dim() == 3 else _as_2d(p).shape
            rb, cb = blocks[name]
            self.rows[name] = torch.zeros(3, r // rb, dtype=torch.float32, device=p.device)
            self.cols[name] = torch.zeros(3, c // cb, dtype=torch.float32, device=p.device)

    def add(self, name: str, weight: torch.Tensor, grad: torch.Tensor) -> None:
        rb, cb = self.blocks[name]
        if weight.dim() == 3:  # stacked experts [E, A, B]: partials along A and B, summed over experts
            for w, g in zip(weight, grad):
                taylor_accumulate_(w, g, self.rows[name], self.cols[name], rb, cb)
            return
        taylor_accumulate_(_as_2d(weight), _as_2d(grad), self.rows[name], self.cols[name], rb, cb)

    def add_linear(self, name: str, grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> None:
        """The partials of a linear weight from its backward inputs (``fused_linear``; Triton)."""
        from fastprune.kernels.triton_fused_scoring import linear_taylor_accumulate

        rb, cb = self.blocks[name]
        linear_taylor_accumulate(grad_out, x, weight.detach(), self.rows[name], self.cols[name], rb, cb)

    def along(self, name: str, dim: int) -> torch.Tensor:
        return self.rows[name] if _axis(self.shapes[name], dim) == 0 else self.cols[name]


class _Stream:
    """Post-accumulate-grad hooks that reduce each gradient into partials and free it."""

    def __init__(self, params: dict[str, torch.nn.Parameter]):
        self.params = params
        self.target: _Partials | None = None  # None: let gradients accumulate (not the last micro-batch)
        self.seen: set[str] = set()
        self.fused: set[str] = set()  # weights whose backward hands its inputs to ``sink`` (they get no gradient)
        self.sum_gradient: Callable[[torch.Tensor], None] | None = None  # data-parallel: sum over the shards first
        self.handles = [p.register_post_accumulate_grad_hook(self._hook(name)) for name, p in params.items()]

    def _hook(self, name: str):
        def hook(p: torch.Tensor) -> None:
            if self.target is None or name in self.fused:
                return
            if name in self.seen:
                raise RuntimeError(f"the gradient of {name} arrived in several parts in one backward pass "
                                   "(reentrant checkpointing?); Taylor scores need it whole")
            self.seen.add(name)
            if self.sum_gradient is not None:
                self.sum_gradient(p.grad)
            self.target.add(name, p.detach(), p.grad)
            p.grad = None

        return hook

    def sink(self, name: str):
        """Where a fused linear layer's backward sends its inputs (``fused_linear``)."""
        self.fused.add(name)

        def add(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> None:
            if self.target is None:
                raise RuntimeError(f"fused_linear: {name}'s gradient cannot accumulate over micro-batches")
            self.target.add_linear(name, grad_out, x, weight)

        return add

    def backward(self, loss: torch.Tensor, target: _Partials | None) -> None:
        self.target, self.seen = target, set()
        loss.backward()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _lm_loss(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy of ``ids`` (labels = inputs), in fp32."""
    kwargs = {"use_cache": False} if hasattr(model, "config") else {}
    out = model(input_ids=ids, **kwargs)
    logits = out.logits if hasattr(out, "logits") else out[0]
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def _scored_params(model: torch.nn.Module, graph: PruningGraph) -> dict[str, torch.nn.Parameter]:
    """Every parameter a slice references or a layer holds, in model order."""
    wanted = {sl.param for g in graph.groups for sl in g.slices}
    wanted |= {n for n in graph.param_shapes if graph.layer_of(n) is not None}
    return {n: p for n, p in model.named_parameters() if n in wanted}


def _taylor_partials(model, params, blocks, calib, criterion, batch_size, progress, loss_chunk=None,
                     fused_linear=False, shard_sum=None, n_total=None):
    """Run the backward passes ``criterion`` needs; return (first-order, second-order) partials.

    With ``shard_sum`` (see :func:`score`) ``calib`` is this process's shard of ``n_total`` samples.
    """
    from tqdm.auto import tqdm

    from fastprune.fused_scoring import fusable_linears, fused_linears

    if loss_chunk is None:
        loss = lambda ids: _lm_loss(model, ids)  # noqa: E731
    else:
        from fastprune.chunked_loss import chunked_lm_loss

        checked: set[int] = set()
        loss = lambda ids: chunked_lm_loss(model, ids, loss_chunk, checked)  # noqa: E731

    n = calib.shape[0]
    n_total = n if n_total is None else n_total
    first = _Partials(params, blocks) if criterion in ("element1", "mix", "vectorwise") else None
    second = _Partials(params, blocks) if criterion in ("element2", "mix") else None
    batch = n if batch_size is None else max(1, min(batch_size, n))
    chunks = [calib[i:i + batch] for i in range(0, n, batch)] if first is not None else []
    passes = len(chunks) + (n if second is not None else 0)
    linear = criterion == "vectorwise"
    if fused_linear and not linear and len(chunks) > 1:
        raise FastpruneError(f"fused_linear scores {criterion} from one backward pass over the whole calibration "
                             "batch: use batch_size=None")
    if fused_linear and shard_sum is not None:
        raise FastpruneError("fused_linear cannot score a shard of the calibration batch (its weights get no "
                             "gradient to sum over the processes)")
    stream = _Stream(params)
    if shard_sum is not None and not linear:
        stream.sum_gradient = shard_sum  # |w*g| does not add up over shards: the whole batch's gradient first
    fused = fused_linears(fusable_linears(model, set(params)), stream.sink) if fused_linear else nullcontext()
    try:
        desc = f"scoring ({criterion}{', shard' if shard_sum is not None else ''})"
        with fused, tqdm(total=passes, desc=desc, disable=not progress) as bar:
            for i, chunk in enumerate(chunks):
                last = i == len(chunks) - 1
                stream.backward(loss(chunk) * (chunk.shape[0] / n_total), first if (last or linear) else None)
                bar.update()
            if second is not None:
                stream.sum_gradient = None  # per-sample passes: each shard adds its own (w*g_s)^2
                for s in range(n):
                    stream.backward(loss(calib[s:s + 1]), second)
                    bar.update()
        if shard_sum is not None:  # what is linear in the data is summed over the shards once
            if linear:
                _sum_channel(first, 1, shard_sum)
            if second is not None:
                _sum_channel(second, 2, shard_sum)
        if second is not None:
            for acc in (second.rows, second.cols):
                for t in acc.values():
                    t /= n_total
    finally:
        stream.remove()
    return first, second


def _sum_channel(acc: _Partials, channel: int, shard_sum: Callable[[torch.Tensor], None]) -> None:
    for table in (acc.rows, acc.cols):
        for t in table.values():
            shard_sum(t[channel])


def _magnitude_partials(params, blocks) -> _Partials:
    """Partials of |w| and w^2 (the op with a gradient of ones, broadcast without a copy)."""
    acc = _Partials(params, blocks)
    with torch.no_grad():
        for name, p in params.items():
            w = p.detach() if p.dim() == 3 else _as_2d(p.detach())
            acc.add(name, w, torch.ones((1,) * w.dim(), dtype=w.dtype, device=w.device).expand(w.shape))
    return acc


def _combine(criterion: str, first: _Partials | None, second: _Partials | None, name: str, dim: int,
             index: torch.Tensor | slice) -> torch.Tensor:
    """The criterion's value from partials ``[..., index]`` along ``dim`` (summed over the last axis)."""
    def take(acc: _Partials, ch: int) -> torch.Tensor:
        v = acc.along(name, dim)[ch]
        return v[index].sum(-1)

    if criterion in ("element1", "l1"):
        return take(first, 0)
    if criterion == "l2":
        return take(first, 2)
    if criterion == "vectorwise":
        return take(first, 1).abs()
    if criterion == "element2":
        return take(second, 2)
    return take(first, 0) - 0.5 * take(second, 2)  # mix


def _slice_index(sl, size: int, block: int) -> torch.Tensor:
    """(size, width // block) indices into the block partials of ``sl``'s dimension (on the host)."""
    idx = sl.indices(torch.arange(size)).view(size, sl.width)
    return idx[:, ::block] // block if block > 1 else idx


def _reduced_scores(graph: PruningGraph, params, criterion, first, second, blocks):
    """Group and layer scores, reduced where the partials live and brought to the host in one copy per device.

    Returns ``{group: (n_slices, size) fp32}`` and the fp32 layer scores (per layer, the float64 sum in
    parameter order of each parameter's total).  The slices' index tensors are built on the host and
    uploaded once per device.
    """
    acc = first if first is not None else second
    slices = [(g, sl) for g in graph.groups for sl in g.slices]
    host_index = [_slice_index(sl, g.size, blocks[sl.param][_axis(acc.shapes[sl.param], sl.dim)]) for g, sl in slices]
    index: list[torch.Tensor | None] = [None] * len(slices)
    by_device: dict[torch.device, list[int]] = {}
    for i, (_, sl) in enumerate(slices):
        by_device.setdefault(acc.rows[sl.param].device, []).append(i)
    for device, positions in by_device.items():
        for i, t in zip(positions, upload([host_index[i] for i in positions], device)):
            index[i] = t
    values, k = [], 0
    for g in graph.groups:
        rows = []
        for sl in g.slices:
            rows.append(_combine(criterion, first, second, sl.param, sl.dim, index[k]))
            k += 1
        values.append(torch.stack(rows).float())
    in_layers = [n for n in params if graph.layer_of(n) is not None and graph.layer_of(n) < graph.num_layers]
    totals = [_combine(criterion, first, second, n, 0, slice(None)).float().reshape(1) for n in in_layers]
    host = download(values + totals)
    groups = {g.name: t for g, t in zip(graph.groups, host)}
    layer_sums = [0.0] * graph.num_layers
    if totals:
        for name, total in zip(in_layers, torch.cat(host[len(values):]).tolist()):
            layer_sums[graph.layer_of(name)] += total
    return groups, torch.tensor(layer_sums, dtype=torch.float64).float()


def _checked_params(model: torch.nn.Module, graph: PruningGraph, criterion: str,
                    batch_size: int | None) -> dict[str, torch.nn.Parameter]:
    """Validate the scoring arguments; the parameters the graph's slices reference."""
    if criterion not in CRITERIA:
        raise FastpruneError(f"unknown criterion {criterion!r}; choose one of {CRITERIA}")
    if batch_size is not None and batch_size < 1:
        raise FastpruneError(f"batch_size must be at least 1, got {batch_size}")
    params = _scored_params(model, graph)
    missing = {sl.param for g in graph.groups for sl in g.slices} - set(params)
    if missing:
        raise FastpruneError(f"the graph names parameters this model does not have: {sorted(missing)[:4]}")
    for g in graph.groups:
        for sl in g.slices:
            ndim = len(graph.param_shapes[sl.param])
            if (sl.dim not in (1, 2)) if ndim == 3 else (sl.dim > 1 or (sl.dim == 1 and ndim != 2)):
                raise FastpruneError(f"cannot score {sl.param} along dim {sl.dim}: only rows of any parameter, "
                                     "columns of 2-D ones and dims 1, 2 of 3-D expert stacks are supported")
    return params


def score(model: torch.nn.Module, graph: PruningGraph, calib: torch.Tensor | None = None,
          criterion: str = "element1", *, batch_size: int | None = None, seed: int = 0,
          gradient_checkpointing: bool = False, progress: bool = True, loss_chunk: int | None = None,
          fused_linear: bool = False, shard_sum: Callable[[torch.Tensor], None] | None = None,
          groups: Collection[str] | None = None) -> Scores:
    """Score every element of every group of ``graph`` (or of the groups named in ``groups``) with ``criterion``.

    ``calib`` is an ``(n, seq_len)`` LongTensor of token ids (the loss is the causal LM loss
    with labels = inputs); gradient-free criteria need none.  ``batch_size`` splits the
    first-order backward pass into micro-batches (see the module notes).  ``loss_chunk`` computes
    the loss that many tokens of logits at a time, never all of them (:mod:`fastprune.chunked_loss`;
    scores then differ from the default by float rounding).  ``fused_linear`` (opt-in, Triton, not yet
    validated on a GPU) scores linear layers inside their backward pass without storing their weight
    gradients (:mod:`fastprune.fused_scoring`).  The model's parameters, gradients, ``requires_grad``
    flags and train/eval mode are left as they were.

    ``shard_sum`` is the data-parallel hook (:mod:`fastprune.distributed` passes an all-reduce): a function
    that sums a tensor in place over processes that each hold the same model and their own ``calib``
    shard.  Every process then gets the scores of the whole batch (``settings["n_samples"]`` counts it);
    gradient-free criteria ignore it.

    ``groups`` limits the scores to those groups (and the layer scores): a parameter that no named group
    and no layer holds then gets no gradient at all, e.g. the embeddings when only heads and MLP channels
    are selected, which saves their vocab x hidden gradient buffer.  The named groups score exactly as
    without the option.
    """
    wanted = graph if groups is None else _only_groups(graph, groups)
    params = _checked_params(model, wanted, criterion, batch_size)
    settings: dict[str, Any] = {"seed": seed}
    if criterion == "random":  # drawn for every group in graph order, so a group's draw never depends on ``groups``
        gen = torch.Generator().manual_seed(seed)
        drawn = {g.name: torch.rand(len(g.slices), g.size, generator=gen) for g in graph.groups}
        layer_scores = torch.rand(graph.num_layers, generator=gen)
        return Scores({g.name: drawn[g.name] for g in wanted.groups}, layer_scores, criterion, graph.fingerprint,
                      settings)
    graph = wanted
    blocks = _blocks(graph, list(params))
    if criterion in GRADIENT_FREE:
        first, second = _magnitude_partials(params, blocks), None
    else:
        calib = _check_calib(calib, model)
        n_total = calib.shape[0]
        if shard_sum is not None:
            count = torch.tensor([n_total], dtype=torch.long, device=calib.device)
            shard_sum(count)
            n_total = int(count)
        settings.update(n_samples=n_total, seq_len=calib.shape[1], batch_size=batch_size,
                        gradient_checkpointing=gradient_checkpointing, loss_chunk=loss_chunk,
                        fused_linear=fused_linear)
        with _scoring_state(model, params, gradient_checkpointing), torch.enable_grad():
            first, second = _taylor_partials(model, params, blocks, calib, criterion, batch_size, progress,
                                             loss_chunk, fused_linear, shard_sum, n_total)
    groups, layer_scores = _reduced_scores(graph, params, criterion, first, second, blocks)
    return Scores(groups, layer_scores, criterion, graph.fingerprint, settings)


def _only_groups(graph: PruningGraph, names: Collection[str]) -> PruningGraph:
    """``graph`` with only the groups named (each must exist)."""
    if isinstance(names, str):
        raise FastpruneError(f"groups must be a collection of group names, got the string {names!r}")
    known = {g.name for g in graph.groups}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise FastpruneError(f"groups names {unknown[0]!r}, which the graph does not have; it has "
                             f"{sorted(known)[:6]}{' ...' if len(known) > 6 else ''}")
    wanted = set(names)
    return replace(graph, groups=[g for g in graph.groups if g.name in wanted])


def _check_calib(calib, model) -> torch.Tensor:
    if not isinstance(calib, torch.Tensor) or calib.dim() != 2 or calib.dtype != torch.long:
        raise FastpruneError("gradient criteria need calib: an (n, seq_len) LongTensor of token ids, got "
                             f"{type(calib).__name__}"
                             + (f" {calib.dtype} {tuple(calib.shape)}" if isinstance(calib, torch.Tensor) else ""))
    if calib.shape[0] < 1 or calib.shape[1] < 2:
        raise FastpruneError(f"calib needs at least one sample of two tokens, got shape {tuple(calib.shape)}")
    return calib.to(next(model.parameters()).device)


def _is_checkpointing(model: torch.nn.Module) -> bool:
    """Whether a Hugging Face model checkpoints activations (``is_gradient_checkpointing`` before transformers 5.23)."""
    new = "is_activation_checkpointing"
    name = new if hasattr(model, new) else "is_gradient_checkpointing"
    return bool(getattr(model, name, False))


@contextmanager
def _scoring_state(model: torch.nn.Module, params: dict, checkpointing: bool):
    """Only scored parameters require grad and no old gradient mixes in; all restored on exit."""
    training = model.training
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    grads = {n: p.grad for n, p in model.named_parameters()}
    was_checkpointing = _is_checkpointing(model)
    try:
        for n, p in model.named_parameters():
            p.grad = None
            p.requires_grad_(n in params)
        if checkpointing:
            if hasattr(model, "activation_checkpointing_enable"):
                model.activation_checkpointing_enable({"use_reentrant": False})
            elif hasattr(model, "gradient_checkpointing_enable"):
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            else:
                raise FastpruneError(f"{type(model).__name__} cannot checkpoint activations")
            model.train()  # Hugging Face models checkpoint only in training mode
        else:
            model.eval()
        yield
    finally:
        if checkpointing and not was_checkpointing:
            for name in ("activation_checkpointing_disable", "gradient_checkpointing_disable"):
                if hasattr(model, name):
                    getattr(model, name)()
                    break
        model.train(training)
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
            p.grad = grads[n]


# ---------------------------------------------------------------- aggregation

def aggregate(scores: Scores, graph: PruningGraph, how: str = "sum") -> dict[str, torch.Tensor]:
    """One float64 score per element of every scored group, reducing over its slices.

    ``first`` sums the group's root slices only (the projections that open it).  ``prod``
    multiplies the slices' scores; it is computed in float64 because a product of many small
    fp32 scores underflows to zero (then every element ties), and with signed scores (mix)
    its sign flips with the number of negative factors: prefer ``sum``.
    """
    if how not in AGGREGATIONS:
        raise FastpruneError(f"unknown aggregation {how!r}; choose one of {AGGREGATIONS}")
    out = {}
    for g in graph.groups:
        if g.name not in scores.groups:
            continue
        s = scores.groups[g.name].double()
        if s.shape != (len(g.slices), g.size):
            raise FastpruneError(f"scores of {g.name!r} have shape {tuple(s.shape)}, the graph expects "
                                 f"{(len(g.slices), g.size)}")
        if how == "sum":
            out[g.name] = s.sum(0)
        elif how == "mean":
            out[g.name] = s.mean(0)
        elif how == "max":
            out[g.name] = s.max(0).values
        elif how == "prod":
            out[g.name] = s.prod(0)
        else:
            out[g.name] = s[list(g.root) or list(range(len(g.slices)))].sum(0)
    return out
