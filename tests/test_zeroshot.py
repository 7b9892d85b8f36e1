"""Offline zero-shot tasks: deterministic generation and correct accuracy (tiny model, character tokenizer)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from test_data import char_tokenizer
from transformers import LlamaConfig, LlamaForCausalLM

from fastprune import zeroshot
from fastprune.errors import FastpruneError

DOCS = [f"Document {d} begins here today. " + " ".join(
    f"Sentence {i} of document {d} says something rather plain about item {i * d}." for i in range(6))
    for d in range(8)]


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    return LlamaForCausalLM(config).eval()


def test_split_sentences_keeps_abbreviations():
    text = "Mr. Woodhouse was fond of _every_ body. J. S. Bach wrote music.\nIt rained."
    assert zeroshot.split_sentences(text) == ["Mr. Woodhouse was fond of every body.", "J. S. Bach wrote music.",
                                              "It rained."]


@pytest.mark.parametrize("kind", ["next_sentence", "continuation"])
def test_generation_is_deterministic_and_well_formed(kind):
    items = zeroshot.make_items(DOCS, kind, n_items=10, seed=3)
    assert items == zeroshot.make_items(DOCS, kind, n_items=10, seed=3)
    assert items != zeroshot.make_items(DOCS, kind, n_items=10, seed=4)
    sentences = {s for d in DOCS for s in zeroshot.split_sentences(d)}
    for item in items:
        assert len(item["choices"]) == 4 and len(set(item["choices"])) == 4
        answer = item["choices"][item["label"]]
        if kind == "next_sentence":
            assert answer in sentences and f"{item['context']} {answer}" in " ".join(DOCS)
        else:
            assert any(s.endswith(answer) and s.startswith(item["context"].split(". ")[-1]) for s in sentences)
    assert len({item["label"] for item in items}) > 1  # the answer's position varies


def test_offline_tasks_written_for_lm_eval(tmp_path):
    paths = zeroshot.write_offline_tasks(tmp_path, ["austen_continuation"], n_items=12, seed=0)
    items = zeroshot.read_items(paths["austen_continuation"])
    assert len(items) == 12 and items == zeroshot.offline_items("austen_continuation", n_items=12)
    yaml_text = (tmp_path / "austen_continuation.yaml").read_text()
    assert "fastprune_austen_continuation" in yaml_text and str(paths["austen_continuation"]) in yaml_text


def _reference_loglikelihood(model, tok, context: str, choice: str) -> float:
    """Sum of log p(choice tokens | context), one unpadded forward pass."""
    ctx = tok.encode(context)
    full = tok.encode(f"{context} {choice}")
    with torch.no_grad():
        logprobs = F.log_softmax(model(torch.tensor([full])).logits[0].float(), -1)
    return sum(float(logprobs[i - 1, full[i]]) for i in range(len(ctx), len(full)))


def test_accuracy_on_a_hand_made_task(model, tok):
    items = [{"context": "The cat sat on the", "choices": ["mat.", "moon tonight.", "a", "big red hat."]},
             {"context": "Water boils at one hundred", "choices": ["degrees.", "cats", "and then some more", "ok"]}]
    lls = [[_reference_loglikelihood(model, tok, it["context"], c) for c in it["choices"]] for it in items]
    for it, got in zip(items, lls):
        assert zeroshot.choice_loglikelihoods(model, tok, it["context"], it["choices"]) == \
            pytest.approx(got, abs=1e-4)
    items[0]["label"] = max(range(4), key=lambda i: lls[0][i])  # the model is right on item 0 ...
    items[1]["label"] = min(range(4), key=lambda i: lls[1][i])  # ... and wrong on item 1
    norm = [[ll / len(c) for ll, c in zip(row, it["choices"])] for row, it in zip(lls, items)]
    expected_norm = sum(max(range(4), key=lambda i: n[i]) == it["label"] for n, it in zip(norm, items)) / 2
    result = zeroshot.score_items(model, tok, items, progress=False)
    assert result.n == 2 and result.acc == 0.5 and result.acc_norm == expected_norm


@pytest.mark.skipif(not zeroshot.lm_eval_available(), reason="lm-eval is not installed")
def test_lm_eval_and_native_engines_agree(model, tok, tmp_path):
    kwargs = dict(limit=3, n_items=6, tasks_dir=tmp_path, progress=False)
    native = zeroshot.evaluate_zeroshot(model, tok, ["austen_next_sentence"], engine="native", **kwargs)
    harness = zeroshot.evaluate_zeroshot(model, tok, ["austen_next_sentence"], engine="lm-eval", **kwargs)
    assert native == harness and native["austen_next_sentence"].n == 3


def test_hub_tasks_offline_give_a_clear_error(model, tok, monkeypatch):
    monkeypatch.setattr(zeroshot, "hub_reachable", lambda timeout=3.0: False)
    # without lm-eval the first thing to fix, and the error, is the missing lm-eval
    match = "hub" if zeroshot.lm_eval_available() else "lm-eval is not installed"
    with pytest.raises(FastpruneError, match=match):
        zeroshot.evaluate_zeroshot(model, tok, ["boolq"], engine="auto" if zeroshot.lm_eval_available() else
                                   "lm-eval")


def test_resolve_tasks():
    assert zeroshot.resolve_tasks("offline") == list(zeroshot.OFFLINE_TASKS)
    assert zeroshot.resolve_tasks("piqa, wiki_continuation,piqa") == ["piqa", "wiki_continuation"]
    assert json.dumps(zeroshot.resolve_tasks("")) == "[]"


@pytest.mark.slow
def test_smollm2_beats_chance_on_offline_suite():
    from fastprune.models import load_model

    model, tokenizer = load_model("smollm2")
    results = zeroshot.evaluate_zeroshot(model, tokenizer, ["wiki_continuation"], limit=12, n_items=50, engine="native",
                                         progress=False)
    assert results["wiki_continuation"].n == 12 and results["wiki_continuation"].acc_norm > 0.5  # chance: 0.25
