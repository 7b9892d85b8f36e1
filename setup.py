"""Packaging and the native build.

CMakeLists.txt is the one build description (sources, flags, CUDA targets); this script only
configures and builds it, then places the module at ``fastprune/_native/_C*.so``.  The Triton
kernels are plain modules of the package (``fastprune/kernels``).

The extension is compiled against the torch installed in the environment that builds it, so
install from source with ``pip install --no-build-isolation .`` (``-e .`` to develop): pip's
default isolated build has no torch, and the build then stops with an error saying so.  Without
``cmake`` or a C++ compiler the package is built without the extension and runs on the PyTorch
reference kernels (it warns once at first use).

Environment: ``FASTPRUNE_NO_EXT=1`` skips the native build, ``FASTPRUNE_REQUIRE_EXT=1`` makes a
missing ``cmake`` or compiler an error instead, ``FASTPRUNE_CUDA=auto|ON|OFF`` chooses the CUDA
part, ``MAX_JOBS`` limits parallel compile jobs.
"""

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _native_build():
    """fastprune/native_build.py, loaded by path (importing the package would need torch)."""
    spec = importlib.util.spec_from_file_location("fastprune_native_build", ROOT / "fastprune" / "native_build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class CMakeExtension(Extension):
    """An extension whose sources are listed in CMakeLists.txt."""

    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    """Configure and build CMakeLists.txt, then copy the module where setuptools expects it."""

    def run(self) -> None:
        if self.extensions:
            check_build_environment()
        super().run()

    def build_extension(self, ext: Extension) -> None:
        target = Path(self.get_ext_fullpath(ext.name)).resolve()
        build_dir = Path(self.build_temp).resolve() / "cmake"
        out_dir = build_dir / "out"
        configure = ["cmake", "-S", str(ROOT), "-B", str(build_dir), f"-DPython_EXECUTABLE={sys.executable}",
                     f"-DFASTPRUNE_OUTPUT_DIR={out_dir}", "-DCMAKE_BUILD_TYPE=Release"]
        ninja = shutil.which("ninja")
        if ninja and not (build_dir / "CMakeCache.txt").exists():
            configure += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        for option in ("FASTPRUNE_CUDA", "FASTPRUNE_CUDA_ARCHS"):  # CMake cache options, from the environment
            if option in os.environ:
                configure.append(f"-D{option}={os.environ[option]}")
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        subprocess.run(configure, check=True)
        subprocess.run(["cmake", "--build", str(build_dir), "-j", jobs], check=True)
        built = sorted(out_dir.glob("_C*"))
        if not built:
            raise RuntimeError(f"the CMake build produced no module in {out_dir}")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(built[0], target)


def check_build_environment() -> None:
    """Stop early, with what to do, when the extension cannot be built against the installed torch."""
    try:
        import torch
    except ImportError as exc:
        raise SystemExit(
            f"fastprune: torch is not importable in this build environment ({exc}). The C++ extension is compiled "
            "against the torch you run it with: install torch first, then build without isolation: "
            "pip install --no-build-isolation . (pip's default isolated build cannot see your torch). "
            "FASTPRUNE_NO_EXT=1 installs without the extension (PyTorch reference kernels only).") from exc
    native = _native_build()
    if not native.torch_supported(torch.__version__):
        raise SystemExit(f"fastprune: torch {torch.__version__} is installed and fastprune needs "
                         f"torch>={native.MIN_TORCH}. Upgrade torch first (the build for your CUDA version), then "
                         "build again: the extension is compiled against the torch installed now, and pip would "
                         "otherwise install another torch after compiling against this one.")
    try:
        import pybind11  # noqa: F401
    except ImportError as exc:
        raise SystemExit("fastprune: the native build needs pybind11 in this environment: pip install pybind11 "
                         "(or FASTPRUNE_NO_EXT=1 to install without the extension)") from exc


def ext_modules() -> list[Extension]:
    if os.environ.get("FASTPRUNE_NO_EXT") == "1":
        return []
    missing = _native_build().missing_build_tools()
    if missing:
        message = (f"{' and '.join(missing)} not found: fastprune is installed without its compiled extension "
                   "and runs on the PyTorch reference kernels (same results, slower scoring)")
        if os.environ.get("FASTPRUNE_REQUIRE_EXT") == "1":
            raise SystemExit(f"fastprune: FASTPRUNE_REQUIRE_EXT=1 but {message}")
        print(f"fastprune: warning: {message}", file=sys.stderr)
        return []
    return [CMakeExtension("fastprune._native._C")]


setup(
    packages=find_packages(include=["fastprune", "fastprune.*"]),
    package_data={"fastprune": ["resources/*", "tasks/*.yaml"]},
    ext_modules=ext_modules(),
    cmdclass={"build_ext": CMakeBuild},
)
