"""Command line: ``fastprune prune --model smollm2 --ratio 0.2``."""

from __future__ import annotations

import argparse
import json
import sys
import time

from fastprune.errors import FastpruneError

CRITERIA = ("element1", "element2", "mix", "vectorwise", "l1", "l2", "random")


def _add_prune_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2",
                   help="hub id, local directory, .gguf file, or 'smollm2' (the embedded default)")
    p.add_argument("--ratio", type=float, default=0.2, help="fraction of all parameters to remove")
    p.add_argument("--criterion", choices=CRITERIA, default="element1")
    p.add_argument("--scope", choices=("block", "channel", "layer"), default="block")
    p.add_argument("--ranking", choices=("local", "global"), default="local")
    p.add_argument("--aggregation", choices=("sum", "mean", "max", "prod", "first"), default="sum")
    p.add_argument("--layers", type=int, nargs=2, metavar=("START", "END"),
                   help="block-wise layer range [START, END) (default: LLM-Pruner's 4..30 of 32, scaled)")
    p.add_argument("--round-to", type=int, default=1, help="keep channel counts multiples of this")
    p.add_argument("--steps", type=int, default=1, help="iterative pruning in this many steps")
    p.add_argument("--calib", default="wiki", help="calibration text: wiki, austen, a .txt/.jsonl file, or a hub name")
    p.add_argument("--n-samples", type=int, default=10)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval", default="wiki,austen", help="comma-separated perplexity sets ('' to skip)")
    p.add_argument("--eval-seq-len", type=int, default=128)
    p.add_argument("--eval-tokens", type=int, default=8192, help="held-out tokens per evaluation set")
    p.add_argument("--prompt", default="The capital of France is", help="prompt for a generated sample")
    p.add_argument("--plan-out", help="write the plan as JSON here")
    p.add_argument("--dry-run", action="store_true", help="show the plan's effect without changing the model")
    p.add_argument("--json", action="store_true", help="print machine-readable results")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: float32 on CPU)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")


def _perplexities(model, tokenizer, sets, seq_len, max_tokens, quiet):
    from fastprune.data import eval_tokens
    from fastprune.evaluate import perplexity

    out = {}
    for name in sets:
        tokens = eval_tokens(tokenizer, name, max_tokens=max_tokens)
        out[name] = perplexity(model, tokens, seq_len=seq_len, progress=not quiet).ppl
    return out


def cmd_prune(args: argparse.Namespace) -> dict:
    import torch

    import fastprune
    from fastprune.evaluate import generate_sample
    from fastprune.models import load_model

    quiet = args.json
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype) if args.dtype else None
    t0 = time.perf_counter()
    model, tokenizer = load_model(args.model, dtype=dtype, device=device)
    say(f"loaded {args.model} ({sum(p.numel() for p in model.parameters()):,} parameters) "
        f"in {time.perf_counter() - t0:.1f} s")
    sets = [s for s in args.eval.split(",") if s]
    result: dict = {"model": args.model}
    if sets:
        result["ppl_before"] = _perplexities(model, tokenizer, sets, args.eval_seq_len, args.eval_tokens, quiet)
        say("perplexity before: " + ", ".join(f"{k} {v:.2f}" for k, v in result["ppl_before"].items()))
    report = fastprune.prune(model, args.ratio, criterion=args.criterion, scope=args.scope,
                             ranking=args.ranking, aggregation=args.aggregation,
                             layers=tuple(args.layers) if args.layers else None, round_to=args.round_to,
                             calib=args.calib, tokenizer=tokenizer, n_samples=args.n_samples,
                             seq_len=args.seq_len, steps=args.steps, seed=args.seed,
                             dry_run=args.dry_run, progress=not quiet)
    say(report.summary())
    result["report"] = report.to_dict()
    if args.plan_out:
        fastprune.Plan.from_json(report.settings["plans"][-1]).save(args.plan_out)
        say(f"plan written to {args.plan_out}")
    if sets and not args.dry_run:
        result["ppl_after"] = _perplexities(model, tokenizer, sets, args.eval_seq_len, args.eval_tokens, quiet)
        say("perplexity after:  " + ", ".join(f"{k} {v:.2f}" for k, v in result["ppl_after"].items()))
    if args.prompt and not args.dry_run:
        result["sample"] = generate_sample(model, tokenizer, args.prompt, max_new_tokens=24)
        say(f"sample: {args.prompt!r} -> {result['sample']!r}")
    return result


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fastprune`` console script."""
    parser = argparse.ArgumentParser(prog="fastprune", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_prune_args(sub.add_parser("prune", help="prune a model and report size and perplexity"))
    args = parser.parse_args(argv)
    try:
        result = cmd_prune(args)
    except FastpruneError as exc:
        print(f"fastprune: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fastprune: interrupted", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
