"""The native extension is built, imports and serves the ops through the dispatcher.

Skips with a reason where the extension was not built; ``FASTPRUNE_REQUIRE_EXT=1`` (set in CI)
turns that skip into a failure.
"""

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastprune import backends, ops

ROOT = Path(__file__).resolve().parents[1]


def _native():
    try:
        return importlib.import_module("fastprune._native")
    except ImportError as exc:
        if os.environ.get("FASTPRUNE_REQUIRE_EXT") == "1":
            pytest.fail(f"FASTPRUNE_REQUIRE_EXT=1 but fastprune._native does not import: {exc}")
        pytest.skip(f"the compiled extension is not built ({exc}); run pip install --no-build-isolation -e .")


def test_extension_registers_cpp_backend():
    native = _native()
    assert callable(native._C.taylor_accumulate_cpu) and callable(native._C.gather_cpu)
    assert "cpp" in backends.available("cpu")
    assert backends.active("taylor_accumulate_", "cpu") == backends.active("gather", "cpu") == "cpp"
    rows, _ = ops.taylor_partials(torch.ones(2, 3), torch.full((2, 3), 2.0))
    assert backends.active("taylor_accumulate_", "cpu", torch.float32) == "cpp"  # passed its self-check
    assert rows.tolist() == [[6.0, 6.0], [6.0, 6.0], [12.0, 12.0]]


def test_cuda_backend_follows_build():
    native = _native()
    assert ("cuda" in backends.available("cuda")) == bool(native._C.with_cuda)


def test_cmake_lists_every_source():
    cmake = (ROOT / "CMakeLists.txt").read_text()
    listed = set(re.findall(r"csrc/\S+\.(?:cpp|cu)", cmake))
    on_disk = {str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob("*") if p.suffix in (".cpp", ".cu")}
    assert listed == on_disk


def test_kernels_are_modules_of_the_package():
    kernels = importlib.import_module("fastprune.kernels")
    assert Path(kernels.__file__).resolve().parent == ROOT / "fastprune" / "kernels"
    assert not (ROOT / "kernels").exists()


def test_no_import_cycles_between_ops_and_backends():
    """ops imports nothing of fastprune; the extension loader and the Triton kernels import neither."""
    for name in ("fastprune/ops.py", "fastprune/_native/__init__.py", *sorted(
            str(p.relative_to(ROOT)) for p in (ROOT / "fastprune" / "kernels").glob("*.py"))):
        imports = re.findall(r"^\s*(?:from|import) fastprune\b.*$", (ROOT / name).read_text(), re.MULTILINE)
        assert not imports, (name, imports)


def test_package_works_without_extension():
    code = """
import sys, warnings
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.startswith("fastprune._native"):
            raise ImportError("blocked by the test")
sys.meta_path.insert(0, Block())
import torch
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    from fastprune import backends, ops
    ops.taylor_partials(torch.randn(4, 4), torch.randn(4, 4))
    ops.gather(torch.randn(4, 4), 0, torch.tensor([1]))
assert backends.active("gather", "cpu") == "reference", backends.active("gather", "cpu")
assert "cpp" not in backends.available("cpu")
assert sum("compiled extension" in str(w.message) for w in caught) == 1
assert not torch.cuda.is_initialized()
"""
    env = {k: v for k, v in os.environ.items() if k not in ("FASTPRUNE_BACKEND", "TRITON_INTERPRET")}
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
