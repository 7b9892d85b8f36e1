"""The vectorised ratio solver makes the same choices as the one-step-at-a-time greedy it replaced.

The oracle below is that greedy, written plainly: Python prefix sums of the sorted scores per
parameter, then a heap of each group's next step, lowest mean score per parameter first, a group
stopping at its first step that does not fit, and one overshooting step at the end if it lands closer.
Scores include exact ties and near-ties (values one ulp apart), so the tie-breaking is tested too.
"""

import bisect
import heapq

import pytest
import torch
from helpers_graph import llama_graph, random_scores

from fastprune.importance import aggregate
from fastprune.select import _Candidate, _fill, select


def _oracle_prefix(agg: torch.Tensor, cost: int) -> tuple[torch.Tensor, list[float]]:
    order = torch.sort(agg, stable=True).indices
    prefix = [0.0]
    for d in (agg[order] / max(cost, 1)).tolist():
        prefix.append(prefix[-1] + d)
    return order, prefix


def _oracle_fill(cands, counts, target):
    prefix = [_oracle_prefix(c_agg, c.cost)[1] for c, c_agg in cands]
    allowed = [c.allowed for c, _ in cands]
    cost = [c.cost for c, _ in cands]

    def nxt(i, n):
        j = bisect.bisect_right(allowed[i], n)
        return allowed[i][j] if j < len(allowed[i]) else None

    def key(i, n, m):
        return (prefix[i][m] - prefix[i][n]) / (m - n)

    counts = list(counts)
    removed = sum(n * k for n, k in zip(counts, cost))
    heap = [(key(i, counts[i], m), i, m) for i in range(len(cands)) if (m := nxt(i, counts[i])) is not None]
    heapq.heapify(heap)
    over = []
    while heap:
        k, i, m = heapq.heappop(heap)
        step = (m - counts[i]) * cost[i]
        if removed + step > target:
            over.append((k, i, m, step))
            continue
        counts[i], removed = m, removed + step
        if (m2 := nxt(i, m)) is not None:
            heapq.heappush(heap, (key(i, m, m2), i, m2))
    closer = [s for s in over if removed + s[3] - target < target - removed]
    if closer:
        _, i, m, _ = min(closer)
        counts[i] = m
    return counts


def _scores_with_ties(n: int, gen: torch.Generator) -> torch.Tensor:
    x = torch.rand(n, generator=gen, dtype=torch.float64)
    x[torch.randint(n, (n // 4,), generator=gen)] = x[0].item()  # exact ties
    near = torch.randint(n, (n // 4,), generator=gen)
    x[near] = torch.nextafter(x[1], torch.tensor(2.0, dtype=torch.float64)).item()  # one ulp apart
    return x


@pytest.mark.parametrize("seed", range(12))
def test_fill_matches_the_greedy_oracle(seed):
    gen = torch.Generator().manual_seed(seed)
    graph = llama_graph(layers=6, hidden=64, inter=96, heads=8, kv=4, head_dim=16, vocab=64)
    round_to = [1, 8, 5][seed % 3]
    cands = []
    for g in graph.groups:
        if g.kind not in ("heads", "channels"):
            continue
        agg = _scores_with_ties(g.size, gen)
        cands.append((_Candidate(g, agg, graph, round_to, 1), agg))
    capacity = sum(c.allowed[-1] * c.cost for c, _ in cands)
    start = [0] * len(cands) if seed % 2 else [c.allowed[len(c.allowed) // 4] for c, _ in cands]
    for fraction in (0.05, 0.2, 0.37, 0.5, 0.9, 1.2):
        target = fraction * capacity
        assert _fill([c for c, _ in cands], start, target) == _oracle_fill(cands, start, target), fraction


@pytest.mark.parametrize("ranking", ["local", "global"])
def test_plans_keep_the_oracle_elements(ranking):
    graph = llama_graph(layers=8, hidden=256, inter=688, heads=8, kv=4, head_dim=32, vocab=512)
    scores = random_scores(graph, seed=5)
    plan = select(graph, scores, 0.25, ranking=ranking, round_to=8)
    agg = aggregate(scores, graph, "sum")
    for name, kept in plan.keep.items():
        g = graph.group(name)
        order, _ = _oracle_prefix(agg[name], g.params_per_element(graph.param_shapes))
        assert kept == sorted(order[g.size - len(kept):].tolist())
