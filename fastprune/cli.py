"""fastprune: structured pruning of Hugging Face causal LMs (the LLM-Pruner method).

Commands: prune, sweep, eval, inspect, bench, tune.  Run ``fastprune COMMAND --help`` for options.
Exit codes: 0 success, 2 a problem with the input (the message says what), 130 interrupted.
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fastprune import backends
from fastprune.activation_scores import ACTIVATION_CRITERIA
from fastprune.cli_checks import check_args
from fastprune.errors import FastpruneError
from fastprune.importance import AGGREGATIONS
from fastprune.importance import CRITERIA as SCORE_CRITERIA
from fastprune.optional import OPTIONAL, install_hint, optional_output
from fastprune.presets import PRESETS
from fastprune.ratio import RATIO_OF
from fastprune.report import json_safe
from fastprune.select import RANKINGS, SCOPES
from fastprune.tables import WIDTH_COLUMNS, format_eval_table, markdown_table, width_cells
from fastprune.zeroshot import ENGINES

CRITERIA = SCORE_CRITERIA + ACTIVATION_CRITERIA
DTYPES = ("float32", "bfloat16", "float16")
BENCH_SCRIPTS = {"kernels": "bench_kernels.py", "prune": "bench_prune.py", "quality": "quality.py"}
USER_ERRORS = (FastpruneError, FileNotFoundError, NotADirectoryError, ValueError)


# ---------------------------------------------------------------------------------------------- arguments

def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be a fraction in [0, 1) (0.2 removes 20 %), got {text}")
    return value


def _ratios(text: str) -> list[float]:
    return [_ratio(t) for t in text.split(",") if t.strip()]


def _positive_ints(text: str) -> list[int]:
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 2:
        raise argparse.ArgumentTypeError(f"expected integers >= 2, got {text!r}")
    return values


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _common() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--json", action="store_true", help="print machine-readable results (JSON) only")
    p.add_argument("--dtype", default=None, choices=DTYPES,
                   help="weight dtype (default: float32 on CPU)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    return p


def _add_selection_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2",
                   help="hub id, local directory, .gguf file, or 'smollm2' (the embedded default)")
    p.add_argument("--method", choices=tuple(PRESETS), default="refit",
                   help="recipe (default refit: OBS scores and reconstruction from generic text; llm-pruner: "
                        "the faithful LLM-Pruner recipe); the options below override its settings one by one")
    p.add_argument("--criterion", choices=CRITERIA, default=None,
                   help="importance criterion (refit: obs; llm-pruner: element1)")
    p.add_argument("--scope", choices=SCOPES, default=None, help="(method: block)")
    p.add_argument("--ranking", choices=RANKINGS, default=None, help="(method: local)")
    p.add_argument("--aggregation", choices=AGGREGATIONS, default=None)
    p.add_argument("--layers", type=int, nargs=2, metavar=("START", "END"),
                   help="block-wise layer range [START, END) (default: LLM-Pruner's 4..30 of 32, scaled)")
    p.add_argument("--round-to", type=_positive_int, default=1, help="keep channel counts multiples of this")
    p.add_argument("--max-group-ratio", type=float, default=None,
                   help="at most this share of any head/channel group goes (a minimum width per layer)")
    p.add_argument("--calib", default=None,
                   help="calibration text for the scores: wiki, austen, alpaca, melville, a .txt/.jsonl file, "
                        "or a hub name (method: wiki)")
    p.add_argument("--n-samples", type=_positive_int, default=None, help="calibration windows (method: 10)")
    p.add_argument("--seq-len", type=_positive_int, default=None, help="calibration window length (method: 64)")
    p.add_argument("--reconstruct", action=argparse.BooleanOptionalAction, default=None,
                   help="refit the consumers of pruned channels before compaction (method refit: on)")
    p.add_argument("--recon-calib", default=None,
                   help="reconstruction text: 'generic' (wiki + alpaca + melville, the default), a source name or "
                        "a file; several sources separated by '+'")
    p.add_argument("--recon-samples", type=_positive_int, default=None, help="reconstruction windows (128)")
    p.add_argument("--recon-seq-len", type=_positive_int, default=None, help="reconstruction window length (128)")
    p.add_argument("--ridge", type=float, default=None, help="ridge term, relative to the mean input energy (0.01)")
    p.add_argument("--recon-bias", action=argparse.BooleanOptionalAction, default=None,
                   help="let the refit move the bias (FLAP's compensation; default on)")
    p.add_argument("--sequential", action=argparse.BooleanOptionalAction, default=None,
                   help="statistics of each layer from the already pruned earlier layers (default off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval", default="wiki,austen", help="comma-separated perplexity sets ('' to skip)")
    p.add_argument("--eval-seq-len", type=_positive_int, default=128)
    p.add_argument("--eval-tokens", type=_positive_int, default=8192, help="held-out tokens per evaluation set")


def _add_prune_args(p: argparse.ArgumentParser) -> None:
    _add_selection_args(p)
    p.add_argument("--ratio", type=_ratio, default=0.2, help="fraction of all parameters to remove")
    p.add_argument("--ratio-of", choices=RATIO_OF, default="model",
                   help="count --ratio over all parameters (default) or over those the scope can remove")
    p.add_argument("--steps", type=_positive_int, default=1, help="iterative pruning in this many steps")
    p.add_argument("--scores", help="reuse importance scores saved with --save-scores (skips calibration)")
    p.add_argument("--save-scores", help="write the importance scores here (safetensors) for later runs")
    p.add_argument("--out", help="save the pruned checkpoint (and the run report) to this directory")
    p.add_argument("--report-dir", help="write the run report here (default: --out, else runs/prune-<time>)")
    p.add_argument("--prompt", default="The capital of France is", help="prompt for a generated sample ('' to skip)")
    p.add_argument("--plan-out", help="write the plan as JSON here")
    p.add_argument("--dry-run", action="store_true", help="show the plan's effect without changing the model")
    p.add_argument("--uniform", action="store_true",
                   help="same widths in every layer (all layers pruned, first and last too, which costs quality): "
                        "saves a plain Hugging Face checkpoint; --scope layer also does")


def _add_sweep_args(p: argparse.ArgumentParser) -> None:
    _add_selection_args(p)
    p.add_argument("--ratios", type=_ratios, default=[0.1, 0.2, 0.3, 0.4, 0.5],
                   help="comma-separated ratios, scored once and pruned from a fresh copy each")
    p.add_argument("--out", help="write table, JSON and chart here (default: runs/sweep-<time>)")


def _add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", action="append",
                   help="model or checkpoint directory (repeat to compare; default: smollm2)")
    p.add_argument("--ppl", default="wiki,austen",
                   help="perplexity sets: wiki, austen, wikitext2, ptb, a local file ('' to skip)")
    p.add_argument("--seq-lens", type=_positive_ints, default=[128],
                   help="perplexity window lengths, e.g. 128,512,2048")
    p.add_argument("--eval-tokens", type=_positive_int, default=16384, help="held-out tokens per perplexity set")
    p.add_argument("--zeroshot", default="offline",
                   help="offline, standard, all, or comma-separated task names ('' to skip)")
    p.add_argument("--limit", type=_positive_int, help="score only the first N items of each zero-shot task")
    p.add_argument("--engine", choices=ENGINES, default="auto",
                   help="zero-shot scorer: lm-eval's HFLM or the built-in one (same scoring)")
    p.add_argument("--n-items", type=_positive_int, default=500, help="items generated per offline task")
    p.add_argument("--tasks-dir", help="where offline task jsonl + lm-eval YAMLs are written (default: cache)")
    p.add_argument("--batch-size", type=_positive_int, default=8)


def _add_bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("script", nargs="?", choices=tuple(BENCH_SCRIPTS),
                   help="run benchmarks/<script>; arguments after it are passed through")
    p.add_argument("--inference", action="store_true", help="pruned vs dense inference speed and memory")
    p.add_argument("--model", default="smollm2", help="the dense model")
    p.add_argument("--checkpoint", help="the pruned model (a checkpoint directory); default: prune --ratio now")
    p.add_argument("--ratio", type=_ratio, default=0.2)
    p.add_argument("--criterion", choices=CRITERIA, default="element1")
    p.add_argument("--prompt-len", type=_positive_int, default=128)
    p.add_argument("--new-tokens", type=_positive_int, default=32)
    p.add_argument("--batch-size", type=_positive_int, default=1)
    p.add_argument("--repeat", type=_positive_int, default=3)
    p.add_argument("--attn", default="sdpa,eager", help="attention implementations to compare")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend for the check ('none' skips)")
    p.add_argument("--out", help="write the table and JSON here")


def _add_tune(sub: Any, argv: Sequence[str]) -> None:
    p = sub.add_parser("tune", help="LoRA recovery of a pruned checkpoint (fastprune.recovery)")
    if list(argv[:1]) != ["tune"]:
        return  # import the recovery module (peft) only when it is asked for
    try:
        add_tune_arguments(p)
    except ImportError as exc:
        p.set_defaults(tune_unavailable=f"{exc}")


def add_tune_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``fastprune tune`` (see :func:`fastprune.recovery.recover` for their meaning)."""
    from fastprune.recovery import PROMPT_FORMATS, SAMPLE_DATA

    p.add_argument("--model", required=True,
                   help="a checkpoint written by fastprune prune/save_pruned, a hub id, or 'smollm2'")
    p.add_argument("--merge-only", metavar="ADAPTER", default=None,
                   help="no training: merge this saved adapter (OUTPUT/adapter of a --no-merge or FSDP run) into "
                        "--model in one process and write the merged model to --output")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="with --merge-only: load, merge and save in this dtype (default: as stored)")
    p.add_argument("--data", nargs="+", default=[str(SAMPLE_DATA)],
                   help="Alpaca .json/.jsonl, wiki, austen, a .txt file or a hub dataset (several are concatenated)")
    p.add_argument("--output", required=True, help="directory for checkpoints, the adapter and the merged model")
    p.add_argument("--no-merge", dest="merge", action="store_false", default=None,
                   help="save the adapter, merge nothing (the default under FSDP: sharded weights cannot be merged)")
    p.add_argument("--fsdp", action="store_true",
                   help="shard with FSDP under torchrun (GPUs only; accelerate launch --use_fsdp needs no flag)")
    p.add_argument("--fsdp-config", default=None, metavar="JSON",
                   help="FSDP settings for TrainingArguments.fsdp_config, a JSON file (implies --fsdp)")
    p.add_argument("--prompt-format", choices=PROMPT_FORMATS, default="auto")
    p.add_argument("--response-only", action="store_true", help="loss on the response tokens only")
    p.add_argument("--r", type=int, default=8, help="LoRA rank")
    p.add_argument("--alpha", type=int, default=16)
    p.add_argument("--dropout", type=float, default=0.05)
    p.add_argument("--target-modules", default=None,
                   help="comma-separated module names (default: every linear layer in the decoder layers)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (overrides --epochs)")
    p.add_argument("--batch-size", type=int, default=128, help="global batch per optimizer step")
    p.add_argument("--micro-batch-size", type=int, default=4, help="examples per forward pass and process")
    p.add_argument("--seq-len", type=int, default=256, help="examples are cut at this many tokens")
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--val", default="wiki", help="held-out perplexity source ('' to skip)")
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--save-every", type=int, default=200)
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --output")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 mixed precision (default: on a GPU that supports it)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The ``fastprune`` argument parser (``argv`` decides whether ``tune`` loads its options)."""
    parser = argparse.ArgumentParser(prog="fastprune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = _common()
    _add_prune_args(sub.add_parser("prune", parents=[common], help="prune a model, report size and perplexity"))
    _add_sweep_args(sub.add_parser("sweep", parents=[common], help="one scoring, several ratios: table and chart"))
    _add_eval_args(sub.add_parser("eval", parents=[common], help="perplexity and zero-shot accuracy table"))
    inspect = sub.add_parser("inspect", parents=[common], help="per-layer widths of a model or checkpoint")
    inspect.add_argument("model", help="model, checkpoint directory, .gguf file or 'smollm2'")
    _add_bench_args(sub.add_parser("bench", parents=[common], help="benchmark scripts; --inference: pruned vs dense"))
    _add_tune(sub, argv)
    return parser


# ---------------------------------------------------------------------------------------------- helpers

def _say(args: argparse.Namespace):
    return (lambda *a: None) if getattr(args, "json", False) else (lambda *a: print(*a, flush=True))


def _device(args: argparse.Namespace) -> str:
    import torch

    return args.device or ("cuda" if torch.cuda.is_available() else "cpu")


def _dtype(args: argparse.Namespace):
    """The torch dtype ``--dtype`` names, or None."""
    import torch

    return getattr(torch, args.dtype) if getattr(args, "dtype", None) else None


def load(name: str, args: argparse.Namespace, attn: str | None = None):
    """``(model, tokenizer)`` from a fastprune checkpoint or anything ``load_model`` takes."""
    from fastprune.io import is_checkpoint, load_pruned
    from fastprune.models import load_model

    dtype = _dtype(args)
    device = _device(args)
    if is_checkpoint(name):
        model, tokenizer = load_pruned(Path(name).expanduser(), dtype=dtype, device=device)
        if attn:
            model.set_attn_implementation(attn)
        return model, tokenizer
    return load_model(name, dtype=dtype, device=device, attn_implementation=attn)


def _perplexities(model, tokenizer, sets: Sequence[str], seq_lens: Sequence[int], max_tokens: int,
                  progress: bool) -> dict[str, float]:
    from fastprune.data import eval_tokens
    from fastprune.evaluate import perplexity

    if tokenizer is None and sets:
        raise FastpruneError("perplexity needs the model's tokenizer (the checkpoint has none)")
    out = {}
    for name in sets:
        tokens = eval_tokens(tokenizer, name, max_tokens=max_tokens)
        for seq_len in seq_lens:
            out[f"{name}@{seq_len}"] = perplexity(model, tokens, seq_len=seq_len, progress=progress).ppl
    return out


def _sets(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(json_safe(data), indent=1) + "\n")


def _run_dir(kind: str, explicit: str | None) -> Path:
    if explicit:
        return Path(explicit).expanduser()
    return Path("runs") / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}"


def write_prune_report(directory: str | Path, report: Any, result: dict[str, Any]) -> dict[str, Path]:
    """Write ``report.json`` (everything), ``report.md`` (a short summary) and ``widths.png`` to ``directory``
    (the chart needs matplotlib: without it, it is skipped with one line on stderr)."""
    from fastprune.plots import plot_widths

    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    paths = {"json": root / "report.json", "markdown": root / "report.md"}
    _write_json(paths["json"], result)
    title = f"{result.get('model', '')}: {report.ratio_achieved:.1%} of parameters removed"
    chart = optional_output("matplotlib", "widths.png", lambda: plot_widths(
        report.widths_before, report.widths_after, root / "widths.png", title=title))
    if chart is not None:
        paths["chart"] = chart
    s = report.settings
    rows = [("parameters", f"{report.params_before:,}", f"{report.params_after:,}"),
            ("layers", report.layers_before, report.layers_after)]
    if report.hidden_before is not None:
        rows.append(("hidden size", report.hidden_before, report.hidden_after))
    for key, before in result.get("ppl_before", {}).items():
        after = result.get("ppl_after", {}).get(key)
        rows.append((f"perplexity {key}", f"{before:.2f}", "-" if after is None else f"{after:.2f}"))
    verb = "would remove (dry run)" if report.dry_run else "removed"
    lines = [f"# fastprune prune: {result.get('model', '')}", "",
             f"{verb} {report.ratio_achieved:.2%} of the parameters (target {report.ratio_target:.2%}); "
             f"criterion {s.get('criterion')}, scope {s.get('scope')}, ranking {s.get('ranking')}, "
             f"aggregation {s.get('aggregation')}, {s.get('steps')} step(s), calibration "
             f"{result.get('calib', '')} {s.get('n_samples')} x {s.get('seq_len')} tokens.", "",
             markdown_table(("", "before", "after"), rows), "",
             *(["![kept heads and MLP channels per layer](widths.png)", ""] if chart is not None else []),
             "```", report.summary(), "```", ""]
    if result.get("sample") is not None:
        lines[-1:-1] = ["", f"Sample: `{result['prompt']}` -> `{result['sample']}`"]
    paths["markdown"].write_text("\n".join(lines))
    return paths


# ---------------------------------------------------------------------------------------------- commands

def resolve_method(args: argparse.Namespace) -> argparse.Namespace:
    """Fill every option the user left unset from ``--method``'s recipe (:mod:`fastprune.presets`)."""
    from fastprune.presets import resolve

    names = ("criterion", "scope", "ranking", "aggregation", "calib", "n_samples", "seq_len", "reconstruct",
             "recon_calib", "recon_samples", "recon_seq_len", "ridge", "recon_bias", "sequential", "max_group_ratio")
    given = {n: getattr(args, n, None) for n in names}
    if isinstance(given["recon_calib"], str) and "+" in given["recon_calib"]:
        given["recon_calib"] = given["recon_calib"].split("+")
    for name, value in resolve(getattr(args, "method", "refit"), given).items():
        if name != "layers":
            setattr(args, name, value)
    return args


def _prune_options(args: argparse.Namespace) -> dict[str, Any]:
    """The options of :func:`fastprune.prune` that the command line sets."""
    return dict(method=args.method, criterion=args.criterion, scope=args.scope, ranking=args.ranking,
                aggregation=args.aggregation, layers=tuple(args.layers) if args.layers else None,
                round_to=args.round_to, max_group_ratio=args.max_group_ratio, reconstruct=args.reconstruct,
                recon_calib=args.recon_calib, recon_samples=args.recon_samples, recon_seq_len=args.recon_seq_len,
                ridge=args.ridge, recon_bias=args.recon_bias, sequential=args.sequential)


def _scores_for(model, tokenizer, args, say):
    """Saved scores (``--scores``), or fresh ones written to ``--save-scores``; None lets prune() score."""
    from fastprune.importance import Scores

    if args.scores:
        if not Path(args.scores).is_file():
            raise FastpruneError(f"no such scores file: {args.scores}")
        scores = Scores.load(args.scores)
        say(f"reusing {scores.criterion} scores from {args.scores}")
        return scores
    if not args.save_scores:
        return None
    scores = _score(model, tokenizer, args)
    scores.save(args.save_scores)
    say(f"scores written to {args.save_scores}")
    return scores


def _score(model, tokenizer, args):
    from fastprune.data import calibration_batch
    from fastprune.discover import discover
    from fastprune.importance import GRADIENT_FREE, score

    graph = discover(model)
    if args.criterion in ACTIVATION_CRITERIA:
        from fastprune.activation_scores import activation_scores

        if tokenizer is None:
            raise FastpruneError(f"the {args.criterion} criterion needs the model's tokenizer for calibration text")
        tokens = calibration_batch(tokenizer, args.recon_calib, n_samples=args.recon_samples,
                                   seq_len=args.recon_seq_len, seed=args.seed, bos=None)
        return activation_scores(model, graph, tokens, args.criterion, ridge=args.ridge, progress=not args.json)
    calib = None
    if args.criterion not in GRADIENT_FREE:
        if tokenizer is None:
            raise FastpruneError("gradient-based criteria need the model's tokenizer for calibration text")
        calib = calibration_batch(tokenizer, args.calib, n_samples=args.n_samples, seq_len=args.seq_len,
                                  seed=args.seed)
    return score(model, graph, calib, criterion=args.criterion, seed=args.seed, progress=not args.json)


def cmd_prune(args: argparse.Namespace) -> dict:
    import fastprune
    from fastprune.evaluate import generate_sample

    say = _say(args)
    progress = not args.json
    t0 = time.perf_counter()
    model, tokenizer = load(args.model, args)
    say(f"loaded {args.model} ({sum(p.numel() for p in model.parameters()):,} parameters) "
        f"in {time.perf_counter() - t0:.1f} s")
    sets = _sets(args.eval)
    result: dict = {"command": "prune", "model": args.model, "calib": args.calib}
    if sets:
        result["ppl_before"] = _perplexities(model, tokenizer, sets, [args.eval_seq_len], args.eval_tokens, progress)
        say("perplexity before: " + ", ".join(f"{k} {v:.2f}" for k, v in result["ppl_before"].items()))
    scores = _scores_for(model, tokenizer, args, say)
    options = dict(_prune_options(args), criterion=scores.criterion if scores else args.criterion)
    report = fastprune.prune(model, args.ratio, calib=args.calib, tokenizer=tokenizer, n_samples=args.n_samples,
                             seq_len=args.seq_len, steps=args.steps, seed=args.seed, scores=scores,
                             dry_run=args.dry_run, uniform=args.uniform, progress=progress,
                             ratio_of=args.ratio_of, **options)
    say(report.summary())
    result["report"] = report.to_dict()
    if args.plan_out:
        fastprune.Plan.from_json(report.settings["plans"][-1]).save(args.plan_out)
        say(f"plan written to {args.plan_out}")
    if sets and not args.dry_run:
        result["ppl_after"] = _perplexities(model, tokenizer, sets, [args.eval_seq_len], args.eval_tokens, progress)
        say("perplexity after:  " + ", ".join(f"{k} {v:.2f}" for k, v in result["ppl_after"].items()))
    if args.prompt and not args.dry_run and tokenizer is not None:
        result["prompt"] = args.prompt
        result["sample"] = generate_sample(model, tokenizer, args.prompt, max_new_tokens=24)
        say(f"sample: {args.prompt!r} -> {result['sample']!r}")
    if args.out and not args.dry_run:
        from fastprune.io import save_pruned
        from fastprune.models import base_model_id

        say(f"saving checkpoint to {args.out} ...")
        evaluation = {f"perplexity {k}": v for k, v in result.get("ppl_after", {}).items()}
        result["checkpoint"] = str(save_pruned(model, args.out, tokenizer=tokenizer, report=report,
                                               base_model=base_model_id(args.model), evaluation=evaluation or None,
                                               progress=progress))
    report_dir = _run_dir("prune", args.report_dir or (None if args.dry_run else args.out))
    result["report_files"] = {k: str(v) for k, v in write_prune_report(report_dir, report, result).items()}
    say(f"report written to {report_dir}/ ({', '.join(Path(f).name for f in result['report_files'].values())})")
    return result


def cmd_sweep(args: argparse.Namespace) -> dict:
    from tqdm.auto import tqdm

    import fastprune
    from fastprune.plots import plot_sweep

    say = _say(args)
    progress = not args.json
    sets = _sets(args.eval)
    model, tokenizer = load(args.model, args)
    if tokenizer is None:
        raise FastpruneError(f"{args.model} has no tokenizer; sweep needs one for calibration and perplexity")
    say(f"loaded {args.model}; scoring once with {args.criterion}")
    scores = _score(model, tokenizer, args)
    dense = sum(p.numel() for p in model.parameters())
    rows = [{"ratio": 0.0, "params": dense, "ratio_achieved": 0.0,
             **_perplexities(model, tokenizer, sets, [args.eval_seq_len], args.eval_tokens, False)}]
    for ratio in tqdm(sorted(set(args.ratios) - {0.0}), desc="sweep", unit="ratio", disable=not progress):
        pruned = copy.deepcopy(model)
        report = fastprune.prune(pruned, ratio, tokenizer=tokenizer, scores=scores, seed=args.seed, progress=False,
                                 **_prune_options(args))
        rows.append({"ratio": ratio, "params": report.params_after, "ratio_achieved": report.ratio_achieved,
                     **_perplexities(pruned, tokenizer, sets, [args.eval_seq_len], args.eval_tokens, False)})
        del pruned
    keys = [k for k in rows[0] if "@" in k]
    table = markdown_table(("ratio", "parameters", "removed", *(f"ppl {k}" for k in keys)),
                           [(f"{r['ratio']:.0%}", f"{r['params']:,}", f"{r['ratio_achieved']:.2%}",
                             *(f"{r[k]:.2f}" for k in keys)) for r in rows])
    out = _run_dir("sweep", args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {k: getattr(args, k) for k in ("model", "criterion", "scope", "ranking", "aggregation", "calib",
                                              "n_samples", "seq_len", "seed", "eval_seq_len", "eval_tokens")}
    result = {"command": "sweep", **settings, "rows": rows,
              "files": {"json": str(out / "sweep.json"), "markdown": str(out / "sweep.md"),
                        "chart": str(out / "sweep.png")}}
    chart = optional_output("matplotlib", "sweep.png", lambda: plot_sweep(
        rows, out / "sweep.png", keys, title=f"{args.model}: {args.criterion}, {args.scope}"))
    if chart is None:
        del result["files"]["chart"]
    _write_json(out / "sweep.json", result)
    image = "\n\n![perplexity against parameters](sweep.png)" if chart is not None else ""
    (out / "sweep.md").write_text(f"# fastprune sweep: {args.model} ({args.criterion}, {args.scope})\n\n"
                                  f"{table}{image}\n")
    say(table)
    say(f"written to {out}/ ({', '.join(Path(f).name for f in result['files'].values())})")
    return result


def cmd_eval(args: argparse.Namespace) -> dict:
    from fastprune.zeroshot import PRIMARY_METRIC, evaluate_zeroshot, resolve_tasks

    say = _say(args)
    progress = not args.json
    tasks = resolve_tasks(args.zeroshot)
    sets = _sets(args.ppl)
    rows = []
    for name in args.model or ["smollm2"]:
        model, tokenizer = load(name, args)
        say(f"evaluating {name}")
        row: dict[str, Any] = {"model": name, "params": sum(p.numel() for p in model.parameters()),
                               "ppl": _perplexities(model, tokenizer, sets, args.seq_lens, args.eval_tokens, progress)}
        results = evaluate_zeroshot(model, tokenizer, tasks, limit=args.limit, engine=args.engine,
                                    tasks_dir=args.tasks_dir, n_items=args.n_items, batch_size=args.batch_size,
                                    progress=progress) if tasks else {}
        row["zeroshot"] = {t: {"acc": r.acc, "acc_norm": r.acc_norm, "n": r.n, "score": r.primary(t),
                               "metric": PRIMARY_METRIC.get(t, "acc")} for t, r in results.items()}
        row["mean"] = sum(r["score"] for r in row["zeroshot"].values()) / len(results) if results else None
        rows.append(row)
        del model
    table = format_eval_table(rows)
    say(table)
    if tasks:
        n = {t: r["n"] for t, r in rows[0]["zeroshot"].items()}
        say("accuracy in %: " + ", ".join(f"{t} {rows[0]['zeroshot'][t]['metric']} on {n[t]} items" for t in n))
    return {"command": "eval", "rows": rows, "table": table}


def cmd_inspect(args: argparse.Namespace) -> dict:
    from fastprune.apply import layer_widths
    from fastprune.discover import discover
    from fastprune.io import is_checkpoint, read_plans

    say = _say(args)
    model, _ = load(args.model, args)
    graph = discover(model)
    widths = layer_widths(model, graph)
    config = model.config
    result: dict[str, Any] = {
        "command": "inspect", "model": args.model, "class": type(model).__name__,
        "params": sum(p.numel() for p in model.parameters()), "layers": graph.num_layers,
        "hidden_size": getattr(config, "hidden_size", None), "vocab_size": getattr(config, "vocab_size", None),
        "widths": {int(k): v for k, v in sorted(widths.items())}, "checkpoint": is_checkpoint(args.model)}
    if result["checkpoint"]:
        plans = read_plans(Path(args.model).expanduser())
        result["plans"] = [p.settings for p in plans]
    lines = [f"{args.model}: {type(model).__name__}, {result['params']:,} parameters, {graph.num_layers} layers, "
             f"hidden size {result['hidden_size']}"]
    for settings in result.get("plans", []):
        lines.append("pruned with " + ", ".join(f"{k} {v}" for k, v in settings.items() if not isinstance(v, dict)))
    lines.append(markdown_table(("layer", *WIDTH_COLUMNS.values()),
                                [(k, *width_cells(w)) for k, w in result["widths"].items()]))
    say("\n".join(lines))
    return result


def _bench_script(name: str, extra: Sequence[str]) -> int:
    root = Path(__file__).resolve().parent.parent / "benchmarks"
    script = root / BENCH_SCRIPTS[name]
    if not script.is_file():
        raise FastpruneError(f"{script} not found: the benchmark scripts live in the source tree's benchmarks/ "
                             "folder (run from a git checkout)")
    return subprocess.call([sys.executable, str(script), *extra])


def cmd_bench(args: argparse.Namespace, extra: Sequence[str]) -> dict:
    import fastprune
    from fastprune.inference import benchmark, compile_check, format_table

    say = _say(args)
    progress = not args.json
    if args.script:
        if args.inference:
            raise FastpruneError("give either a benchmark script or --inference")
        code = _bench_script(args.script, extra)
        return {"command": "bench", "script": args.script, "returncode": code}
    if not args.inference:
        raise FastpruneError(f"choose a benchmark: --inference or one of {', '.join(BENCH_SCRIPTS)}")
    if extra:
        raise FastpruneError(f"unrecognised arguments: {' '.join(extra)}")
    attn = _sets(args.attn)
    dense, tokenizer = load(args.model, args)
    if args.checkpoint:
        pruned, _ = load(args.checkpoint, args)
    else:
        say(f"pruning a copy of {args.model} by {args.ratio:.0%} ({args.criterion})")
        pruned = copy.deepcopy(dense)
        fastprune.prune(pruned, args.ratio, criterion=args.criterion, tokenizer=tokenizer, progress=progress)
    rows = benchmark({"dense": dense, "pruned": pruned}, attn=attn, prompt_len=args.prompt_len,
                     new_tokens=args.new_tokens, batch_size=args.batch_size, repeat=args.repeat, progress=progress)
    table = format_table(rows)
    say(table)
    result: dict[str, Any] = {"command": "bench", "inference": rows, "table": table}
    if args.compile_backend != "none":
        result["compile"] = compile_check(pruned, backend=args.compile_backend)
        c = result["compile"]
        say(f"torch.compile ({c['backend']}) of the pruned model: " +
            (f"ok, max |logit diff| {c['max_abs_diff']:.2e}, {c['compile_and_run_s']:.1f} s" if c["ok"]
             else f"FAILED: {c.get('error') or 'logits differ by ' + format(c.get('max_abs_diff', 0), '.3g')}"))
    if args.out:
        out = Path(args.out).expanduser()
        out.mkdir(parents=True, exist_ok=True)
        _write_json(out / "inference.json", result)
        (out / "inference.md").write_text(table + "\n")
    return result


def cmd_tune(args: argparse.Namespace) -> dict:
    reason = getattr(args, "tune_unavailable", None)
    if reason is not None:
        raise FastpruneError(f"'fastprune tune' is not available in this installation (LoRA recovery lives in "
                             f"fastprune.recovery: {reason})")
    return run_tune(args)


def run_tune(args: argparse.Namespace) -> dict:
    """``fastprune tune``: load ``--model``, recover, save to ``--output``; returns the run's summary.

    With ``--merge-only ADAPTER`` it only merges a saved adapter into ``--model``
    (:func:`fastprune.recovery.merge_adapter`).
    """
    try:
        from fastprune.recovery import RecoveryConfig, merge_adapter, recover_from
    except ImportError as exc:
        raise FastpruneError(f"'fastprune tune' is not available: {exc}") from exc
    if args.merge_only is not None:  # no training: merge a saved adapter into --model in one process
        merged = merge_adapter(args.model, args.merge_only, args.output, dtype=_dtype(args))
        return {"model": str(args.model), "adapter_dir": str(Path(args.merge_only).expanduser().absolute()),
                "merged_dir": str(merged), "merged": True}
    targets = [t for t in args.target_modules.split(",") if t] if args.target_modules else None
    config = RecoveryConfig(r=args.r, alpha=args.alpha, dropout=args.dropout, target_modules=targets, lr=args.lr,
                            epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size,
                            micro_batch_size=args.micro_batch_size, seq_len=args.seq_len,
                            prompt_format=args.prompt_format, train_on_inputs=not args.response_only,
                            warmup_steps=args.warmup_steps, val_source=args.val or None, eval_every=args.eval_every,
                            output_dir=args.output, save_every=args.save_every, resume=args.resume, seed=args.seed,
                            bf16=args.bf16, gradient_checkpointing=args.gradient_checkpointing, merge=args.merge,
                            fsdp=bool(args.fsdp or args.fsdp_config) or None, fsdp_config=args.fsdp_config)
    return recover_from(args.model, list(args.data), config, progress=not args.quiet).to_dict()


# ---------------------------------------------------------------------------------------------- main

def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one line each on stderr (not the source location a library user would want)."""
    print(f"fastprune: warning: {message}", file=sys.stderr, flush=True)


def _install_hint(module: str) -> str:
    top = module.split(".")[0]
    return install_hint(top) if top in OPTIONAL else f"{module} is not installed (pip install {top})"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fastprune`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args, extra = parser.parse_known_args(argv)
    passthrough = args.command == "bench" or getattr(args, "tune_unavailable", None) is not None
    if extra and not passthrough:
        parser.error(f"unrecognised arguments: {' '.join(extra)}")
    commands = {"prune": cmd_prune, "sweep": cmd_sweep, "eval": cmd_eval, "inspect": cmd_inspect, "tune": cmd_tune}
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            if args.command in ("prune", "sweep"):
                resolve_method(args)  # the recipe's settings first: the checks read them
            check_args(args)  # everything that can be checked before a model is loaded
            backends.available()  # load the kernels now: a warning about them comes before any progress bar
            result = cmd_bench(args, extra) if args.command == "bench" else commands[args.command](args)
    except USER_ERRORS as exc:
        print(f"fastprune: error: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        print(f"fastprune: error: {_install_hint(exc.name or '')}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fastprune: interrupted", file=sys.stderr)
        return 130
    if getattr(args, "json", False) or args.command == "tune":  # tune's summary is its result as JSON
        print(json.dumps(json_safe(result), indent=1))
    if args.command == "bench" and args.script:
        return int(result["returncode"])
    if args.command == "bench" and "compile" in result and not result["compile"]["ok"]:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
