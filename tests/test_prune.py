import pytest
import torch
from models import UnseenLM, tiny_llama

import fastprune
from fastprune import backends
from fastprune.errors import FastpruneError
from fastprune.importance import score
from fastprune.plan import Plan
from fastprune.select import select


def _calib(vocab=96, n=4, s=16, seed=0):
    return torch.randint(0, vocab, (n, s), generator=torch.Generator().manual_seed(seed))


def _model():
    return tiny_llama(layers=4, hidden=72, intermediate=160, heads=6, kv_heads=3)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("ratio", [0.1, 0.2, 0.3])
def test_block_ratio_is_met_and_reported(ratio):
    model = _model()
    report = fastprune.prune(model, ratio, calib=_calib(), layers=(0, 4), method="llm-pruner", progress=False)
    actual = sum(p.numel() for p in model.parameters())
    assert report.params_after == actual
    assert abs(report.ratio_achieved - ratio) <= 0.01
    assert set(report.stages) == {"discovery", "calibration", "scoring", "selection", "compaction"}
    assert all(s.seconds >= 0 and s.peak_bytes > 0 for s in report.stages.values())
    x = _calib(seed=5)
    assert torch.isfinite(model(x, labels=x).loss)


def test_ratio_zero_is_the_identity():
    model = _model()
    before = _state(model)
    report = fastprune.prune(model, 0.0, calib=_calib(), method="llm-pruner", progress=False)
    assert report.params_after == report.params_before
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5, "0.2"])
def test_bad_ratio_is_refused_and_nothing_changes(ratio):
    model = _model()
    before = _state(model)
    with pytest.raises(FastpruneError, match="ratio must be a fraction"):
        fastprune.prune(model, ratio, calib=_calib(), method="llm-pruner", progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_gradient_criteria_need_calibration_data():
    with pytest.raises(FastpruneError, match="calibration"):
        fastprune.prune(_model(), 0.2, method="llm-pruner", progress=False)


def test_dry_run_predicts_without_touching_the_model():
    model = _model()
    before = _state(model)
    report = fastprune.prune(model, 0.2, calib=_calib(), layers=(0, 4), dry_run=True,
                             method="llm-pruner", progress=False)
    assert report.dry_run and "compaction" not in report.stages
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    plan = Plan.from_json(report.settings["plans"][0])
    fastprune.apply(model, plan)
    assert sum(p.numel() for p in model.parameters()) == report.params_after


def test_iterative_pruning_reaches_the_target():
    model = _model()
    report = fastprune.prune(model, 0.3, calib=_calib(), layers=(0, 4), steps=3, method="llm-pruner", progress=False)
    assert len(report.settings["plans"]) == 3
    assert abs(report.ratio_achieved - 0.3) <= 0.01


def test_saved_scores_make_plans_at_several_ratios(tmp_path):
    model = _model()
    graph = fastprune.discover(model)
    scores = score(model, graph, _calib(), criterion="element1", progress=False)
    scores.save(tmp_path / "scores.safetensors")
    loaded = type(scores).load(tmp_path / "scores.safetensors")
    plans = [select(graph, loaded, r, layers=(0, 4)) for r in (0.1, 0.2)]
    assert plans[0].keep != plans[1].keep
    report = fastprune.prune(model, 0.2, scores=loaded, layers=(0, 4), method="llm-pruner", progress=False)
    assert abs(report.ratio_achieved - 0.2) <= 0.01
    assert Plan.from_json(report.settings["plans"][0]) == plans[1]


@pytest.mark.parametrize("scope", ["block", "channel", "layer"])
@pytest.mark.parametrize("criterion", ["element1", "vectorwise", "l2"])
def test_compiled_kernels_give_the_reference_plans(scope, criterion):
    if "cpp" not in backends.available("cpu"):
        pytest.skip("the C++ extension is not built")
    plans = {}
    for backend in ("reference", "cpp"):
        with backends.use(backend):
            model = _model()
            report = fastprune.prune(model, 0.25, criterion=criterion, scope=scope, calib=_calib(),
                                     layers=(0, 4) if scope == "block" else None, dry_run=True,
                                     method="llm-pruner", progress=False)
            plans[backend] = report.settings["plans"][0]
    assert plans["reference"] == plans["cpp"]


def test_unseen_model_prunes_end_to_end():
    model = UnseenLM(vocab=50, dim=40, n_heads=5, inner=36, depth=4)
    calib = torch.randint(0, 50, (3, 12), generator=torch.Generator().manual_seed(0))
    report = fastprune.prune(model, 0.15, calib=calib, layers=(0, 4), method="llm-pruner", progress=False)
    assert abs(report.ratio_achieved - 0.15) <= 0.01
    assert report.widths_after[0]["intermediate"] < 36
    with torch.no_grad():
        assert torch.isfinite(model(calib).logits).all()


def test_uniform_pruning_saves_a_vanilla_checkpoint(tmp_path):
    from transformers import AutoModelForCausalLM

    from fastprune.io import save_pruned

    model = _model()
    report = fastprune.prune(model, 0.2, calib=_calib(), uniform=True, method="llm-pruner", progress=False)
    assert abs(report.ratio_achieved - 0.2) <= 0.01
    widths = list(report.widths_after.values())
    assert len(widths) == 4 and all(w == widths[0] for w in widths)
    assert widths[0]["intermediate"] < 160
    save_pruned(model, tmp_path / "ckpt", report=report)
    config = (tmp_path / "ckpt" / "config.json").read_text()
    assert "auto_map" not in config
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    x = _calib(seed=7)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=0, atol=0)


def test_uniform_needs_block_scope():
    with pytest.raises(FastpruneError, match="uniform"):
        fastprune.prune(_model(), 0.2, calib=_calib(), scope="channel", uniform=True, method="llm-pruner",
                        progress=False)


@pytest.mark.parametrize("scope,embedding_scored", [("block", False), ("layer", True), ("channel", True)])
def test_prune_takes_the_embedding_gradient_only_when_the_hidden_dimension_is_pruned(scope, embedding_scored):
    """Heads and MLP channels need no embedding gradient (a vocab x hidden buffer); the plan is the one
    that scores from a full run give."""
    model = _model()
    seen = []
    model.get_input_embeddings().register_forward_pre_hook(  # forwards with autograd on: the scoring ones
        lambda mod, args: seen.append(mod.weight.requires_grad) if torch.is_grad_enabled() else None)
    layers = (0, 4) if scope == "block" else None
    report = fastprune.prune(model, 0.25, scope=scope, calib=_calib(), layers=layers, dry_run=True,
                             method="llm-pruner", progress=False)
    assert True in seen if embedding_scored else (seen and True not in seen)
    full = _model()
    scores = score(full, fastprune.discover(full), _calib(), criterion="element1", progress=False)
    again = fastprune.prune(full, 0.25, scope=scope, scores=scores, layers=layers, dry_run=True,
                            method="llm-pruner", progress=False)
    assert report.settings["plans"][0] == again.settings["plans"][0]
