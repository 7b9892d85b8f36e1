"""The hot path makes no per-layer host syncs: conversions of tensors to Python values do not grow with depth.

``prune()`` runs on a tiny Llama with 2 and with 8 layers while ``Tensor.item``, ``tolist``,
``__float__``, ``__bool__`` and ``numpy`` count their calls and a ``TorchDispatchMode`` counts
``aten._local_scalar_dense`` (every tensor-to-Python conversion ends there, ``int()`` included).
On a CUDA tensor each of these is a device synchronisation.  The counts of the deep model must not
exceed those of the shallow one.  On a GPU the same run counts the synchronisations CUDA itself
reports (``torch.cuda.set_sync_debug_mode``) around scoring, selection and compaction.
"""

from __future__ import annotations

import warnings
from collections import Counter

import pytest
import torch
from models import tiny_llama
from torch.utils._python_dispatch import TorchDispatchMode

import fastprune
from fastprune import graph_cache

PATCHED = ("item", "tolist", "__float__", "__bool__", "numpy")


class _CountScalars(TorchDispatchMode):
    def __init__(self, counts: Counter):
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.counts["_local_scalar_dense"] += 1
        return func(*args, **(kwargs or {}))


def _counted(monkeypatch, counts: Counter):
    for name in PATCHED:
        original = getattr(torch.Tensor, name)

        def wrapper(self, *args, _name=name, _original=original, **kwargs):
            counts[_name] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, wrapper)


def _model(layers: int, device: str = "cpu"):
    return tiny_llama(layers=layers, hidden=48, intermediate=80, heads=6, kv_heads=3).to(device)


def _calib(device: str = "cpu"):
    return torch.randint(0, 96, (4, 12), generator=torch.Generator().manual_seed(0)).to(device)


CASES = [dict(criterion="element1"), dict(criterion="element2"), dict(criterion="vectorwise", ranking="global"),
         dict(criterion="l2", scope="channel", ratio=None, group_ratio=0.25), dict(criterion="element1", scope="layer"),
         dict(criterion="element1", steps=2),
         dict(method="refit")]


@pytest.mark.parametrize("options", CASES, ids=lambda o: "-".join(str(v) for v in o.values()))
def test_conversions_do_not_grow_with_depth(monkeypatch, options):
    options = {"ratio": 0.2, "method": "llm-pruner", **options}
    for layers in (2, 8):  # warm: kernels' self-checks, and each depth's graph in the discovery cache
        fastprune.prune(_model(layers), calib=_calib(), layers=(0, layers), progress=False, **options)
    counts = {}
    for layers in (2, 8):
        model = _model(layers)
        graph_cache.clear()  # both runs trace their model (a first prune does)
        with monkeypatch.context() as m:
            counted = Counter()
            _counted(m, counted)
            with _CountScalars(counted):
                fastprune.prune(model, calib=_calib(), layers=(0, layers), progress=False, **options)
        counts[layers] = counted
    grown = {k: (counts[2][k], counts[8][k]) for k in counts[8] if counts[8][k] > counts[2][k]}
    assert not grown, f"conversions that grow with depth (2 layers, 8 layers): {grown}"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_synchronisations_do_not_grow_with_depth():
    from fastprune.apply import apply
    from fastprune.importance import score
    from fastprune.select import select

    def hot_path(layers: int) -> int:
        model = _model(layers, "cuda")
        graph = fastprune.discover(model)
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                scores = score(model, graph, _calib("cuda"), progress=False)
                plan = select(graph, scores, 0.2, layers=(0, layers))
                apply(model, plan, graph)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sum("synchronizing" in str(w.message) for w in caught)

    hot_path(2)  # warm: self-checks and library handles
    assert hot_path(8) <= hot_path(2)
