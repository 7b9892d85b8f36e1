"""Sensitivity allocation: measured loss rises rescale each group's scores; the model is left as it was."""

import pytest
import torch
from models import tiny_llama

import fastprune
from fastprune.allocate import sensitivity_scores
from fastprune.errors import FastpruneError
from fastprune.importance import aggregate, score


def _calib(n=4, s=16, seed=0):
    return torch.randint(0, 96, (n, s), generator=torch.Generator().manual_seed(seed))


def _loss(model, ids):
    with torch.no_grad():
        logits = model(ids).logits[:, :-1]
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).double(), ids[:, 1:].flatten()).item()


def test_probe_scores_sum_to_the_measured_loss_rise():
    model = tiny_llama(layers=3, hidden=48, intermediate=64, heads=6, kv_heads=3)
    graph = fastprune.discover(model)
    calib = _calib()
    scores = score(model, graph, calib, criterion="element1", progress=False)
    groups = [g for g in graph.groups if g.kind in ("heads", "channels")]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scaled = sensitivity_scores(model, graph, scores, calib, groups, probe=0.25, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    base = _loss(model, calib)
    agg, new = aggregate(scores, graph), aggregate(scaled, graph)
    for g in groups:
        n = max(1, round(0.25 * g.size))
        probe = torch.sort(agg[g.name], stable=True).indices[:n]
        # oracle: silence those elements' input columns in the reading projection, measure the loss
        silenced = tiny_llama(layers=3, hidden=48, intermediate=64, heads=6, kv_heads=3)
        silenced.load_state_dict(model.state_dict())
        params = dict(silenced.named_parameters())
        with torch.no_grad():
            for sl in g.slices:
                if sl.role == "in":
                    params[sl.param].index_fill_(sl.dim, sl.indices(probe), 0)
        rise = max(_loss(silenced, calib) - base, 1e-9)
        assert new[g.name][probe].sum().item() == pytest.approx(rise, rel=2e-2, abs=1e-7)
        ratio = new[g.name] / agg[g.name].clamp_min(1e-30)
        assert torch.allclose(ratio[agg[g.name] > 0], ratio[agg[g.name] > 0][0], rtol=1e-4)  # order kept


def test_prune_with_sensitivity_allocation_meets_the_ratio_and_the_minimum_width():
    model = tiny_llama(layers=4, hidden=48, intermediate=64, heads=6, kv_heads=3)
    report = fastprune.prune(model, 0.25, calib=_calib(), method="llm-pruner", allocation="sensitivity",
                             progress=False)
    assert abs(report.ratio_achieved - 0.25) <= 0.01
    assert report.settings["allocation"] == "sensitivity" and "allocation" in report.stages
    assert report.settings["max_group_ratio"] == 0.6
    for w in report.widths_after.values():
        assert w["intermediate"] >= 64 * 0.4 and w["kv_heads"] >= 1


def test_unknown_allocation_and_bad_probe_are_refused():
    model = tiny_llama()
    with pytest.raises(FastpruneError, match="unknown allocation"):
        fastprune.prune(model, 0.1, calib=_calib(), allocation="magic", progress=False)
    graph = fastprune.discover(model)
    scores = score(model, graph, None, criterion="l1", progress=False)
    with pytest.raises(FastpruneError, match="probe"):
        sensitivity_scores(model, graph, scores, _calib(), graph.groups, probe=1.5, progress=False)


def test_the_default_recipe_takes_sensitivity_allocation():
    """obs scores (no gradients, no LLM-Pruner calibration) with allocation="sensitivity": the sensitivity
    probes run on the reconstruction windows."""
    model = tiny_llama(layers=4, hidden=48, intermediate=64, heads=6, kv_heads=3)
    report = fastprune.prune(model, 0.2, recon_calib=_calib(n=8, s=16, seed=2), method="refit",
                             allocation="sensitivity", progress=False)
    assert report.settings["criterion"] == "obs" and report.settings["allocation"] == "sensitivity"
    assert "allocation" in report.stages and "reconstruction" in report.stages
    assert abs(report.ratio_achieved - 0.2) <= 0.01
    x = _calib(seed=7)
    assert torch.isfinite(model(x, labels=x).loss)
