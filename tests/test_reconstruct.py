"""Reconstruction: the ridge refit against a closed form written here, errors that never grow,
biases that survive checkpoints, and the layer-by-layer driver against the model's own forward."""

import copy

import pytest
import torch
from models import tiny_llama
from transformers import AutoModelForCausalLM

import fastprune
from fastprune.activation_scores import activation_scores
from fastprune.errors import FastpruneError
from fastprune.io import load_pruned, save_pruned
from fastprune.layerwise import propagate, record_layer_calls
from fastprune.plan import Plan
from fastprune.reconstruct import attach_biases, find_consumers, reconstruct


def _calib(n=6, s=12, seed=0):
    return torch.randint(0, 96, (n, s), generator=torch.Generator().manual_seed(seed))


def _model(**kw):
    base = dict(heads=6, kv_heads=3, layers=3, hidden=48, intermediate=64, head_dim=8)
    return tiny_llama(**{**base, **kw})


def _plan(graph, seed=0):
    """Remove one kv group of heads and a random quarter of the MLP channels in every layer."""
    gen = torch.Generator().manual_seed(seed)
    keep = {}
    for g in graph.groups:
        if g.kind == "heads":
            keep[g.name] = [i for i in range(g.size) if i != int(torch.randint(g.size, (1,), generator=gen))]
        elif g.kind == "channels":
            keep[g.name] = sorted(torch.randperm(g.size, generator=gen)[: g.size * 3 // 4].tolist())
    return Plan(fingerprint=graph.fingerprint, keep=keep, group_sizes={g.name: g.size for g in graph.groups})


def _consumer_inputs(model, names, calib):
    """Every named module's inputs on ``calib``, from one ordinary forward pass of the dense model."""
    seen = {n: [] for n in names}
    mods = dict(model.named_modules())
    handles = [mods[n].register_forward_pre_hook(lambda m, a, n=n: seen[n].append(a[0].reshape(-1, a[0].shape[-1])))
               for n in names]
    with torch.no_grad():
        model(calib)
    for h in handles:
        h.remove()
    return {n: torch.cat(v).double() for n, v in seen.items()}


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_refit_matches_the_closed_form(bias):
    model = _model()
    graph = fastprune.discover(model)
    plan = _plan(graph)
    calib = _calib()
    dense = copy.deepcopy(model)
    consumers, _ = find_consumers(model, graph, plan)
    assert {c.module.rsplit(".", 1)[1] for c in consumers} == {"o_proj", "down_proj"}
    inputs = _consumer_inputs(dense, [c.module for c in consumers], calib)
    ridge = 0.05
    report = reconstruct(model, graph, plan, calib, ridge=ridge, bias=bias, progress=False, batch_size=4)
    mods, old = dict(model.named_modules()), dict(dense.named_modules())
    for c in consumers:
        x = inputs[c.module]
        w = old[c.module].weight.double()
        k, r = c.kept, c.removed
        if bias:  # centred least squares with an intercept
            mu = x.mean(0)
            xc = x - mu
        else:
            xc = x
        a = xc[:, k].T @ xc[:, k] / x.shape[0]
        lam = ridge * a.diagonal().mean()
        # argmin_D  mean ||xc_R W_R^T - xc_K D^T||^2 + lam ||D||^2
        d = torch.linalg.solve(a + lam * torch.eye(len(k), dtype=a.dtype), xc[:, k].T @ xc[:, r] @ w[:, r].T
                               / x.shape[0]).T
        torch.testing.assert_close(mods[c.module].weight.double()[:, k], w[:, k] + d, rtol=1e-4, atol=1e-5)
        assert torch.equal(mods[c.module].weight[:, r], old[c.module].weight[:, r])  # left for apply to drop
        if bias:
            expected_b = w[:, r] @ mu[r] - d @ mu[k]
            torch.testing.assert_close(report.new_biases[c.module].double(), expected_b, rtol=1e-4, atol=1e-5)
    assert not bias or report.config_flags == {"mlp_bias": True, "attention_bias": True}


@pytest.mark.parametrize("sequential", [False, True], ids=["dense-stats", "sequential"])
def test_refit_never_increases_a_consumers_calibration_error(sequential):
    model = _model(layers=4)
    graph = fastprune.discover(model)
    plan = _plan(graph, seed=3)
    calib = _calib(seed=4)
    dense = copy.deepcopy(model)
    consumers, _ = find_consumers(model, graph, plan)
    report = reconstruct(model, graph, plan, calib, ridge=1e-3, bias=True, sequential=sequential, progress=False)
    fastprune.apply(model, plan, graph)
    attach_biases(model, report, plan, graph)
    assert len(report.error_after) == len(consumers)
    for before, after in zip(report.error_before, report.error_after):
        assert after <= before * (1 + 1e-6)
    if not sequential:  # dense statistics: check the reported errors against outputs computed here
        inputs = _consumer_inputs(dense, [c.module for c in consumers], calib)
        mods, old = dict(model.named_modules()), dict(dense.named_modules())
        for c, before, after in zip(consumers, report.error_before, report.error_after):
            x = inputs[c.module].float()
            target = x @ old[c.module].weight.T
            plain = x[:, c.kept] @ old[c.module].weight[:, c.kept].T
            refitted = x[:, c.kept] @ mods[c.module].weight.T + mods[c.module].bias
            e_plain = (target - plain).square().sum(1).mean()
            e_refit = (target - refitted).square().sum(1).mean()
            assert e_refit <= e_plain
            torch.testing.assert_close(e_plain.item(), before, rtol=1e-3, atol=1e-7)
            torch.testing.assert_close(e_refit.item(), after, rtol=1e-3, atol=1e-7)


def test_reconstruction_brings_the_pruned_model_closer_to_the_dense_one():
    model = _model(layers=4)
    dense = copy.deepcopy(model)
    plain = copy.deepcopy(model)
    calib = _calib(n=16, s=16)
    graph = fastprune.discover(model)
    plan = _plan(graph, seed=1)
    fastprune.apply(plain, plan, graph)
    report = reconstruct(model, graph, plan, calib, progress=False)
    fastprune.apply(model, plan, graph)
    attach_biases(model, report, plan, graph)
    x = _calib(n=16, s=16, seed=9)  # not calibrated on
    with torch.no_grad():
        ref = dense(x).logits
        assert (model(x).logits - ref).square().mean() < (plain(x).logits - ref).square().mean()


def test_layer_driver_reproduces_the_models_own_forward():
    model = _model(layers=3)
    calib = _calib(n=5, s=10)
    layers = model.model.layers
    record = record_layer_calls(model, layers, calib, batch_size=2)
    assert len(record.hidden) == 3 and all(len(c) == 3 for c in record.calls)
    seen = {}

    def visit(i, inputs):
        seen[i] = torch.cat(inputs)
        return None

    propagate(layers, record, 3, visit)
    captured = {}
    handles = [layer.register_forward_pre_hook(lambda m, a, i=i: captured.__setitem__(i, a[0]))
               for i, layer in enumerate(layers)]
    with torch.no_grad():
        model(calib)
    for h in handles:
        h.remove()
    for i in range(3):
        torch.testing.assert_close(seen[i], captured[i])
    assert "forward" not in vars(layers[0])  # the recorders are gone


def test_reconstruction_refuses_a_bad_plan_before_touching_weights():
    model = _model()
    graph = fastprune.discover(model)
    plan = _plan(graph)
    name = next(iter(plan.keep))
    plan.keep[name] = [0, 0]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(FastpruneError, match="sorted and distinct"):
        reconstruct(model, graph, plan, _calib(), progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_prune_with_reconstruction_saves_and_loads(tmp_path):
    model = _model(layers=4)
    report = fastprune.prune(model, 0.2, calib=_calib(), recon_calib=_calib(n=8, s=16, seed=2), layers=(0, 4),
                             method="refit", progress=False)
    assert "reconstruction" in report.stages and report.settings["reconstruct"]
    assert model.config.mlp_bias and model.model.layers[1].mlp.down_proj.bias is not None
    assert model.model.layers[1].mlp.up_proj.bias.abs().sum() == 0  # the config's other biases are zero
    x = _calib(seed=7)
    with torch.no_grad():
        expected = model(x).logits
    out = save_pruned(model, tmp_path / "ckpt")
    loaded, _ = load_pruned(out)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, expected)
    remote = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    with torch.no_grad():
        torch.testing.assert_close(remote(x).logits, expected)


def test_uniform_prune_with_reconstruction_loads_with_vanilla_transformers(tmp_path):
    model = _model(layers=3)
    fastprune.prune(model, 0.15, calib=_calib(), recon_calib=_calib(n=8, s=16, seed=2), uniform=True,
                    method="refit", progress=False)
    x = _calib(seed=7)
    with torch.no_grad():
        expected = model(x).logits
    out = save_pruned(model, tmp_path / "ckpt")
    vanilla = AutoModelForCausalLM.from_pretrained(out)
    assert vanilla.config.mlp_bias
    with torch.no_grad():
        torch.testing.assert_close(vanilla(x).logits, expected)


def test_uniform_refuses_a_bias_the_config_cannot_express():
    from transformers import GemmaConfig, GemmaForCausalLM, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)  # Gemma's MLP has no bias and no config field for one
    model = GemmaForCausalLM(GemmaConfig(hidden_size=48, intermediate_size=80, num_hidden_layers=3,
                                         num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                                         vocab_size=96)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(FastpruneError, match="cannot express"):
        fastprune.prune(model, 0.1, calib=_calib(), recon_calib=_calib(n=8, s=16), uniform=True, method="refit",
                        progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    report = fastprune.prune(model, 0.1, calib=_calib(), recon_calib=_calib(n=8, s=16), layers=(0, 3),
                             method="refit", progress=False)  # not uniform: refitted without a mean term
    assert any("down_proj" in w and "have no bias" in w for w in report.settings["warnings"])
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=96, n_positions=32)).eval()
    report = fastprune.prune(gpt2, 0.15, calib=_calib(), recon_calib=_calib(n=8, s=16), layers=(0, 2),
                             method="refit", progress=False)  # Conv1D consumers with their own biases
    assert report.settings["reconstruction"]["steps"][0]["consumers"] >= 2


def test_reconstruction_off_keeps_masked_equivalence():
    from equivalence import masked_reference

    model = _model()
    graph = fastprune.discover(model)
    plan = _plan(graph)
    ref = masked_reference(model, plan, graph)
    report = fastprune.prune(model, plan=plan, method="refit", reconstruct=False, progress=False)
    assert not report.settings["reconstruct"]
    x = _calib(seed=3)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, ref(x).logits, rtol=1e-5, atol=1e-5)


def _oracle_scores(model, graph, calib, criterion, ridge):
    names = [n for n, _ in model.named_modules() if n.endswith(("o_proj", "down_proj"))]
    inputs = _consumer_inputs(model, names, calib)
    mods = dict(model.named_modules())
    out = {}
    for g in graph.groups:
        if g.kind not in ("heads", "channels"):
            continue
        sl = next(s for s in g.slices if s.role == "in")
        name = sl.param.rsplit(".", 1)[0]
        x, w = inputs[name], mods[name].weight.double()
        cols = [sl.indices([e]) for e in range(g.size)]
        if criterion == "fluctuation":
            out[g.name] = torch.stack([(x[:, c].var(0, unbiased=False) * w[:, c].square().sum(0)).sum() for c in cols])
        else:
            h = x.T @ x / x.shape[0]
            h = h + ridge * h.diagonal().mean() * torch.eye(h.shape[0], dtype=h.dtype)
            hinv = torch.linalg.inv(h)
            out[g.name] = torch.stack([torch.trace(w[:, c] @ torch.linalg.inv(hinv[c][:, c]) @ w[:, c].T)
                                       for c in cols])
    return out


@pytest.mark.parametrize("criterion", ["fluctuation", "obs"])
def test_activation_criteria_match_an_oracle(criterion):
    model = _model()
    graph = fastprune.discover(model)
    calib = _calib(n=8, s=12)
    scores = activation_scores(model, graph, calib, criterion, ridge=0.01, progress=False)
    expected = _oracle_scores(model, graph, calib, criterion, 0.01)
    for name, values in expected.items():
        torch.testing.assert_close(scores.groups[name].double().sum(0), values, rtol=2e-4, atol=1e-6)


def test_prune_with_an_activation_criterion_meets_the_ratio():
    model = _model(layers=4)
    report = fastprune.prune(model, 0.2, criterion="obs", recon_calib=_calib(n=8, s=16), layers=(0, 4),
                             method="llm-pruner", progress=False)
    assert abs(report.ratio_achieved - 0.2) <= 0.01
    assert report.settings["criterion"] == "obs" and "reconstruction" not in report.stages
