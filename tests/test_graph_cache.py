"""Discovery is traced once per model structure: reused for same-structure models, derived after ``apply``.

The derived graph must be the graph a fresh trace finds on the pruned model, for every family.
"""

import copy
import dataclasses
import importlib

import pytest
import test_families
import test_moe
import torch
from models import UnseenLM, tiny_llama

import fastprune
from fastprune import graph_cache
from fastprune.apply import apply
from fastprune.discover import discover
from fastprune.plan import Plan

discover_module = importlib.import_module("fastprune.discover")  # the package's ``discover`` is the function

MODELS = {**{name: (lambda n=name: test_families._make(n)) for name in
             [*test_families.FAMILIES, "baichuan_wpack", "baichuan13_alibi"]},
          **{f"moe-{name}": (lambda n=name: test_moe._make(n)) for name in ("mixtral", "qwen2_moe", "qwen3_moe")},
          "llama": lambda: tiny_llama(layers=4), "unseen": lambda: UnseenLM(depth=3)}


@pytest.fixture
def traces(monkeypatch):
    calls = []
    real = discover_module.trace_model

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(discover_module, "trace_model", counted)
    graph_cache.clear()
    yield calls
    graph_cache.clear()


def _plan(graph, every_other: bool, remove_layers):
    keep = {}
    moe = any(g.experts for g in graph.groups)
    for g in graph.groups:
        if every_other and g.size > 3:
            keep[g.name] = list(range(0, g.size, 2))
        elif g.size > 2:  # one element fewer (8 in grouped_mm's aligned dims of MoE models)
            keep[g.name] = list(range(8 if moe and (g.experts or g.kind == "hidden") else 1, g.size))
    return Plan(graph.fingerprint, keep, remove_layers, {g.name: g.size for g in graph.groups})


@pytest.mark.parametrize("every_other,remove_layers", [(True, [1]), (False, []), (False, [0, 2])],
                         ids=["half-and-a-layer", "one-each", "two-layers"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_derived_graph_is_the_traced_graph(traces, name, every_other, remove_layers):
    model = MODELS[name]()
    graph = discover(model)
    apply(model, _plan(graph, every_other, remove_layers), graph)
    derived = discover(model)
    assert len(traces) == 1, "the pruned model's graph was traced instead of derived"
    fresh = discover(model, cache=False)
    assert derived == fresh
    if name in ("llama", "qwen2") and every_other:  # and once more: a second step from the derived graph
        apply(model, _plan(derived, True, []), derived)
        assert discover(model) == discover(model, cache=False)


def test_one_kv_head_left_is_traced_again(traces):
    """With one kv head left its query heads become the elements (multi-query): only a trace finds that."""
    model = tiny_llama(layers=2, heads=6, kv_heads=2)
    graph = discover(model)
    keep = {g.name: [1] for g in graph.groups_of("heads")}
    apply(model, Plan(graph.fingerprint, keep, [], {g.name: g.size for g in graph.groups}), graph)
    pruned = discover(model)
    assert len(traces) == 2 and pruned == discover(model, cache=False)
    assert [(g.size, g.kv_heads_per_element) for g in pruned.groups_of("heads")] == [(3, 0), (3, 0)]


def test_same_structure_reuses_the_graph(traces):
    model = tiny_llama(layers=3)
    graph = discover(model)
    twin = copy.deepcopy(model)
    assert discover(twin) == graph and len(traces) == 1
    other = tiny_llama(layers=3, seed=5)  # other weights, same structure
    assert discover(other) == graph and len(traces) == 1
    assert discover(tiny_llama(layers=3, kv_heads=3)) != graph and len(traces) == 2  # other structure
    assert discover(model, input_ids=torch.randint(0, 96, (1, 5))) == graph and len(traces) == 3  # explicit input


def test_iterative_pruning_traces_once(traces):
    model = tiny_llama(layers=4, hidden=72, intermediate=160, heads=6, kv_heads=3)
    calib = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(0))
    report = fastprune.prune(model, 0.3, calib=calib, layers=(0, 4), steps=3, method="llm-pruner", progress=False)
    assert len(report.settings["plans"]) == 3 and len(traces) == 1


def test_a_graph_edited_by_hand_is_not_followed(traces):
    model = tiny_llama(layers=3)
    graph = discover(model)
    partial = dataclasses.replace(graph, groups=[g for g in graph.groups if g.kind != "channels"])
    apply(model, _plan(partial, True, []), partial)
    assert {g.kind for g in discover(model).groups} == {"heads", "channels", "hidden"}
    assert len(traces) == 2  # traced again, not derived from the partial graph


def test_returned_graphs_are_copies(traces):
    model = tiny_llama(layers=2)
    first = discover(model)
    first.groups[0].slices.clear()
    first.groups.pop()
    assert discover(model) == discover(model, cache=False)


def test_the_cache_is_bounded(traces):
    for layers in range(1, graph_cache.MAX_ENTRIES + 3):
        discover(tiny_llama(layers=layers))
    assert len(graph_cache._graphs) == graph_cache.MAX_ENTRIES


def test_the_pruned_graph_is_derived_at_its_first_lookup_only(traces, monkeypatch):
    """``apply`` records how to derive the pruned model's graph; a prune that never discovers it again
    pays nothing, and a plan the caller changes afterwards does not change what is derived."""
    derived = []
    real = graph_cache.derive
    monkeypatch.setattr(graph_cache, "derive", lambda *a, **k: derived.append(1) or real(*a, **k))
    model = tiny_llama(layers=3)
    graph = discover(model)
    plan = _plan(graph, True, [1])
    apply(model, plan, graph)
    assert derived == []
    plan.keep.clear()
    plan.remove_layers.clear()
    first = discover(model)
    assert derived == [1] and len(traces) == 1
    assert discover(model) == first and derived == [1]  # derived once, then stored
    assert first == discover(model, cache=False)
