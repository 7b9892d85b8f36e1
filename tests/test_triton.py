"""The Triton kernels on their own: launch configurations that reach the multi-tile paths, against the oracles.

On a machine without a GPU they run under Triton's interpreter (``tests/conftest.py`` sets
``TRITON_INTERPRET=1`` before anything defines them); ``FASTPRUNE_REQUIRE_TRITON=1`` (``make test``)
makes a skip here a failure.  With ``TRITON_INTERPRET=0`` on a GPU the same tests check the compiled
kernels.  The ops-level cases (every backend, through the dispatcher) are in ``test_ops.py``.
"""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from kernel_backends import require, triton_interpreted
from oracles import DTYPES, LAYOUTS, assert_taylor_close, gather_oracle, kept, matrix

from fastprune import backends

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def device():
    try:
        interpreted = triton_interpreted()
    except ImportError:
        interpreted = False
    dev = "cpu" if interpreted or not torch.cuda.is_available() else "cuda"
    require("triton", dev)
    return dev


@pytest.fixture(scope="module")
def kernels(device):
    from fastprune.kernels import triton_gather, triton_taylor

    return triton_taylor.taylor_accumulate, triton_gather.gather


@pytest.fixture
def poisoned_empty(monkeypatch):
    """``torch.empty`` hands out NaN-filled (or -7) tensors, so any slot a kernel forgets shows up."""
    real = torch.empty

    def empty(*args, **kwargs):
        t = real(*args, **kwargs)
        return t.fill_(math.nan) if t.is_floating_point() else t.fill_(-7)

    monkeypatch.setattr(torch, "empty", empty)


TAYLOR_CASES = [((37, 53), 1, 1), ((1, 7), 1, 7), ((65, 130), 5, 2), ((48, 40), 16, 8)]
# The default launch, and small tiles with several column programs per row strip.
CONFIGS = {"default": {}, "small-tiles": dict(block_r=16, block_c=16, split_c=3)}


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,row_block,col_block", TAYLOR_CASES, ids=str)
def test_taylor_tiles(kernels, device, shape, row_block, col_block, dtype, layout, config, poisoned_empty):
    taylor, _ = kernels
    w = matrix(shape, dtype, layout, device)
    g = matrix(shape, dtype, "sliced" if layout == "contiguous" else "contiguous", device)
    rows0 = torch.randn(3, shape[0] // row_block, device=device)
    cols0 = torch.randn(3, shape[1] // col_block, device=device)
    rows, cols = rows0.clone(), cols0.clone()
    taylor(w, g, rows, cols, row_block, col_block, **CONFIGS[config])
    assert_taylor_close(rows, cols, rows0, cols0, w, g, row_block, col_block)


@pytest.mark.parametrize("kind", ("random", "all", "one", "empty"))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dim", (0, 1, -1))
@pytest.mark.parametrize("shape", [(37, 53), (1, 7), (65, 130)], ids=str)
def test_gather_2d(kernels, device, shape, dim, layout, kind, poisoned_empty):
    _, gather = kernels
    src = matrix(shape, torch.float32, layout, device)
    index = kept(src.shape[dim], kind, device)
    out = gather(src, dim, index)
    assert out.is_contiguous() and torch.equal(out, gather_oracle(src, dim, index))  # NaN poison would fail


@pytest.mark.parametrize("dtype", (*DTYPES, torch.int64, torch.bool, torch.uint8), ids=str)
@pytest.mark.parametrize("dim", (0, 1))
def test_gather_dtypes(kernels, device, dtype, dim, poisoned_empty):
    _, gather = kernels
    src = matrix((37, 53), torch.float32, "transposed", device).mul(3).to(dtype)
    index = kept(src.shape[dim], device=device)
    assert torch.equal(gather(src, dim, index), gather_oracle(src, dim, index))


@pytest.mark.parametrize("dim", (0, 1))
def test_gather_small_tiles(kernels, device, dim, poisoned_empty):
    _, gather = kernels
    src = matrix((65, 130), torch.bfloat16, "sliced", device)
    index = kept(src.shape[dim], device=device)
    assert torch.equal(gather(src, dim, index, block_m=4, block_n=16), gather_oracle(src, dim, index))


@pytest.mark.parametrize("dim", (0, 1, 2, -2))
def test_gather_nd(kernels, device, dim, poisoned_empty):
    _, gather = kernels
    src = torch.randn(5, 6, 7, device=device)
    for view in (src, src.permute(2, 0, 1)):  # the permuted view cannot be merged: index_select
        index = kept(view.shape[dim], device=device)
        out = gather(view, dim, index)
        assert out.is_contiguous() and torch.equal(out, gather_oracle(view, dim, index))


@pytest.mark.parametrize("dim,bad", [(0, [2, 37]), (1, [-3, 4]), (1, [0, 53])])
def test_gather_refuses_out_of_range_indices(kernels, device, dim, bad):
    if device == "cuda":
        pytest.skip("a device-side error ends the CUDA context; test_ops.py checks it in a subprocess")
    _, gather = kernels
    src = matrix((37, 53), torch.float32, "contiguous", device)
    with pytest.raises(RuntimeError, match=r"out of range \[0, (37|53)\)"):
        gather(src, dim, torch.tensor(bad, device=device))


def test_registered_where_it_can_run(device):
    assert "triton" in backends.available(device)
    assert "triton" in backends.available("cuda")  # compiled for a GPU, whether or not this machine has one


def _python(code, **env):
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": path, **env}, timeout=300)
    assert proc.returncode == 0, proc.stderr


def test_importing_does_not_initialise_cuda(device):
    _python("import torch, fastprune\nfrom fastprune.kernels import triton_gather, triton_taylor\n"
            "assert not torch.cuda.is_initialized()\n", TRITON_INTERPRET="0")


def test_without_triton_nothing_is_registered(device):
    _python("import sys\nsys.modules['triton'] = None\nimport fastprune\nfrom fastprune import backends\n"
            "assert 'triton' not in backends.available('cpu') + backends.available('cuda')\n"
            "assert backends.active('gather', 'cuda') in ('cuda', 'reference')\n")
