"""Mixture-of-experts families (Mixtral, Qwen2-MoE with its shared expert, Qwen3-MoE): expert channels.

Transformers 5 stores a layer's experts as 3-D stacks (``gate_up_proj [E, 2I, H]``, ``down_proj
[E, H, I]``) and routes tokens with data-dependent ops.  Discovery groups channel ``j`` of every
expert of a layer (one index set for the whole stack), keeps the router's expert dim out of every
group, lets the hidden dimension run through the router and the experts, and must not depend on
which experts the traced tokens reached.
"""

import tempfile
from types import SimpleNamespace

import pytest
import torch
import transformers as T
from equivalence import masked_reference
from torch import nn

import fastprune
from fastprune.apply import apply
from fastprune.discover import discover
from fastprune.importance import score
from fastprune.plan import Plan

COMMON = dict(vocab_size=96, hidden_size=48, num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=2,
              num_experts_per_tok=2)
MOE = {
    "mixtral": (T.MixtralConfig, T.MixtralForCausalLM, dict(intermediate_size=64, num_local_experts=4)),
    "qwen2_moe": (T.Qwen2MoeConfig, T.Qwen2MoeForCausalLM,
                  dict(intermediate_size=72, moe_intermediate_size=48, shared_expert_intermediate_size=56,
                       num_experts=6)),
    "qwen3_moe": (T.Qwen3MoeConfig, T.Qwen3MoeForCausalLM,  # layer 2 is a dense MLP
                  dict(intermediate_size=72, moe_intermediate_size=48, num_experts=8, head_dim=8,
                       mlp_only_layers=[2])),
}
IMPLEMENTATIONS = ("grouped_mm", "eager", "batched_mm")  # how transformers runs the experts


def _make(name: str, experts: str = "grouped_mm") -> torch.nn.Module:
    torch.manual_seed(0)
    config_cls, model_cls, kw = MOE[name]
    config = config_cls(**COMMON, **kw)
    config._experts_implementation = experts
    model = model_cls(config).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() == 1 and "norm" in n:  # non-trivial norm scales so masking mistakes show
                p.add_(torch.rand_like(p) * 0.5)
            if n.endswith("mlp.gate.weight"):  # decisive routing: no near-ties between experts
                p.normal_(0.0, 0.5)
    return model


def _ids(seed: int = 1, shape=(2, 9)) -> torch.Tensor:
    return torch.randint(0, 96, shape, generator=torch.Generator().manual_seed(seed))


def _every_other(graph, layers=()) -> Plan:
    keep = {g.name: list(range(0, g.size, 2)) for g in graph.groups}
    return Plan(graph.fingerprint, keep, list(layers), {g.name: g.size for g in graph.groups})


def _signature(graph):
    return [(g.name, g.kind, g.size, g.experts, g.slices, g.root) for g in graph.groups]


def _check_generate(model, ids):
    with torch.no_grad():
        cached = model.generate(ids[:1, :4], max_new_tokens=5, do_sample=False, use_cache=True)
        uncached = model.generate(ids[:1, :4], max_new_tokens=5, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("name", sorted(MOE))
def test_moe_discovery_finds_expert_channels_heads_and_hidden(name):
    model = _make(name)
    graph = discover(model)
    assert not graph.warnings, graph.warnings
    assert {g.kind for g in graph.groups} == {"heads", "channels", "hidden"}
    assert len(graph.groups_of("heads")) == 3
    shapes = graph.param_shapes
    experts = [g for g in graph.groups_of("channels") if g.experts]
    moe_layers = [i for i in range(3) if not (name == "qwen3_moe" and i == 2)]
    assert [g.layer for g in experts] == moe_layers
    for g in experts:
        stack = f"model.layers.{g.layer}.mlp.experts"
        n_experts, two_i, _ = shapes[f"{stack}.gate_up_proj"]
        assert g.experts == n_experts and g.size == two_i // 2
        # gate and up halves of the fused rows, and the down projection's columns
        assert {(s.param, s.dim, s.base) for s in g.slices} == {(f"{stack}.gate_up_proj", 1, (0,)),
                                                                  (f"{stack}.gate_up_proj", 1, (g.size,)),
                                                                  (f"{stack}.down_proj", 2, (0,))}
        assert [g.slices[i].param for i in g.root] == [f"{stack}.gate_up_proj"] * 2
    hidden = graph.group("hidden")
    on_hidden = {(s.param, s.dim) for s in hidden.slices}
    for i in moe_layers:
        mlp = f"model.layers.{i}.mlp"
        assert {(f"{mlp}.gate.weight", 1), (f"{mlp}.experts.gate_up_proj", 2),
                (f"{mlp}.experts.down_proj", 1)} <= on_hidden
    # the router's expert dim and the expert stacks' dim 0 are never pruned
    assert not any((s.param.endswith("mlp.gate.weight") or s.param.endswith("experts.gate_up_proj")
                    or s.param.endswith("experts.down_proj")) and s.dim == 0 for g in graph.groups for s in g.slices)
    if name == "qwen2_moe":
        shared = [g for g in graph.groups_of("channels") if not g.experts]
        assert [g.name for g in shared] == [f"model.layers.{i}.mlp.shared_expert" for i in range(3)]
        assert ("model.layers.0.mlp.shared_expert_gate.weight", 1) in on_hidden


@pytest.mark.parametrize("experts", IMPLEMENTATIONS)
@pytest.mark.parametrize("name", sorted(MOE))
def test_moe_equivalence_and_generate(name, experts):
    """Masking removed heads, expert channels, hidden channels and a layer equals the compacted model."""
    model = _make(name, experts)
    graph = discover(model)
    if experts != "grouped_mm":  # every way of running the experts gives one graph
        assert _signature(graph) == _signature(discover(_make(name)))
    plan = _every_other(graph, layers=[1])
    reference = masked_reference(model, plan, graph)
    ids = _ids()
    with torch.no_grad():
        expected = reference(ids).logits
        apply(model, plan, graph)
        got = model(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    stack = model.model.layers[0].mlp.experts
    n_experts = stack.gate_up_proj.shape[0]
    width = MOE[name][2].get("moe_intermediate_size", MOE[name][2]["intermediate_size"]) // 2
    assert stack.gate_up_proj.shape == (n_experts, 2 * width, 24) and stack.down_proj.shape == (n_experts, 24, width)
    assert model.model.layers[0].mlp.gate.weight.shape == (n_experts, 24)
    assert len(model.model.layers) == 2
    _check_generate(model, ids)


def test_grouped_mm_fallback_kernel_is_traced_like_grouped_mm(monkeypatch):
    import transformers.integrations.moe as moe

    monkeypatch.setattr(moe, "_can_use_grouped_mm", lambda *args: False)  # transformers' own custom op runs
    model = _make("qwen3_moe")
    graph = discover(model, cache=False)  # traced now, through the fallback
    assert not graph.warnings
    assert _signature(graph) == _signature(discover(_make("qwen3_moe", "eager"), cache=False))


def test_discovery_does_not_depend_on_the_experts_the_trace_reaches():
    """Route every traced token to experts 0 and 1 only: the groups still cover every expert."""
    model = _make("mixtral", "eager")
    reached: set[int] = set()

    def only_first_two(module, args, out):
        logits, weights, index = out
        return logits, torch.full_like(weights, 0.5), torch.arange(2).expand_as(index)

    def record(module, args):
        reached.update(args[1].flatten().tolist())

    handles = []
    for layer in model.model.layers:
        handles.append(layer.mlp.gate.register_forward_hook(only_first_two))
        handles.append(layer.mlp.experts.register_forward_pre_hook(record))
    try:
        graph = discover(model, cache=False)  # traced now, with the routing above
    finally:
        for h in handles:
            h.remove()
    assert reached == {0, 1}
    assert _signature(graph) == _signature(discover(_make("mixtral"), cache=False))
    plan = Plan(graph.fingerprint, {g.name: list(range(1, g.size, 3)) for g in graph.groups_of("channels")}, [],
                {g.name: g.size for g in graph.groups})
    reference = masked_reference(model, plan, graph)
    ids = _ids(2)
    with torch.no_grad():
        expected = reference(ids).logits
        apply(model, plan, graph)
        got = model(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_expert_channel_scores_sum_over_every_expert():
    model = _make("qwen2_moe")
    graph = discover(model)
    scores = score(model, graph, criterion="l1", progress=False)
    group = graph.group("model.layers.0.mlp.experts")
    gate_up = model.model.layers[0].mlp.experts.gate_up_proj.detach().abs()
    down = model.model.layers[0].mlp.experts.down_proj.detach().abs()
    got = scores.groups[group.name]
    torch.testing.assert_close(got[0], gate_up[:, :group.size].sum((0, 2)))
    torch.testing.assert_close(got[1], gate_up[:, group.size:].sum((0, 2)))
    torch.testing.assert_close(got[2], down.sum((0, 1)))
    hidden = graph.group("hidden")
    row = next(i for i, s in enumerate(hidden.slices) if s.param == "model.layers.0.mlp.experts.down_proj")
    torch.testing.assert_close(scores.groups["hidden"][row], down.sum((0, 2)))


def test_prune_removes_expert_channels_in_aligned_steps():
    model = _make("mixtral")
    before = {i: layer.mlp.experts.gate_up_proj.shape[1] // 2 for i, layer in enumerate(model.model.layers)}
    report = fastprune.prune(model, 0.2, calib=_ids(0, (4, 16)), method="llm-pruner", progress=False)
    after = {i: layer.mlp.experts.gate_up_proj.shape[1] // 2 for i, layer in enumerate(model.model.layers)}
    assert any(after[i] < before[i] for i in before)
    assert all(w % 8 == 0 for w in after.values())  # grouped_mm needs 16-byte aligned expert rows
    assert [w["intermediate"] for w in report.widths_after.values()] == list(after.values())
    assert abs(report.ratio_achieved - 0.2) <= 0.01
    _check_generate(model, _ids())


@pytest.mark.parametrize("name", sorted(MOE))
def test_uniform_moe_plan_reloads_from_its_config(name):
    """The same widths in every layer: a plain config (expert, shared expert, dense widths) describes it."""
    model = _make(name)
    graph = discover(model)
    apply(model, _every_other(graph, layers=[1]), graph)
    config = model.config
    kw = MOE[name][2]
    if name == "mixtral":
        assert config.intermediate_size == 32
    else:
        assert config.moe_intermediate_size == 24
        dense = [g for g in graph.groups_of("channels") if not g.experts]
        assert config.intermediate_size == (36 if name == "qwen3_moe" else kw["intermediate_size"])
        if name == "qwen2_moe":
            assert config.shared_expert_intermediate_size == 28 and len(dense) == 3
        else:
            assert config.mlp_only_layers == [1]  # the dense layer 2 is layer 1 once layer 1 is gone
    assert config.hidden_size == 24 and config.num_hidden_layers == 2
    assert "fastprune_layer_widths" not in vars(config)  # dense and expert layers differ, each kind uniform
    ids = _ids(3)
    with tempfile.TemporaryDirectory() as path:
        model.save_pretrained(path)
        loaded = type(model).from_pretrained(path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


class MaskRoutedLM(nn.Module):
    """Token routing with a boolean mask, a sort and ``index_put_``/``index_add_`` (no library code)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(32, 16)
        self.layers = nn.ModuleList(nn.ModuleDict(dict(up=nn.Linear(16, 24), down=nn.Linear(24, 16)))
                                    for _ in range(2))
        self.head = nn.Linear(16, 32, bias=False)

    def forward(self, input_ids, **_):
        x = self.embed(input_ids).flatten(0, 1)
        chosen = input_ids.flatten() % 2 == 0
        order = torch.sort(input_ids.flatten(), stable=True).indices
        for layer in self.layers:
            h = layer["down"](torch.relu(layer["up"](x[chosen])))  # the chosen tokens only
            routed = torch.zeros_like(x).index_put_((chosen,), h)
            x = x + routed.index_add(0, order, x[order] * 0.5)
        return SimpleNamespace(logits=self.head(x).view(*input_ids.shape, -1))


def test_token_routing_ops_keep_channel_and_hidden_spaces():
    model = MaskRoutedLM().eval()
    graph = discover(model)
    assert not graph.warnings, graph.warnings
    assert [g.size for g in graph.groups_of("channels")] == [24, 24] and graph.group("hidden").size == 16
    plan = Plan(graph.fingerprint, {g.name: list(range(1, g.size, 2)) for g in graph.groups}, [],
                {g.name: g.size for g in graph.groups})
    reference = masked_reference(model, plan, graph)
    ids = torch.randint(0, 32, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = reference(ids).logits
        apply(model, plan, graph)
        got = model(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def _pruned_for_saving(name, uniform):
    """Every other element kept; uniform: layer 1 removed, else layer 0's experts keep a quarter."""
    model = _make(name)
    graph = discover(model)
    plan = _every_other(graph, layers=[1] if uniform else [])
    if not uniform:
        first = next(g for g in graph.groups_of("channels") if g.experts)
        plan.keep[first.name] = list(range(0, first.size, 4))
    apply(model, plan, graph)
    return model


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("uniform", [True, False], ids=["uniform", "per-layer"])
@pytest.mark.parametrize("name", sorted(MOE))
def test_pruned_moe_checkpoint_round_trip(tmp_path, name, uniform):
    """save_pretrained stores the expert stacks as per-expert matrices; both loaders stack them back."""
    from safetensors import safe_open

    model = _pruned_for_saving(name, uniform)
    widths = [layer.mlp.experts.gate_up_proj.shape[1] // 2 for layer in model.model.layers
              if hasattr(layer.mlp, "experts")]
    assert (len(set(widths)) == 1) == uniform
    ids = _ids(4)
    expected = _logits(model, ids)
    out = fastprune.save_pruned(model, tmp_path / "ckpt")
    with safe_open(out / "model.safetensors", "pt") as f:
        assert not any(k.endswith("experts.gate_up_proj") for k in f.keys())  # transformers' legacy layout
    loaded, _ = fastprune.load_pruned(out)
    assert [layer.mlp.experts.gate_up_proj.shape[1] // 2 for layer in loaded.model.layers
            if hasattr(layer.mlp, "experts")] == widths
    assert torch.equal(_logits(loaded, ids), expected)
    if uniform:
        assert not (out / "modeling_fastprune.py").exists()
        plain = T.AutoModelForCausalLM.from_pretrained(out).eval()
        assert torch.equal(_logits(plain, ids), expected)
    remote = T.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    assert torch.equal(_logits(remote, ids), expected)
    again = fastprune.save_pruned(loaded, tmp_path / "again")  # a loaded checkpoint saves again
    assert torch.equal(_logits(fastprune.load_pruned(again)[0], ids), expected)


def test_moe_checkpoint_with_mismatched_experts_is_reported(tmp_path):
    from safetensors.torch import load_file, save_file

    out = fastprune.save_pruned(_pruned_for_saving("mixtral", uniform=False), tmp_path / "ckpt")
    tensors = load_file(out / "model.safetensors")
    name = "model.layers.0.block_sparse_moe.experts.1.w1.weight"
    tensors[name] = tensors[name][:4]
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(fastprune.FastpruneError, match=r"experts.0.w1.weight.*do not combine into "
                                                       r"'model.layers.0.mlp.experts.gate_up_proj'"):
        fastprune.load_pruned(out)
