"""Per-layer widths report heads and kv heads for every attention layer, also where no group is left."""

import torch
import transformers as T
from models import tiny_llama

import fastprune
from fastprune.apply import apply, layer_widths
from fastprune.discover import discover
from fastprune.io import load_pruned, save_pruned
from fastprune.plan import Plan


def _plan(graph, keep, remove_layers=()):
    return Plan(graph.fingerprint, keep, list(remove_layers), {g.name: g.size for g in graph.groups})


def test_a_layer_left_with_one_kv_head_keeps_reporting_it(tmp_path):
    model = tiny_llama(heads=6, kv_heads=2, layers=3)
    graph = discover(model)
    apply(model, _plan(graph, {"model.layers.0.self_attn": [1]}), graph)
    graph = discover(model)  # layer 0 has one kv head: its query heads are the elements now
    group = graph.group("model.layers.0.self_attn")
    assert (group.size, group.kv_heads_per_element) == (3, 0)
    assert layer_widths(model, graph)[0] == {"heads": 3, "kv_heads": 1, "intermediate": 80}
    second = _plan(graph, {"model.layers.0.self_attn": [2]}, remove_layers=[1])
    report = fastprune.prune(model, plan=second, method="llm-pruner", progress=False)
    assert report.widths_after[0] == {"heads": 1, "kv_heads": 1, "intermediate": 80}
    assert report.widths_after[2] == {"heads": 6, "kv_heads": 2, "intermediate": 80}
    graph = discover(model)
    assert not graph.groups_of("heads")[0].name.startswith("model.layers.0.")  # one head: nothing to choose
    widths = layer_widths(model, graph)
    assert widths[0] == {"heads": 1, "kv_heads": 1, "intermediate": 80}  # head_dim is no channel group
    assert widths[1] == {"heads": 6, "kv_heads": 2, "intermediate": 80}
    # the config speaks of the model as it is now: layer 2 became layer 1
    assert model.config.fastprune_layer_widths == {"0": {"heads": 1, "kv_heads": 1, "intermediate": 80},
                                                   "1": {"heads": 6, "kv_heads": 2, "intermediate": 80}}
    expected = model(torch.arange(9)[None]).logits
    loaded, _ = load_pruned(save_pruned(model, tmp_path / "ckpt"))
    assert torch.equal(loaded(torch.arange(9)[None]).logits, expected)


def test_multi_query_and_fused_heads_report_their_kv_heads():
    torch.manual_seed(0)
    gemma = T.GemmaForCausalLM(T.GemmaConfig(vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=1, head_dim=16))
    graph = discover(gemma)
    widths = layer_widths(gemma, graph, _plan(graph, {"model.layers.0.self_attn": [0, 3]}))
    assert [(w["heads"], w["kv_heads"]) for w in widths.values()] == [(2, 1), (4, 1)]
    neox = T.GPTNeoXForCausalLM(T.GPTNeoXConfig(vocab_size=96, hidden_size=48, intermediate_size=80,
                                                num_hidden_layers=2, num_attention_heads=6))
    graph = discover(neox)  # interleaved fused qkv: every query head owns its key and value head
    widths = layer_widths(neox, graph, _plan(graph, {"gpt_neox.layers.1.attention": [0, 3, 4]}))
    assert [(w["heads"], w["kv_heads"]) for w in widths.values()] == [(6, 6), (3, 3)]


def test_uniform_widths_drop_stale_per_layer_widths():
    model = tiny_llama(heads=6, kv_heads=2, layers=2)
    graph = discover(model)
    apply(model, _plan(graph, {"model.layers.0.mlp": list(range(40))}), graph)
    assert model.config.fastprune_layer_widths["1"]["intermediate"] == 80
    graph = discover(model)
    apply(model, _plan(graph, {"model.layers.1.mlp": list(range(40))}), graph)
    assert "fastprune_layer_widths" not in vars(model.config) and model.config.intermediate_size == 40
