"""The compiled extension ``_C``: C++ kernels for the CPU, and CUDA kernels when built with CUDA.

Importing it registers nothing (``fastprune.backends`` registers its kernels with the dispatcher)
and raises ImportError when the extension was not built, or was compiled against another torch
release than the one running (``fastprune.native_build``).
"""

import torch

from fastprune.native_build import check_compiled_torch

from . import _C

check_compiled_torch(_C.torch_version, torch.__version__)

__all__ = ["_C"]
