import pytest
import torch
from models import UnseenLM, tiny_llama
from torch import nn

from fastprune.discover import discover
from fastprune.errors import FastpruneError
from fastprune.widths import WidthLink


def _by_name(graph):
    return {g.name: g for g in graph.groups}


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("heads,kv_heads", [(6, 6), (6, 2), (4, 1)])
@pytest.mark.parametrize("tied", [True, False])
def test_llama_groups(attn, heads, kv_heads, tied):
    model = tiny_llama(heads=heads, kv_heads=kv_heads, layers=2, tied=tied, attn=attn)
    graph = discover(model)
    groups = _by_name(graph)
    rep, hd = heads // kv_heads, 8
    assert graph.layer_container == "model.layers" and graph.num_layers == 2
    assert sorted(groups) == ["hidden", "model.layers.0.mlp", "model.layers.0.self_attn",
                              "model.layers.1.mlp", "model.layers.1.self_attn"]
    for i in range(2):
        attn_group = groups[f"model.layers.{i}.self_attn"]
        got = {(s.param.split(".")[-2], s.dim, s.width, s.stride, s.role) for s in attn_group.slices}
        roots = {attn_group.slices[r].param.split(".")[-2] for r in attn_group.root}
        assert attn_group.kind == "heads" and attn_group.layer == i
        if kv_heads == 1:  # multi-query: the single kv head stays, query heads are the elements
            assert attn_group.size == heads and attn_group.heads_per_element == 1
            assert got == {("q_proj", 0, hd, hd, "out"), ("o_proj", 1, hd, hd, "in")}
            assert roots == {"q_proj"}
            if attn == "eager":  # repeat_kv's copy count follows the kept query heads
                assert graph.widths.links_of(f"model.layers.{i}.self_attn") == {
                    "num_key_value_groups": WidthLink(attn_group.name, "num_key_value_groups", attn_group.name, 1)}
            continue
        assert attn_group.size == kv_heads and attn_group.heads_per_element == rep
        assert got == {("q_proj", 0, rep * hd, rep * hd, "out"), ("k_proj", 0, hd, hd, "out"),
                       ("v_proj", 0, hd, hd, "out"), ("o_proj", 1, rep * hd, rep * hd, "in")}
        assert roots == {"q_proj", "k_proj"}
    for i in range(2):
        mlp = groups[f"model.layers.{i}.mlp"]
        assert mlp.kind == "channels" and mlp.size == 80
        assert {(s.param.split(".")[-2], s.dim) for s in mlp.slices} == {
            ("gate_proj", 0), ("up_proj", 0), ("down_proj", 1)}
        assert {mlp.slices[r].param.split(".")[-2] for r in mlp.root} == {"gate_proj", "up_proj"}
    hidden = groups["hidden"]
    assert hidden.kind == "hidden" and hidden.size == 48 and hidden.normalized
    names = {s.param for s in hidden.slices}
    expected = {n for n, p in model.named_parameters() if "norm" in n or "embed" in n or "lm_head" in n}
    assert expected <= names
    assert len(hidden.slices) == len(list(model.parameters()))  # every parameter meets the hidden dim
    assert not graph.warnings


def test_unseen_model_discovered_without_code():
    model = UnseenLM(dim=40, n_heads=5, inner=36, depth=3)
    graph = discover(model)
    groups = _by_name(graph)
    assert graph.layer_container == "stack" and graph.num_layers == 3
    assert sorted(groups) == ["hidden"] + [f"stack.{i}.{m}" for i in range(3) for m in ("ffn", "mixer")]
    heads = groups["stack.1.mixer"]
    assert heads.kind == "heads" and heads.size == 5
    qkv = sorted(s.base[0] for s in heads.slices if s.param == "stack.1.mixer.qkv.weight")
    assert qkv == [0, 40, 80]  # q, k and v pieces of the fused projection
    assert {s.width for s in heads.slices} == {8}
    mlp = groups["stack.1.ffn"]
    assert sorted(s.base[0] for s in mlp.slices if s.param == "stack.1.ffn.up.weight") == [0, 36]
    assert graph.widths.links_of("stack.1.mixer") == {
        "n_heads": WidthLink("stack.1.mixer", "n_heads", "stack.1.mixer", 1)}
    assert groups["hidden"].size == 40
    text = str(graph)
    assert "stack.1.mixer" in text and "heads" in text and "qkv.weight" in text


class _OnlyLookup(nn.Module):
    def __init__(self):
        super().__init__()
        self.table = nn.Embedding(16, 16)

    def forward(self, input_ids, **_):
        return (self.table(input_ids),)


def test_nothing_prunable_is_an_error():
    with pytest.raises(FastpruneError, match="nothing prunable"):
        discover(_OnlyLookup())


class _SortsChannels(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 12)
        self.mix = nn.Linear(12, 12)
        self.head = nn.Linear(12, 20)

    def forward(self, input_ids, **_):
        h = self.mix(self.emb(input_ids))
        h = torch.fft.fft(h).real  # an op the tracer has no rule for
        return (self.head(h),)


def test_unmapped_op_is_named_and_blocks_its_spaces():
    graph = discover(_SortsChannels())
    assert any("fft" in w and "<root>" in w for w in graph.warnings), graph.warnings
    for g in graph.groups:  # the channels the unknown op touched are never offered for pruning
        assert not any(s.param == "mix.weight" and s.dim == 0 for s in g.slices)
