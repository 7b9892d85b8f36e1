"""PNG charts of pruning runs (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _kept(widths_after: Mapping[Any, Mapping[str, int]], layer: Any, key: str) -> float:
    """Kept width of ``layer``; 0 for a removed layer, NaN (no bar) when the report does not say."""
    w = widths_after.get(layer, widths_after.get(str(layer)))
    if w is None:
        return 0
    return w.get(key, float("nan"))


def plot_widths(widths_before: Mapping[Any, Mapping[str, int]], widths_after: Mapping[Any, Mapping[str, int]],
                path: str | os.PathLike, title: str = "") -> Path:
    """Bar charts of query heads, kv heads and MLP channels per layer, before (outline) and kept (filled).

    ``widths_*``: layer -> {"heads", "kv_heads", "intermediate"} as in :class:`fastprune.PruneReport`;
    a layer missing from ``widths_after`` was removed.
    """
    plt = _pyplot()
    layers = sorted(widths_before, key=int)
    panels = [(k, label) for k, label in (("heads", "query heads"), ("kv_heads", "kv heads"),
                                          ("intermediate", "MLP channels"))
              if any(k in widths_before[layer] for layer in layers)]
    fig, axes = plt.subplots(len(panels) or 1, 1, figsize=(max(6.0, 0.25 * len(layers) + 2), 2.2 * max(1, len(panels))),
                             sharex=True, squeeze=False)
    x = [int(layer) for layer in layers]
    for ax, (key, label) in zip(axes[:, 0], panels):
        before = [widths_before[layer].get(key, 0) for layer in layers]
        after = [_kept(widths_after, layer, key) for layer in layers]
        ax.bar(x, before, color="none", edgecolor="0.6", label="before")
        ax.bar(x, after, color="tab:blue", label="kept")
        ax.set_ylabel(label)
        ax.set_ylim(0, max(before + [1]) * 1.1)
    from matplotlib.ticker import MaxNLocator

    axes[-1, 0].xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0, 0].legend(loc="lower left", bbox_to_anchor=(0, 1), ncol=2, fontsize="small", frameon=False)
    axes[-1, 0].set_xlabel("layer")
    if title:
        fig.suptitle(title)
    return _save(plt, fig, path)


def _save(plt, fig, path: str | os.PathLike) -> Path:
    """Write ``fig`` as a PNG at ``path`` (parents created) and release it."""
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def plot_sweep(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike, metric_keys: Sequence[str],
               title: str = "") -> Path:
    """Perplexity (log scale) against parameters, one line per evaluation set; rows hold ``params`` and the keys."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    params = [r["params"] / 1e6 for r in rows]
    for key in metric_keys:
        ax.plot(params, [r[key] for r in rows], marker="o", label=key)
    for r, x in zip(rows, params):
        ax.annotate(f"{r['ratio']:.0%}", (x, r[metric_keys[0]]), textcoords="offset points", xytext=(4, 4),
                    fontsize="small")
    ax.set_xlabel("parameters (millions)")
    ax.set_ylabel("perplexity")
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title)
    return _save(plt, fig, path)
