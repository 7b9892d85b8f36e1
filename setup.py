"""Packaging and the native build.

CMakeLists.txt is the one build description (sources, flags, CUDA targets); this script only
configures and builds it, then places the module at ``fastprune/_native/_C*.so``.  The Triton
kernels are plain modules of the package (``fastprune/kernels``).

Environment: ``FASTPRUNE_NO_EXT=1`` skips the native build (the package then runs on the
PyTorch reference kernels), ``FASTPRUNE_CUDA=auto|ON|OFF`` chooses the CUDA part, ``MAX_JOBS``
limits parallel compile jobs.  Install with ``pip install --no-build-isolation -e .``.
"""

import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    """An extension whose sources are listed in CMakeLists.txt."""

    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    """Configure and build CMakeLists.txt, then copy the module where setuptools expects it."""

    def build_extension(self, ext: Extension) -> None:
        target = Path(self.get_ext_fullpath(ext.name)).resolve()
        build_dir = Path(self.build_temp).resolve() / "cmake"
        out_dir = build_dir / "out"
        configure = ["cmake", "-S", str(ROOT), "-B", str(build_dir), f"-DPython_EXECUTABLE={sys.executable}",
                     f"-DFASTPRUNE_OUTPUT_DIR={out_dir}", "-DCMAKE_BUILD_TYPE=Release"]
        ninja = shutil.which("ninja")
        if ninja and not (build_dir / "CMakeCache.txt").exists():
            configure += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        if "FASTPRUNE_CUDA" in os.environ:
            configure.append(f"-DFASTPRUNE_CUDA={os.environ['FASTPRUNE_CUDA']}")
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        subprocess.run(configure, check=True)
        subprocess.run(["cmake", "--build", str(build_dir), "-j", jobs], check=True)
        built = sorted(out_dir.glob("_C*"))
        if not built:
            raise RuntimeError(f"the CMake build produced no module in {out_dir}")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(built[0], target)


def ext_modules() -> list[Extension]:
    if os.environ.get("FASTPRUNE_NO_EXT") == "1":
        return []
    if shutil.which("cmake") is None:
        warnings.warn("cmake not found: fastprune's native extension is not built (reference kernels only)",
                      stacklevel=1)
        return []
    return [CMakeExtension("fastprune._native._C")]


setup(
    packages=find_packages(include=["fastprune", "fastprune.*"]),
    package_data={"fastprune": ["resources/*", "tasks/*.yaml"]},
    ext_modules=ext_modules(),
    cmdclass={"build_ext": CMakeBuild},
)
