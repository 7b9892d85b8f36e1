"""The model card (``README.md``) that :func:`fastprune.io.save_pruned` writes into a checkpoint."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from fastprune.plan import Plan
from fastprune.remote import modeling_fastprune as remote
from fastprune.report import PruneReport
from fastprune.tables import WIDTH_COLUMNS, markdown_table, width_cells


def _layer_rows(model: torch.nn.Module, report: PruneReport | None) -> list[tuple[str, Any, Any, Any]]:
    if report is not None and report.widths_after:
        rows = []
        for layer in sorted(report.widths_before, key=int):
            w = report.widths_after.get(layer)
            rows.append((str(layer), *width_cells(w)) if w else (str(layer), "removed", "", ""))
        return rows
    config = model.config
    per_layer = getattr(config, remote.RECORD_KEY, None)
    if per_layer:
        return [(str(i), *width_cells(per_layer[i])) for i in sorted(per_layer, key=int)]
    uniform = (getattr(config, "num_attention_heads", "-"), getattr(config, "num_key_value_heads", "-"),
               getattr(config, "intermediate_size", "-"))
    return [(str(i), *uniform) for i in range(getattr(config, "num_hidden_layers", 0))]


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def model_card(model: torch.nn.Module, report: PruneReport | None, plans: list[Plan], base_model: str | None,
               evaluation: Mapping[str, Any] | None, vanilla: bool, name: str) -> str:
    """The ``README.md`` of a checkpoint named ``name``: what was pruned and how, per-layer widths, the
    evaluation given, and how to load it (``vanilla``: plain ``from_pretrained`` can)."""
    config = model.config
    base = base_model or getattr(config, "_name_or_path", "") or "unknown"
    settings = dict(report.settings) if report is not None else {}
    if not settings and plans:
        settings = dict(plans[-1].settings)
    front = ["---", "library_name: transformers", "tags: [fastprune, pruned, llm-pruner]"]
    if base_model:
        front.append(f"base_model: {base_model}")
    lines = [*front, "---", "", f"# {name}", "",
             f"`{base}` structurally pruned with fastprune (the LLM-Pruner method): "
             "whole attention head groups, MLP channels, hidden channels or layers were removed, so the "
             "model is smaller and faster with no sparse kernels.", "", "## Pruning", ""]
    pruning: list[tuple[str, str]] = [("base model", f"`{base}`")]
    params_after = sum(p.numel() for p in model.parameters())
    if report is not None:
        target = f" (target {report.ratio_target:.2%})" if math.isfinite(report.ratio_target) else ""
        pruning += [("parameters", f"{report.params_before:,} -> {params_after:,}"),
                    ("ratio", f"{report.ratio_achieved:.2%} removed{target}"),
                    ("layers", f"{report.layers_before} -> {report.layers_after}")]
        if report.hidden_before is not None:
            pruning.append(("hidden size", f"{report.hidden_before} -> {report.hidden_after}"))
    else:
        pruning.append(("parameters", f"{params_after:,}"))
    for key in ("criterion", "scope", "ranking", "aggregation", "steps", "round_to"):
        if settings.get(key) is not None:
            pruning.append((key.replace("_", " "), _fmt(settings[key])))
    calib = [f"{k.replace('_', ' ')} {_fmt(settings[k])}" for k in ("calib", "n_samples", "seq_len", "seed")
             if settings.get(k) is not None]
    if calib:
        pruning.append(("calibration", ", ".join(calib)))
    lines += [markdown_table(("", "value"), pruning), "", "## Per-layer widths", "",
              markdown_table(("layer", *WIDTH_COLUMNS.values()), _layer_rows(model, report))]
    if evaluation:
        lines += ["", "## Evaluation", "",
                  markdown_table(("metric", "value"), [(k, _fmt(v)) for k, v in evaluation.items()])]
    lines += ["", "## How to load", "", "```python"]
    if vanilla:
        lines += ["# every layer has the same widths: plain transformers loads it",
                  "from transformers import AutoModelForCausalLM",
                  "model = AutoModelForCausalLM.from_pretrained(path)"]
    else:
        lines += ["# the config alone does not describe this model (per-layer widths, or values it derives "
                  "from a pruned size): modeling_fastprune.py rebuilds it (needs only transformers)",
                  "from transformers import AutoModelForCausalLM",
                  "model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)"]
    lines += ["", "# or, with fastprune installed", "import fastprune",
              "model, tokenizer = fastprune.load_pruned(path)", "```", ""]
    return "\n".join(lines)
