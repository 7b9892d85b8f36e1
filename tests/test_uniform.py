"""uniform=True prunes only what the model's own config can express, and says what it left alone."""

import json
import warnings

import pytest
import torch
import transformers as T
from models import tiny_llama
from transformers import AutoModelForCausalLM

import fastprune
from fastprune.errors import FastpruneError
from fastprune.io import save_pruned

IDS = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(0))


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


def _vanilla_round_trip(model, report, directory):
    out = save_pruned(model, directory, report=report)
    config = json.loads((out / "config.json").read_text())
    assert "auto_map" not in config and "fastprune" not in config
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert torch.equal(_logits(loaded), _logits(model))


def test_bloom_config_expresses_no_block_pruning():
    torch.manual_seed(0)
    model = T.BloomForCausalLM(T.BloomConfig(vocab_size=96, hidden_size=48, n_layer=3, n_head=6)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(FastpruneError) as info:
        fastprune.prune(model, 0.1, criterion="l1", uniform=True, method="llm-pruner", progress=False)
    message = str(info.value)
    assert "BloomConfig cannot express any block-scope pruning" in message
    assert "attention heads: transformer.h.0.self_attention" in message
    assert "MLP channels: transformer.h.0.mlp.dense_4h_to_h.weight would be [48, 192]" in message
    assert "uniform=False" in message and "scope='layer'" in message
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # nothing was touched


def test_gpt_neox_prunes_mlp_channels_only_and_says_so(tmp_path):
    torch.manual_seed(0)
    model = T.GPTNeoXForCausalLM(T.GPTNeoXConfig(vocab_size=96, hidden_size=48, intermediate_size=80,
                                                 num_hidden_layers=3, num_attention_heads=6)).eval()
    with pytest.warns(UserWarning, match=r"GPTNeoXConfig cannot express pruned attention heads \(gpt_neox\.layers"):
        report = fastprune.prune(model, 0.1, criterion="l1", uniform=True, method="llm-pruner", progress=False)
    assert abs(report.ratio_achieved - 0.1) <= 0.01
    assert {(w["heads"], w["intermediate"]) for w in report.widths_after.values()} == {(6, 59)}
    assert any("left unpruned" in w for w in report.settings["warnings"])
    assert "warning: uniform=True: GPTNeoXConfig cannot express pruned attention heads" in report.summary()
    assert model.config.intermediate_size == 59
    _vanilla_round_trip(model, report, tmp_path / "ckpt")


def test_llama_uniform_prunes_heads_and_channels_without_warnings(tmp_path):
    model = tiny_llama(layers=4, hidden=72, intermediate=160, heads=6, kv_heads=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = fastprune.prune(model, 0.2, criterion="l1", uniform=True, method="llm-pruner", progress=False)
    assert report.settings["warnings"] == []
    widths = {(w["heads"], w["kv_heads"], w["intermediate"]) for w in report.widths_after.values()}
    assert len(widths) == 1
    heads, kv_heads, intermediate = widths.pop()
    assert heads < 6 and kv_heads < 3 and intermediate < 160
    _vanilla_round_trip(model, report, tmp_path / "ckpt")
