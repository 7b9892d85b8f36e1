"""A layer with a single query head: its head_dim is no channel space, whatever the attention implementation.

With two or more heads the head view splits q/k/v rows into heads x head_dim and head_dim sits inside
every head.  With one head no view splits it off, so the attention rules themselves fix head_dim.
"""

import pytest
import torch
import transformers as T
from equivalence import masked_reference
from models import tiny_llama

import fastprune
from fastprune.apply import apply, layer_widths
from fastprune.discover import discover
from fastprune.plan import Plan

# (projection, dim) pairs that run over head_dim when a layer has one head (and one kv head)
_HEAD_DIM = {("q_proj", 0), ("k_proj", 0), ("v_proj", 0), ("o_proj", 1)}


def _calib(vocab=96, n=4, s=16, seed=0):
    return torch.randint(0, vocab, (n, s), generator=torch.Generator().manual_seed(seed))


def _plan(graph, keep):
    return Plan(graph.fingerprint, keep, [], {g.name: g.size for g in graph.groups})


def _head_dim_slices(graph, layer):
    """Slices of non-hidden groups that cut through the attention projections of ``layer``."""
    prefix = f"model.layers.{layer}.self_attn."
    return [(g.name, s.param, s.dim) for g in graph.groups if g.kind != "hidden" for s in g.slices
            if s.param.startswith(prefix) and (s.param.split(".")[-2], s.dim) in _HEAD_DIM]


def _generate_consistently(model, ids):
    with torch.no_grad():
        cached = model.generate(ids[:1, :4], max_new_tokens=5, do_sample=False, use_cache=True)
        uncached = model.generate(ids[:1, :4], max_new_tokens=5, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_one_head_config_offers_no_head_dim_channels(attn):
    model = tiny_llama(heads=1, kv_heads=1, layers=2, hidden=32, head_dim=32, intermediate=40, attn=attn)
    graph = discover(model)
    assert not graph.warnings
    assert not graph.groups_of("heads")  # one head: nothing to choose
    for i in range(2):
        assert not _head_dim_slices(graph, i), _head_dim_slices(graph, i)
        channels = [g for g in graph.groups_of("channels") if g.layer == i]
        assert [g.name for g in channels] == [f"model.layers.{i}.mlp"]
        assert channels[0].size == 40
    assert layer_widths(model, graph) == {i: {"heads": 1, "kv_heads": 1, "intermediate": 40} for i in range(2)}

    report = fastprune.prune(model, 0.2, calib=_calib(), layers=(0, 2), method="llm-pruner", progress=False)
    assert report.params_after < report.params_before
    for i, layer in enumerate(model.model.layers):
        attn_mod = layer.self_attn
        assert attn_mod.q_proj.weight.shape == attn_mod.k_proj.weight.shape == (32, 32)
        assert attn_mod.v_proj.weight.shape == (32, 32) and attn_mod.o_proj.weight.shape == (32, 32)
        assert report.widths_after[i]["heads"] == report.widths_after[i]["kv_heads"] == 1
        assert report.widths_after[i]["intermediate"] == layer.mlp.gate_proj.weight.shape[0] < 40
    ids = _calib(seed=5)
    with torch.no_grad():
        assert torch.isfinite(model(ids, labels=ids).loss)
    _generate_consistently(model, ids)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_layer_pruned_down_to_one_head_keeps_its_head_dim(attn):
    model = tiny_llama(heads=4, kv_heads=2, layers=2, attn=attn)  # hidden 48, head_dim 8, intermediate 80
    ids = _calib(seed=1)[:2, :9]
    graph = discover(model)
    first = _plan(graph, {"model.layers.0.self_attn": [1]})  # layer 0: one kv head with its 2 query heads
    reference = masked_reference(model, first, graph)
    apply(model, first, graph)
    graph = discover(model)
    group = graph.group("model.layers.0.self_attn")
    assert (group.size, group.heads_per_element, group.kv_heads_per_element) == (2, 1, 0)
    assert {name for name, *_ in _head_dim_slices(graph, 0)} == {group.name}  # query heads, never head_dim

    second = _plan(graph, {"model.layers.0.self_attn": [0]})  # then one query head with that kv head
    with torch.no_grad():  # in the reference, also drop query head 3 of the original (the second kept)
        attn0 = reference.model.layers[0].self_attn
        attn0.q_proj.weight[24:32] = 0
        attn0.o_proj.weight[:, 24:32] = 0
    apply(model, second, graph)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-5)

    graph = discover(model)
    assert not graph.warnings
    assert not _head_dim_slices(graph, 0), _head_dim_slices(graph, 0)
    assert [g.layer for g in graph.groups_of("heads")] == [1]
    channels = {g.layer: g for g in graph.groups_of("channels")}
    assert sorted(channels) == [0, 1] and channels[0].name == "model.layers.0.mlp" and channels[0].size == 80
    assert layer_widths(model, graph) == {0: {"heads": 1, "kv_heads": 1, "intermediate": 80},
                                          1: {"heads": 4, "kv_heads": 2, "intermediate": 80}}

    report = fastprune.prune(model, 0.2, calib=_calib(vocab=96), layers=(0, 2), method="llm-pruner", progress=False)
    attn0 = model.model.layers[0].self_attn
    assert attn0.v_proj.weight.shape[0] == attn0.k_proj.weight.shape[0] == attn0.q_proj.weight.shape[0] == 8
    assert attn0.o_proj.weight.shape[1] == 8
    assert report.widths_after[0]["heads"] == report.widths_after[0]["kv_heads"] == 1
    assert report.widths_after[0]["intermediate"] == model.model.layers[0].mlp.up_proj.weight.shape[0]
    _generate_consistently(model, ids)


def _single_head(name):
    torch.manual_seed(0)
    if name == "gpt2":  # no rotary: only the attention rules keep q/k head_dim whole
        return T.GPT2LMHeadModel(T.GPT2Config(vocab_size=96, n_embd=32, n_inner=40, n_layer=2, n_head=1,
                                              bos_token_id=0, eos_token_id=0))
    if name == "gpt_neox":  # partial rotary: the pass-through half of head_dim is a piece of its own
        return T.GPTNeoXForCausalLM(T.GPTNeoXConfig(vocab_size=96, hidden_size=32, intermediate_size=40,
                                                    num_hidden_layers=2, num_attention_heads=1, rotary_pct=0.5))
    return T.OPTForCausalLM(T.OPTConfig(vocab_size=96, hidden_size=32, ffn_dim=40, num_hidden_layers=2,
                                        num_attention_heads=1, word_embed_proj_dim=32))


@pytest.mark.parametrize("name", ["gpt2", "gpt_neox", "opt"])
def test_one_head_families_offer_only_mlp_channels(name):
    model = _single_head(name).eval()
    graph = discover(model)
    assert not graph.warnings
    assert {g.kind for g in graph.groups} == {"channels", "hidden"}, graph
    channels = graph.groups_of("channels")
    assert [g.layer for g in channels] == [0, 1] and all(g.size == 40 for g in channels), graph
