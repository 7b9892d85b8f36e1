"""Per-layer widths report heads and kv heads for every attention layer, also where no group is left."""

import json

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


def _prune(model, keep, remove_layers=()):
    graph = discover(model)
    apply(model, _plan(graph, keep, remove_layers), graph)
    return model


def _round_trip(model, directory):
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids).logits
    out = save_pruned(model, directory)
    with torch.no_grad():
        assert torch.equal(load_pruned(out)[0](ids).logits, expected)
        remote = T.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
        assert torch.equal(remote(ids).logits, expected)
    return json.loads((out / "config.json").read_text())


def _phi3():
    torch.manual_seed(0)
    return T.Phi3ForCausalLM(T.Phi3Config(vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                                          num_attention_heads=6, num_key_value_heads=2, pad_token_id=0)).eval()


def test_phi3_head_counts_are_declared_by_its_override_and_survive_a_checkpoint(tmp_path):
    graph = discover(_phi3())
    links = graph.widths.links_of("model.layers.0.self_attn")
    assert {attr: (link.per, link.found) for attr, link in links.items()} == {
        "config.num_attention_heads": (3, "override phi3"), "config.num_key_value_heads": (1, "override phi3"),
        "num_key_value_heads": (1, "override phi3")}
    model = _prune(_phi3(), {"model.layers.0.self_attn": [1]})
    attn0, attn1 = (layer.self_attn for layer in model.model.layers)
    assert (attn0.config.num_attention_heads, attn0.config.num_key_value_heads, attn0.num_key_value_heads) == (3, 1, 1)
    assert attn1.config is model.config and model.config.num_attention_heads == 6  # unpruned layer: shared config
    config = _round_trip(model, tmp_path / "ckpt")  # qkv is sliced by the layer's own head counts after loading too
    # one kv head left: the query heads are the elements now, and the kv head counts are fixed values
    assert config["fastprune"]["widths"]["model.layers.0.self_attn"] == {"config.num_attention_heads": [0, "heads", 1]}
    assert config["fastprune"]["attributes"]["model.layers.0.self_attn"] == {"num_key_value_heads": 1,
                                                                           "config.num_key_value_heads": 1}
    assert config["fastprune_layer_widths"]["0"] == {"heads": 3, "kv_heads": 1, "intermediate": 80}


def test_traced_widths_are_stored_as_bindings_to_the_record(tmp_path):
    torch.manual_seed(0)
    model = T.GPT2LMHeadModel(T.GPT2Config(vocab_size=96, n_embd=48, n_inner=80, n_layer=2, n_head=6,
                                           bos_token_id=0, eos_token_id=0)).eval()
    links = discover(model).widths.links_of("transformer.h.0.attn")
    assert {attr: link.per for attr, link in links.items()} == {"embed_dim": 8, "num_heads": 1, "split_size": 8}
    assert links["embed_dim"].found == links["split_size"].found == "trace"
    # num_heads is a traced literal where this transformers release's attention reads it, else bound by name
    assert links["num_heads"].found in ("trace", "name")
    _prune(model, {"transformer.h.0.attn": [0, 2, 5], "transformer.h.1.attn": [1, 4]})
    config = _round_trip(model, tmp_path / "ckpt")
    assert config["fastprune"]["widths"]["transformer.h.1.attn"] == {
        "embed_dim": [1, "kv_heads", 8], "num_heads": [1, "kv_heads", 1], "split_size": [1, "kv_heads", 8]}
    assert "transformer.h.1.attn" not in config["fastprune"]["attributes"]  # never the values a second time


def test_head_counts_the_config_cannot_express_go_to_the_record(tmp_path):
    model = tiny_llama(heads=6, kv_heads=6, layers=2)  # every layer keeps 5 heads: 48 is no multiple of 5
    _prune(model, {f"model.layers.{i}.self_attn": [0, 1, 2, 4, 5] for i in range(2)})
    assert model.config.num_attention_heads == model.config.num_key_value_heads == 6
    assert model.config.fastprune_layer_widths == {str(i): {"heads": 5, "kv_heads": 5, "intermediate": 80}
                                                   for i in range(2)}
    _round_trip(model, tmp_path / "ckpt")
    model = tiny_llama(heads=6, kv_heads=6, layers=2)  # 4 heads divide 48: the config says it
    _prune(model, {f"model.layers.{i}.self_attn": [0, 1, 2, 4] for i in range(2)})
    assert model.config.num_attention_heads == model.config.num_key_value_heads == 4
    assert "fastprune_layer_widths" not in vars(model.config)


def test_removed_layers_renumber_layer_indices_and_config_lists():
    torch.manual_seed(0)
    model = T.Gemma2ForCausalLM(T.Gemma2Config(vocab_size=96, hidden_size=48, intermediate_size=80,
                                               num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                               head_dim=16)).eval()
    types = list(model.config.layer_types)
    _prune(model, {}, remove_layers=[0])
    assert model.config.num_hidden_layers == 2 and model.config.layer_types == types[1:]
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1]
