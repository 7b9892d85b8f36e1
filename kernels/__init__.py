"""Triton kernels for fastprune's ops (imported lazily; ``registry`` registers them)."""
