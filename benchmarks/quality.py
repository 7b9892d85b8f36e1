"""Quality table on SmolLM2-135M: perplexity and zero-shot accuracy after pruning, one row per method.

LLM-Pruner's protocol adapted to the offline data: 10 x 64 calibration tokens from the Wikipedia
corpus (training split by article); perplexity in non-overlapping windows of 128 and 2048 tokens on
held-out Wikipedia articles and on the held-out Austen text; the offline zero-shot suite
(``fastprune.zeroshot``, lm-eval engine when installed) subsampled to ``--zeroshot-items`` per task.
Every row starts from a fresh copy of the dense model.  The LoRA row prunes as ``element1`` and
then runs a CPU-sized recovery (steps, tokens and time are recorded).  The Torch-Pruning row runs
in a child process killed after ``--tp-timeout`` seconds; a run that does not finish is recorded.

    python benchmarks/quality.py --out runs/quality        # writes quality.jsonl and quality.md
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

import fastprune
from fastprune.data import calibration_batch, eval_tokens
from fastprune.evaluate import perplexity
from fastprune.models import load_model
from fastprune.zeroshot import OFFLINE_TASKS, evaluate_zeroshot

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import torch_pruning_targets  # noqa: E402

ROWS: dict[str, dict | None] = {
    "dense": None,
    "random": dict(criterion="random"),
    "l2": dict(criterion="l2"),
    "vectorwise": dict(criterion="vectorwise"),
    "element1": dict(criterion="element1"),
    "element2": dict(criterion="element2"),
    "element1 + LoRA": dict(criterion="element1"),
    "element1 uniform": dict(criterion="element1", uniform=True),
    "Torch-Pruning 1.6.1 (Taylor)": None,
    # extra rows, not in the default table
    "mix": dict(criterion="mix"),
    "element1 global": dict(criterion="element1", ranking="global"),
    "element1 channel": dict(criterion="element1", scope="channel"),
    "element1 layer": dict(criterion="element1", scope="layer"),
}
DEFAULT_ROWS = list(ROWS)[:9]
TORCH_PRUNING = "Torch-Pruning 1.6.1 (Taylor)"
SEQ_LENS = (128, 2048)
SOURCES = ("wiki", "austen")
TASKS = tuple(OFFLINE_TASKS)
LORA = dict(max_steps=300, batch_size=4, micro_batch_size=4, seq_len=64, lr=3e-4, warmup_steps=20,
            text_tokens=100_000)


def evaluate_row(model, tokenizer, args) -> dict:
    """Parameters, perplexities and zero-shot accuracies of ``model``."""
    entry: dict = {"params": sum(p.numel() for p in model.parameters())}
    t0 = time.perf_counter()
    for source in SOURCES:
        tokens = eval_tokens(tokenizer, source, max_tokens=args.eval_tokens)
        for seq_len in SEQ_LENS:
            entry[f"{source}@{seq_len}"] = perplexity(model, tokens, seq_len=seq_len, progress=False).ppl
    entry["ppl_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    results = evaluate_zeroshot(model, tokenizer, TASKS, limit=args.zeroshot_items, progress=False)
    entry["zeroshot"] = {task: 100 * r.primary(task) for task, r in results.items()}
    entry["zeroshot_items"] = {task: r.n for task, r in results.items()}
    entry["zeroshot_s"] = time.perf_counter() - t0
    return entry


def run_fastprune_row(row: str, args) -> dict:
    """Prune a fresh SmolLM2 as ``row`` says (LoRA recovery for the LoRA row) and evaluate it."""
    from fastprune.recovery import SAMPLE_DATA, recover

    model, tokenizer = load_model("smollm2")
    options = ROWS[row]
    entry: dict = {"row": row}
    if options is not None:
        calib = calibration_batch(tokenizer, "wiki", n_samples=10, seq_len=64, seed=args.seed)
        start = time.perf_counter()
        fastprune.prune(model, args.ratio, calib=calib, seed=args.seed, progress=False, **options)
        entry["prune_s"] = time.perf_counter() - start
    if row.endswith("+ LoRA"):
        torch.manual_seed(args.seed)
        result = recover(model, [SAMPLE_DATA, "wiki"], tokenizer=tokenizer, seed=args.seed, progress=False,
                         logging_steps=max(1, min(25, args.lora_steps)), **{**LORA, "max_steps": args.lora_steps})
        entry["lora"] = {"steps": result.steps, "tokens": result.tokens, "examples": result.examples,
                         "seconds": result.seconds, "trainable_params": result.trainable_params,
                         "loss_first": result.losses[0][1], "loss_last": result.losses[-1][1], **LORA,
                         "max_steps": args.lora_steps}
    entry.update(evaluate_row(model, tokenizer, args))
    return entry


def torch_pruning_child(args) -> None:
    """Child process: Torch-Pruning's MetaPruner + Taylor on SmolLM2, then the same evaluation."""
    import torch_pruning as tp

    model, tokenizer = load_model("smollm2")
    calib = calibration_batch(tokenizer, "wiki", n_samples=10, seq_len=64, seed=args.seed)
    num_heads, ignored = torch_pruning_targets(model)  # keeps the hidden width, as fastprune's block scope
    print("STAGE building MetaPruner", flush=True)
    start = time.perf_counter()
    pruner = tp.pruner.MetaPruner(
        model, example_inputs=calib[:1], importance=tp.importance.GroupTaylorImportance(),
        pruning_ratio=args.ratio, head_pruning_ratio=args.ratio, num_heads=num_heads, prune_num_heads=True,
        prune_head_dims=False, global_pruning=False, ignored_layers=ignored,
        output_transform=lambda out: out.logits)
    print("STAGE scoring and pruning", flush=True)
    model(calib, labels=calib).loss.backward()
    pruner.step()
    model.zero_grad(set_to_none=True)
    entry = {"row": TORCH_PRUNING, "prune_s": time.perf_counter() - start}
    entry.update(evaluate_row(model, tokenizer, args))
    print("RESULT " + json.dumps(entry), flush=True)


def run_torch_pruning_row(args) -> dict:
    """Torch-Pruning in a child process with a time limit; its failure is a result too."""
    cmd = [sys.executable, __file__, "--torch-pruning-child", "--ratio", str(args.ratio), "--seed", str(args.seed),
           "--eval-tokens", str(args.eval_tokens), "--zeroshot-items", str(args.zeroshot_items)]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.tp_timeout)
        out, err, timed_out = proc.stdout, proc.stderr, False
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        err, timed_out = "", True
    for line in out.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    stages = [line[len("STAGE "):] for line in out.splitlines() if line.startswith("STAGE ")]
    where = stages[-1] if stages else "start-up"
    if timed_out:
        message = f"did not finish in {args.tp_timeout:.0f} s (stuck in: {where})"
    else:
        tail = [x for x in err.splitlines() if x.strip()]
        message = f"failed in {where}: {tail[-1] if tail else 'no output'}"
    return {"row": TORCH_PRUNING, "status": message, "wall_s": time.perf_counter() - start}


def markdown(results: list[dict]) -> str:
    """One table: parameters, perplexities, zero-shot accuracies and their mean per row."""
    ppl_cols = [f"{s}@{n}" for s in SOURCES for n in SEQ_LENS]
    short = {t: t.replace("_next_sentence", " next").replace("_continuation", " cont.") for t in TASKS}
    head = (["row", "parameters", "removed"] + [f"PPL {c}" for c in ppl_cols] + [short[t] for t in TASKS]
            + ["mean acc", "prune s"])
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    dense = next((r["params"] for r in results if r["row"] == "dense"), None)
    for r in results:
        if "params" not in r:
            lines.append(f"| {r['row']} | " + " | ".join(["-"] * (len(head) - 2)) + f" | {r['status']} |")
            continue
        removed = f"{1 - r['params'] / dense:.1%}" if dense else "-"
        accs = [r["zeroshot"][t] for t in TASKS]
        cells = ([r["row"], f"{r['params']:,}", removed] + [f"{r[c]:.2f}" for c in ppl_cols]
                 + [f"{a:.1f}" for a in accs] + [f"{sum(accs) / len(accs):.1f}",
                                                 f"{r['prune_s']:.1f}" if "prune_s" in r else "-"])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="*", default=DEFAULT_ROWS, choices=list(ROWS))
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--eval-tokens", type=int, default=8192, help="held-out tokens per perplexity set")
    parser.add_argument("--zeroshot-items", type=int, default=100, help="items per offline zero-shot task")
    parser.add_argument("--lora-steps", type=int, default=LORA["max_steps"])
    parser.add_argument("--tp-timeout", type=float, default=600.0, help="seconds allowed to Torch-Pruning")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/quality", help="folder for quality.jsonl and quality.md")
    parser.add_argument("--torch-pruning-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.torch_pruning_child:
        torch_pruning_child(args)
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"machine": platform.machine(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "ratio": args.ratio, "eval_tokens": args.eval_tokens, "zeroshot_items": args.zeroshot_items,
            "date": time.strftime("%Y-%m-%d")}
    results = []
    with open(out / "quality.jsonl", "w") as log:
        log.write(json.dumps({"meta": meta}) + "\n")
        for row in args.rows:
            entry = run_torch_pruning_row(args) if row == TORCH_PRUNING else run_fastprune_row(row, args)
            print(json.dumps(entry), flush=True)
            log.write(json.dumps(entry) + "\n")
            log.flush()
            results.append(entry)
    table = markdown(results)
    (out / "quality.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
