"""Markdown tables: the one renderer behind command output, run reports, model cards and benchmarks."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

# the per-layer counts a width table shows (keys of PruneReport.widths_* and of the width record), with headers
WIDTH_COLUMNS = {"heads": "query heads", "kv_heads": "kv heads", "intermediate": "MLP channels"}


def markdown_table(header: Sequence[Any], rows: Sequence[Sequence[Any]], align: str | None = None) -> str:
    """``header`` and ``rows`` (cells as ``str(cell)``) as a markdown table.

    ``align`` has one letter per column, ``l`` (left, the default for every column) or ``r`` (right).
    """
    align = align or "l" * len(header)
    if len(align) != len(header):
        raise ValueError(f"align has {len(align)} letters for {len(header)} columns")
    lines = [_row(header), "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"]
    lines += [_row(row) for row in rows]
    return "\n".join(lines)


def width_cells(widths: Mapping[str, Any] | None) -> tuple[Any, ...]:
    """One layer's :data:`WIDTH_COLUMNS` cells (``-`` where a count is missing)."""
    return tuple((widths or {}).get(k, "-") for k in WIDTH_COLUMNS)


def format_eval_table(rows: Sequence[dict[str, Any]]) -> str:
    """LLM-Pruner's results layout: model, parameters, perplexities, accuracy per task (%), mean."""
    ppl_keys = list(dict.fromkeys(k for r in rows for k in r["ppl"]))
    tasks = list(dict.fromkeys(t for r in rows for t in r["zeroshot"]))
    header = ["model", "params", *ppl_keys, *tasks] + (["mean"] if tasks else [])
    body = []
    for r in rows:
        cells = [r["model"], f"{r['params'] / 1e6:.1f} M" if r["params"] >= 1e6 else f"{r['params'] / 1e3:.1f} K"]
        cells += [f"{r['ppl'][k]:.2f}" if k in r["ppl"] else "-" for k in ppl_keys]
        cells += [f"{100 * r['zeroshot'][t]['score']:.2f}" if t in r["zeroshot"] else "-" for t in tasks]
        if tasks:
            cells.append("-" if r.get("mean") is None else f"{100 * r['mean']:.2f}")
        body.append(cells)
    return markdown_table(header, body)


def _row(cells: Sequence[Any]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"
