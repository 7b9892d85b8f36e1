import copy

import pytest
import torch
from equivalence import masked_reference
from models import UnseenLM, tiny_llama

from fastprune.apply import apply, layer_widths
from fastprune.discover import discover
from fastprune.errors import FastpruneError
from fastprune.plan import Plan


def _plan(graph, keep=None, remove_layers=()):
    return Plan(fingerprint=graph.fingerprint, keep=keep or {}, remove_layers=list(remove_layers),
                group_sizes={g.name: g.size for g in graph.groups})


def _random_keep(graph, kinds, frac=0.6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    keep = {}
    for g in graph.groups:
        if g.kind in kinds:
            n = max(1, int(g.size * frac))
            keep[g.name] = sorted(torch.randperm(g.size, generator=gen)[:n].tolist())
    return keep


def _tokens(vocab, seed=1):
    return torch.randint(0, vocab, (2, 13), generator=torch.Generator().manual_seed(seed))


CASES = {
    "heads_mha": (lambda: tiny_llama(heads=6, kv_heads=6), {"heads"}, ()),
    "heads_gqa": (lambda: tiny_llama(heads=6, kv_heads=2), {"heads"}, ()),
    "heads_mqa_eager": (lambda: tiny_llama(heads=4, kv_heads=1, attn="eager"), {"heads"}, ()),
    "heads_gqa_eager": (lambda: tiny_llama(heads=6, kv_heads=3, attn="eager"), {"heads"}, ()),
    "mlp": (lambda: tiny_llama(), {"channels"}, ()),
    "layers": (lambda: tiny_llama(layers=4), set(), (1, 2)),
    "block_and_layers_untied": (lambda: tiny_llama(tied=False, layers=4), {"heads", "channels"}, (3,)),
    "hidden": (lambda: tiny_llama(), {"hidden"}, ()),
    "everything": (lambda: tiny_llama(tied=False, layers=4), {"heads", "channels", "hidden"}, (0,)),
    "unseen_model": (lambda: UnseenLM(), {"heads", "channels", "hidden"}, (1,)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_masked_original_equals_compacted(case):
    make, kinds, layers = CASES[case]
    model = make()
    graph = discover(model)
    plan = _plan(graph, _random_keep(graph, kinds), layers)
    reference = masked_reference(model, plan, graph)
    vocab = model.tok.num_embeddings if isinstance(model, UnseenLM) else model.config.vocab_size
    x = _tokens(vocab)
    with torch.no_grad():
        expected = reference(x).logits
        apply(model, plan, graph)
        got = model(x).logits
    before, after = graph.total_params, sum(p.numel() for p in model.parameters())
    assert after < before
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_parameter_count_and_config_follow_the_plan():
    model = tiny_llama(heads=6, kv_heads=2, layers=3)
    graph = discover(model)
    keep = {"model.layers.0.self_attn": [1], "model.layers.1.mlp": list(range(0, 80, 2))}
    plan = _plan(graph, keep, remove_layers=[2])
    apply(model, plan, graph)
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.weight.shape == (24, 48) and attn.k_proj.out_features == 8
    assert model.model.layers[1].mlp.down_proj.in_features == 40
    assert model.config.num_hidden_layers == 2 and len(model.model.layers) == 2
    assert model.config.fastprune_layer_widths["0"] == {"kv_heads": 1, "heads": 3, "intermediate": 80}
    expected = graph.total_params - 2 * 24 * 48 - 2 * 8 * 48 - 40 * 48 * 3  # q,o + k,v of one group; mlp
    expected -= sum(p.numel() for n, p in dict(tiny_llama(layers=3).named_parameters()).items()
                    if n.startswith("model.layers.2."))
    assert sum(p.numel() for p in model.parameters()) == expected
    assert layer_widths(model, graph, plan)[1]["intermediate"] == 40


def test_empty_plan_is_the_identity():
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    graph = discover(model)
    apply(model, _plan(graph), graph)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_plan_round_trips_and_reapplies_to_a_fresh_copy(tmp_path):
    model = tiny_llama(tied=False)
    fresh = copy.deepcopy(model)
    graph = discover(model)
    plan = _plan(graph, _random_keep(graph, {"heads", "channels", "hidden"}, seed=3), [1])
    path = tmp_path / "plan.json"
    plan.save(path)
    loaded = Plan.load(path)
    assert loaded == plan
    apply(model, plan)
    apply(fresh, loaded)
    x = _tokens(96)
    with torch.no_grad():
        assert torch.equal(model(x).logits, fresh(x).logits)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


BAD_PLANS = {
    "out of range": ({"model.layers.0.mlp": [0, 80]}, (), "out of range"),
    "negative": ({"model.layers.0.mlp": [-1, 3]}, (), "out of range"),
    "duplicate": ({"model.layers.0.mlp": [1, 1, 2]}, (), "sorted and distinct"),
    "unsorted": ({"model.layers.0.mlp": [3, 2]}, (), "sorted and distinct"),
    "every head": ({"model.layers.1.self_attn": []}, (), "every head group"),
    "unknown group": ({"model.layers.9.mlp": [0]}, (), "does not have"),
    "every layer": ({}, (0, 1, 2), "every layer"),
    "layer range": ({}, (5,), "out of range"),
}


@pytest.mark.parametrize("case", sorted(BAD_PLANS))
def test_bad_plans_are_refused_and_nothing_changes(case):
    keep, layers, message = BAD_PLANS[case]
    model = tiny_llama()
    graph = discover(model)
    # a valid first entry that would be applied first if validation were not done up front
    plan = _plan(graph, {"model.layers.2.mlp": [0, 1, 2], **keep}, layers)
    before = _state(model)
    with pytest.raises(FastpruneError, match=message):
        apply(model, plan, graph)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_plan_for_another_model_is_refused():
    graph = discover(tiny_llama(intermediate=80))
    other = tiny_llama(intermediate=64)
    plan = _plan(graph, {"model.layers.0.mlp": [0, 1]})
    before = _state(other)
    with pytest.raises(FastpruneError, match="different model"):
        apply(other, plan)
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_pruned_model_trains_and_generates(dtype, attn):
    model = tiny_llama(heads=6, kv_heads=2, attn=attn).to(dtype)
    graph = discover(model)
    plan = _plan(graph, _random_keep(graph, {"heads", "channels", "hidden"}), [1])
    apply(model, plan, graph)
    x = _tokens(96)
    out = model(x, labels=x)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is not None and p.grad.shape == p.shape for p in model.parameters())
    model.zero_grad()
    with torch.no_grad():
        gen = model.generate(x[:1, :5], max_new_tokens=6, do_sample=False, use_cache=True)
        nocache = model.generate(x[:1, :5], max_new_tokens=6, do_sample=False, use_cache=False)
    assert gen.shape == (1, 11)
    if dtype == torch.float32:
        assert torch.equal(gen, nocache)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_multi_query_head_count_follows_the_plan_with_a_padding_mask(attn):
    """Multi-query (one kv head): the query heads are the elements and ``num_key_value_groups`` their count.
    Where the traced attention takes SDPA's own GQA path (transformers 5.6 without a mask) no view shows
    that count, so it is bound by name; a padding mask sends the pruned model through ``repeat_kv``."""
    model = tiny_llama(heads=4, kv_heads=1, attn=attn)
    graph = discover(model)
    plan = _plan(graph, {g.name: [0, 2, 3] for g in graph.groups_of("heads")})
    reference = masked_reference(model, plan, graph)
    x = _tokens(model.config.vocab_size)
    mask = torch.ones_like(x)
    mask[0, :4] = 0  # left padding in the first row
    with torch.no_grad():
        expected = reference(x, attention_mask=mask).logits
        apply(model, plan, graph)
        got = model(x, attention_mask=mask).logits
    assert [layer.self_attn.num_key_value_groups for layer in model.model.layers] == [3] * len(model.model.layers)
    torch.testing.assert_close(got[:, 4:], expected[:, 4:], rtol=1e-5, atol=1e-5)
