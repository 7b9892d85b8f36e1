"""Quality table on SmolLM2-135M: perplexity after pruning by each criterion.

LLM-Pruner's protocol adapted to the offline data: 10 x 64 calibration tokens from the Wikipedia
corpus (training split by article), perplexity in non-overlapping windows of 128 and 512 tokens on
held-out Wikipedia articles and on the held-out end of the Austen excerpts.

    python benchmarks/quality.py --ratio 0.2 --eval-tokens 4096 --json quality.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

import fastprune
from fastprune.data import calibration_batch, eval_tokens
from fastprune.evaluate import perplexity
from fastprune.models import load_model

ROWS = {
    "dense": None,
    "random": dict(criterion="random"),
    "l2": dict(criterion="l2"),
    "vectorwise": dict(criterion="vectorwise"),
    "element1": dict(criterion="element1"),
    "element2": dict(criterion="element2"),
    "mix": dict(criterion="mix"),
    "element1 global": dict(criterion="element1", ranking="global"),
    "element1 channel": dict(criterion="element1", scope="channel"),
    "element1 layer": dict(criterion="element1", scope="layer"),
}
SEQ_LENS = (128, 512)
SOURCES = ("wiki", "austen")


def run(rows: list[str], ratio: float, n_eval: int, seed: int) -> list[dict]:
    results = []
    for row in rows:
        model, tokenizer = load_model("smollm2")
        options = ROWS[row]
        entry: dict = {"row": row, "ratio_target": 0.0 if options is None else ratio}
        if options is not None:
            calib = calibration_batch(tokenizer, "wiki", n_samples=10, seq_len=64, seed=seed)
            start = time.perf_counter()
            report = fastprune.prune(model, ratio, calib=calib, seed=seed, progress=False, **options)
            entry["prune_s"] = time.perf_counter() - start
            entry["stages_s"] = {k: round(v.seconds, 3) for k, v in report.stages.items()}
        entry["params"] = sum(p.numel() for p in model.parameters())
        for source in SOURCES:
            tokens = eval_tokens(tokenizer, source, max_tokens=n_eval)
            for seq_len in SEQ_LENS:
                entry[f"{source}@{seq_len}"] = perplexity(model, tokens, seq_len=seq_len, progress=False).ppl
        print(json.dumps(entry), flush=True)
        results.append(entry)
    return results


def markdown(results: list[dict]) -> str:
    cols = [f"{s}@{n}" for s in SOURCES for n in SEQ_LENS]
    lines = ["| row | parameters | removed | " + " | ".join(f"PPL {c}" for c in cols) + " | prune time (s) |",
             "|---|---:|---:|" + "---:|" * len(cols) + "---:|"]
    dense = results[0]["params"] if results and results[0]["row"] == "dense" else None
    for r in results:
        removed = f"{1 - r['params'] / dense:.1%}" if dense else "-"
        cells = " | ".join(f"{r[c]:.2f}" for c in cols)
        lines.append(f"| {r['row']} | {r['params']:,} | {removed} | {cells} | {r.get('prune_s', 0):.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="*", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write results here")
    args = parser.parse_args()
    results = run(args.rows, args.ratio, args.eval_tokens, args.seed)
    table = markdown(results)
    print(table)
    if args.json:
        meta = {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                "torch": torch.__version__, "eval_tokens": args.eval_tokens, "ratio": args.ratio}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": results, "markdown": table}, f, indent=1)


if __name__ == "__main__":
    main()
