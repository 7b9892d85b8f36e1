"""Optional dependencies: the extra that installs each, and the one line said when an output is skipped.

A command's main work never needs them.  An output that does (a chart needs matplotlib) is written
through :func:`optional_output`, which skips it with one line naming the extra to install instead of
failing a command whose results are already on disk.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

# import name -> (distribution, the fastprune extra that installs it; pyproject.toml [project.optional-dependencies])
OPTIONAL = {"matplotlib": ("matplotlib", "charts"), "lm_eval": ("lm-eval", "zeroshot"),
            "triton": ("triton", "triton"), "gguf": ("gguf", "gguf")}


def available(module: str) -> bool:
    """Whether ``module`` can be imported (found on the path; nothing is imported)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def install_hint(module: str) -> str:
    """``"<package> is not installed (pip install 'fastprune[<extra>]')"`` for an optional ``module``."""
    package, extra = OPTIONAL[module]
    return f"{package} is not installed (pip install 'fastprune[{extra}]')"


def optional_output(module: str, what: str, write: Callable[[], T]) -> T | None:
    """``write()``, which needs the optional ``module``; without it, None and one line on stderr saying
    that ``what`` was skipped and how to get it."""
    if available(module):
        try:
            return write()
        except ImportError as exc:  # installed but broken (a dependency or shared library missing, say)
            reason = f"{OPTIONAL[module][0]} does not import ({exc})"
    else:
        reason = install_hint(module)
    print(f"fastprune: {what} skipped: {reason}", file=sys.stderr, flush=True)
    return None
