"""The tracer's rule table: one rule per aten op, grouped by kind; a rule that raises is a loud bug."""

import re

import pytest
import torch
from models import tiny_llama

from fastprune import graph_cache
from fastprune.discover import discover
from fastprune.trace import RULES, STRICT_ENV, TraceRuleError
from fastprune.trace import rules as R


def test_every_op_has_one_rule_in_one_group():
    groups = [R.SHAPE_RULES, R.SLICING_RULES, R.CONTRACTION_RULES, R.ATTENTION_RULES, R.NORM_ELEMENTWISE_RULES,
              R.ROUTING_RULES, R.CONSTANT_RULES]
    assert sum(len(g) for g in groups) == len(RULES)  # no name in two groups
    assert all(callable(rule) for rule in RULES.values())
    assert not R.IGNORED & RULES.keys()
    assert RULES["view"] is R.view and RULES["_unsafe_view"] is R.view
    assert RULES["index_add_"] is not None and RULES["index_add"] is not None
    with pytest.raises(RuntimeError, match="two groups"):
        R._merge({"mm": R.mm}, {"mm": R.bmm})


def _boom(tr, call):
    raise ValueError("rule bug")


def test_a_rule_that_raises_fails_in_strict_mode(monkeypatch):
    monkeypatch.setitem(RULES, "_unsafe_view", _boom)
    monkeypatch.setenv(STRICT_ENV, "1")
    # the first module that views is the rotary embedding or q_proj, as the transformers release has it
    with pytest.raises(TraceRuleError, match=r"rule for aten\._unsafe_view \(in module 'model\.(rotary_emb|layers\.0"
                                             r"\.self_attn\.q_proj)'\) raised ValueError: rule bug"):
        discover(tiny_llama(layers=2))


def test_a_rule_that_raises_is_a_warning_for_users_and_blocks_its_dims(monkeypatch):
    model = tiny_llama(layers=2)
    expected = discover(model)
    monkeypatch.setitem(RULES, "_unsafe_view", _boom)
    monkeypatch.delenv(STRICT_ENV)
    graph_cache.clear()  # the same model again: discovery must trace it, not reuse its graph
    graph = discover(model)
    assert graph.warnings and all("its rule raised ValueError: rule bug; a fastprune bug, please report it" in w
                                  for w in graph.warnings)
    assert re.search(r"aten\._unsafe_view in module 'model\.(rotary_emb|layers\.0\.self_attn\.q_proj)'",
                     graph.warnings[0])
    assert len(graph.groups) < len(expected.groups)  # what the failed rule touched is never pruned


def test_pointwise_tagged_ops_need_no_entry():
    assert "gelu" not in RULES and torch.Tag.pointwise in torch.ops.aten.gelu.default.tags
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.GELU(), torch.nn.Linear(6, 4))
    from fastprune.trace import trace_model

    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.mlp, self.head = torch.nn.Embedding(10, 4), model, torch.nn.Linear(4, 10)

        def forward(self, input_ids, **_):
            return (self.head(self.mlp(self.emb(input_ids))),)

    result = trace_model(Wrap(), torch.arange(6).view(2, 3))
    assert not result.unmapped
    sp = result.spaces
    first, second = result.param_atoms["mlp.0.weight"][0], result.param_atoms["mlp.2.weight"][1]
    assert sp.find(first) == sp.find(second)  # the gelu keeps the 6 channels one space
    # the trace is over: layouts are computed once, and nothing can be related any more
    assert sp.layout(first) is sp.layout(second)
    for relate in (lambda: sp.union(first, second), lambda: sp.new(3), lambda: sp.block(first),
                   lambda: sp.define(first, "cat", [first])):
        with pytest.raises(RuntimeError, match="frozen"):
            relate()


def test_a_graph_that_warned_is_not_reused(monkeypatch):
    model = tiny_llama(layers=2)
    graph_cache.clear()
    with monkeypatch.context() as patch:
        patch.setitem(RULES, "_unsafe_view", _boom)
        patch.delenv(STRICT_ENV, raising=False)
        broken = discover(model)
    assert broken.warnings
    fixed = discover(model)  # the rule works again: traced anew, not the warned graph from the cache
    assert not fixed.warnings and len(fixed.groups) > len(broken.groups)
