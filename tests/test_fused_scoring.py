"""Opt-in fused scoring: Taylor partials of linear layers from their backward pass, the weight gradient never stored.

The Triton kernel is compared with a float64 oracle of |w * (gy^T x)| sums (on the CPU under Triton's
interpreter, on a GPU compiled), and ``score(fused_linear=True)`` with the stored-gradient path.
"""

import pytest
import torch
from kernel_backends import require
from models import tiny_llama

import fastprune.importance as importance
from fastprune.discover import discover
from fastprune.errors import FastpruneError
from fastprune.importance import score

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 2e-5, torch.bfloat16: 1e-4, torch.float16: 1e-4}


@pytest.fixture(autouse=True)
def triton_here():
    require("triton", DEVICE)


def _oracle(gy, x, w, row_block, col_block):
    p = w.double() * (gy.double().t() @ x.double())
    r, c = p.shape
    rows = torch.stack([p.abs(), p, p * p]).sum(2).view(3, r // row_block, row_block).sum(2)
    cols = torch.stack([p.abs(), p, p * p]).sum(1).view(3, c // col_block, col_block).sum(2)
    return rows, cols


@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize("shape,row_block,col_block,tiles", [
    ((37, 45, 70), 5, 7, {}), ((9, 16, 16), 1, 1, {}), ((70, 48, 40), 8, 4, dict(block_r=16, block_c=16, block_t=16)),
    ((33, 100, 30), 1, 1, dict(block_r=32, block_c=16, block_t=16)),
], ids=str)
def test_kernel_matches_the_oracle(dtype, shape, row_block, col_block, tiles):
    from fastprune.kernels.triton_fused_scoring import linear_taylor_accumulate

    t, r, c = shape
    gy = torch.randn(t, r, device=DEVICE).to(dtype)
    x = torch.randn(c, t, device=DEVICE).to(dtype).t()  # a transposed view: strides are honoured
    w = torch.randn(r, c, device=DEVICE).to(dtype)
    rows0, cols0 = torch.rand(3, r // row_block, device=DEVICE), torch.rand(3, c // col_block, device=DEVICE)
    rows, cols = rows0.clone(), cols0.clone()
    linear_taylor_accumulate(gy, x, w, rows, cols, row_block, col_block, **tiles)
    want_rows, want_cols = _oracle(gy, x, w, row_block, col_block)
    scale = max(want_rows[0].max().item(), want_cols[0].max().item())
    for got, start, want in ((rows, rows0, want_rows), (cols, cols0, want_cols)):
        torch.testing.assert_close((got - start).double().cpu(), want.cpu(), rtol=TOL[dtype], atol=TOL[dtype] * scale)


@pytest.mark.parametrize("criterion", ["element1", "vectorwise", "element2"])
def test_scores_match_the_stored_gradient_path(monkeypatch, criterion):
    model = tiny_llama(layers=2, tied=True).to(DEVICE)
    graph = discover(model)
    ids = torch.randint(0, 96, (3, 12), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    want = score(model, graph, ids, criterion, progress=False)
    streamed, fused = set(), set()
    real_add, real_linear = importance._Partials.add, importance._Partials.add_linear
    monkeypatch.setattr(importance._Partials, "add", lambda self, n, *a: (streamed.add(n), real_add(self, n, *a)))
    monkeypatch.setattr(importance._Partials, "add_linear",
                        lambda self, n, *a: (fused.add(n), real_linear(self, n, *a)))
    got = score(model, graph, ids, criterion, progress=False, fused_linear=True)
    linears = {f"{n}.weight" for n, m in model.named_modules() if type(m) is torch.nn.Linear}
    assert fused == linears - {"lm_head.weight"}  # the tied output embedding is shared: streamed
    assert not streamed & fused
    for name, t in want.groups.items():
        torch.testing.assert_close(got.groups[name], t, rtol=1e-4, atol=1e-5 * t.abs().max().item(), msg=name)
    torch.testing.assert_close(got.layer_scores, want.layer_scores, rtol=1e-4, atol=0)
    assert all(p.grad is None for p in model.parameters())


def test_micro_batches_of_element1_are_refused():
    model = tiny_llama(layers=1).to(DEVICE)
    ids = torch.randint(0, 96, (4, 8), device=DEVICE)
    with pytest.raises(FastpruneError, match="one backward pass"):
        score(model, discover(model), ids, "element1", batch_size=2, progress=False, fused_linear=True)
