"""The compiled extension ``_C``: C++ kernels for the CPU, and CUDA kernels when built with CUDA.

Importing it registers nothing (``fastprune.backends`` registers its kernels with the dispatcher)
and raises ImportError when the extension was not built.
"""

from . import _C

__all__ = ["_C"]
