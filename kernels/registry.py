"""Register the Triton kernels as the ``triton`` backend of fastprune's ops.

CUDA tensors always get them when Triton imports; CPU tensors only under Triton's interpreter
(``TRITON_INTERPRET=1``), which is how the tests run them without a GPU.  Importing never
initialises CUDA and registers nothing when Triton is missing.
"""

from __future__ import annotations

import os

from fastprune import ops

try:
    from .gather import gather
    from .taylor import taylor_accumulate
except ImportError:  # no Triton: the other backends stay available
    gather = taylor_accumulate = None

if taylor_accumulate is not None:
    _devices = ["cuda"] + (["cpu"] if os.environ.get("TRITON_INTERPRET") == "1" else [])
    for _device in _devices:
        ops.register_backend("taylor_accumulate_", "triton", _device, taylor_accumulate)
        ops.register_backend("gather", "triton", _device, gather)
