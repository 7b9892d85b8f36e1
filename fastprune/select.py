"""``select(graph, scores, ratio) -> Plan``: which group elements (or layers) to remove.

``ratio`` is the fraction of *all* the model's parameters to remove.  Block- and channel-wise
plans land within 0.01 of it (one percentage point; usually far closer, the solver picks the
closest reachable count), layer-wise within one layer; ``settings["achieved"]`` states the
predicted value.

Scopes
- ``block``: attention head groups and MLP channel groups of the layers in ``layers``
  (default: LLM-Pruner's ``range(4, 30)`` of 32 layers scaled to the depth L, i.e.
  ``range(floor(4/32*L + 0.5), floor(30/32*L + 0.5))``; 30 layers give 4..27).
- ``channel``: the hidden dimension (one group spanning every layer).
- ``layer``: whole layers, lowest ``scores.layer_scores`` first (candidates: ``layers``,
  default all), never every layer.

Ranking (block scope)
- ``local``: one ratio p for every group, as LLM-Pruner: each group removes its lowest-scored
  ``round(p * size)`` elements (rounded to an allowed count).  p is found by bisection as the
  largest value whose plan removes no more than the target.  That is how the budget splits
  between attention and MLP: both take the same fraction of their elements, so each gives up
  parameters in proportion to its size.  Head groups are coarse (with 3 kv heads one element
  is a third of the attention), so at that p the attention may fall a step short of its
  share.  The MLP groups then absorb that remainder with a second shared ratio of their own
  (attention keeps the whole heads the first ratio gave), and what is left after that (less
  than one step per group) goes greedily, step by step, to the group whose next step has the
  lowest score per parameter.
- ``global``: every element of every in-range group competes on its aggregated score divided
  by the parameters it frees (importance per removed parameter, so a kv head group and an MLP
  channel compare fairly; raw scores grow with slice size).  The cheapest steps are taken until
  the budget is met.

Constraints: a head group keeps at least ``min_keep_heads`` elements; channel and hidden groups
keep a multiple of ``round_to`` elements (when the group size allows) and at least
``round_to``, so a layer never loses its last head or channel.  In a model with stacked experts
(MoE), the expert channel groups and the hidden group keep a multiple of ``lcm(round_to, 8)``:
``torch._grouped_mm`` needs 16-byte aligned strides (8 bf16 or 4 fp32 elements).  ``group_ratio`` skips the
solver: every in-range group removes ``round(group_ratio * size)`` elements (LLM-Pruner's
``pruning_ratio``).
"""

from __future__ import annotations

import bisect
import heapq
import math

import torch

from fastprune.errors import FastpruneError
from fastprune.graph import LAYER_KINDS, Group, PruningGraph
from fastprune.importance import Scores, aggregate
from fastprune.plan import Plan
from fastprune.plan_ops import predicted_params

SCOPES = ("block", "channel", "layer")
EXPERT_ALIGN = 8  # stacked expert widths (and an MoE model's hidden size): 16-byte rows for grouped_mm
RANKINGS = ("local", "global")
TOLERANCE = 0.01


def default_layers(num_layers: int) -> tuple[int, int]:
    """LLM-Pruner's block range ``range(4, 30)`` of 32 layers, scaled to ``num_layers``."""
    start = math.floor(4 / 32 * num_layers + 0.5)
    end = math.floor(30 / 32 * num_layers + 0.5)
    return start, min(max(end, start + 1), num_layers)


def select(graph: PruningGraph, scores: Scores, ratio: float | None = None, *,
           group_ratio: float | None = None, scope: str = "block",
           layers: tuple[int, int] | range | None = None, ranking: str = "local",
           aggregation: str = "sum", round_to: int = 1, min_keep_heads: int = 1, uniform: bool = False,
           max_group_ratio: float | None = None) -> Plan:
    """Choose what to remove so that about ``ratio`` of all parameters go (see the module notes).

    ``uniform=True`` (block scope) removes the same number of head groups and of MLP channels in
    every layer, all layers included, so the pruned model has one width per kind and a plain
    Hugging Face config describes it.  ``max_group_ratio`` caps the share of any group's elements
    that may go (a minimum width per layer: with global ranking over every layer, a layer is never
    emptied whatever its scores say).
    """
    if uniform and (scope != "block" or ranking != "local"):
        raise FastpruneError("uniform pruning works with scope='block' and ranking='local'")
    _check_args(graph, scores, ratio, group_ratio, scope, ranking, round_to, min_keep_heads)
    if max_group_ratio is not None and not 0 < max_group_ratio <= 1:
        raise FastpruneError(f"max_group_ratio must be in (0, 1], got {max_group_ratio!r}")
    settings = {"criterion": scores.criterion, "aggregation": aggregation, "scope": scope,
                "ranking": ranking, "ratio": ratio, "group_ratio": group_ratio, "round_to": round_to,
                "min_keep_heads": min_keep_heads, "uniform": uniform}
    if max_group_ratio is not None:
        settings["max_group_ratio"] = max_group_ratio
    plan = Plan(fingerprint=graph.fingerprint, group_sizes={g.name: g.size for g in graph.groups},
                settings=settings)
    total = graph.total_params
    if scope == "layer":
        span = _layer_range(graph, layers, default=(0, graph.num_layers))
        settings["layers"] = list(span)
        if ratio:
            plan.remove_layers = _select_layers(graph, scores, ratio, span)
    else:
        groups, span = scope_groups(graph, scope, layers, uniform)
        settings["layers"] = list(span) if span else None  # the hidden dimension spans every layer
        if not groups:
            raise FastpruneError(f"nothing to prune in scope {scope!r}"
                                 + (f" within layers {settings['layers']}" if scope == "block" else ""))
        if ratio or group_ratio:
            agg = aggregate(scores, graph, aggregation)
            missing = [g.name for g in groups if g.name not in agg]
            if missing:
                raise FastpruneError(f"the scores have no entry for group {missing[0]!r}")
            align = EXPERT_ALIGN if any(g.experts for g in graph.groups) else 1
            cands = [_Candidate(g, agg[g.name], graph, math.lcm(round_to, align) if g.experts or g.kind == "hidden"
                                else round_to, min_keep_heads, max_group_ratio) for g in groups]
            if group_ratio is not None:
                counts = [c.nearest(group_ratio * c.group.size) for c in cands]
            else:
                counts = _solve(cands, ratio * total, ranking, uniform)
            plan.keep = _kept_indices(cands, counts)
    achieved = 1 - predicted_params(graph, plan) / total
    settings["achieved"] = achieved
    if ratio is not None and ratio > 0 and scope != "layer" and abs(achieved - ratio) > TOLERANCE:
        best = 1 - predicted_params(graph, _max_plan(plan, cands)) / total
        raise FastpruneError(f"cannot remove {ratio:.4f} of the parameters in scope {scope!r}"
                             + (f" (layers {settings['layers']})" if scope == "block" else "")
                             + f": the closest plan removes {achieved:.4f}; at most {best:.4f} can go "
                             f"with round_to={round_to}, min_keep_heads={min_keep_heads}")
    return plan


def scope_groups(graph: PruningGraph, scope: str, layers=None,
                 uniform: bool = False) -> tuple[list[Group], tuple[int, int] | None]:
    """The groups ``scope`` may prune (block: heads and MLP channels in the layer range; channel: the
    hidden group) and the layer range used (None for the channel scope)."""
    if scope == "block":
        default = (0, graph.num_layers) if uniform else default_layers(graph.num_layers)
        span = _layer_range(graph, layers, default=default)
        return [g for g in graph.groups if g.kind in LAYER_KINDS
                and (g.layer is None or span[0] <= g.layer < span[1])], span
    return graph.groups_of("hidden"), None


def prunable_params(graph: PruningGraph, scope: str, layers=None, uniform: bool = False) -> int:
    """Parameters that ``scope`` can remove: the weights its groups own (block, channel) or its layers hold."""
    if scope == "layer":
        span = _layer_range(graph, layers, default=(0, graph.num_layers))
        return sum(math.prod(shape) for name, shape in graph.param_shapes.items()
                   if graph.layer_of(name) is not None and span[0] <= graph.layer_of(name) < span[1])
    groups, _ = scope_groups(graph, scope, layers, uniform)
    return sum(g.size * g.params_per_element(graph.param_shapes) for g in groups)


# ---------------------------------------------------------------- helpers

def _check_args(graph, scores, ratio, group_ratio, scope, ranking, round_to, min_keep_heads) -> None:
    if scope not in SCOPES:
        raise FastpruneError(f"unknown scope {scope!r}; choose one of {SCOPES}")
    if ranking not in RANKINGS:
        raise FastpruneError(f"unknown ranking {ranking!r}; choose one of {RANKINGS}")
    if (ratio is None) == (group_ratio is None):
        raise FastpruneError("give exactly one of ratio (fraction of all parameters) and group_ratio")
    for name, value in (("ratio", ratio), ("group_ratio", group_ratio)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not 0 <= value < 1):
            raise FastpruneError(f"{name} must be a fraction in [0, 1), got {value!r}")
    if group_ratio is not None and scope == "layer":
        raise FastpruneError("group_ratio applies to block and channel scopes; use ratio for layers")
    if type(round_to) is not int or round_to < 1:
        raise FastpruneError(f"round_to must be a positive integer, got {round_to!r}")
    if type(min_keep_heads) is not int or min_keep_heads < 1:
        raise FastpruneError(f"min_keep_heads must be a positive integer, got {min_keep_heads!r}")
    if scores.fingerprint != graph.fingerprint:
        raise FastpruneError(f"these scores were computed for another model (fingerprint {scores.fingerprint},"
                             f" graph {graph.fingerprint})")


def _layer_range(graph: PruningGraph, layers, default: tuple[int, int]) -> tuple[int, int]:
    if layers is None:
        return default
    if isinstance(layers, range):
        if layers.step != 1:
            raise FastpruneError(f"layers must be a contiguous range, got {layers}")
        layers = (layers.start, layers.stop)
    start, end = (int(x) for x in layers)
    if not 0 <= start < end <= graph.num_layers:
        raise FastpruneError(f"layers ({start}, {end}) is not a non-empty range within "
                             f"[0, {graph.num_layers}]")
    return start, end


class _Candidate:
    """One group's scores, allowed removal counts and per-element parameter cost.

    ``prefix_t`` holds the float64 prefix sums of the sorted scores per parameter (``torch.cumsum``
    on the host adds them one after the other, as a Python loop would, so near-ties resolve the same
    way); :func:`_fill` turns every candidate's into a Python list (``prefix``) in one conversion.
    """

    def __init__(self, group: Group, agg: torch.Tensor, graph: PruningGraph, round_to: int,
                 min_keep_heads: int, max_group_ratio: float | None = None):
        self.group = group
        self.cost = group.params_per_element(graph.param_shapes)
        self.order = torch.sort(agg, stable=True).indices  # lowest score first, ties by index
        self.prefix_t = torch.cat([agg.new_zeros(1), torch.cumsum(agg[self.order] / max(self.cost, 1), 0)])
        self.prefix: list[float] = []
        size = group.size
        if group.kind == "heads":
            self.allowed = list(range(0, max(size - min_keep_heads, 0) + 1))
        else:
            kept = list(range(round_to, size + 1, round_to)) or list(range(1, size + 1))
            self.allowed = sorted({0} | {size - k for k in kept})
        if max_group_ratio is not None:
            limit = math.floor(max_group_ratio * size + 1e-9)
            self.allowed = [n for n in self.allowed if n <= limit] or [0]
        self.allowed_t = torch.tensor(self.allowed, dtype=torch.long)

    def nearest(self, x: float) -> int:
        """The allowed removal count nearest ``x`` (the lower one on a tie)."""
        i = bisect.bisect_left(self.allowed, x)
        if i == 0:
            return self.allowed[0]
        if i == len(self.allowed):
            return self.allowed[-1]
        below, above = self.allowed[i - 1], self.allowed[i]
        return below if x - below <= above - x else above

    def next(self, n: int) -> int | None:
        i = bisect.bisect_right(self.allowed, n)
        return self.allowed[i] if i < len(self.allowed) else None

    def step_key(self, n: int, m: int) -> float:
        """Mean score per parameter of the elements a step from n to m removes."""
        return (self.prefix[m] - self.prefix[n]) / (m - n)

    def steps(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Every later step from ``n``: its end counts m and keys, as tensors (keys as :meth:`step_key`)."""
        a = self.allowed_t[bisect.bisect_left(self.allowed, n):]
        start, end = a[:-1], a[1:]
        return end, (self.prefix_t[end] - self.prefix_t[start]) / (end - start)


def _kept_indices(cands: list[_Candidate], counts: list[int]) -> dict[str, list[int]]:
    """Sorted kept elements of every candidate that removes some, brought to Python in one conversion."""
    parts = [(c.group.name, c.order[n:].sort().values) for c, n in zip(cands, counts) if n]
    if not parts:
        return {}
    flat = torch.cat([t for _, t in parts]).tolist()
    out, at = {}, 0
    for name, t in parts:
        out[name], at = flat[at:at + t.numel()], at + t.numel()
    return out


def _solve(cands: list[_Candidate], target: float, ranking: str, uniform: bool = False) -> list[int]:
    """Removal counts per candidate: local (shared ratio, MLP remainder, greedy rest) or global."""
    if ranking == "global":
        return _fill(cands, [0] * len(cands), target)

    def largest(counts_at) -> list[int]:
        lo, hi = 0.0, 1.0
        for _ in range(50):
            mid = (lo + hi) / 2
            if sum(n * c.cost for n, c in zip(counts_at(mid), cands)) <= target:
                lo = mid
            else:
                hi = mid
        return counts_at(lo)

    shared = largest(lambda p: [c.nearest(p * c.group.size) for c in cands])
    # heads are coarse: keep the whole heads the shared ratio gave and spread the rest over channels
    rest = largest(lambda p: [n if c.group.kind == "heads" else max(n, c.nearest(p * c.group.size))
                              for n, c in zip(shared, cands)])
    if uniform:  # the shared fractions give equal counts to equal-size groups; no per-group rest
        return rest
    return _fill(cands, rest, target)


def _fill(cands: list[_Candidate], counts: list[int], target: float) -> list[int]:
    """Take the lowest-keyed steps that fit the budget, then one overshooting step if closer.

    The greedy takes, among every candidate's next step, the one of lowest (key, candidate, m), and a
    candidate stops at its first step that does not fit.  Until that first misfit it takes the steps
    in the order of (running maximum of the candidate's keys, candidate, m): a step whose key is below
    an earlier one of its candidate (float rounding of the prefix sums) comes right after that one.
    So that part is one sort and one cumulative sum of the budget over every step of every
    candidate; from the misfit on, each candidate's next step goes one at a time (each either fits
    what is left, less than the misfit's cost, or stops its candidate).
    """
    counts = list(counts)
    if not cands:
        return counts
    prefixes = torch.cat([c.prefix_t for c in cands]).tolist()
    at = 0
    for c in cands:
        c.prefix, at = prefixes[at:at + c.prefix_t.numel()], at + c.prefix_t.numel()
    removed = sum(n * c.cost for n, c in zip(counts, cands))
    ends, keys, owner, costs = [], [], [], []
    for i, c in enumerate(cands):
        end, key = c.steps(counts[i])
        ends.append(end)
        keys.append(torch.cummax(key, 0).values if key.numel() else key)
        owner.append(torch.full_like(end, i))
        costs.append((end - torch.cat([end.new_tensor([counts[i]]), end[:-1]])) * c.cost)
    end, owner, cost = torch.cat(ends), torch.cat(owner), torch.cat(costs)
    order = torch.sort(torch.cat(keys), stable=True).indices  # steps are listed by (candidate, m): ties keep it
    total = removed + torch.cumsum(cost[order], 0)
    fits = int(torch.searchsorted(total.double(), torch.tensor([float(target)], dtype=torch.float64), right=True))
    taken = order[:fits]
    new = torch.tensor(counts, dtype=torch.long).scatter_reduce(0, owner[taken], end[taken], "amax")
    counts = new.tolist()
    if fits == len(order):
        return counts
    removed = sum(n * c.cost for n, c in zip(counts, cands))
    heap = []
    for i, c in enumerate(cands):
        m = c.next(counts[i])
        if m is not None:
            heap.append((c.step_key(counts[i], m), i, m))
    heapq.heapify(heap)
    over = []
    while heap:
        key, i, m = heapq.heappop(heap)
        cost = (m - counts[i]) * cands[i].cost
        if removed + cost > target:
            over.append((key, i, m, cost))  # this group stops here: its steps must stay in order
            continue
        counts[i], removed = m, removed + cost
        nxt = cands[i].next(m)
        if nxt is not None:
            heapq.heappush(heap, (cands[i].step_key(m, nxt), i, nxt))
    closer = [s for s in over if removed + s[3] - target < target - removed]
    if closer:
        _, i, m, _ = min(closer)
        counts[i] = m
    return counts


def _max_plan(plan: Plan, cands: list[_Candidate]) -> Plan:
    keep = _kept_indices(cands, [c.allowed[-1] for c in cands])
    return Plan(fingerprint=plan.fingerprint, keep=keep, group_sizes=plan.group_sizes)


def _select_layers(graph: PruningGraph, scores: Scores, ratio: float, span: tuple[int, int]) -> list[int]:
    """Lowest-scored layers whose parameters come closest to ``ratio`` (never every layer)."""
    if graph.num_layers < 2:
        raise FastpruneError("layer-wise pruning needs a model with at least two layers")
    if scores.layer_scores.shape != (graph.num_layers,):
        raise FastpruneError(f"layer scores have shape {tuple(scores.layer_scores.shape)}, the model has "
                             f"{graph.num_layers} layers")
    sizes = [0] * graph.num_layers
    for name, shape in graph.param_shapes.items():
        layer = graph.layer_of(name)
        if layer is not None and layer < graph.num_layers:
            sizes[layer] += math.prod(shape)
    values = scores.layer_scores.tolist()
    cands = sorted(range(span[0], span[1]), key=lambda i: (values[i], i))
    cands = cands[:graph.num_layers - 1]
    target = ratio * graph.total_params
    best_k, best_gap, removed = 0, target, 0
    for k, i in enumerate(cands, start=1):
        removed += sizes[i]
        if abs(removed - target) < best_gap:
            best_k, best_gap = k, abs(removed - target)
    if best_gap > max(sizes[i] for i in cands):
        raise FastpruneError(f"cannot remove {ratio:.4f} of the parameters layer-wise: removing "
                             f"{len(cands)} layers of range {span} leaves {best_gap / graph.total_params:.4f}"
                             " short")
    return sorted(cands[:best_k])
