"""What a ratio means: the warning on heavy cuts and ratios counted over prunable parameters."""

import pytest
import torch
from models import tiny_llama

import fastprune
from fastprune.errors import FastpruneError
from fastprune.select import prunable_params


def _calib(n=4, s=16):
    return torch.randint(0, 96, (n, s), generator=torch.Generator().manual_seed(0))


def _embedding_heavy(vocab=4000):
    """A model whose (untied) embeddings are most of its parameters, as a 262k-vocabulary model's are."""
    model = tiny_llama(layers=3, hidden=48, intermediate=64, heads=6, kv_heads=3, tied=False)
    model.resize_token_embeddings(vocab, mean_resizing=False)
    return model


def test_a_heavy_cut_warns_with_the_numbers_before_anything_changes():
    model = _embedding_heavy()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.warns(UserWarning, match=r"removes more than 40% of the prunable weights.*embeddings are 8\d%"):
        report = fastprune.prune(model, 0.06, calib=_calib(), layers=(0, 3), method="llm-pruner", dry_run=True,
                                 progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    meaning = report.settings["ratio_meaning"]
    assert meaning["embedding_share"] > 0.8 and meaning["max_layer_cut"] > 0.4
    assert set(meaning["layer_cut"]) == {0, 1, 2}


def test_ratio_of_prunable_counts_only_what_the_scope_can_remove():
    model = _embedding_heavy()
    graph = fastprune.discover(model)
    prunable = prunable_params(graph, "block", (0, 3))
    report = fastprune.prune(model, 0.3, calib=_calib(), layers=(0, 3), method="llm-pruner", ratio_of="prunable",
                             progress=False)
    removed = report.params_before - report.params_after
    assert abs(removed / prunable - 0.3) < 0.05
    assert report.settings["ratio_of"] == "prunable"
    assert max(report.settings["ratio_meaning"]["layer_cut"].values()) < 0.4 + 0.1


def test_a_moderate_ratio_does_not_warn():
    model = tiny_llama(layers=4, hidden=48, intermediate=64, heads=6, kv_heads=3)
    report = fastprune.prune(model, 0.05, calib=_calib(), layers=(0, 4), method="llm-pruner", progress=False)
    assert not any("prunable weights" in w for w in report.settings["warnings"])
    assert 0 < report.settings["ratio_meaning"]["max_layer_cut"] <= 0.4


def test_unknown_ratio_of_and_method_are_refused():
    model = tiny_llama()
    with pytest.raises(FastpruneError, match="ratio_of"):
        fastprune.prune(model, 0.1, calib=_calib(), ratio_of="layers", progress=False)
    with pytest.raises(FastpruneError, match="unknown method"):
        fastprune.prune(model, 0.1, calib=_calib(), method="flap", progress=False)
