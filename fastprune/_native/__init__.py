"""Loader of the compiled extension ``_C``: registers its kernels as fastprune backends.

``cpp`` serves CPU tensors; ``cuda`` (present when the extension was built with CUDA) serves
CUDA tensors once selected.  Raises ImportError when the extension was not built.
"""

from fastprune import ops
from fastprune._native import _C

ops.register_backend("taylor_accumulate_", "cpp", "cpu", _C.taylor_accumulate_cpu)
ops.register_backend("gather", "cpp", "cpu", _C.gather_cpu)
if _C.with_cuda:
    ops.register_backend("taylor_accumulate_", "cuda", "cuda", _C.taylor_accumulate_cuda)
    ops.register_backend("gather", "cuda", "cuda", _C.gather_cuda)

__all__ = ["_C"]
