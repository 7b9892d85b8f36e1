"""Render RESULTS.md's CPU kernel and fast-path tables from the benchmarks' committed JSON lines.

    python benchmarks/render_fastpath.py [PRUNE_JSONL [KERNELS_JSONL]]

``PRUNE_JSONL`` (default results/fastpath-2026-12-01.jsonl): ``bench_prune.py --jsonl`` rows with the number
of the invocation that wrote each (``run``) added; the SmolLM2 rows give one table, the Llama-3.2-1B-shape
rows (and their dense baseline) another.  ``KERNELS_JSONL`` (default results/kernels-2026-12-01.jsonl):
``bench_kernels.py --small --jsonl`` rows, one table (reference against C++ per op and shape).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT = RESULTS / "fastpath-2026-12-01.jsonl"
KERNELS = RESULTS / "kernels-2026-12-01.jsonl"
FAST_STAGES = ("discovery", "selection", "compaction")


def _s(row: dict, stage: str) -> float:
    return row["stages"][stage]["seconds"]


def _share(row: dict) -> float:
    return sum(_s(row, stage) for stage in FAST_STAGES) / row["total_s"]


def smollm2_table(rows: list[dict]) -> str:
    """Per run and backend: stage seconds, the dense forward+backward of the same process, the ratios."""
    out = ["| run | backend | discovery (trace) | scoring | taylor op | selection | compaction | total | dense f+b | "
           "scoring / f+b | disc+sel+comp share |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        dense = r["dense_fwd_bwd_s"]
        out.append(f"| {r['run']} | {r['backend']} | {_s(r, 'discovery'):.3f} | {_s(r, 'scoring'):.3f} | "
                   f"{r['taylor_op_s']:.3f} | {_s(r, 'selection'):.3f} | {_s(r, 'compaction'):.3f} | "
                   f"{r['total_s']:.3f} | {dense:.3f} | {_s(r, 'scoring') / dense:.2f}x | {100 * _share(r):.1f} % |")
    return "\n".join(out)


def llama_table(rows: list[dict]) -> str:
    """Per scoring-loss setting: stage seconds, total against the dense run, peak over the weights."""
    dense = next(r for r in rows if r["tool"] == "dense")
    out = [f"| scoring loss | discovery | scoring | taylor op | selection | compaction | total | "
           f"total / dense f+b ({dense['total_s']:.2f} s) | peak over pre-model / weights |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r["tool"] == "dense":
            continue
        loss = "default (full logits)" if r["loss_chunk"] is None else f"`loss_chunk={r['loss_chunk']}`"
        if r["gradient_checkpointing"]:
            loss += ", `gradient_checkpointing`"
        out.append(f"| {loss} | {_s(r, 'discovery'):.3f} | {_s(r, 'scoring'):.3f} | {r['taylor_op_s']:.3f} | "
                   f"{_s(r, 'selection'):.3f} | {_s(r, 'compaction'):.3f} | {r['total_s']:.3f} | "
                   f"{r['total_s'] / dense['total_s']:.2f}x | {r['peak_over_pre_model_vs_weights']:.2f}x |")
    out.append(f"| dense forward+backward (all gradients) | | | | | | {dense['total_s']:.3f} | 1.00x | "
               f"{dense['peak_over_pre_model_vs_weights']:.2f}x |")
    return "\n".join(out)


def kernels_table(rows: list[dict]) -> str:
    """Per op and shape: the reference's and the C++ kernel's median milliseconds, and their ratio."""
    out = ["| op | shape | reference ms | C++ ms | speedup |", "|---|---|---:|---:|---:|"]
    ref = {(r["op"], tuple(r["shape"])): r for r in rows if r["backend"] == "reference"}
    for r in rows:
        if r["backend"] == "cpp":
            base = ref[(r["op"], tuple(r["shape"]))]
            out.append(f"| {r['op']} | {'x'.join(map(str, r['shape']))} | {base['ms']:.2f} | {r['ms']:.2f} | "
                       f"{base['ms'] / r['ms']:.2f}x |")
    return "\n".join(out)


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def render(path: Path = DEFAULT, kernels: Path = KERNELS) -> str:
    """The kernel table, then SmolLM2's and the Llama shape's, separated by blank lines."""
    rows = _rows(path)
    smollm2 = [r for r in rows if r["shape"] == "smollm2-real"]
    llama = [r for r in rows if r["shape"] == "llama3.2-1b"]
    return "\n\n".join((kernels_table(_rows(kernels)), smollm2_table(smollm2), llama_table(llama)))


if __name__ == "__main__":
    print(render(*(Path(a) for a in sys.argv[1:3])))
