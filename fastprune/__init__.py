"""fastprune: structured pruning of Hugging Face causal LMs (the LLM-Pruner method) with compiled kernels.

Quick start::

    import fastprune
    report = fastprune.prune(model, 0.2, tokenizer=tokenizer)   # in place
    print(report.summary())
"""

from fastprune import backends, ops
from fastprune.apply import apply
from fastprune.discover import discover
from fastprune.errors import FastpruneError
from fastprune.graph import Group, PruningGraph, Slice
from fastprune.overrides import Override, register_override
from fastprune.plan import Plan
from fastprune.prune import prune
from fastprune.report import PruneReport

__version__ = "0.1.0"

__all__ = ["FastpruneError", "Group", "Override", "Plan", "PruneReport", "PruningGraph", "Slice", "apply", "backends",
           "discover", "load_pruned", "ops", "prune", "recover", "register_override", "save_pruned", "score", "select"]


def __getattr__(name: str):
    if name == "score":
        from fastprune.importance import score
        return score
    if name == "select":
        from fastprune.select import select
        return select
    if name == "recover":
        from fastprune.recovery import recover
        return recover
    if name in ("save_pruned", "load_pruned"):
        from fastprune import io
        return getattr(io, name)
    raise AttributeError(f"module 'fastprune' has no attribute {name!r}")
