"""Which kernel serves each of fastprune's ops on each device type, registered with PyTorch's dispatcher.

Backends: ``reference`` (pure PyTorch, :mod:`fastprune.ops`), ``cpp`` (CPU, the compiled extension
``fastprune._native._C``), ``cuda`` (CUDA, the same extension built with CUDA) and ``triton``
(CUDA; the CPU too under ``TRITON_INTERPRET=1``, which is how the tests run it).

When ``fastprune`` is imported, each op gets one kernel per device type through
``torch.library.register_kernel``; nothing is compiled and CUDA is not initialised:

- CPU: ``cpp`` when the extension is built, else the reference (with one warning);
- CUDA: ``cuda`` when the extension was built with CUDA, else ``triton`` when Triton is
  installed (imported at first use), else the reference.

A compiled default is *self-checked*: the first time it runs on a device and dtype it is compared
with the reference on a small random input (milliseconds, a private generator, so the caller's
random state is untouched).  A mismatch, or an error, warns once naming the op, backend, device and
dtype, and the reference serves that device and dtype for the rest of the process.  Every kernel is
wrapped with the op's one argument check (:func:`fastprune.ops.check_taylor`, ``check_gather``).

Forcing: ``FASTPRUNE_BACKEND=reference`` (read once, at import) registers the reference everywhere;
``=cpp``, ``=cuda`` or ``=triton`` registers that backend, unchecked, for the device types it
serves.  :func:`use` does the same for a block (tests, benchmarks), :func:`substitute` serves one op
with any function for a block.  :func:`tune` measures the compiled backends of a device and keeps the
fastest (this is how Triton becomes the CUDA default where the CUDA build has kernels too).
"""

from __future__ import annotations

import importlib.util
import os
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from fastprune import ops
from fastprune.native_build import check_compiled_torch, unavailable_message

BACKENDS = ("reference", "cpp", "cuda", "triton")
DEVICE_TYPES = ("cpu", "cuda")


# ---------------------------------------------------------------- what each op needs for the self-check

def _random(shape, dtype, device, gen) -> torch.Tensor:
    if dtype.is_floating_point:
        return torch.randn(shape, generator=gen, device=device).to(dtype)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen, device=device).bool()
    return torch.randint(-100, 100, shape, generator=gen, device=device).to(dtype)


def _taylor_samples(device, dtype, gen) -> list[tuple]:
    """A row-major case and a column-major (transposed) one with row/column blocks, non-zero accumulators."""
    out = []
    for (r, c), rb, cb, transposed in (((37, 53), 1, 1, False), ((48, 40), 8, 4, True)):
        shape = (c, r) if transposed else (r, c)
        w, g = (_random(shape, dtype, device, gen) for _ in range(2))
        if transposed:
            w, g = w.t(), g.t()
        rows = torch.rand(3, r // rb, generator=gen, device=device)
        cols = torch.rand(3, c // cb, generator=gen, device=device)
        out.append((w, g, rows, cols, rb, cb))
    return out


def _taylor_run(fn: Callable, args: tuple) -> tuple[torch.Tensor, ...]:
    w, g, rows, cols, rb, cb = args
    rows, cols = rows.clone(), cols.clone()
    fn(w, g, rows, cols, rb, cb)
    return rows, cols


def _taylor_agree(got, want) -> bool:
    scale = max(float(want[0][0].abs().max()), float(want[1][0].abs().max()), 1.0)
    return all(torch.allclose(a, b, rtol=1e-4, atol=1e-4 * scale) for a, b in zip(got, want))


def _gather_samples(device, dtype, gen) -> list[tuple]:
    """Rows and columns of a matrix, and a middle dim of a permuted 3-D view."""
    m = _random((13, 21), dtype, device, gen)
    cube = _random((6, 7, 5), dtype, device, gen).permute(2, 0, 1)
    out = []
    for src, dim in ((m, 0), (m, 1), (cube, 1)):
        n = src.shape[dim]
        index = torch.randperm(n, generator=gen, device=device)[: (2 * n) // 3].sort().values
        out.append((src, dim, index))
    return out


def _gather_run(fn: Callable, args: tuple) -> tuple[torch.Tensor, ...]:
    return (fn(*args),)


def _gather_agree(got, want) -> bool:
    return got[0].shape == want[0].shape and got[0].is_contiguous() and torch.equal(got[0], want[0])


@dataclass(frozen=True)
class _Op:
    """An op and what registering and self-checking its kernels needs."""

    op: torch._library.custom_ops.CustomOpDef
    check: Callable[..., None]
    reference: Callable
    samples: Callable[[torch.device, torch.dtype, torch.Generator], list[tuple]]
    run: Callable[[Callable, tuple], tuple]
    agree: Callable[[tuple, tuple], bool]


OPS: dict[str, _Op] = {
    "taylor_accumulate_": _Op(ops.taylor_accumulate_, ops.check_taylor, ops.taylor_accumulate_reference,
                              _taylor_samples, _taylor_run, _taylor_agree),
    "gather": _Op(ops.gather, ops.check_gather, ops.gather_reference, _gather_samples, _gather_run,
                  _gather_agree),
}


# ---------------------------------------------------------------- the registered kernels

class Kernel:
    """One backend's implementation of one op for one device type, as the dispatcher calls it.

    Validates the arguments, loads the implementation on first use, and, when ``checked``,
    compares it with the reference once per (device, dtype) before trusting it.
    """

    def __init__(self, op: str, backend: str, device_type: str, load: Callable[[], Callable], checked: bool):
        self.op, self.backend, self.device_type, self.checked = op, backend, device_type, checked
        self._info, self._load, self._fn = OPS[op], load, None
        self._verified: set[tuple[torch.device, torch.dtype]] = set()
        self.failed: dict[tuple[torch.device, torch.dtype], str] = {}

    @property
    def fn(self) -> Callable:
        if self._fn is None:
            self._fn = self._load()
        return self._fn

    def __call__(self, *args):
        self._info.check(*args)
        if self.checked:
            key = (args[0].device, args[0].dtype)
            if key not in self._verified:
                self._verify(key)
            if key in self.failed:
                return self._info.reference(*args)
        return self.fn(*args)

    def _verify(self, key: tuple[torch.device, torch.dtype]) -> None:
        device, dtype = key
        info = self._info
        try:
            gen = torch.Generator(device=device).manual_seed(0)
            for args in info.samples(device, dtype, gen):
                if not info.agree(info.run(self.fn, args), info.run(info.reference, args)):
                    raise AssertionError("its output differs from the reference")
        except Exception as exc:  # a wrong result, or a kernel that cannot even run here
            why = f"{type(exc).__name__}: {exc}" if not isinstance(exc, AssertionError) else str(exc)
            self.failed[key] = why
            warnings.warn(f"fastprune: the {self.backend} kernel of {self.op} failed its self-check on {device} "
                          f"{dtype} ({why}); the PyTorch reference serves it from now on", RuntimeWarning,
                          stacklevel=2)
        self._verified.add(key)


_registered: dict[tuple[str, str], Kernel] = {}  # (op, device type) -> what the dispatcher calls


def _register(kernel: Kernel) -> None:
    torch.library.register_kernel(OPS[kernel.op].op, kernel.device_type, kernel)
    _registered[(kernel.op, kernel.device_type)] = kernel


# ---------------------------------------------------------------- loading each backend

_native_error: str | None = None
_native_exc: ImportError | None = None


def _native():
    """The compiled extension module, or None (the reason kept in ``_native_error``)."""
    global _native_error, _native_exc
    try:
        from fastprune._native import _C
        check_compiled_torch(getattr(_C, "torch_version", "unknown"), torch.__version__)  # another release: ImportError
    except ImportError as exc:
        _native_error, _native_exc = str(exc), exc
        return None
    return _C


def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def _triton_kernel(op: str) -> Callable:
    if op == "gather":
        from fastprune.kernels.triton_gather import gather
        return gather
    from fastprune.kernels.triton_taylor import taylor_accumulate
    return taylor_accumulate


def _loader(backend: str, op: str) -> Callable[[], Callable]:
    if backend == "reference":
        return lambda: OPS[op].reference
    if backend == "triton":
        return lambda: _triton_kernel(op)
    name = f"{op.rstrip('_')}_{'cpu' if backend == 'cpp' else 'cuda'}"  # taylor_accumulate_cpu, gather_cuda
    return lambda: getattr(_native(), name)


def serves(backend: str) -> tuple[str, ...]:
    """The device types ``backend`` has kernels for here (empty when it is not available)."""
    if backend == "reference":
        return DEVICE_TYPES
    if backend == "triton":
        if not _triton_installed():
            return ()
        return ("cuda", "cpu") if os.environ.get("TRITON_INTERPRET") == "1" else ("cuda",)
    native = _native()
    if native is None:
        return ()
    if backend == "cpp":
        return ("cpu",)
    return ("cuda",) if native.with_cuda else ()


def available(device_type: str = "cpu") -> list[str]:
    """Backends with kernels for ``device_type`` tensors here, the reference first."""
    if error := _unknown(device_type, DEVICE_TYPES, "device type"):
        raise ValueError(error)
    return [b for b in BACKENDS if device_type in serves(b)]


def active(op: str, device_type: str, dtype: torch.dtype | None = None) -> str:
    """The backend that serves ``op`` on ``device_type`` (for ``dtype``: ``reference`` after a failed self-check)."""
    kernel = _registered[(op, device_type)]
    if dtype is not None and any(d.type == device_type and t == dtype for d, t in kernel.failed):
        return "reference"
    return kernel.backend


def _unknown(value: str, allowed: tuple[str, ...], what: str) -> str | None:
    return None if value in allowed else f"unknown {what} {value!r}; choose one of {allowed}"


def _set(backend: str, checked: bool, device_types: tuple[str, ...]) -> None:
    for op in OPS:
        for device_type in device_types:
            _register(Kernel(op, backend, device_type, _loader(backend, op), checked))


def _install_defaults() -> None:
    cpu = "cpp" if "cpu" in serves("cpp") else "reference"
    cuda = next((b for b in ("cuda", "triton") if "cuda" in serves(b)), "reference")
    _set(cpu, cpu != "reference", ("cpu",))
    _set(cuda, cuda != "reference", ("cuda",))


def _force(backend: str) -> None:
    if error := _unknown(backend, BACKENDS, "backend"):
        raise ValueError(error)
    device_types = serves(backend)
    if not device_types:
        why = "Triton is not installed" if backend == "triton" else \
            "the extension was not built with CUDA" if _native() is not None else \
            f"the compiled extension is not available ({_native_error})"
        raise RuntimeError(f"backend {backend!r} is not available here: {why}")
    _set(backend, False, device_types)


@contextmanager
def _restoring() -> Iterator[None]:
    saved = dict(_registered)
    try:
        yield
    finally:
        for kernel in saved.values():
            _register(kernel)


@contextmanager
def use(backend: str) -> Iterator[None]:
    """Run every op on ``backend`` (unchecked) for the device types it serves, inside the block."""
    with _restoring():
        _force(backend)
        yield


@contextmanager
def substitute(op: str, device_type: str, fn: Callable, *, name: str, checked: bool = True) -> Iterator[Kernel]:
    """Serve ``op`` on ``device_type`` with ``fn`` (called like the op) inside the block.

    ``checked`` puts it behind the self-check like a compiled default.  Yields the registered
    :class:`Kernel` (its ``failed`` records self-check failures).
    """
    if error := _unknown(op, tuple(OPS), "op") or _unknown(device_type, DEVICE_TYPES, "device type"):
        raise ValueError(error)
    kernel = Kernel(op, name, device_type, lambda: fn, checked)
    with _restoring():
        _register(kernel)
        yield kernel


def tune(device_type: str = "cuda", dtype: torch.dtype = torch.bfloat16, shape: tuple[int, int] = (4096, 4096),
         repeat: int = 10) -> dict[str, dict[str, float]]:
    """Time every compiled backend of ``device_type`` on each op and make the fastest the checked default.

    Each op runs on a random ``shape`` matrix of ``dtype`` (Taylor over rows and columns; gather
    keeping three rows in four); a backend that fails its self-check is not timed.  Returns the
    median seconds per op and backend; the reference is kept where nothing compiled is available.
    """
    device = torch.device(device_type)
    if device_type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    gen = torch.Generator(device=device).manual_seed(0)
    w, g = (_random(shape, dtype, device, gen) for _ in range(2))
    rows, cols = torch.zeros(3, shape[0], device=device), torch.zeros(3, shape[1], device=device)
    keep = torch.arange(shape[0], device=device)
    keep = keep[keep % 4 != 0]
    calls = {"taylor_accumulate_": lambda fn: fn(w, g, rows, cols, 1, 1), "gather": lambda fn: fn(w, 0, keep)}
    timings: dict[str, dict[str, float]] = {}
    for op, call in calls.items():
        timings[op] = {}
        for backend in (b for b in available(device_type) if b != "reference"):
            kernel = Kernel(op, backend, device_type, _loader(backend, op), checked=True)
            call(kernel)  # self-check and warm-up (Triton compiles here)
            if kernel.failed:
                continue
            timings[op][backend] = _median_seconds(lambda k=kernel, c=call: c(k.fn), device, repeat)
        if timings[op]:
            best = min(timings[op], key=timings[op].get)
            _register(Kernel(op, best, device_type, _loader(best, op), checked=True))
    return timings


def _median_seconds(fn: Callable[[], object], device: torch.device, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def _install() -> None:
    _install_defaults()
    if _native() is None:  # what is missing, what it costs, how to build it (fastprune.native_build)
        warnings.warn(unavailable_message(_native_exc), RuntimeWarning, stacklevel=2)
    forced = os.environ.get("FASTPRUNE_BACKEND", "auto")
    if forced != "auto":
        if error := _unknown(forced, ("auto", *BACKENDS), "backend"):
            raise ValueError(f"FASTPRUNE_BACKEND: {error}")
        if forced == "reference":
            _set("reference", False, DEVICE_TYPES)
        else:
            _force(forced)


_install()
