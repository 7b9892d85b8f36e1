"""Fuzzed equivalence: random models of every supported family, random plans at random scopes.

For each seed (see ``fuzz.py``): masking the plan's removed elements in the original model (the
kept-channel-norm reference for the hidden dimension, ``equivalence.py``) gives the compacted
model's logits, and a copy saved with ``save_pruned`` and loaded with ``load_pruned`` gives them
too.  Every run checks seeds ``FASTPRUNE_FUZZ_START`` (default 0) onwards, ``FASTPRUNE_FUZZ_CASES``
of them (default 30); ``make fuzz`` runs 500.
"""

import os

import pytest
import torch
from equivalence import masked_reference
from fuzz import VOCAB, random_case, random_plan

from fastprune.apply import apply
from fastprune.discover import discover
from fastprune.io import load_pruned, save_pruned

START = int(os.environ.get("FASTPRUNE_FUZZ_START", "0"))
CASES = int(os.environ.get("FASTPRUNE_FUZZ_CASES", "30"))


@pytest.mark.parametrize("seed", range(START, START + CASES))
def test_fuzzed_plan_equals_masked_original_and_round_trips(seed, tmp_path):
    case = random_case(seed)
    model = case.make()
    graph = discover(model)
    assert not graph.warnings, case.describe()
    plan = random_plan(case, graph)
    reference = masked_reference(model, plan, graph)
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        expected = reference(ids).logits
        apply(model, plan, graph)
        got = model(ids).logits
    assert sum(p.numel() for p in model.parameters()) < graph.total_params, case.describe()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5, msg=lambda m: f"{case.describe()}: {m}")
    loaded, _ = load_pruned(save_pruned(model, tmp_path / "ckpt"))
    with torch.no_grad():
        again = loaded(ids).logits
    assert torch.equal(again, got), f"{case.describe()}: the loaded copy differs by {(again - got).abs().max()}"
