"""Triton kernels of fastprune's ops (``triton_*`` modules, imported at first use by ``fastprune.backends``).

The ops validate their arguments before these run (``fastprune.ops.check_*``); the kernels keep
only the checks that guard memory (a gather index out of range is refused as it is read).
"""
