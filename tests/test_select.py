import math

import pytest
import torch
from helpers_graph import llama_graph, random_scores
from models import tiny_llama

from fastprune.apply import apply, validate
from fastprune.discover import discover
from fastprune.errors import FastpruneError
from fastprune.importance import aggregate, score
from fastprune.plan import Plan
from fastprune.select import TOLERANCE, default_layers, predicted_params, select


@pytest.fixture(scope="module")
def graph():
    # 8 layers: the default block range is 1..7
    return llama_graph(layers=8, hidden=256, inter=688, heads=8, kv=4, head_dim=32, vocab=512)


@pytest.fixture(scope="module")
def scores(graph):
    return random_scores(graph, seed=0)


def _removed(plan, graph, kind=None):
    return {g.name: g.size - len(plan.keep[g.name]) for g in graph.groups
            if g.name in plan.keep and (kind is None or g.kind == kind)}


def _achieved(graph, plan):
    return 1 - predicted_params(graph, plan) / graph.total_params


def test_default_layer_range_scales_llm_pruner():
    assert default_layers(32) == (4, 30)
    assert default_layers(30) == (4, 28)
    assert default_layers(8) == (1, 8)
    assert default_layers(2) == (0, 2)


@pytest.mark.parametrize("ranking", ["local", "global"])
@pytest.mark.parametrize("ratio", [0.05, 0.1, 0.2, 0.3, 0.45])
def test_block_ratio_is_met_within_one_percent(graph, scores, ratio, ranking):
    plan = select(graph, scores, ratio, ranking=ranking)
    achieved = _achieved(graph, plan)
    assert plan.settings["achieved"] == pytest.approx(achieved)
    assert abs(achieved - ratio) <= 0.01 * ratio  # within 1 % of the target, not just 1 point
    assert plan.settings["layers"] == [1, 8]
    for name in plan.keep:  # only in-range heads/MLP groups
        g = graph.group(name)
        assert g.kind in ("heads", "channels") and 1 <= g.layer < 8


@pytest.mark.parametrize("ratio", [0.05, 0.1, 0.2, 0.35])
def test_channel_ratio_is_met(graph, scores, ratio):
    plan = select(graph, scores, ratio, scope="channel")
    assert list(plan.keep) == ["hidden"] and plan.settings["layers"] is None
    step = graph.group("hidden").params_per_element(graph.param_shapes) / graph.total_params
    assert abs(_achieved(graph, plan) - ratio) <= min(0.01, step / 2 + 1e-12)


def test_local_ranking_uses_one_ratio_and_mlp_takes_the_head_remainder(graph, scores):
    plan = select(graph, scores, 0.2)
    heads = _removed(plan, graph, "heads")
    mlp = _removed(plan, graph, "channels")
    assert set(heads.values()) == {1} and len(heads) == 7  # every in-range layer loses 1 of 4 kv heads
    assert max(mlp.values()) - min(mlp.values()) < len(mlp)  # evenly, up to the greedy remainder
    head_cost = graph.groups_of("heads")[0].params_per_element(graph.param_shapes)  # 49152
    channel_cost = graph.groups_of("channels")[0].params_per_element(graph.param_shapes)  # 768
    # the MLP channels take the rest of the budget; the greedy fill ends less than one channel from the target
    rest = 0.2 * graph.total_params - 7 * head_cost
    assert abs(sum(mlp.values()) * channel_cost - rest) < channel_cost


def test_global_ranking_follows_scores_across_layers(graph):
    s = random_scores(graph, seed=1)
    s.groups["model.layers.3.mlp"] = s.groups["model.layers.3.mlp"] * 1e-3  # a cheap layer
    local = _removed(select(graph, s, 0.1, ranking="local"), graph, "channels")
    glob = _removed(select(graph, s, 0.1, ranking="global"), graph, "channels")
    assert max(local.values()) - min(local.values()) < len(local)
    assert glob["model.layers.3.mlp"] == 688 - 1  # it goes first, down to the last channel
    assert glob["model.layers.3.mlp"] > local["model.layers.3.mlp"]


def test_global_ranking_normalises_by_parameters_freed():
    g = llama_graph(layers=2, hidden=64, inter=64, heads=4, kv=4, head_dim=16, vocab=32)
    s = random_scores(g, seed=2)
    for grp in g.groups:  # every weight equally important: a head holds 4x the weights of a channel
        cost = grp.params_per_element(g.param_shapes)
        s.groups[grp.name] = torch.full_like(s.groups[grp.name], cost / len(grp.slices))
    s.groups["model.layers.1.self_attn"][:, 2] *= 0.5  # ...except this head, half as important per weight
    plan = select(g, s, 0.07, ranking="global", layers=(0, 2))  # room for one head (6.9 %)
    assert plan.keep["model.layers.1.self_attn"] == [0, 1, 3]


def test_kept_indices_are_the_highest_scoring(graph, scores):
    agg = aggregate(scores, graph, "max")
    for ranking in ("local", "global"):
        plan = select(graph, scores, 0.25, ranking=ranking, aggregation="max")
        for name, kept in plan.keep.items():
            mask = torch.zeros(graph.group(name).size, dtype=torch.bool)
            mask[kept] = True
            assert kept == sorted(kept)
            assert agg[name][mask].min() >= agg[name][~mask].max()


def test_first_aggregation_uses_root_slices(graph):
    s = random_scores(graph, seed=3)
    name = "model.layers.2.mlp"
    s.groups[name][2] = torch.linspace(100, 0, 688)  # down_proj (not a root) would keep the low indices
    plan = select(graph, s, group_ratio=0.5, aggregation="first")
    agg = s.groups[name][:2].sum(0)
    assert plan.keep[name] == sorted(torch.topk(agg, 344).indices.tolist())


def test_round_to_and_min_keep(graph, scores):
    plan = select(graph, scores, 0.3, round_to=16)
    for name, kept in plan.keep.items():
        if graph.group(name).kind == "channels":
            assert len(kept) % 16 == 0
    assert abs(plan.settings["achieved"] - 0.3) <= 0.01
    plan = select(graph, scores, 0.25, scope="channel", round_to=8)
    assert len(plan.keep["hidden"]) % 8 == 0
    with pytest.raises(FastpruneError, match="closest plan removes 0.1875"):  # 8 dims are 3.1 %
        select(graph, scores, 0.2, scope="channel", round_to=8)
    for k, unit in ((1, 1), (2, 16)):  # never the last head(s) or channel(s) of a layer
        plan = select(graph, scores, group_ratio=0.999, min_keep_heads=k, round_to=unit)
        for name, kept in plan.keep.items():
            assert len(kept) == (k if graph.group(name).kind == "heads" else unit)


def test_group_ratio_removes_the_same_fraction_everywhere(graph, scores):
    plan = select(graph, scores, group_ratio=0.25, layers=(2, 6))
    removed = _removed(plan, graph)
    assert set(removed) == {f"model.layers.{i}.{m}" for i in range(2, 6) for m in ("self_attn", "mlp")}
    assert all(n == (1 if "attn" in name else 172) for name, n in removed.items())
    assert plan.settings["group_ratio"] == 0.25 and plan.settings["ratio"] is None


def test_layer_scope_removes_lowest_layers_within_one_layer(graph):
    s = random_scores(graph, seed=4)
    per_layer = sum(math.prod(shape) for n, shape in graph.param_shapes.items() if n.startswith("model.layers.0."))
    order = torch.argsort(s.layer_scores).tolist()
    for ratio in (0.1, 0.3, 0.5, 0.8):
        plan = select(graph, s, ratio, scope="layer")
        assert plan.keep == {}
        k = len(plan.remove_layers)
        assert plan.remove_layers == sorted(order[:k])
        removed = graph.total_params - predicted_params(graph, plan)
        assert abs(removed - ratio * graph.total_params) <= per_layer / 2  # the closest layer count
        assert k < graph.num_layers
    with pytest.raises(FastpruneError, match="layer-wise"):
        select(graph, s, 0.99, scope="layer")


def test_ratio_zero_is_the_identity(graph, scores):
    for scope in ("block", "channel", "layer"):
        plan = select(graph, scores, 0, scope=scope)
        assert plan.keep == {} and plan.remove_layers == []
        assert plan.settings["achieved"] == 0
        assert plan.group_sizes == {g.name: g.size for g in graph.groups}


def test_errors(graph, scores):
    for bad in (-0.1, 1.0, 1.5, "0.2", True):
        with pytest.raises(FastpruneError, match="ratio"):
            select(graph, scores, bad)
    with pytest.raises(FastpruneError, match="exactly one"):
        select(graph, scores, 0.2, group_ratio=0.2)
    with pytest.raises(FastpruneError, match="exactly one"):
        select(graph, scores)
    with pytest.raises(FastpruneError, match="scope"):
        select(graph, scores, 0.2, scope="width")
    with pytest.raises(FastpruneError, match="ranking"):
        select(graph, scores, 0.2, ranking="best")
    with pytest.raises(FastpruneError, match="round_to"):
        select(graph, scores, 0.2, round_to=0)
    with pytest.raises(FastpruneError, match="layers"):
        select(graph, scores, 0.2, layers=(5, 12))
    other = random_scores(llama_graph(layers=2))
    with pytest.raises(FastpruneError, match="another model"):
        select(graph, other, 0.2)
    with pytest.raises(FastpruneError, match=r"at most 0\.\d+ can go") as info:
        select(graph, scores, 0.9)
    best = float(str(info.value).split("at most ")[1].split()[0])
    assert 0.5 < best < 0.9


def test_plans_are_deterministic_and_round_trip(graph, scores):
    a = select(graph, scores, 0.2, ranking="global", round_to=8)
    b = select(graph, scores, 0.2, ranking="global", round_to=8)
    assert a.to_json() == b.to_json()
    back = Plan.from_json(a.to_json())
    assert back.keep == a.keep and back.settings == a.settings
    assert a.fingerprint == graph.fingerprint
    for key in ("criterion", "aggregation", "scope", "ranking", "ratio", "achieved", "layers", "round_to"):
        assert key in a.settings


def test_predicted_params_match_apply_and_count_overlaps_once():
    model = tiny_llama(layers=4, tied=False)
    graph = discover(model)
    gen = torch.Generator().manual_seed(0)
    keep = {}
    for g in graph.groups:  # heads AND hidden: q_proj loses rows and columns
        n = max(1, g.size // 2)
        keep[g.name] = sorted(torch.randperm(g.size, generator=gen)[:n].tolist())
    plan = Plan(graph.fingerprint, keep=keep, remove_layers=[2], group_sizes={g.name: g.size for g in graph.groups})
    predicted = predicted_params(graph, plan)
    naive = graph.total_params - sum((g.size - len(keep[g.name])) * g.params_per_element(graph.param_shapes)
                                     for g in graph.groups)
    apply(model, plan, graph)
    assert predicted == sum(p.numel() for p in model.parameters())
    assert predicted != naive


@pytest.mark.parametrize("scope", ["block", "channel", "layer"])
def test_end_to_end_on_a_real_model(scope):
    model = tiny_llama(layers=4)
    graph = discover(model)
    calib = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(0))
    s = score(model, graph, calib, "element1", progress=False)
    plan = select(graph, s, 0.25, scope=scope, layers=(0, 4) if scope == "block" else None)
    validate(plan, graph)
    predicted = predicted_params(graph, plan)
    apply(model, plan, graph)
    assert sum(p.numel() for p in model.parameters()) == predicted
    # block and channel scopes: within select's TOLERANCE; layer scope: the closest count of equal layers
    per_layer = sum(math.prod(s) for n, s in graph.param_shapes.items() if graph.layer_of(n) == 0)
    tolerance = TOLERANCE if scope != "layer" else per_layer / graph.total_params / 2
    assert abs(plan.settings["achieved"] - 0.25) <= tolerance
    with torch.no_grad():
        assert torch.isfinite(model(calib).logits).all()
