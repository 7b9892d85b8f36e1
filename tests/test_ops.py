"""fastprune's ops on every backend against oracles written in the tests (``tests/oracles.py``).

Backends: the reference, C++ (CPU), Triton (the CPU under its interpreter; CUDA) and CUDA, each forced
with ``fastprune.backends.use``.  Cases: fp32/fp16/bf16 (and integer/bool gathers), odd and
non-power-of-two shapes, transposed and sliced views, accumulation into non-zero accumulators,
outputs over a poisoned allocator, ``torch.library.opcheck``, out-of-range indices, and on a GPU the
shapes that reach the CUDA kernels' 16-byte row path and grid-stride loops.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from kernel_backends import CASES, require
from oracles import DTYPES, LAYOUTS, assert_taylor_close, gather_oracle, kept, matrix, poison_allocator

from fastprune import backends, ops

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(params=CASES, ids=[f"{b}-{d}" for b, d in CASES])
def backend(request):
    name, device = request.param
    require(name, device)
    with backends.use(name):
        yield name, device


# ---------------------------------------------------------------- taylor

TAYLOR_SHAPES = [((37, 53), 1, 1), ((1, 7), 1, 7), ((130, 96), 13, 32), ((300, 70), 1, 5), ((64, 48), 16, 8)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,row_block,col_block", TAYLOR_SHAPES, ids=str)
@pytest.mark.parametrize("layout", [*LAYOUTS, "mixed"])
def test_taylor_matches_oracle(backend, dtype, shape, row_block, col_block, layout):
    _, device = backend
    w = matrix(shape, dtype, "transposed" if layout == "mixed" else layout, device)
    g = matrix(shape, dtype, "sliced" if layout == "mixed" else layout, device)
    rows0 = torch.rand(3, shape[0] // row_block, device=device) + 0.5  # the op must add, not overwrite
    cols0 = torch.rand(3, shape[1] // col_block, device=device) + 0.5
    rows, cols = rows0.clone(), cols0.clone()
    ops.taylor_accumulate_(w, g, rows, cols, row_block, col_block)
    assert_taylor_close(rows, cols, rows0, cols0, w, g, row_block, col_block)


def test_taylor_strided_accumulators(backend):
    _, device = backend
    w, g = torch.randn(2, 24, 40, device=device).unbind(0)
    rows = torch.rand(6, 3, device=device).t()[:, ::2]  # (3, 3) with strides (1, 6)
    cols = torch.rand(3, 20, device=device)[:, ::2]  # (3, 10)
    rows0, cols0 = rows.clone(), cols.clone()
    ops.taylor_accumulate_(w, g, rows, cols, 8, 4)
    assert_taylor_close(rows, cols, rows0, cols0, w, g, 8, 4)


def test_taylor_is_deterministic(backend):
    _, device = backend
    w, g = torch.randn(2, 257, 129, device=device).unbind(0)
    first, second = ops.taylor_partials(w, g, 1, 3), ops.taylor_partials(w, g, 1, 3)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


# ---------------------------------------------------------------- gather

GATHER_CASES = [  # (shape, layout, dim)
    ((37, 53), "contiguous", 0), ((37, 53), "contiguous", 1), ((37, 53), "transposed", 0),
    ((37, 53), "transposed", 1), ((37, 53), "sliced", 1), ((13,), "contiguous", 0),
    ((5, 7, 9), "contiguous", 1), ((5, 7, 9), "contiguous", -1), ((5, 7, 9), "permuted", 0),
    ((5, 7, 9), "permuted", 2), ((3, 4, 5, 6), "sliced", 2),
]


def _tensor(shape, layout, dtype, device):
    if not dtype.is_floating_point:
        base = torch.randint(-1000, 1000, (2 * max(shape),) * len(shape), device=device)
        return base[tuple(slice(0, n) for n in shape)].to(dtype) if dtype != torch.bool else \
            base[tuple(slice(0, n) for n in shape)] > 0
    if layout == "transposed":
        return torch.randn(shape[::-1], device=device).to(dtype).t()
    if layout == "permuted":
        return torch.randn(shape[1], shape[2], shape[0], device=device).to(dtype).permute(2, 0, 1)
    if layout == "sliced":
        return torch.randn(*shape[:-1], 2 * shape[-1], device=device).to(dtype)[..., ::2]
    return torch.randn(shape, device=device).to(dtype)


@pytest.mark.parametrize("dtype", [*DTYPES, torch.int64, torch.bool], ids=str)
@pytest.mark.parametrize("shape,layout,dim", GATHER_CASES, ids=str)
def test_gather_matches_oracle(backend, dtype, shape, layout, dim):
    _, device = backend
    src = _tensor(shape, layout, dtype, device)
    index = kept(src.shape[dim], device=device)
    poison_allocator(src.numel() * src.element_size(), device)
    out = ops.gather(src, dim, index)
    assert out.is_contiguous() and out.dtype == src.dtype
    assert torch.equal(out, gather_oracle(src, dim, index))


@pytest.mark.parametrize("kind", ["all", "one", "empty"])
def test_gather_edge_indices(backend, kind):
    _, device = backend
    src = torch.randn(6, 5, device=device)
    index = kept(5, kind, device)
    out = ops.gather(src, 1, index)
    assert out.shape == (6, index.numel()) and torch.equal(out, gather_oracle(src, 1, index))


def test_gather_refuses_out_of_range_indices(backend):
    name, device = backend
    if device == "cuda":  # a device-side error ends the CUDA context: check it in a fresh process
        code = (f"import torch, fastprune\nwith fastprune.backends.use({name!r}):\n"
                f"    out = fastprune.ops.gather(torch.randn(6, 4, device='cuda'), 0, "
                f"torch.tensor([1, 6], device='cuda'))\ntorch.cuda.synchronize()\n")
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
        assert proc.returncode != 0 and "assert" in proc.stderr.lower(), proc.stderr[-2000:]
        return
    src = torch.randn(6, 4)
    for dim, bad in ((0, [1, 6]), (1, [-1, 2]), (0, [0, 100])):
        with pytest.raises((IndexError, RuntimeError), match="out of"):
            ops.gather(src, dim, torch.tensor(bad))


def test_opcheck(backend):
    _, device = backend
    w, g = torch.randn(2, 12, 10, device=device).unbind(0)
    rows, cols = torch.rand(3, 6, device=device), torch.rand(3, 5, device=device)
    torch.library.opcheck(torch.ops.fastprune.taylor_accumulate_.default, (w, g, rows, cols, 2, 2))
    src = torch.randn(9, 11, device=device, dtype=torch.bfloat16)
    for dim in (0, 1):
        torch.library.opcheck(torch.ops.fastprune.gather.default, (src, dim, kept(src.shape[dim], device=device)))


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["cuda", "triton"])
def test_large_shapes_reach_the_wide_and_grid_stride_paths(name):
    """On an H100/H200-class GPU: gather rows of 8 KiB (16-byte units, more units than threads launched)
    and a Taylor matrix with more tiles and fold warps than the grids hold (grid-stride loops)."""
    require(name, "cuda")
    with backends.use(name):
        src = torch.randn(4096, 4096, device="cuda").bfloat16()
        for dim in (0, 1):
            index = kept(4096, device="cuda")
            out = ops.gather(src, dim, index)
            assert torch.equal(out, src.index_select(dim, index))
        w, g = (torch.randn(8192, 4608, device="cuda").bfloat16() for _ in range(2))
        rows0, cols0 = torch.rand(3, 8192, device="cuda"), torch.rand(3, 4608, device="cuda")
        rows, cols = rows0.clone(), cols0.clone()
        ops.taylor_accumulate_(w, g, rows, cols, 1, 1)
        p = w.double() * g.double()
        for got, start, axis in ((rows, rows0, 1), (cols, cols0, 0)):
            want = torch.stack([p.abs().sum(axis), p.sum(axis), (p * p).sum(axis)])
            scale = want[0].abs().max().item()
            torch.testing.assert_close(got.double() - start.double(), want, rtol=1e-4, atol=1e-5 * scale)


# ---------------------------------------------------------------- C++: thread count

def test_cpp_kernels_run_on_as_many_threads_as_torch_is_given():
    """ATen's parallel_for runs inline in a module compiled without OpenMP: the kernels would use one
    core whatever torch.set_num_threads says (and the bitwise test below would compare a run with itself)."""
    require("cpp", "cpu")
    from fastprune._native import _C

    threads = torch.get_num_threads()
    try:
        seen = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            seen.append(_C.parallel_threads())
    finally:
        torch.set_num_threads(threads)
    assert seen == [1, 2, 3]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpp_taylor_is_bitwise_the_same_with_one_and_two_threads(dtype):
    require("cpp", "cpu")
    w, g = matrix((1000, 2600), dtype), matrix((1000, 2600), dtype, "sliced")  # 63 row chunks, 7800 columns
    threads = torch.get_num_threads()
    results = []
    try:
        with backends.use("cpp"):
            for n in (1, 2):
                torch.set_num_threads(n)
                results.append(ops.taylor_partials(w, g, 4, 2))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)


# ---------------------------------------------------------------- validation: one place, every backend

def test_bad_arguments_are_refused_before_any_backend_runs(backend):
    _, device = backend
    w = torch.randn(6, 4, device=device)
    z = lambda *shape, dtype=torch.float32: torch.zeros(*shape, dtype=dtype, device=device)  # noqa: E731
    cases = [
        (lambda: ops.taylor_partials(w, torch.randn(4, 6, device=device)), "grad the same shape"),
        (lambda: ops.taylor_partials(w, w, 4, 1), "must divide the shape"),
        (lambda: ops.taylor_accumulate_(w, w, z(3, 5), z(3, 4)), r"accumulators must be \(3, 6\)"),
        (lambda: ops.taylor_accumulate_(w, w, z(3, 6, dtype=torch.float64), z(3, 4)), "float32"),
        (lambda: ops.taylor_partials(w.double(), w.double()), "float32, float16 or bfloat16"),
        (lambda: ops.gather(w, 0, torch.tensor([0, 1], dtype=torch.int32, device=device)), "1-D int64"),
        (lambda: ops.gather(w, 2, torch.tensor([0], device=device)), "out of range"),
    ]
    if device == "cuda":
        cases.append((lambda: ops.gather(w, 0, torch.tensor([0])), "must be on cuda"))
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()


def test_native_error_messages():
    """The C++ entry points guard memory themselves when called directly (TORCH_CHECK)."""
    require("cpp", "cpu")
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


# ---------------------------------------------------------------- defaults, forcing, self-check

def test_defaults_on_this_machine():
    want_cpu = "cpp" if "cpp" in backends.available("cpu") else "reference"
    assert backends.active("gather", "cpu") == backends.active("taylor_accumulate_", "cpu") == want_cpu
    want_cuda = next((b for b in ("cuda", "triton") if b in backends.available("cuda")), "reference")
    assert backends.active("gather", "cuda") == want_cuda


def test_use_forces_and_restores():
    before = backends.active("gather", "cpu")
    with backends.use("reference"):
        assert backends.active("gather", "cpu") == backends.active("gather", "cuda") == "reference"
        with backends.substitute("gather", "cpu", lambda src, dim, index: src.index_select(dim, index) + 1,
                                 name="plus-one", checked=False):
            src = torch.randn(4, 5)
            assert torch.equal(ops.gather(src, 0, torch.tensor([1, 3])), src[[1, 3]] + 1)  # the dispatcher calls it
        assert backends.active("gather", "cpu") == "reference"
    assert backends.active("gather", "cpu") == before


def test_unknown_and_unavailable_backends():
    with pytest.raises(ValueError, match="unknown backend 'fortran'"):
        with backends.use("fortran"):
            pass
    if "cuda" not in backends.available("cuda"):
        with pytest.raises(RuntimeError, match="backend 'cuda' is not available here"):
            with backends.use("cuda"):
                pass
    with pytest.raises(ValueError, match="unknown device type"):
        backends.available("tpu")


def _run(code: str, **env) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k != "FASTPRUNE_BACKEND"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                          env={**full, **env}, timeout=300)


def test_environment_forces_the_reference():
    code = ("import fastprune\nfrom fastprune import backends\n"
            "print([backends.active(op, d) for op in backends.OPS for d in backends.DEVICE_TYPES])")
    proc = _run(code, FASTPRUNE_BACKEND="reference")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["['reference',", "'reference',", "'reference',", "'reference']"]
    proc = _run("import fastprune", FASTPRUNE_BACKEND="fortran")
    assert proc.returncode != 0 and "FASTPRUNE_BACKEND: unknown backend 'fortran'" in proc.stderr


def _wrong_gather(src, dim, index):
    return src.index_select(dim, index.flip(0))  # right values, wrong order


def test_self_check_catches_a_wrong_kernel_and_falls_back():
    calls = []

    def wrong(*args):
        calls.append(1)
        return _wrong_gather(*args)

    with backends.substitute("gather", "cpu", wrong, name="wrong") as kernel:
        src = torch.randn(7, 9)
        index = torch.tensor([0, 2, 5])
        with pytest.warns(RuntimeWarning, match=r"wrong kernel of gather failed its self-check on cpu torch.float32"):
            out = ops.gather(src, 1, index)
        assert torch.equal(out, gather_oracle(src, 1, index))  # the reference answered
        checked = len(calls)
        assert checked > 0
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # warned once: no second warning
            assert torch.equal(ops.gather(src, 0, torch.tensor([3])), src[3:4])
        assert len(calls) == checked  # never trusted again for this device and dtype
        assert backends.active("gather", "cpu", torch.float32) == "reference"
        assert list(kernel.failed) == [(torch.device("cpu"), torch.float32)]
        with pytest.warns(RuntimeWarning, match="torch.bfloat16"):  # another dtype is checked on its own
            ops.gather(src.bfloat16(), 1, index)


def test_self_check_catches_a_failing_kernel():
    def broken(*args):
        raise RuntimeError("no kernel image is available for execution on the device")

    with backends.substitute("taylor_accumulate_", "cpu", broken, name="broken"):
        w, g = torch.randn(2, 5, 4).unbind(0)
        with pytest.warns(RuntimeWarning, match="broken kernel of taylor_accumulate_ failed its self-check.*no "
                                                 "kernel image"):
            rows, cols = ops.taylor_partials(w, g)
        assert_taylor_close(rows, cols, torch.zeros_like(rows), torch.zeros_like(cols), w, g, 1, 1)


def test_self_check_trusts_a_right_kernel_once_per_device_and_dtype():
    seen = []

    def right(src, dim, index):
        seen.append(src.dtype)
        return src.index_select(dim, index).contiguous()

    with backends.substitute("gather", "cpu", right, name="right") as kernel:
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            for dtype in (torch.float32, torch.float32, torch.bfloat16):
                src = torch.randn(6, 6).to(dtype)
                assert torch.equal(ops.gather(src, 0, torch.tensor([1, 4])), src[[1, 4]])
        assert not kernel.failed
        samples = len(backends.OPS["gather"].samples(torch.device("cpu"), torch.float32, torch.Generator()))
        assert seen.count(torch.float32) == samples + 2 and seen.count(torch.bfloat16) == samples + 1


def test_tune_keeps_the_fastest_compiled_backend():
    compiled = [b for b in backends.available("cpu") if b != "reference"]
    if not compiled:
        pytest.skip("no compiled backend for the CPU here")
    with backends.use("reference"):  # restores the defaults afterwards
        timings = backends.tune("cpu", torch.float32, shape=(64, 48), repeat=2)
        for op, seconds in timings.items():
            assert set(seconds) == set(compiled) and all(s > 0 for s in seconds.values())
            assert backends.active(op, "cpu") == min(seconds, key=seconds.get)
