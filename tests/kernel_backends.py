"""The backends the kernel tests run on, and when they may skip.

A backend missing here skips with a reason, except where CI requires it: ``FASTPRUNE_REQUIRE_EXT=1``
(the C++ extension) and ``FASTPRUNE_REQUIRE_TRITON=1`` (Triton under its interpreter; ``make test``
sets both) turn those skips into failures.  CUDA cases skip without a GPU.
"""

from __future__ import annotations

import os

import pytest
import torch

from fastprune import backends

CASES = [("reference", "cpu"), ("cpp", "cpu"), ("triton", "cpu"), ("reference", "cuda"), ("cuda", "cuda"),
         ("triton", "cuda")]


def _skip_or_fail(reason: str, required_by: str | None) -> None:
    if required_by and os.environ.get(required_by) == "1":
        pytest.fail(f"{required_by}=1 but {reason}")
    pytest.skip(reason)


def triton_interpreted() -> bool:
    """Whether the Triton kernels were defined under TRITON_INTERPRET=1 (so they run on the CPU)."""
    from fastprune.kernels import triton_taylor

    return type(triton_taylor._taylor_partials_kernel).__name__ == "InterpretedFunction"


def require(backend: str, device: str) -> None:
    """Skip (or fail, where CI requires the backend) unless ``backend`` can run on ``device`` here."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if backend == "cpp" and "cpp" not in backends.available("cpu"):
        _skip_or_fail("the C++ extension is not built", "FASTPRUNE_REQUIRE_EXT")
    if backend == "cuda" and "cuda" not in backends.available("cuda"):
        pytest.skip("the extension was built without CUDA")
    if backend == "triton":
        if "triton" not in backends.available(device):
            _skip_or_fail(f"Triton cannot run on {device} here (not installed, or TRITON_INTERPRET is not 1)",
                          "FASTPRUNE_REQUIRE_TRITON")
        if device == "cpu" and not triton_interpreted():
            _skip_or_fail("the Triton kernels were defined without TRITON_INTERPRET=1 (tests/conftest.py sets it "
                          "before anything imports them)", "FASTPRUNE_REQUIRE_TRITON")
