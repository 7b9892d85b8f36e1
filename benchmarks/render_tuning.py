"""Render the issue-17 tuning table (benchmarks/RESULTS.md, "How the recipe was chosen") from its JSON lines.

    python benchmarks/render_tuning.py [benchmarks/results/tuning-2026-11-30.jsonl]

Each line is one experiment on the tuning sets (wiki-tune, Pride and Prejudice); ``dense`` is the reference.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

DEFAULT = Path(__file__).resolve().parent / "results" / "tuning-2026-11-30.jsonl"
ALLOCATIONS = {"local": "LLM-Pruner (local, layers 4..27)", "mlp": "MLP channels only (local, layers 4..27)",
               "all-global": "global ranking, all layers, max 60 % per group"}
RECONSTRUCTIONS = {"none": "none", "dense": "refit, dense statistics", "seq": "refit, sequential"}


def _row(r: dict, dense: dict) -> str:
    if r["name"].startswith("e5") or "sens" in r["name"]:
        alloc = "sensitivity (measured), all layers, max 60 %"
    else:
        alloc = ALLOCATIONS.get(r["alloc"], r["alloc"])
    rec = RECONSTRUCTIONS[r["rec"]]
    if r["rec"] != "none":
        rec += f", ridge {r['ridge']}" + (", no bias" if r["nobias"] else ", bias")
    activation = r["criterion"] in ("obs", "fluctuation")
    calib = r["mix"].replace("moby", "melville") if r["rec"] != "none" or activation else "wiki 10x64"
    heads = r.get("heads") or []
    kv = f"{min(heads[4:28])}..{max(heads[4:28])}" if heads else ""
    mlp = r["mlp"][10] if r.get("mlp") else ""
    wiki, pp = r["wikitune"], r["pp"]
    return (f"| {r['name']} | {r['criterion']} | {alloc} | {rec} | {calib} | "
            f"{wiki:.2f} ({wiki / dense['wikitune']:.2f}x) | {pp:.2f} ({pp / dense['pp']:.2f}x) | {kv} | {mlp} |")


def render(path: Path) -> str:
    """The markdown table of the experiments in ``path``."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    dense = next(r for r in rows if r["name"] == "dense")
    out = ["| experiment | criterion | allocation | reconstruction | calibration | wiki-tune PPL@128 (x dense) | "
           "P&P PPL@128 (x dense) | kv groups kept (layers 4..27) | MLP kept (layer 10) |",
           "|---|---|---|---|---|---:|---:|---|---:|"]
    for r in rows:
        if r["name"] == "dense":
            out.append(f"| dense | | | | | {dense['wikitune']:.2f} | {dense['pp']:.2f} | 3 | 1536 |")
        else:
            out.append(_row(r, dense))
    return "\n".join(out)


if __name__ == "__main__":
    print(render(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT))
