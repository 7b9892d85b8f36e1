"""Quality table on SmolLM2-135M: perplexity and zero-shot accuracy after pruning, one row per method.

LLM-Pruner's protocol adapted to the offline data: 10 x 64 calibration tokens from the Wikipedia
corpus (training split by article); perplexity in non-overlapping windows of 128 and 2048 tokens on
held-out Wikipedia articles and on the held-out Austen text; the offline zero-shot suite
(``fastprune.zeroshot``, lm-eval engine when installed) subsampled to ``--zeroshot-items`` per task.
Every row starts from a fresh copy of the dense model.  The LoRA row prunes as ``element1`` and
then runs a CPU-sized recovery (steps, tokens and time are recorded).  The Torch-Pruning row runs
in a child process killed after ``--tp-timeout`` seconds; a run that does not finish is recorded.

    python benchmarks/quality.py --out runs/quality        # writes quality.jsonl and quality.md
    python benchmarks/quality.py --rows dense element1 --sweep --seeds 1 2 --seed-rows element1 \\
        --recon-sizes 32 128 512 --out runs/quality        # resumes: finished jobs are not run again
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
from fastprune.data import adds_bos, calibration_batch, eval_tokens
from fastprune.evaluate import perplexity
from fastprune.models import load_model
from fastprune.report import stage
from fastprune.zeroshot import OFFLINE_TASKS, evaluate_zeroshot

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import torch_pruning_targets  # noqa: E402

LLMP = dict(method="llm-pruner")
ROWS: dict[str, dict | None] = {
    "dense": None,
    "random": dict(LLMP, criterion="random"),
    "l2": dict(LLMP, criterion="l2"),
    "vectorwise": dict(LLMP, criterion="vectorwise"),
    "element1": dict(LLMP),  # LLM-Pruner, faithful (method="llm-pruner")
    "element2": dict(LLMP, criterion="element2"),
    "element1 + LoRA": dict(LLMP),
    "element1 uniform": dict(LLMP, uniform=True),
    "Torch-Pruning 1.6.1 (Taylor)": None,
    # the new pieces alone, then combined (issue 17); reconstruction calibration: 128 x 128 tokens
    "element1 + refit (wiki only)": dict(LLMP, reconstruct=True, recon_calib="wiki"),
    "element1 + refit (generic mix)": dict(LLMP, reconstruct=True),
    "element1 + refit, no bias": dict(LLMP, reconstruct=True, recon_bias=False),
    "element1 + sequential refit": dict(LLMP, reconstruct=True, sequential=True),
    "fluctuation": dict(LLMP, criterion="fluctuation"),
    "obs": dict(LLMP, criterion="obs"),
    "obs + refit (generic mix)": dict(LLMP, criterion="obs", reconstruct=True),
    "element1, sensitivity allocation": dict(LLMP, allocation="sensitivity"),
    "element1 + refit (generic mix), sensitivity allocation": dict(LLMP, reconstruct=True, allocation="sensitivity"),
    "element1 global, all layers": dict(LLMP, ranking="global", layers=(0, 30), max_group_ratio=0.6),
    "obs global, all layers": dict(LLMP, criterion="obs", ranking="global", layers=(0, 30), max_group_ratio=0.6),
    "refit (default)": dict(method="refit"),  # obs + refit (generic mix) since it won every held-out set
    "refit (default), sensitivity allocation": dict(method="refit", allocation="sensitivity"),
    "refit (default) + LoRA": dict(method="refit"),
    # extra rows
    "mix": dict(LLMP, criterion="mix"),
    "element1 global": dict(LLMP, ranking="global"),
    "element1 channel": dict(LLMP, scope="channel"),
    "element1 layer": dict(LLMP, scope="layer"),
}
DEFAULT_ROWS = ["dense", "element1", "element1 + refit (wiki only)", "element1 + refit (generic mix)",
                "element1 + refit, no bias", "element1 + sequential refit", "fluctuation", "obs",
                "element1 global, all layers", "obs global, all layers", "refit (default)", "element1 + LoRA",
                "refit (default) + LoRA"]
SWEEP_METHODS = {"llm-pruner": dict(LLMP), "refit (default)": dict(method="refit")}
SWEEP_RATIOS = (0.1, 0.2, 0.3, 0.5)
RECON_SIZES = (32, 128, 512)
TORCH_PRUNING = "Torch-Pruning 1.6.1 (Taylor)"
SEQ_LENS = (128, 2048)
SOURCES = ("wiki", "austen")
TASKS = tuple(OFFLINE_TASKS)
LORA = dict(max_steps=300, batch_size=4, micro_batch_size=4, seq_len=64, lr=3e-4, warmup_steps=20,
            text_tokens=100_000)


def evaluate_row(model, tokenizer, args, zeroshot: bool = True) -> dict:
    """Parameters, perplexities and (with ``zeroshot``) zero-shot accuracies of ``model``."""
    entry: dict = {"params": sum(p.numel() for p in model.parameters())}
    bos = tokenizer.bos_token_id if adds_bos(tokenizer) else None  # SmolLM2's tokenizer adds none
    t0 = time.perf_counter()
    for source in SOURCES:
        tokens = eval_tokens(tokenizer, source, max_tokens=args.eval_tokens)
        for seq_len in SEQ_LENS:
            entry[f"{source}@{seq_len}"] = perplexity(model, tokens, seq_len=seq_len, progress=False,
                                                      bos_token_id=bos).ppl
    entry["ppl_s"] = time.perf_counter() - t0
    if not zeroshot:
        return entry
    t0 = time.perf_counter()
    results = evaluate_zeroshot(model, tokenizer, TASKS, limit=args.zeroshot_items, progress=False)
    entry["zeroshot"] = {task: 100 * r.primary(task) for task, r in results.items()}
    entry["zeroshot_items"] = {task: r.n for task, r in results.items()}
    entry["zeroshot_s"] = time.perf_counter() - t0
    return entry


def _forward_cost(model, tokens: torch.Tensor, batch_size: int = 8) -> dict:
    """Wall time and peak RSS of a no-grad forward pass over ``tokens`` (the reconstruction's yardstick)."""
    stats: dict = {}
    with stage(stats, "forward", torch.device("cpu")), torch.no_grad():
        for i in range(0, tokens.shape[0], batch_size):
            model(input_ids=tokens[i:i + batch_size], use_cache=False)
    st = stats["forward"]
    return {"seconds": st.seconds, "peak_bytes": st.peak_bytes, "extra_bytes": st.extra_bytes}


def run_fastprune_row(job: dict, args) -> dict:
    """Prune a fresh SmolLM2 as the job's row says (LoRA recovery for the LoRA rows) and evaluate it."""
    from fastprune.presets import resolve
    from fastprune.recovery import SAMPLE_DATA, recover

    model, tokenizer = load_model("smollm2")
    row, ratio, seed = job["row"], job["ratio"], job["seed"]
    options = dict(ROWS[row] or {})
    if job.get("recon_samples"):
        options["recon_samples"] = job["recon_samples"]
    entry: dict = dict(job)
    if ROWS[row] is not None:
        settings = resolve(options.get("method", "refit"), {k: v for k, v in options.items() if k != "method"})
        if settings["reconstruct"]:  # the yardstick: a dense no-grad forward over the same tokens
            tokens = calibration_batch(tokenizer, settings["recon_calib"], n_samples=settings["recon_samples"],
                                       seq_len=settings["recon_seq_len"], seed=seed, bos=None)
            entry["forward_over_recon_tokens"] = _forward_cost(model, tokens)
        start = time.perf_counter()
        report = fastprune.prune(model, ratio, tokenizer=tokenizer, seed=seed, progress=False, **options)
        entry["prune_s"] = time.perf_counter() - start
        entry["stages"] = {k: {"seconds": v.seconds, "peak_bytes": v.peak_bytes, "extra_bytes": v.extra_bytes}
                           for k, v in report.stages.items()}
        entry["peak_bytes"] = max(v.peak_bytes for v in report.stages.values())
        entry["settings"] = {k: report.settings.get(k) for k in ("method", "criterion", "ranking", "reconstruct",
                                                                 "max_group_ratio", "reconstruction")}
        entry["max_layer_cut"] = report.settings["ratio_meaning"]["max_layer_cut"]
    if row.endswith("+ LoRA"):
        torch.manual_seed(seed)
        result = recover(model, [SAMPLE_DATA, "wiki"], tokenizer=tokenizer, seed=seed, progress=False,
                         logging_steps=max(1, min(25, args.lora_steps)), **{**LORA, "max_steps": args.lora_steps})
        entry["lora"] = {"steps": result.steps, "tokens": result.tokens, "examples": result.examples,
                         "seconds": result.seconds, "trainable_params": result.trainable_params,
                         "loss_first": result.losses[0][1], "loss_last": result.losses[-1][1], **LORA,
                         "max_steps": args.lora_steps}
    entry.update(evaluate_row(model, tokenizer, args, zeroshot=job["with_zeroshot"]))
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


def _ppl_cells(r: dict, dense: dict | None) -> list[str]:
    cells = []
    for c in (f"{s}@{n}" for s in SOURCES for n in SEQ_LENS):
        ratio = f" ({r[c] / dense[c]:.2f}x)" if dense and c in dense and c.endswith("@128") else ""
        cells.append(f"{r[c]:.2f}{ratio}")
    return cells


def main_table(results: list[dict]) -> str:
    """Parameters, perplexities (x dense at 128 tokens), zero-shot accuracies, prune time and peak memory."""
    short = {t: t.replace("_next_sentence", " next").replace("_continuation", " cont.") for t in TASKS}
    head = (["row", "parameters", "removed"] + [f"PPL {s}@{n}" for s in SOURCES for n in SEQ_LENS]
            + [short[t] for t in TASKS] + ["mean acc", "prune s", "peak MiB"])
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    dense = next((r for r in results if r["row"] == "dense" and "params" in r), None)
    for r in results:
        if "params" not in r:
            lines.append(f"| {r['row']} | " + " | ".join(["-"] * (len(head) - 2)) + f" | {r['status']} |")
            continue
        removed = f"{1 - r['params'] / dense['params']:.1%}" if dense else "-"
        accs = [r["zeroshot"][t] for t in TASKS] if isinstance(r.get("zeroshot"), dict) else []
        cells = ([r["row"], f"{r['params']:,}", removed] + _ppl_cells(r, dense)
                 + ([f"{a:.1f}" for a in accs] + [f"{sum(accs) / len(accs):.1f}"] if accs else ["-"] * (len(TASKS) + 1))
                 + [f"{r['prune_s']:.1f}" if "prune_s" in r else "-",
                    f"{r['peak_bytes'] / 2**20:,.0f}" if "peak_bytes" in r else "-"])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def spread_table(results: list[dict], key: str, label: str) -> str:
    """Rows grouped by ``key`` (mean and min..max over the other settings, e.g. over seeds)."""
    groups: dict = {}
    for r in results:
        if "params" in r:
            groups.setdefault(r[key] if key != "row" else r["row"], []).append(r)
    cols = [f"{s}@{n}" for s in SOURCES for n in SEQ_LENS]
    lines = [f"| {label} | runs | " + " | ".join(f"PPL {c}" for c in cols) + " |", "|---|---:|" + "---:|" * len(cols)]
    for name, rs in groups.items():
        cells = []
        for c in cols:
            v = [r[c] for r in rs]
            cells.append(f"{sum(v) / len(v):.2f} ({min(v):.2f}..{max(v):.2f})" if len(v) > 1 else f"{v[0]:.2f}")
        lines.append(f"| {name} | {len(rs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def sweep_chart(results: list[dict], dense: dict | None, path: Path) -> Path | None:
    """Perplexity (wiki and Austen at 128 tokens) against the ratio, one line per method."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no sweep chart (pip install matplotlib)", file=sys.stderr)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, source in zip(axes, SOURCES):
        for method in SWEEP_METHODS:
            pts = sorted((r["ratio"], r[f"{source}@128"]) for r in results if r.get("method_label") == method)
            if pts:
                ax.plot([100 * x for x, _ in pts], [y for _, y in pts], marker="o", label=method)
        if dense:
            ax.axhline(dense[f"{source}@128"], color="grey", linestyle=":", label="dense")
        ax.set_yscale("log")
        ax.set_xlabel("parameters removed (%)")
        ax.set_ylabel(f"perplexity, {source} @128")
        ax.legend()
    fig.suptitle("SmolLM2-135M-Instruct: perplexity against pruning ratio")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def jobs_from_args(args) -> list[dict]:
    """Every run the arguments ask for, each a plain dict keyed by ``job`` (the resume key)."""
    jobs = []

    def add(row, ratio, seed, zeroshot, part, **extra):
        key = f"{part}|{row}|r{ratio}|s{seed}" + "".join(f"|{k}{v}" for k, v in sorted(extra.items()))
        jobs.append(dict(job=key, part=part, row=row, ratio=ratio, seed=seed, with_zeroshot=zeroshot, **extra))

    for row in args.rows:
        add(row, args.ratio, args.seed, not args.no_zeroshot, "main")
    if args.sweep:
        for label, _ in SWEEP_METHODS.items():
            row = "element1" if label == "llm-pruner" else "refit (default)"
            for ratio in SWEEP_RATIOS:
                add(row, ratio, args.seed, False, "sweep", method_label=label)
    for seed in args.seeds:
        for row in args.seed_rows:
            add(row, args.ratio, seed, False, "seeds")
    for n in args.recon_sizes:
        add("refit (default)", args.ratio, args.seed, False, "recon_size", recon_samples=n)
    return jobs


def _same_run(job: dict, finished) -> dict | None:
    """A finished job of another part with the very same settings (row, ratio, seed, calibration size)."""
    for r in finished:
        if ("params" in r and r.get("row") == job["row"] and r.get("ratio") == job["ratio"]
                and r.get("seed") == job["seed"] and r.get("recon_samples") == job.get("recon_samples")):
            return r
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="*", default=DEFAULT_ROWS, choices=list(ROWS))
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--eval-tokens", type=int, default=8192, help="held-out tokens per perplexity set")
    parser.add_argument("--zeroshot-items", type=int, default=300, help="items per offline zero-shot task")
    parser.add_argument("--no-zeroshot", action="store_true", help="perplexity only in the main rows")
    parser.add_argument("--sweep", action="store_true", help=f"ratios {SWEEP_RATIOS} for {tuple(SWEEP_METHODS)}")
    parser.add_argument("--seeds", nargs="*", type=int, default=[], help="calibration seeds for --seed-rows")
    parser.add_argument("--seed-rows", nargs="*", default=[], choices=list(ROWS))
    parser.add_argument("--recon-sizes", nargs="*", type=int, default=[],
                        help=f"reconstruction calibration windows for the default recipe, e.g. {RECON_SIZES}")
    parser.add_argument("--lora-steps", type=int, default=LORA["max_steps"])
    parser.add_argument("--tp-timeout", type=float, default=600.0, help="seconds allowed to Torch-Pruning")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/quality", help="folder for quality.jsonl, quality.md, sweep.png")
    parser.add_argument("--render-only", action="store_true", help="rebuild quality.md from quality.jsonl")
    parser.add_argument("--torch-pruning-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.torch_pruning_child:
        torch_pruning_child(args)
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "quality.jsonl"
    done = {}
    if log_path.exists():  # resume: every finished job is kept and not run again
        for line in log_path.read_text().splitlines():
            record = json.loads(line)
            if "job" in record:
                done[record["job"]] = record
    if not args.render_only:
        meta = {"machine": platform.machine(), "threads": torch.get_num_threads(), "torch": torch.__version__,
                "ratio": args.ratio, "eval_tokens": args.eval_tokens, "zeroshot_items": args.zeroshot_items,
                "date": time.strftime("%Y-%m-%d")}
        with open(log_path, "a") as log:
            log.write(json.dumps({"meta": meta}) + "\n")
            for job in jobs_from_args(args):
                if job["job"] in done:
                    continue
                same = _same_run(job, done.values())
                if same is not None:  # e.g. the sweep's 20 % point is the main row: the same run, not re-run
                    entry = {**same, **job, "same_run_as": same["job"]}
                elif job["row"] == TORCH_PRUNING:
                    entry = {**job, **run_torch_pruning_row(args)}
                else:
                    entry = run_fastprune_row(job, args)
                print(json.dumps(entry), flush=True)
                log.write(json.dumps(entry) + "\n")
                log.flush()
                done[job["job"]] = entry
    results = list(done.values())
    main_rows = sorted((r for r in results if r.get("part") == "main"), key=lambda r: list(ROWS).index(r["row"]))
    dense = next((r for r in main_rows if r["row"] == "dense" and "params" in r), None)
    parts = ["## Main table\n", main_table(main_rows)]
    sweep = [r for r in results if r.get("part") == "sweep"]
    if sweep:
        parts += ["\n## Ratio sweep\n", main_table(([dense] if dense else []) + [
            dict(r, row=f"{r['method_label']} @{r['ratio']:.0%}") for r in sweep])]
        chart = sweep_chart(sweep, dense, out / "sweep.png")
        if chart:
            parts.append(f"\n![perplexity against ratio]({chart.name})")
    seeds = [r for r in results if r.get("part") == "seeds"]
    if seeds:
        parts += ["\n## Calibration seeds (mean, min..max)\n", spread_table(seeds, "row", "row")]
    sizes = [r for r in results if r.get("part") == "recon_size"]
    if sizes:
        parts += ["\n## Reconstruction calibration size (default recipe)\n",
                  spread_table(sizes, "recon_samples", "windows of 128 tokens")]
    table = "\n".join(parts)
    (out / "quality.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
