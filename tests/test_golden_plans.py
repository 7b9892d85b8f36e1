"""Golden plans: LLM-Pruner's recipe on the real SmolLM2 must keep choosing exactly these elements.

``tests/golden/llm_pruner_plans.json`` holds, for each case below, the elements (and layers) that the
faithful LLM-Pruner recipe removed when the file was written (commit b92b7d4, the code behind the
quality table's element1 row, wiki PPL@128 77.60).  Any later change (kernels, vectorised selection,
restructuring, new presets) must reproduce them bit for bit.  Regenerate only on purpose:

    .venv/bin/python tests/test_golden_plans.py     # rewrites the golden file
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

import fastprune

GOLDEN = Path(__file__).resolve().parent / "golden" / "llm_pruner_plans.json"
BASE = dict(ratio=0.2, n_samples=10, seq_len=64, seed=0, calib="wiki", method="llm-pruner")
CASES: dict[str, dict] = {
    "random": dict(criterion="random"),
    "l1": dict(criterion="l1"),
    "l2": dict(criterion="l2"),
    "element1": dict(criterion="element1"),
    "element2": dict(criterion="element2"),
    "mix": dict(criterion="mix"),
    "vectorwise": dict(criterion="vectorwise"),
    "element1-global": dict(criterion="element1", ranking="global"),
    "element1-channel": dict(criterion="element1", scope="channel"),
    "element1-layer": dict(criterion="element1", scope="layer"),
}


def removed_elements(plan: fastprune.Plan) -> dict:
    """The plan as removed indices per group (smaller than the kept ones) plus removed layers."""
    removed = {}
    for name, kept in sorted(plan.keep.items()):
        gone = sorted(set(range(plan.group_sizes[name])) - set(kept))
        if gone:
            removed[name] = gone
    return {"remove": removed, "remove_layers": sorted(plan.remove_layers)}


def golden_plan(model, tokenizer, case: str, **overrides) -> dict:
    """The plan of ``case`` on ``model`` as :func:`removed_elements` (dry run: the model is not changed)."""
    options = {**BASE, **CASES[case], **overrides}
    report = fastprune.prune(model, tokenizer=tokenizer, dry_run=True, progress=False, **options)
    return removed_elements(fastprune.Plan.from_json(report.settings["plans"][0]))


@pytest.fixture(scope="module")
def smollm2():
    models = pytest.importorskip("fastprune.models")
    try:
        return models.load_model("smollm2")
    except fastprune.FastpruneError as exc:  # the package is installed by scripts/setup.sh
        pytest.skip(str(exc))


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_llm_pruner_plans_match_golden(smollm2, case):
    model, tokenizer = smollm2
    expected = json.loads(GOLDEN.read_text())[case]
    got = golden_plan(model, tokenizer, case)
    assert got["remove_layers"] == expected["remove_layers"]
    assert sorted(got["remove"]) == sorted(expected["remove"])
    for name, gone in expected["remove"].items():
        assert got["remove"][name] == gone, f"{case}: group {name} removes other elements than the golden plan"


def main() -> None:
    from fastprune.models import load_model

    model, tokenizer = load_model("smollm2")
    out = {case: golden_plan(model, tokenizer, case) for case in CASES}
    GOLDEN.write_text(json.dumps(out, sort_keys=True, separators=(",", ":")) + "\n")
    print(f"wrote {GOLDEN} ({GOLDEN.stat().st_size:,} bytes)", file=sys.stderr)


if __name__ == "__main__":
    main()
