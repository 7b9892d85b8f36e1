"""fastprune's ops on every available backend against the PyTorch reference.

Covers dtype x shape x layout (odd sizes, transposed and sliced views), accumulation into
non-zero accumulators, fresh outputs over a poisoned allocator, ``torch.library.opcheck``,
backend selection (``FASTPRUNE_BACKEND``, ``set_backend``, ``last_backend``) and input errors.
CUDA cases skip with a reason where there is no GPU or no CUDA build of the extension.
"""

import pytest
import torch

from fastprune import ops

HAS_CPP = "cpp" in ops.available_backends("cpu")
HAS_CUDA = torch.cuda.is_available() and "cuda" in ops.available_backends("cuda")

BACKENDS = [
    pytest.param(("reference", "cpu"), id="reference"),
    pytest.param(("cpp", "cpu"), id="cpp",
                 marks=pytest.mark.skipif(not HAS_CPP, reason="the C++ extension is not built")),
    pytest.param(("cuda", "cuda"), id="cuda", marks=[
        pytest.mark.cuda,
        pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU and the extension built with CUDA")]),
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Relative to the largest |w*g| sum.  Every backend multiplies in fp32 and accumulates in fp32,
# so only the summation order differs; fp16/bf16 products are even exact in fp32, while fp32
# products may round differently where a compiler fuses multiply-adds.
TAYLOR_TOL = {torch.float32: 2e-5, torch.float16: 1e-5, torch.bfloat16: 1e-5}
# (shape, row_block, col_block)
TAYLOR_SHAPES = [((37, 53), 1, 1), ((1, 7), 1, 7), ((130, 96), 13, 32), ((300, 70), 1, 5), ((64, 48), 16, 8)]
LAYOUTS = ["contiguous", "transposed", "sliced", "mixed"]


@pytest.fixture(params=BACKENDS)
def backend(request):
    name, device = request.param
    ops.set_backend(name)
    yield name, device
    ops.set_backend(None)


def _matrix(shape, layout, dtype, device):
    r, c = shape
    if layout == "transposed":
        x = torch.randn(c, r, device=device).t()
    elif layout == "sliced":
        x = torch.randn(r + 3, 2 * c + 1, device=device)[2:r + 2, 1::2]
    else:
        x = torch.randn(r, c, device=device)
    return x.to(dtype)


def _poison_allocator(nbytes, device):
    """Fill and free a block, so that an output the op allocates next starts as NaN garbage."""
    junk = torch.full((nbytes // 4 + 64,), float("nan"), device=device)
    del junk


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,row_block,col_block", TAYLOR_SHAPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_taylor_matches_reference(backend, dtype, shape, row_block, col_block, layout):
    name, device = backend
    weight = _matrix(shape, "transposed" if layout == "mixed" else layout, dtype, device)
    grad = _matrix(shape, "sliced" if layout == "mixed" else layout, dtype, device)
    r, c = shape
    rows = torch.rand(3, r // row_block, device=device) + 0.5  # non-zero: the op must add, not overwrite
    cols = torch.rand(3, c // col_block, device=device) + 0.5
    want_rows, want_cols = rows.clone(), cols.clone()
    ops.taylor_accumulate_reference(weight, grad, want_rows, want_cols, row_block, col_block)

    ops.taylor_accumulate_(weight, grad, rows, cols, row_block, col_block)
    assert ops.last_backend("taylor_accumulate_") == name
    scale = max(want_rows[0].abs().max().item(), want_cols[0].abs().max().item(), 1.0)
    tol = TAYLOR_TOL[dtype]
    torch.testing.assert_close(rows, want_rows, rtol=tol, atol=tol * scale)
    torch.testing.assert_close(cols, want_cols, rtol=tol, atol=tol * scale)


def test_taylor_strided_accumulators(backend):
    name, device = backend
    weight, grad = torch.randn(2, 24, 40, device=device).unbind(0)
    rows = torch.rand(6, 3, device=device).t()[:, ::2]  # (3, 3) with strides (1, 6)
    cols = torch.rand(3, 20, device=device)[:, ::2]  # (3, 10)
    want_rows, want_cols = rows.clone(), cols.clone()
    ops.taylor_accumulate_reference(weight, grad, want_rows, want_cols, 8, 4)
    ops.taylor_accumulate_(weight, grad, rows, cols, 8, 4)
    torch.testing.assert_close(rows, want_rows, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(cols, want_cols, rtol=1e-5, atol=1e-4)


def test_taylor_partials_deterministic(backend):
    _, device = backend
    weight, grad = torch.randn(2, 257, 129, device=device).unbind(0)
    first = ops.taylor_partials(weight, grad, 1, 3)
    second = ops.taylor_partials(weight, grad, 1, 3)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


GATHER_CASES = [  # (shape, layout, dim)
    ((37, 53), "contiguous", 0), ((37, 53), "contiguous", 1), ((37, 53), "transposed", 0),
    ((37, 53), "transposed", 1), ((37, 53), "sliced", 1), ((13,), "contiguous", 0),
    ((5, 7, 9), "contiguous", 1), ((5, 7, 9), "contiguous", -1), ((5, 7, 9), "permuted", 0),
    ((5, 7, 9), "permuted", 2), ((3, 4, 5, 6), "sliced", 2),
]


def _tensor(shape, layout, dtype, device):
    if layout == "transposed":
        return torch.randn(shape[::-1], device=device).t().to(dtype)
    if layout == "permuted":
        return torch.randn(shape[1], shape[2], shape[0], device=device).permute(2, 0, 1).to(dtype)
    if layout == "sliced":
        return torch.randn(*shape[:-1], 2 * shape[-1], device=device)[..., ::2].to(dtype)
    return torch.randn(shape, device=device).to(dtype)


def _kept(n, device):
    keep = torch.randperm(n)[: max(1, (2 * n) // 3)]
    return keep.sort().values.to(device)


@pytest.mark.parametrize("dtype", DTYPES + [torch.int64], ids=str)
@pytest.mark.parametrize("shape,layout,dim", GATHER_CASES)
def test_gather_matches_reference(backend, dtype, shape, layout, dim):
    name, device = backend
    src = _tensor(shape, layout, dtype, device) if dtype.is_floating_point else \
        torch.randint(1, 1000, shape, device=device)
    index = _kept(src.shape[dim], device)
    _poison_allocator(src.numel() * src.element_size(), device)
    out = ops.gather(src, dim, index)
    assert ops.last_backend("gather") == name
    assert out.is_contiguous()
    assert torch.equal(out, src.index_select(dim, index))


def test_gather_empty_index(backend):
    _, device = backend
    src = torch.randn(6, 5, device=device)
    out = ops.gather(src, 1, torch.empty(0, dtype=torch.long, device=device))
    assert out.shape == (6, 0)


def test_opcheck(backend):
    _, device = backend
    weight, grad = torch.randn(2, 12, 10, device=device).unbind(0)
    rows, cols = torch.rand(3, 6, device=device), torch.rand(3, 5, device=device)
    torch.library.opcheck(torch.ops.fastprune.taylor_accumulate_.default, (weight, grad, rows, cols, 2, 2))
    src = torch.randn(9, 11, device=device, dtype=torch.bfloat16)
    for dim in (0, 1):
        torch.library.opcheck(torch.ops.fastprune.gather.default, (src, dim, _kept(src.shape[dim], device)))


# ---------------------------------------------------------------- backend selection

@pytest.fixture
def clean_backend(monkeypatch):
    monkeypatch.delenv("FASTPRUNE_BACKEND", raising=False)
    ops.set_backend(None)
    yield monkeypatch
    ops.set_backend(None)


def _run_both():
    w, g = torch.randn(2, 4, 6).unbind(0)
    ops.taylor_partials(w, g)
    ops.gather(w, 0, torch.tensor([1, 3]))


def test_auto_prefers_cpp_on_cpu(clean_backend):
    assert ops.get_backend() == "auto"
    _run_both()
    want = "cpp" if HAS_CPP else "reference"
    assert ops.last_backend("taylor_accumulate_") == want
    assert ops.last_backend("gather") == want


def test_env_selects_backend(clean_backend):
    clean_backend.setenv("FASTPRUNE_BACKEND", "reference")
    _run_both()
    assert ops.last_backend("taylor_accumulate_") == "reference"
    assert ops.last_backend("gather") == "reference"


def test_set_backend_overrides_env(clean_backend):
    clean_backend.setenv("FASTPRUNE_BACKEND", "reference")
    if HAS_CPP:
        ops.set_backend("cpp")
        _run_both()
        assert ops.last_backend("gather") == "cpp"
    ops.set_backend(None)
    _run_both()
    assert ops.last_backend("gather") == "reference"


def test_bad_backend_names(clean_backend):
    with pytest.raises(ValueError, match="unknown backend"):
        ops.set_backend("fortran")
    clean_backend.setenv("FASTPRUNE_BACKEND", "fortran")
    with pytest.raises(ValueError, match="FASTPRUNE_BACKEND"):
        ops.get_backend()


def test_backend_without_kernel_for_device(clean_backend):
    ops.set_backend("cuda")
    with pytest.raises(RuntimeError, match="no gather kernel for cpu"):
        ops.gather(torch.randn(3, 3), 0, torch.tensor([0]))


# ---------------------------------------------------------------- input errors

def test_op_errors():
    w = torch.randn(6, 4)
    with pytest.raises(ValueError, match="grad the same shape"):
        ops.taylor_partials(w, torch.randn(4, 6))
    with pytest.raises(ValueError, match="must divide the shape"):
        ops.taylor_partials(w, w, 4, 1)
    with pytest.raises(ValueError, match=r"accumulators must be \(3, 6\)"):
        ops.taylor_accumulate_(w, w, torch.zeros(3, 5), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="float32"):
        ops.taylor_accumulate_(w, w, torch.zeros(3, 6, dtype=torch.float64), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="1-D int64"):
        ops.gather(w, 0, torch.tensor([0, 1], dtype=torch.int32))
    with pytest.raises(ValueError, match="out of range"):
        ops.gather(w, 2, torch.tensor([0]))


@pytest.mark.skipif(not HAS_CPP, reason="the C++ extension is not built")
def test_native_error_messages():
    from fastprune._native import _C

    w = torch.randn(6, 4)
    rows, cols = torch.zeros(3, 6), torch.zeros(3, 4)
    cases = [
        ((w, torch.randn(4, 6), rows, cols), r"grad must have weight's shape \[6, 4\]"),
        ((w, w.half(), rows, cols), "grad must have weight's dtype"),
        ((w.double(), w.double(), rows, cols), "weight must be float32, float16 or bfloat16"),
        ((w[0], w[0], rows, cols), "weight must be 2-D"),
        ((w, w, torch.zeros(3, 5), cols), r"rows must have shape \(3, 6\)"),
        ((w, w, rows, cols.half()), "cols must be float32"),
        ((w, w, rows, cols, 4, 1), "row_block 4 must be >= 1 and divide"),
    ]
    for args, message in cases:
        with pytest.raises(RuntimeError, match=message):
            _C.taylor_accumulate_cpu(*args)
    with pytest.raises(RuntimeError, match=r"index\[1\] = 9 is out of range \[0, 6\)"):
        _C.gather_cpu(w, 0, torch.tensor([0, 9]))
    with pytest.raises(RuntimeError, match="index must be a 1-D int64"):
        _C.gather_cpu(w, 0, torch.tensor([[0]]))
    with pytest.raises(RuntimeError, match="dim 3 is out of range"):
        _C.gather_cpu(w, 3, torch.tensor([0]))
