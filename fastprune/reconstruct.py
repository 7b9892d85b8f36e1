"""``reconstruct(model, graph, plan, calib)``: refit what consumes the pruned channels.

After selection and before compaction, every *consumer* of a pruned channel space (the projection
that reads the channels: ``down_proj`` for MLP channels, ``o_proj`` for attention heads; any
``nn.Linear`` or GPT-2 ``Conv1D`` whose input columns a pruned group owns) is refitted so that its
output on calibration text changes as little as possible when the removed columns R go.  With the
second moments ``M = E[x x^T]`` of the consumer's inputs over the calibration tokens, the kept
columns K become::

    W_K' = W_K + W_R M_RK (M_KK + lambda I)^-1          (ridge: lambda = ridge * mean(diag M_KK))

and with ``bias=True`` the moments are centred (covariances) and the bias absorbs the mean::

    b' = b + W_R mu_R - (W_K' - W_K) mu_K

(with W_K' = W_K this is FLAP's bias compensation).  The moments are Gram matrices accumulated in
fp32 by forward pre-hooks while each layer runs (:mod:`fastprune.layerwise`): one layer's statistics
are alive at a time and no activation is stored.  ``sequential=True`` takes each layer's statistics
from the model whose earlier layers are already pruned and refitted.

The ridge solution never increases a consumer's calibration error: it minimises
``E||W_R x_R - dW x_K - db||^2 + lambda ||dW||^2``, whose value at ``dW = 0`` (plain removal, no
bias) is the error of removal alone.  Reported per consumer as ``error_before``/``error_after``.

A consumer without a bias gets one only where the model's config can express it (a boolean config
field such as Llama's ``mlp_bias``/``attention_bias`` whose meta-built model has exactly that bias);
the other modules that field adds get zero biases, so the model's outputs are unchanged by them and
the checkpoint loads with the field set.  New biases are attached after compaction
(:func:`attach_biases`), since the plan's fingerprint names the parameters before it.  Elsewhere
the refit runs without a bias term.  Hidden-dimension pruning is not reconstructed.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from fastprune.errors import FastpruneError
from fastprune.graph import LAYER_KINDS, PruningGraph
from fastprune.layerwise import propagate, record_layer_calls
from fastprune.plan import Plan
from fastprune.plan_ops import validate

DEFAULT_RIDGE = 1e-2
MIN_RIDGE = 1e-6  # the kept columns' moment matrix can be singular (a dead channel); the ridge keeps it definite


@dataclass
class Consumer:
    """A module reading pruned input channels: which of its input columns stay and which go."""

    module: str
    layer: int
    in_dim: int  # the weight dimension holding input channels: 1 for nn.Linear, 0 for Conv1D
    kept: torch.Tensor
    removed: torch.Tensor


@dataclass
class ReconstructionReport:
    """What :func:`reconstruct` did: per consumer the calibration error before and after the refit."""

    consumers: list[str]
    error_before: list[float]
    error_after: list[float]
    tokens: int
    seconds: float
    settings: dict[str, Any]
    new_biases: dict[str, torch.Tensor] = field(default_factory=dict)  # module -> bias (attached after apply)
    config_flags: dict[str, bool] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """Plain data for reports: totals and the mean relative error left per consumer."""
        rel = [a / b for a, b in zip(self.error_after, self.error_before) if b > 0]
        return {"consumers": len(self.consumers), "tokens": self.tokens, "seconds": self.seconds,
                "mean_error_left": sum(rel) / len(rel) if rel else None, "biases_added": len(self.new_biases),
                "config_flags": dict(self.config_flags), "skipped": list(self.skipped), **self.settings}


def _conv1d_type() -> tuple[type, ...]:
    try:
        from transformers.pytorch_utils import Conv1D
        return (Conv1D,)
    except ImportError:  # pragma: no cover
        return ()


def find_consumers(model: torch.nn.Module, graph: PruningGraph, plan: Plan) -> tuple[list[Consumer], list[str]]:
    """Consumers of the plan's pruned head and channel groups, and notes on what cannot be refitted."""
    modules = dict(model.named_modules())
    conv1d = _conv1d_type()
    removed_cols: dict[str, list[torch.Tensor]] = {}
    dims: dict[str, int] = {}
    layers: dict[str, int] = {}
    skipped: list[str] = []
    for group in graph.groups:
        kept = plan.keep.get(group.name)
        if group.kind not in LAYER_KINDS or kept is None or len(kept) == group.size:
            continue
        if group.layer in plan.remove_layers:
            continue
        gone = sorted(set(range(group.size)) - set(kept))
        for sl in group.slices:
            if sl.role != "in":
                continue
            owner, _, leaf = sl.param.rpartition(".")
            mod = modules.get(owner)
            in_dim = 1 if isinstance(mod, torch.nn.Linear) else 0 if conv1d and isinstance(mod, conv1d) else None
            if leaf != "weight" or in_dim is None or sl.dim != in_dim:
                skipped.append(f"{sl.param} (dim {sl.dim}): only nn.Linear and Conv1D inputs are refitted")
                continue
            removed_cols.setdefault(owner, []).append(sl.indices(gone))
            dims[owner] = in_dim
            layers[owner] = group.layer
    out = []
    for owner, parts in removed_cols.items():
        width = modules[owner].weight.shape[dims[owner]]
        mask = torch.ones(width, dtype=torch.bool)
        mask[torch.cat(parts)] = False
        out.append(Consumer(owner, layers[owner], dims[owner], mask.nonzero().flatten(), (~mask).nonzero().flatten()))
    return out, sorted(set(skipped))


class GramStats:
    """fp32 sums of x x^T and x over the inputs of some modules, filled by forward pre-hooks."""

    def __init__(self, modules: dict[str, torch.nn.Module]):
        self.gram: dict[str, torch.Tensor] = {}
        self.sum: dict[str, torch.Tensor] = {}
        self.count: dict[str, int] = {}
        self.handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in modules.items()]

    def _hook(self, name: str):
        def hook(module, args):
            x = args[0].detach()
            x = x.reshape(-1, x.shape[-1]).float()
            if name not in self.gram:
                self.gram[name] = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float32, device=x.device)
                self.sum[name] = torch.zeros(x.shape[1], dtype=torch.float32, device=x.device)
                self.count[name] = 0
            self.gram[name].addmm_(x.T, x)
            self.sum[name] += x.sum(0)
            self.count[name] += x.shape[0]
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def moments(self, name: str, centred: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(second moment or covariance, mean) of ``name``'s inputs, in float64."""
        n = self.count[name]
        mean = self.sum[name].double() / n
        m = self.gram[name].double() / n
        if centred:
            m = m - torch.outer(mean, mean)
        return m, mean


def refit(weight: torch.Tensor, moments: torch.Tensor, mean: torch.Tensor | None, kept: torch.Tensor,
          removed: torch.Tensor, ridge: float) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """The ridge refit of one consumer (weight ``[out, in]``, float64 moments).

    Returns the new kept columns ``[out, |K|]``, the bias change (``None`` without ``mean``) and a
    tensor ``[error before, error after]`` of the mean squared output error on the calibration tokens.
    """
    w = weight.double()
    w_r, w_k = w[:, removed], w[:, kept]
    m_kk = moments[kept][:, kept]
    m_kr = moments[kept][:, removed]
    lam = ridge * m_kk.diagonal().mean().clamp_min(1e-12)
    a = m_kk + lam * torch.eye(len(kept), dtype=m_kk.dtype, device=m_kk.device)
    c = m_kr @ w_r.T  # [K, out]
    chol, _ = torch.linalg.cholesky_ex(a)  # positive definite: ridge >= MIN_RIDGE (no host sync to check)
    delta_t = torch.cholesky_solve(c, chol)
    before = ((w_r @ moments[removed][:, removed]) * w_r).sum()
    # E||W_R x_R - dW x_K||^2 = before - 2 tr(dW M_KR W_R^T) + tr(dW M_KK dW^T), with M_KK dW^T = c - lam dW^T
    after = before - 2 * (delta_t * c).sum() + (delta_t * (c - lam * delta_t)).sum()
    db = None
    if mean is not None:  # centred moments: removal alone also loses the mean W_R mu_R
        shift = w_r @ mean[removed]
        before = before + shift.square().sum()
        db = shift - delta_t.T @ mean[kept]
    return (w_k + delta_t.T), db, torch.stack([before, after.clamp_min(0)])


def _bias_flags(model: torch.nn.Module, wanted: list[str]) -> tuple[dict[str, bool], dict[str, int]]:
    """Boolean config fields that give ``wanted`` modules a bias, and every bias those fields add (name -> size)."""
    config = getattr(model, "config", None)
    base = getattr(type(model), "_fastprune_base", type(model))
    if config is None or not hasattr(base, "_from_config") or not wanted:
        return {}, {}
    have = {n for n, _ in model.named_parameters()}
    flags: dict[str, bool] = {}
    added: dict[str, int] = {}
    missing = {f"{m}.bias" for m in wanted}
    for attr, value in sorted(vars(config).items()):
        if value is not False or "bias" not in attr or not missing:
            continue
        probe = copy.deepcopy(config)
        setattr(probe, attr, True)
        try:
            with torch.device("meta"):
                built = base._from_config(probe)
        except Exception:  # noqa: BLE001 - a field the config class refuses is simply not usable
            continue
        new = {n: p.numel() for n, p in built.named_parameters() if n not in have}
        if not new or not all(n.endswith(".bias") for n in new):
            continue  # the field changes more than biases
        hit = set(new) & missing
        if hit:
            flags[attr] = True
            added.update(new)
            missing -= hit
    return flags, added


def bias_overhead(model: torch.nn.Module, graph: PruningGraph) -> int:
    """Parameters the refit's bias term may add to ``model`` (the config fields' zero biases included),
    counted at today's widths: what selection sets aside so that the ratio still holds."""
    modules = dict(model.named_modules())
    wanted = []
    for g in graph.groups:
        if g.kind in LAYER_KINDS:
            for sl in g.slices:
                owner = sl.param.rpartition(".")[0]
                mod = modules.get(owner)
                if sl.role == "in" and isinstance(mod, torch.nn.Linear) and mod.bias is None:
                    wanted.append(owner)
    _, added = _bias_flags(model, sorted(set(wanted)))
    return sum(added.values())


def reconstruct(model: torch.nn.Module, graph: PruningGraph, plan: Plan, calib: torch.Tensor, *,
                ridge: float = DEFAULT_RIDGE, bias: bool = True, sequential: bool = False, batch_size: int = 8,
                progress: bool = True, require_bias: bool = False) -> ReconstructionReport:
    """Refit the consumers of ``plan``'s pruned heads and MLP channels on ``calib`` (see the module notes).

    ``require_bias`` (uniform pruning: a plain config must describe the result) refuses, before any
    change, a bias term that the config cannot express.
    Writes the refitted kept columns (and existing biases) into ``model`` in place; the removed
    columns are left for :func:`fastprune.apply` to drop.  New biases are returned in the report
    and attached by :func:`attach_biases` after compaction.  Validates the plan first.
    """
    validate(plan, graph)
    if not ridge >= MIN_RIDGE:
        raise FastpruneError(f"ridge must be at least {MIN_RIDGE} (relative to the mean input energy), got {ridge}")
    if not isinstance(calib, torch.Tensor) or calib.dim() != 2 or calib.dtype != torch.long:
        raise FastpruneError("reconstruction needs calib: an (n, seq_len) LongTensor of token ids")
    start = time.perf_counter()
    consumers, skipped = find_consumers(model, graph, plan)
    settings = {"ridge": ridge, "bias": bias, "sequential": sequential, "n_samples": calib.shape[0],
                "seq_len": calib.shape[1]}
    report = ReconstructionReport([], [], [], calib.numel(), 0.0, settings, skipped=skipped)
    if not consumers:
        return report
    modules = dict(model.named_modules())
    need_bias = [c.module for c in consumers if modules[c.module].bias is None] if bias else []
    flags, added = _bias_flags(model, need_bias)
    can_bias = {c.module for c in consumers if modules[c.module].bias is not None} | {
        n[:-len(".bias")] for n in added}
    report.config_flags = flags
    cannot = [m for m in need_bias if m not in can_bias]
    if cannot and require_bias:
        raise FastpruneError(f"the refit's bias term needs a bias on {cannot[0]} (and {len(cannot) - 1} more), which "
                             f"{type(getattr(model, 'config', None)).__name__} cannot express; pass recon_bias=False "
                             "or uniform=False")
    if cannot:
        report.skipped.append(f"{len(cannot)} refitted projections ({cannot[0]}, ...) have no bias and "
                              f"{type(getattr(model, 'config', None)).__name__} cannot express one: they are "
                              "refitted without a mean term")
    by_layer: dict[int, list[Consumer]] = {}
    for c in consumers:
        by_layer.setdefault(c.layer, []).append(c)
    layers = model.get_submodule(graph.layer_container)
    was_training = model.training
    model.eval()
    errors: list[torch.Tensor] = []
    new_biases: dict[str, torch.Tensor] = {}
    bar = tqdm(total=len(by_layer), desc="reconstruction", unit="layer", disable=not progress)
    try:
        record = record_layer_calls(model, layers, calib, batch_size)

        def visit(i: int, inputs: list[torch.Tensor]) -> list[torch.Tensor] | None:
            if i not in by_layer:
                return None
            group = by_layer[i]
            stats = GramStats({c.module: modules[c.module] for c in group})
            try:
                outputs = [record.run(layers[i], i, j, h) for j, h in enumerate(inputs)]
            finally:
                stats.remove()
            for c in group:
                mod = modules[c.module]
                centred = bias and c.module in can_bias
                m, mean = stats.moments(c.module, centred)
                w = mod.weight if c.in_dim == 1 else mod.weight.T
                new_k, db, err = refit(w, m, mean if centred else None, c.kept, c.removed, ridge)
                errors.append(err)
                w[:, c.kept] = new_k.to(w.dtype)
                if db is not None:
                    if mod.bias is not None:
                        mod.bias += db.to(mod.bias.dtype)
                    else:
                        new_biases[c.module] = db.to(mod.weight.dtype)
            del stats
            bar.update()
            if not sequential:
                return outputs
            return _run_pruned(layers[i], i, record, inputs, group, modules, new_biases)

        propagate(layers, record, max(by_layer) + 1, visit)
    finally:
        bar.close()
        model.train(was_training)
    pairs = torch.stack(errors).tolist()  # the one host transfer
    if any(p != p for pair in pairs for p in pair):
        raise FastpruneError("the refit produced NaN: the calibration activations hold NaN or inf")
    report.consumers = [c.module for i in sorted(by_layer) for c in by_layer[i]]  # the order of visit
    report.error_before = [p[0] for p in pairs]
    report.error_after = [p[1] for p in pairs]
    report.new_biases = _renumbered(new_biases, graph, plan)
    report.config_flags = flags if new_biases else {}
    report.seconds = time.perf_counter() - start
    return report


def _run_pruned(layer, i, record, inputs, group, modules, new_biases) -> list[torch.Tensor]:
    """Layer i's outputs as the pruned layer computes them: removed columns zeroed, new biases added."""
    saved = []
    handles = []
    for c in group:
        mod = modules[c.module]
        w = mod.weight if c.in_dim == 1 else mod.weight.T
        saved.append((w, c.removed, w[:, c.removed].clone()))
        w[:, c.removed] = 0
        if c.module in new_biases:
            b = new_biases[c.module]
            handles.append(mod.register_forward_hook(lambda _m, _a, out, b=b: out + b))
    try:
        return [record.run(layer, i, j, h) for j, h in enumerate(inputs)]
    finally:
        for w, idx, old in saved:
            w[:, idx] = old
        for h in handles:
            h.remove()


def _renumbered(biases: dict[str, torch.Tensor], graph: PruningGraph, plan: Plan) -> dict[str, torch.Tensor]:
    """Module names as they will be once the plan's layers are removed."""
    if not plan.remove_layers:
        return biases
    gone = set(plan.remove_layers)
    index = {old: new for new, old in enumerate(i for i in range(graph.num_layers) if i not in gone)}
    prefix = graph.layer_container + "."
    out = {}
    for name, value in biases.items():
        head, _, rest = name[len(prefix):].partition(".")
        out[f"{prefix}{index[int(head)]}.{rest}"] = value
    return out


def attach_biases(model: torch.nn.Module, report: ReconstructionReport, plan: Plan, graph: PruningGraph) -> None:
    """After :func:`fastprune.apply`: give the refitted consumers their new biases, set the config fields
    that describe them and give every other module those fields add a zero bias."""
    if not report.new_biases:
        return
    hidden = next((g for g in graph.groups if g.kind == "hidden" and g.name in plan.keep), None)
    kept_hidden = torch.tensor(plan.keep[hidden.name]) if hidden is not None else None
    config = getattr(model, "config", None)
    for attr, value in report.config_flags.items():
        setattr(config, attr, value)
    flags_added = set()
    if report.config_flags:
        base = getattr(type(model), "_fastprune_base", type(model))
        with torch.device("meta"):
            built = base._from_config(copy.deepcopy(config))
        have = {n for n, _ in model.named_parameters()}
        flags_added = {n for n, _ in built.named_parameters() if n.endswith(".bias")} - have
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name in sorted(flags_added | {f"{m}.bias" for m in report.new_biases}):
            owner = name[:-len(".bias")]
            mod = modules.get(owner)
            if mod is None or getattr(mod, "bias", None) is not None:
                continue
            out_features = mod.weight.shape[0] if isinstance(mod, torch.nn.Linear) else mod.weight.shape[1]
            value = report.new_biases.get(owner)
            if value is not None and kept_hidden is not None and value.shape[0] != out_features:
                value = value[kept_hidden.to(value.device)]
            if value is None:
                value = torch.zeros(out_features, dtype=mod.weight.dtype, device=mod.weight.device)
            mod.bias = torch.nn.Parameter(value.to(mod.weight.device, mod.weight.dtype),
                                          requires_grad=mod.weight.requires_grad)
