"""Installation: the build uses the installed torch, works without a compiler, and the scripts around it.

No other torch is ever installed here: every torch-version decision is tested with the version mocked
(a stand-in ``torch`` package on PYTHONPATH, or a patched ``torch.__version__``).  The real build, wheel
and fresh-venv install run in ``scripts/package_check.py`` (CI).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

from fastprune import native_build, optional

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _run(cmd: list, env: dict | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items()
            if not k.startswith("FASTPRUNE_") and k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    return subprocess.run([str(c) for c in cmd], cwd=cwd, env={**base, **(env or {})}, capture_output=True, text=True)


def _fake_torch(tmp_path: Path, version: str | None = None, broken: str | None = None) -> Path:
    """A folder holding a stand-in ``torch`` package of ``version`` (or one whose import raises ``broken``)."""
    pkg = tmp_path / "fake" / "torch"
    pkg.mkdir(parents=True)
    body = f"raise OSError({broken!r})\n" if broken else f"__version__ = {version!r}\n"
    (pkg / "__init__.py").write_text(body)
    return pkg.parent


def _empty_path(tmp_path: Path) -> str:
    """A PATH with nothing on it: no cmake, no compiler, no nvcc."""
    folder = tmp_path / "empty-bin"
    folder.mkdir(exist_ok=True)
    return str(folder)


# ------------------------------------------------------------------------------------------ declared build

def test_build_requirements_pull_no_torch():
    requires = PYPROJECT["build-system"]["requires"]
    assert not [r for r in requires if re.match(r"torch\b", r)], requires


def test_min_torch_is_the_declared_floor():
    torch_req = [d for d in PYPROJECT["project"]["dependencies"] if re.match(r"torch\b", d)]
    assert torch_req == [f"torch>={native_build.MIN_TORCH}"]


def test_optional_extras_are_declared():
    extras = PYPROJECT["project"]["optional-dependencies"]
    for module, (package, extra) in optional.OPTIONAL.items():
        assert any(r.startswith(package) for r in extras[extra]), (module, extra, extras[extra])
    assert set(extras["all"][0].split("[")[1].rstrip("]").split(",")) == {e for _, e in optional.OPTIONAL.values()}


def test_sdist_manifest_ships_native_sources():
    manifest = (ROOT / "MANIFEST.in").read_text()
    assert "include CMakeLists.txt" in manifest and "graft csrc" in manifest and "*.so" in manifest


# ------------------------------------------------------------------------------------------ torch versions

@pytest.mark.parametrize(("version", "supported"), [
    ("2.13.0+cpu", True), ("2.11.0", True), ("2.11.0+cu128", True), ("2.12.1a0+gitabc", True), ("3.0.0", True),
    ("2.10.1+cu126", False), ("2.9", False), ("1.13.1", False), ("nonsense", False)])
def test_torch_supported(version, supported):
    assert native_build.torch_supported(version) is supported


def test_compiled_torch_must_match_release():
    native_build.check_compiled_torch("2.13.0", "2.13.0+cpu")  # local build tags do not matter
    with pytest.raises(ImportError, match=r"compiled against torch 2\.13\.0 and torch 2\.12\.0\+cu128 is running"):
        native_build.check_compiled_torch("2.13.0", "2.12.0+cu128")


def test_extension_refused_under_another_torch():
    """With torch's version mocked, the built extension does not load: one warning, reference kernels."""
    pytest.importorskip("fastprune._native", reason="the compiled extension is not built")
    code = """
import warnings, torch
torch.__version__ = "2.12.0+cu128"
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    from fastprune import backends, ops
    ops.gather(torch.randn(4, 4), 0, torch.tensor([1, 3]))
messages = [str(w.message) for w in caught if "compiled extension" in str(w.message)]
assert len(messages) == 1, messages
assert "compiled against torch 2.13.0 and torch 2.12.0+cu128 is running" in messages[0], messages[0]
assert "reference" in messages[0] and "--no-build-isolation" in messages[0], messages[0]
assert backends.active("gather", "cpu") == "reference"
"""
    result = _run([sys.executable, "-c", code])
    assert result.returncode == 0, result.stderr


def test_extension_built_looks_for_the_module_file(tmp_path):
    assert not native_build.extension_built(tmp_path)
    (tmp_path / "_C.cpython-311-x86_64-linux-gnu.so").write_bytes(b"")
    (tmp_path / "_C.so").write_bytes(b"")
    assert native_build.extension_built(tmp_path)


def test_missing_extension_warning_names_missing_tools(tmp_path):
    """An install without the extension, on a PATH without build tools: the warning says what is missing,
    what it costs and how to build it (the real install without a compiler: scripts/package_check.py)."""
    code = f"""
import importlib.util, json, pathlib, sys, warnings
# fastprune registers its kernels at import: patch native_build before the package is imported
spec = importlib.util.spec_from_file_location("fastprune.native_build", {str(ROOT / "fastprune" / "native_build.py")!r})
native_build = importlib.util.module_from_spec(spec)
sys.modules["fastprune.native_build"] = native_build
spec.loader.exec_module(native_build)
native_build.NATIVE_DIR = pathlib.Path({str(tmp_path)!r})  # an install without _C
class NoExtension:
    def find_spec(self, name, path=None, target=None):
        if name == "fastprune._native._C":
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
sys.meta_path.insert(0, NoExtension())
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    from fastprune import backends
    print(backends.available())
print(json.dumps([str(w.message) for w in caught if "compiled extension" in str(w.message)]))
"""
    result = _run([sys.executable, "-c", code], env={"PATH": _empty_path(tmp_path)})
    assert result.returncode == 0, result.stderr
    backends, messages = result.stdout.splitlines()
    assert "'cpp'" not in backends and "'reference'" in backends, backends  # triton may serve too (interpreter)
    (message,) = json.loads(messages)
    assert "installed without its compiled extension" in message
    assert "cmake and a C++ compiler (c++, g++ or clang++, or $CXX) not found on PATH" in message
    assert "2.4-8x slower" in message and "pip install --no-build-isolation" in message


# ------------------------------------------------------------------------------------------ setup.py

def _setup(args: list[str], path: str, **env: str) -> subprocess.CompletedProcess:
    return _run([sys.executable, "setup.py", *args], env={"PATH": path, **env})


def test_setup_without_compiler_builds_no_extension(tmp_path):
    result = _setup(["--name"], _empty_path(tmp_path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "fastprune"
    assert "cmake and a C++ compiler" in result.stderr and "reference kernels" in result.stderr


def test_setup_without_compiler_fails_when_extension_required(tmp_path):
    result = _setup(["--name"], _empty_path(tmp_path), FASTPRUNE_REQUIRE_EXT="1")
    assert result.returncode != 0
    assert "FASTPRUNE_REQUIRE_EXT=1 but cmake and a C++ compiler" in result.stderr


@pytest.mark.parametrize(("torch_version", "message"), [
    (None, "pip install --no-build-isolation"),  # no torch, as in pip's isolated build environment
    ("2.10.0+cu126", "fastprune needs torch>=2.11"),
])
def test_setup_build_stops_early_without_a_usable_torch(tmp_path, torch_version, message):
    """build_ext checks torch before anything compiles: absent (an isolated build) or too old (mocked)."""
    block = "sys.modules['torch'] = None; " if torch_version is None else ""
    code = f"import runpy, sys; {block}sys.argv = ['setup.py', 'build_ext']; runpy.run_path('setup.py')"
    pythonpath = str(_fake_torch(tmp_path, torch_version)) if torch_version else ""
    result = _run([sys.executable, "-c", code], env={"PYTHONPATH": pythonpath, "PATH": os.environ["PATH"]})
    assert result.returncode != 0
    assert message in result.stderr, result.stderr[-2000:]
    assert "-- Configuring" not in result.stdout  # stopped before cmake ran


# ------------------------------------------------------------------------------------------ setup.sh's torch

@pytest.mark.parametrize(("fake", "code", "out"), [
    ({"version": "2.11.0+cu128"}, 0, "keep 2.11.0+cu128"),
    ({"version": "2.13.0+cpu"}, 0, "keep 2.13.0+cpu"),
    ({"version": "2.9.1+cu126"}, 1, ""),
    ({"broken": "libcudart.so.12: cannot open shared object file"}, 1, ""),
])
def test_setup_sh_keeps_a_supported_torch(tmp_path, fake, code, out):
    """scripts/check_torch.py decides what setup.sh does: keep a supported torch, refuse an old or broken one."""
    result = _run([sys.executable, "scripts/check_torch.py"], env={"PYTHONPATH": str(_fake_torch(tmp_path, **fake))})
    assert (result.returncode, result.stdout.strip()) == (code, out), result.stderr
    if code:
        assert "setup.sh:" in result.stderr and ("torch>=2.11" in result.stderr or "does not import" in result.stderr)


def test_setup_sh_installs_torch_only_where_none_is(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    result = _run([venv / "bin" / "python", "scripts/check_torch.py"])
    assert (result.returncode, result.stdout.strip()) == (0, "install"), result.stderr


def test_setup_sh_uses_the_decision_and_pins_the_kept_torch():
    script = (ROOT / "scripts" / "setup.sh").read_text()
    assert "python scripts/check_torch.py" in script
    assert 'pip_q -r requirements.txt "torch==${torch_state#keep }"' in script
    assert "|| true; }; }" in script  # pip's own failure is not swallowed by the output filter


# ------------------------------------------------------------------------------------------ CUDA compile step

def test_compile_cuda_skips_without_nvcc(tmp_path):
    result = _run(["bash", "scripts/compile_cuda.sh"],
                  env={"NVCC": str(tmp_path / "no-nvcc"), "PATH": os.environ["PATH"]})
    assert result.returncode == 0 and "nvcc not found: the CUDA compile check is skipped" in result.stderr


def test_compile_cuda_requires_nvcc_in_ci(tmp_path):
    result = _run(["bash", "scripts/compile_cuda.sh"],
                  env={"NVCC": str(tmp_path / "no-nvcc"), "PATH": os.environ["PATH"], "FASTPRUNE_REQUIRE_NVCC": "1"})
    assert result.returncode == 1 and "FASTPRUNE_REQUIRE_NVCC=1" in result.stderr


def test_ci_requires_nvcc_and_extension_and_checks_packaging():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "FASTPRUNE_REQUIRE_NVCC=1" in ci and "FASTPRUNE_REQUIRE_EXT=1" in ci
    assert "scripts/package_check.py" in ci
