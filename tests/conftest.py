import os
import warnings

# Before anything defines a Triton kernel: on a machine without a GPU the Triton tests run under
# Triton's interpreter, whatever order the test modules are collected in.  A GPU run sets
# TRITON_INTERPRET=0 itself (benchmarks/gpu_check.sh) to test the compiled kernels.
os.environ.setdefault("TRITON_INTERPRET", "1")

warnings.filterwarnings("ignore", message=".*compiled extension.*")
# a tracer rule that raises is a bug: fail the test instead of degrading to an unmapped-op warning
os.environ["FASTPRUNE_STRICT_TRACE"] = "1"
