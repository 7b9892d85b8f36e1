"""What fastprune's compiled extension needs to be built and loaded, and the warning when it is not in use.

The extension (``fastprune._native._C``) is compiled at install time with ``cmake`` and a C++ compiler,
against the torch installed then.  Without those tools the package installs without it; under another
torch release it must not load (the C++ ABI changes between releases).  In both cases every op runs its
PyTorch reference instead: the same results, slower.  This module imports nothing heavy, so ``setup.py``
loads it by path to decide whether to build.
"""

from __future__ import annotations

import importlib.machinery
import os
import re
import shutil
from pathlib import Path

NATIVE_DIR = Path(__file__).resolve().parent / "_native"
MIN_TORCH = "2.11"  # the floor of pyproject.toml's torch requirement (tests/test_install.py keeps them equal)
REBUILD = ("install cmake and a C++ compiler, then reinstall fastprune from its source with "
           "pip install --no-build-isolation --no-deps --force-reinstall <source dir or sdist>")
COST = ("the PyTorch reference kernels run instead: the same plans, but the Taylor scoring reduction is 2.4-8x "
        "slower and a whole SmolLM2 prune 1.03-1.3x slower on 2 CPU cores (benchmarks/RESULTS.md)")


def missing_build_tools() -> list[str]:
    """The tools the native build needs that are not on ``PATH``: ``cmake`` and a C++ compiler."""
    missing = [] if shutil.which("cmake") else ["cmake"]
    cxx = os.environ.get("CXX", "").split()
    if not (cxx and shutil.which(cxx[0])) and not any(shutil.which(c) for c in ("c++", "g++", "clang++")):
        missing.append("a C++ compiler (c++, g++ or clang++, or $CXX)")
    return missing


def release(version: str) -> str:
    """A torch version without its local build tag (``2.13.0+cpu`` -> ``2.13.0``)."""
    return str(version).split("+")[0]


def version_tuple(version: str) -> tuple[int, ...]:
    """The numeric release of a version string (``2.11.0a0+git1234`` -> ``(2, 11, 0)``)."""
    match = re.match(r"\d+(\.\d+)*", release(version))
    return tuple(int(part) for part in match.group().split(".")) if match else ()


def torch_supported(version: str) -> bool:
    """Whether fastprune supports this torch version (``MIN_TORCH`` or newer)."""
    return version_tuple(version) >= version_tuple(MIN_TORCH)


def check_compiled_torch(compiled: str, running: str) -> None:
    """Raise ImportError when the extension was compiled against another torch release than ``running``."""
    if release(compiled) != release(running):
        raise ImportError(f"it was compiled against torch {compiled} and torch {running} is running "
                          "(a C++ extension must be rebuilt for each torch release)")


def extension_built(folder: Path | None = None) -> bool:
    """Whether a compiled ``_C`` module lies in ``folder`` (default fastprune/_native), loadable or not."""
    folder = folder or NATIVE_DIR
    return any((folder / f"_C{suffix}").is_file() for suffix in importlib.machinery.EXTENSION_SUFFIXES)


def unavailable_message(exc: ImportError) -> str:
    """One line for the warning when the extension is not used: what is missing, what it costs, how to fix."""
    if not extension_built():
        tools = missing_build_tools()
        why = (f"{' and '.join(tools)} not found on PATH" if tools
               else "it was installed without them, or with FASTPRUNE_NO_EXT=1")
        what = f"fastprune was installed without its compiled extension (it needs cmake and a C++ compiler; {why})"
    else:
        what = f"fastprune's compiled extension cannot be used ({exc})"
    return f"{what}; {COST}. To build it: {REBUILD}"
