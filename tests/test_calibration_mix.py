"""Calibration mixes for reconstruction, the generic sources, and BOS-started windows and perplexity."""

import pytest
import torch
from models import tiny_llama
from test_data import char_tokenizer

from fastprune import data
from fastprune.errors import FastpruneError
from fastprune.evaluate import perplexity


@pytest.fixture
def tok():
    return char_tokenizer()


@pytest.mark.parametrize("source", ["alpaca", "melville"])
def test_generic_sources_have_disjoint_splits(source):
    calib, held_out = data.load_texts(source, "calib"), data.load_texts(source, "eval")
    assert calib and held_out and not set(calib) & set(held_out)


def test_the_generic_mix_draws_evenly_from_each_source_and_never_from_austen(tok):
    batch = data.calibration_batch(tok, "generic", n_samples=7, seq_len=40, seed=3)
    assert batch.shape == (7, 40)
    texts = [tok.decode(row) for row in batch]
    pools = {src: "\n\n".join(data.load_texts(src, "calib")) for src in data.GENERIC_MIX}
    origin = [next(src for src, pool in pools.items() if t in pool) for t in texts]
    assert origin == ["wiki"] * 3 + ["alpaca"] * 2 + ["melville"] * 2
    austen = "\n\n".join(data.load_texts("austen", "calib") + data.load_texts("austen", "eval"))
    assert not any(t in austen for t in texts)
    again = data.calibration_batch(tok, ["wiki", "alpaca", "melville"], n_samples=7, seq_len=40, seed=3)
    assert torch.equal(batch, again)


def test_a_single_source_is_unchanged_by_the_mix_code(tok):
    """One source keeps LLM-Pruner's sampling (the golden plans depend on it)."""
    import random

    batch = data.calibration_batch(tok, "austen", n_samples=4, seq_len=30, seed=1)
    rng = random.Random(1)
    texts = data.load_texts("austen", "calib")
    order = list(range(len(texts)))
    rng.shuffle(order)
    first = next(tok(texts[i], add_special_tokens=False)["input_ids"] for i in order
                 if len(tok(texts[i], add_special_tokens=False)["input_ids"]) >= 30)
    start = rng.randrange(len(first) - 30 + 1)
    assert batch[0].tolist() == first[start:start + 30]


def test_an_empty_mix_is_refused(tok):
    with pytest.raises(FastpruneError, match="empty list"):
        data.calibration_batch(tok, [], n_samples=2, seq_len=8)


def test_bos_starts_every_window_when_asked_or_when_the_tokenizer_adds_one(tok):
    tok.bos_token = "<unk>"  # a BOS id the char tokenizer has, not added by it
    plain = data.calibration_batch(tok, "wiki", n_samples=3, seq_len=20, seed=0, bos=None)
    assert not data.adds_bos(tok) and not (plain[:, 0] == tok.bos_token_id).all()
    with_bos = data.calibration_batch(tok, "wiki", n_samples=3, seq_len=20, seed=0, bos=True)
    assert with_bos.shape == (3, 20) and (with_bos[:, 0] == tok.bos_token_id).all()
    assert torch.equal(with_bos[:, 1:], data.calibration_batch(tok, "wiki", n_samples=3, seq_len=19, seed=0))


def test_perplexity_with_bos_scores_the_same_text_tokens():
    model = tiny_llama()
    tokens = torch.randint(3, 96, (1, 190), generator=torch.Generator().manual_seed(0))
    plain = perplexity(model, tokens, seq_len=20, progress=False)
    with_bos = perplexity(model, tokens, seq_len=20, progress=False, bos_token_id=1)
    assert plain.windows == 9 and with_bos.windows == 10  # 190 // 20 and 190 // 19 text tokens per window
    # the oracle: each window is BOS + 19 text tokens, the loss over those 19 tokens
    text = tokens[0, :190].view(10, 19)
    ids = torch.cat([torch.ones(10, 1, dtype=torch.long), text], 1)
    with torch.no_grad():
        logits = model(ids).logits[:, :-1]
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    assert with_bos.nll == pytest.approx(nll.item(), rel=1e-5)
