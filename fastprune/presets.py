"""Named recipes (``prune(method=...)``): every setting a method implies, overridable one by one.

- ``llm-pruner``: the faithful LLM-Pruner recipe: element1 Taylor scores from 10 x 64 Wikipedia
  tokens, block scope over LLM-Pruner's layer range (4..30 of 32, scaled), local ranking, no
  reconstruction.  Its plans on SmolLM2 are pinned by ``tests/golden/llm_pruner_plans.json``.
- ``refit``: retraining-free pruning with reconstruction (benchmarks/RESULTS.md says how it was
  chosen and what it beat): LLM-Pruner's allocation (one ratio per group over its layer range), each
  element scored by ``obs`` (the output error its removal leaves after the optimal refit of the
  others), then the consumers of the pruned channels refitted by ridge least squares, with a bias
  term.  Scores and refit come from the same 128 x 128 tokens of generic text of three kinds
  (Wikipedia, Alpaca-style instructions, a novel); no gradients.
"""

from __future__ import annotations

from typing import Any

from fastprune.errors import FastpruneError

PRESETS: dict[str, dict[str, Any]] = {
    "llm-pruner": dict(criterion="element1", scope="block", ranking="local", aggregation="sum", layers=None,
                       n_samples=10, seq_len=64, calib="wiki", reconstruct=False, max_group_ratio=None,
                       allocation="fixed"),
    "refit": dict(criterion="obs", scope="block", ranking="local", aggregation="sum", layers=None,
                  n_samples=10, seq_len=64, calib="wiki", reconstruct=True, max_group_ratio=None,
                  allocation="fixed"),
}
DEFAULT_METHOD = "refit"
ALLOCATIONS = ("fixed", "sensitivity")
ADAPTIVE_MAX_GROUP_RATIO = 0.6  # sensitivity allocation: no group loses more than this share (a minimum width)
RECONSTRUCTION_DEFAULTS: dict[str, Any] = dict(recon_calib="generic", recon_samples=128, recon_seq_len=128,
                                               ridge=1e-2, recon_bias=True, sequential=False)


def resolve(method: str, given: dict[str, Any]) -> dict[str, Any]:
    """The settings of ``method`` with every explicitly given (not None) option taking precedence."""
    if method not in PRESETS:
        raise FastpruneError(f"unknown method {method!r}; choose one of {tuple(PRESETS)}")
    settings = {**PRESETS[method], **RECONSTRUCTION_DEFAULTS}
    settings.update({k: v for k, v in given.items() if v is not None})
    return settings
