"""Triton kernels vs the PyTorch references, on the CPU through Triton's interpreter.

``TRITON_INTERPRET=1`` must be set before the kernels are defined, hence the top of the module.
Run with ``TRITON_INTERPRET=0`` on a GPU machine, the same tests check the compiled kernels.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import math  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton", reason="Triton is not installed")

from fastprune import ops  # noqa: E402

try:
    from fastprune.kernels import registry  # noqa: F401  (registers the triton backend)
    from fastprune.kernels.gather import gather
    from fastprune.kernels.taylor import _taylor_partials_kernel, taylor_accumulate
except ImportError:
    from kernels import registry  # noqa: F401
    from kernels.gather import gather
    from kernels.taylor import _taylor_partials_kernel, taylor_accumulate

if type(_taylor_partials_kernel).__name__ == "InterpretedFunction":
    DEVICE = "cpu"
elif torch.cuda.is_available():
    DEVICE = "cuda"
else:
    pytest.skip("the Triton kernels were defined without TRITON_INTERPRET=1 and there is no GPU",
                allow_module_level=True)

REPO = Path(__file__).resolve().parents[1]
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# w*g and (w*g)^2 are formed in fp32 from the same inputs as the reference (exactly, for fp16
# and bf16 inputs), so only the fp32 summation order differs and the tolerances agree.
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-4), torch.float16: dict(rtol=1e-5, atol=1e-4),
       torch.bfloat16: dict(rtol=1e-5, atol=1e-4)}
LAYOUTS = ("contiguous", "transposed", "sliced")


def _matrix(shape, dtype, layout="contiguous"):
    """A fresh random (R, C) tensor: contiguous, a transposed view, or a strided slice."""
    r, c = shape
    if layout == "contiguous":
        return torch.randn(r, c, dtype=dtype, device=DEVICE)
    if layout == "transposed":
        return torch.randn(c, r, dtype=dtype, device=DEVICE).t()
    return torch.randn(2 * r + 1, c + 3, dtype=dtype, device=DEVICE)[1::2, 2:-1]


def _sorted_subset(n, kind="random"):
    if kind == "all":
        return torch.arange(n, device=DEVICE)
    if kind == "empty":
        return torch.empty(0, dtype=torch.long, device=DEVICE)
    if kind == "one":
        return torch.randint(n, (1,), device=DEVICE)
    keep = torch.rand(n) < 0.6
    keep[torch.randint(n, (1,))] = True  # never empty
    return keep.nonzero().flatten().to(DEVICE)


@pytest.fixture
def poisoned_empty(monkeypatch):
    """``torch.empty`` hands out NaN-filled tensors, so any slot a kernel forgets shows up."""
    real = torch.empty

    def empty(*args, **kwargs):
        t = real(*args, **kwargs)
        return t.fill_(math.nan) if t.is_floating_point() else t.fill_(-7)

    monkeypatch.setattr(torch, "empty", empty)


@pytest.fixture
def triton_backend():
    ops.set_backend("triton")
    yield
    ops.set_backend(None)


# ---------------------------------------------------------------- taylor

def _check_taylor(w, g, row_block, col_block, run):
    """Run ``run`` on random (not zero) accumulators and compare with the reference."""
    r, c = w.shape
    rows0 = torch.randn(3, r // row_block, device=DEVICE)
    cols0 = torch.randn(3, c // col_block, device=DEVICE)
    rows, cols = rows0.clone(), cols0.clone()
    run(w, g, rows, cols, row_block, col_block)
    ref_rows, ref_cols = rows0.clone(), cols0.clone()
    ops.taylor_accumulate_reference(w, g, ref_rows, ref_cols, row_block, col_block)
    tol = TOL[w.dtype]
    torch.testing.assert_close(rows, ref_rows, **tol)
    torch.testing.assert_close(cols, ref_cols, **tol)
    torch.testing.assert_close(rows - rows0, ref_rows - rows0, **tol)  # the increment itself
    torch.testing.assert_close(cols - cols0, ref_cols - cols0, **tol)


TAYLOR_CASES = [((37, 53), 1, 1), ((1, 7), 1, 7), ((65, 130), 5, 2), ((48, 40), 16, 8)]
# The default launch and small tiles with several column programs per row strip.
CONFIGS = {"default": {}, "small-tiles": dict(block_r=16, block_c=16, split_c=3)}


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,row_block,col_block", TAYLOR_CASES, ids=str)
def test_taylor_matches_reference(shape, row_block, col_block, dtype, layout, config, poisoned_empty):
    w = _matrix(shape, dtype, layout)
    g = _matrix(shape, dtype, "sliced" if layout == "contiguous" else "contiguous")
    _check_taylor(w, g, row_block, col_block,
                  lambda *args: taylor_accumulate(*args, **CONFIGS[config]))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_taylor_through_op(dtype, triton_backend):
    w, g = _matrix((65, 130), dtype, "transposed"), _matrix((65, 130), dtype)
    _check_taylor(w, g, 5, 2, ops.taylor_accumulate_)
    assert ops.last_backend("taylor_accumulate_") == "triton"


def test_taylor_partials_through_op(triton_backend):
    w, g = _matrix((37, 53), torch.float32), _matrix((37, 53), torch.float32)
    rows, cols = ops.taylor_partials(w, g)
    ref_rows, ref_cols = torch.zeros_like(rows), torch.zeros_like(cols)
    ops.taylor_accumulate_reference(w, g, ref_rows, ref_cols)
    torch.testing.assert_close(rows, ref_rows, **TOL[torch.float32])
    torch.testing.assert_close(cols, ref_cols, **TOL[torch.float32])


def test_taylor_rejects_bad_blocks():
    w = _matrix((6, 4), torch.float32)
    with pytest.raises(ValueError, match="blocks"):
        taylor_accumulate(w, w, torch.zeros(3, 1, device=DEVICE), torch.zeros(3, 4, device=DEVICE), 4, 1)


# ---------------------------------------------------------------- gather

GATHER_SHAPES = [(37, 53), (1, 7), (65, 130)]


@pytest.mark.parametrize("kind", ("random", "all", "one", "empty"))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dim", (0, 1, -1))
@pytest.mark.parametrize("shape", GATHER_SHAPES, ids=str)
def test_gather_2d(shape, dim, layout, kind, poisoned_empty):
    src = _matrix(shape, torch.float32, layout)
    index = _sorted_subset(src.shape[dim], kind)
    out = gather(src, dim, index)
    ref = ops.gather_reference(src, dim, index)
    assert out.shape == ref.shape and out.is_contiguous()
    assert torch.equal(out, ref)  # NaN poison left anywhere would fail here


@pytest.mark.parametrize("dtype", (*DTYPES, torch.int64, torch.bool, torch.uint8), ids=str)
@pytest.mark.parametrize("dim", (0, 1))
def test_gather_dtypes(dtype, dim, poisoned_empty):
    src = _matrix((37, 53), torch.float32, "transposed").mul(3).to(dtype)
    index = _sorted_subset(src.shape[dim])
    assert torch.equal(gather(src, dim, index), ops.gather_reference(src, dim, index))


@pytest.mark.parametrize("dim", (0, 1))
def test_gather_small_tiles(dim, poisoned_empty):
    src = _matrix((65, 130), torch.bfloat16, "sliced")
    index = _sorted_subset(src.shape[dim])
    out = gather(src, dim, index, block_m=4, block_n=16)
    assert torch.equal(out, ops.gather_reference(src, dim, index))


def test_gather_1d(poisoned_empty):
    src = torch.randn(101, device=DEVICE)[::2]
    index = _sorted_subset(src.numel())
    assert torch.equal(gather(src, 0, index), src[index])


@pytest.mark.parametrize("dim", (0, 1, 2, -2))
def test_gather_nd(dim, poisoned_empty):
    src = torch.randn(5, 6, 7, device=DEVICE)
    for view in (src, src.permute(2, 0, 1)):  # the permuted view takes the reference fallback
        index = _sorted_subset(view.shape[dim])
        out = gather(view, dim, index)
        assert out.is_contiguous() and torch.equal(out, ops.gather_reference(view, dim, index))


@pytest.mark.parametrize("dim", (0, 1))
def test_gather_through_op(dim, triton_backend):
    src = _matrix((65, 130), torch.float16, "transposed")
    index = _sorted_subset(src.shape[dim])
    out = ops.gather(src, dim, index)
    assert ops.last_backend("gather") == "triton"
    assert torch.equal(out, ops.gather_reference(src, dim, index))


def test_opcheck(triton_backend):
    w, g = _matrix((9, 12), torch.float32), _matrix((9, 12), torch.float32)
    rows, cols = torch.randn(3, 3, device=DEVICE), torch.randn(3, 4, device=DEVICE)
    torch.library.opcheck(ops.taylor_accumulate_, (w, g, rows, cols, 3, 3))
    torch.library.opcheck(ops.gather, (w, 1, _sorted_subset(12)))


# ---------------------------------------------------------------- registry

def test_registry_registers_interpreter_backend():
    assert "triton" in ops.available_backends(DEVICE)


def _run_python(code, **env):
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": path, **env}, timeout=120)
    assert proc.returncode == 0, proc.stderr


_IMPORT_REGISTRY = (
    "try:\n    import fastprune.kernels.registry\n"
    "except ImportError:\n    import kernels.registry\n"
)


def test_registry_does_not_initialise_cuda():
    _run_python("import torch\n" + _IMPORT_REGISTRY + "assert not torch.cuda.is_initialized()\n",
                TRITON_INTERPRET="0")


def test_registry_without_triton_registers_nothing():
    _run_python("import sys\nsys.modules['triton'] = None\nfrom fastprune import ops\n" + _IMPORT_REGISTRY
                + "assert 'triton' not in ops.available_backends('cpu') + ops.available_backends('cuda')\n")
