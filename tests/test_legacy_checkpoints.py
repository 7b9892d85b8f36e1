"""Checkpoints written before the width record (tests/data/legacy_checkpoints) still load, and save anew."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from fastprune.io import load_pruned, save_pruned

DATA = Path(__file__).parent / "data" / "legacy_checkpoints"
EXPECTED = load_file(DATA / "expected.safetensors")
NAMES = ["llama_untied", "llama_tied", "bloom"]


def _logits(model):
    with torch.no_grad():
        return model(EXPECTED["input_ids"]).logits


def _linear_sizes_follow_weights(model):
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            assert (module.out_features, module.in_features) == tuple(module.weight.shape), name


@pytest.mark.parametrize("name", NAMES)
def test_legacy_checkpoint_loads_with_both_loaders(name):
    spec = json.loads((DATA / name / "config.json").read_text())["fastprune"]
    assert "attributes" in spec and "widths" not in spec  # the old format: every differing attribute as a value
    expected = EXPECTED[f"{name}.logits"]
    loaded, _ = load_pruned(DATA / name)
    torch.testing.assert_close(_logits(loaded), expected, rtol=1e-5, atol=1e-5)
    _linear_sizes_follow_weights(loaded)
    remote = AutoModelForCausalLM.from_pretrained(DATA / name, trust_remote_code=True).eval()  # its own old loader
    torch.testing.assert_close(_logits(remote), expected, rtol=1e-5, atol=1e-5)


def test_legacy_llama_has_the_widths_its_record_states():
    loaded, _ = load_pruned(DATA / "llama_untied")
    record = loaded.config.fastprune_layer_widths
    assert record == {"0": {"heads": 2, "kv_heads": 1, "intermediate": 12},
                      "1": {"heads": 4, "kv_heads": 2, "intermediate": 16}}
    for i, layer in enumerate(loaded.model.layers):
        head_dim = loaded.config.head_dim
        assert layer.self_attn.q_proj.out_features == record[str(i)]["heads"] * head_dim
        assert layer.self_attn.k_proj.out_features == record[str(i)]["kv_heads"] * head_dim
        assert layer.mlp.up_proj.out_features == record[str(i)]["intermediate"]
    assert loaded.config.hidden_size == loaded.model.embed_tokens.embedding_dim == 12


@pytest.mark.parametrize("name", NAMES)
def test_legacy_checkpoint_saves_in_the_new_format(tmp_path, name):
    loaded, _ = load_pruned(DATA / name)
    expected = _logits(loaded)
    out = save_pruned(loaded, tmp_path / name)
    config = json.loads((out / "config.json").read_text())
    attributes = config["fastprune"]["attributes"]
    assert not any({"in_features", "out_features"} & set(attrs) for attrs in attributes.values())  # read off weights
    assert config["fastprune_layer_widths"] == loaded.config.fastprune_layer_widths
    assert torch.equal(_logits(load_pruned(out)[0]), expected)
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()), expected)
