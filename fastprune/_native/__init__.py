"""Loader of the compiled extension ``_C``: registers its kernels as fastprune backends.

``cpp`` serves CPU tensors; ``cuda`` (present when the extension was built with CUDA) serves
CUDA tensors once selected.  Raises ImportError when the extension was not built, or was compiled
against another torch release than the one running (``fastprune.native_build``).
"""

import torch

from fastprune import ops
from fastprune._native import _C
from fastprune.native_build import check_compiled_torch

check_compiled_torch(_C.torch_version, torch.__version__)

ops.register_backend("taylor_accumulate_", "cpp", "cpu", _C.taylor_accumulate_cpu)
ops.register_backend("gather", "cpp", "cpu", _C.gather_cpu)
if _C.with_cuda:
    ops.register_backend("taylor_accumulate_", "cuda", "cuda", _C.taylor_accumulate_cuda)
    ops.register_backend("gather", "cuda", "cuda", _C.gather_cuda)

__all__ = ["_C"]
