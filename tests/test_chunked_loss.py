"""The chunked calibration loss equals the one-shot loss (value and every gradient) and never holds all logits."""

import pytest
import test_families
import torch
import torch.nn.functional as F
from models import tiny_llama
from torch.utils._python_dispatch import TorchDispatchMode

from fastprune.chunked_loss import chunked_lm_loss
from fastprune.discover import discover
from fastprune.errors import FastpruneError
from fastprune.importance import score


def _ids(n=3, s=11, seed=0):
    return torch.randint(0, 96, (n, s), generator=torch.Generator().manual_seed(seed))


def _reference_loss(model, ids):
    logits = model(input_ids=ids, use_cache=False).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def _grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("chunk", [1, 7, 1000])
def test_value_and_gradients_match_the_one_shot_loss(tied, chunk):
    model = tiny_llama(layers=2, tied=tied).double()  # the logits are fp32 in both losses: fp32-level agreement
    ids = _ids()
    want = _reference_loss(model, ids)
    got = chunked_lm_loss(model, ids, chunk, set())
    torch.testing.assert_close(got.double(), want.double(), rtol=1e-6, atol=0)
    want_grads, got_grads = _grads(model, want), _grads(model, got)
    assert model.get_input_embeddings().sparse is False  # restored
    for name, g in want_grads.items():
        assert got_grads[name].layout == torch.strided, name
        torch.testing.assert_close(got_grads[name], g, rtol=1e-5, atol=1e-6 * g.abs().max().item(), msg=name)


class _LargestOutput(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_the_full_logits_never_exist():
    model = tiny_llama(layers=1, hidden=16, intermediate=24, heads=2, kv_heads=1)
    ids = _ids(n=4, s=64)
    chunked_lm_loss(model, ids, 16, set())  # the first call checks the model on a few tokens
    with _LargestOutput() as seen:
        loss = chunked_lm_loss(model, ids, 16, {id(model)})
        loss.backward()
    vocab, tokens = 96, 4 * 63
    assert seen.largest < tokens * vocab / 2  # chunks of 16 tokens: 16 x 96 logits at a time
    assert seen.largest >= 16 * vocab


def test_scores_match_the_default_loss():
    model = tiny_llama(layers=2)
    graph = discover(model)
    ids = _ids(n=4, s=16)
    for criterion in ("element1", "vectorwise", "element2"):
        want = score(model, graph, ids, criterion, progress=False)
        got = score(model, graph, ids, criterion, progress=False, loss_chunk=5)
        assert got.settings["loss_chunk"] == 5
        for name, t in want.groups.items():
            torch.testing.assert_close(got.groups[name], t, rtol=1e-4, atol=1e-6 * t.abs().max().item())


def test_models_whose_logits_are_not_the_head_are_refused():
    model = test_families._make("gemma2")  # final logit soft-capping
    assert model.config.final_logit_softcapping
    with pytest.raises(FastpruneError, match="soft-capping"):
        chunked_lm_loss(model, _ids(), 8, set())
    with pytest.raises(FastpruneError, match="positive number of tokens"):
        chunked_lm_loss(tiny_llama(layers=1), _ids(), 0, set())
