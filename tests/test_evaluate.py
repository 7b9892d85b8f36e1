"""Perplexity against a hand computation, and greedy generation, on a tiny random Llama."""

from __future__ import annotations

import math

import pytest
import torch
from test_data import char_tokenizer
from transformers import LlamaConfig, LlamaForCausalLM

from fastprune.errors import FastpruneError
from fastprune.evaluate import PerplexityResult, generate_sample, perplexity


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return LlamaForCausalLM(cfg).eval()


def manual_ppl(model, tokens: torch.Tensor, seq_len: int) -> float:
    """Mean of the per-window losses computed by the model itself, one window at a time."""
    windows = tokens.numel() // seq_len
    losses = []
    with torch.no_grad():
        for w in range(windows):
            ids = tokens.reshape(-1)[w * seq_len:(w + 1) * seq_len][None]
            losses.append(model(input_ids=ids, labels=ids).loss.double())
    return math.exp(float(torch.stack(losses).mean()))


def test_perplexity_matches_a_hand_computation(model):
    tokens = torch.randint(0, 128, (1, 7 * 16 + 5), generator=torch.Generator().manual_seed(1))
    result = perplexity(model, tokens, seq_len=16, batch_size=3, progress=False)
    assert isinstance(result, PerplexityResult)
    assert result.ppl == pytest.approx(manual_ppl(model, tokens, 16), rel=1e-5)
    assert math.log(result.ppl) == pytest.approx(result.nll)
    assert (result.windows, result.tokens, result.seq_len) == (7, 7 * 16, 16)
    assert result.seconds > 0 and result.tokens_per_s > 0
    assert "ppl" in str(result) and result.to_dict()["windows"] == 7


def test_perplexity_ignores_batch_size_and_accepts_1d(model):
    tokens = torch.randint(0, 128, (100,), generator=torch.Generator().manual_seed(2))
    one = perplexity(model, tokens, seq_len=20, batch_size=1, progress=False)
    many = perplexity(model, tokens[None], seq_len=20, batch_size=8, progress=False)
    assert one.ppl == pytest.approx(many.ppl, rel=1e-5)


def test_perplexity_max_windows(model):
    tokens = torch.randint(0, 128, (1, 200), generator=torch.Generator().manual_seed(3))
    result = perplexity(model, tokens, seq_len=10, max_windows=4, progress=False)
    assert result.windows == 4
    assert result.ppl == pytest.approx(manual_ppl(model, tokens[:, :40], 10), rel=1e-5)


def test_random_model_is_near_uniform_and_restores_training_mode(model):
    tokens = torch.randint(0, 128, (1, 256), generator=torch.Generator().manual_seed(4))
    model.train()
    try:
        result = perplexity(model, tokens, seq_len=32, progress=False)
        assert model.training
    finally:
        model.eval()
    assert 64 < result.ppl < 256  # an untrained model is close to uniform over 128 tokens


@pytest.mark.parametrize("tokens, seq_len, message", [
    (torch.randint(0, 128, (1, 10)), 16, "fewer than one window"),
    (torch.randint(0, 128, (1, 64)), 1, "seq_len >= 2"),
    (torch.full((1, 64), 500), 16, "outside the vocabulary"),
    (torch.rand(1, 64), 16, "torch.long"),
])
def test_perplexity_input_errors(model, tokens, seq_len, message):
    with pytest.raises(FastpruneError, match=message):
        perplexity(model, tokens, seq_len=seq_len, progress=False)


def greedy_by_hand(model, ids: torch.Tensor, steps: int) -> list[int]:
    out = []
    with torch.no_grad():
        for _ in range(steps):
            nxt = int(model(input_ids=ids, use_cache=False).logits[0, -1].argmax())
            if nxt == model.generation_config.eos_token_id:
                break
            out.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return out


def test_generate_sample_is_greedy(model):
    tok = char_tokenizer()
    prompt = "The capital of France is"
    text = generate_sample(model, tok, prompt, max_new_tokens=8)
    expected = greedy_by_hand(model, tok(prompt, return_tensors="pt")["input_ids"], 8)
    assert text == tok.decode(expected, skip_special_tokens=True)
    assert text == generate_sample(model, tok, prompt, max_new_tokens=8)


def test_generate_sample_with_chat_template(model):
    tok = char_tokenizer()
    text = generate_sample(model, tok, "Hi", max_new_tokens=6, chat_template=True)
    ids = tok("<user>Hi</user>", add_special_tokens=False, return_tensors="pt")["input_ids"]
    assert text == tok.decode(greedy_by_hand(model, ids, 6), skip_special_tokens=True)
