"""LoRA recovery on SmolLM2-135M after 20 % block-wise element1 pruning, sized for a CPU.

Perplexity at 128 tokens on held-out Wikipedia and Austen: dense, pruned, pruned + LoRA.
Pruning: element1, block scope, 10 x 64 wiki calibration tokens.  Recovery: LoRA (r=8, alpha=16,
dropout 0.05, all seven projections) on the bundled instruction sample plus wiki calibration-split
text.  Prints a markdown table and writes JSON with ``--json``.

    python benchmarks/quality_lora.py --steps 300 --json lora.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import fastprune
from fastprune.data import eval_tokens
from fastprune.evaluate import perplexity
from fastprune.models import load_model
from fastprune.recovery import SAMPLE_DATA, recover

SETS = ("wiki", "austen")


def _ppl(model, tokens) -> dict[str, float]:
    return {name: perplexity(model, t, seq_len=128, progress=False).ppl for name, t in tokens.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ratio", type=float, default=0.2)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--warmup-steps", type=int, default=20)
    p.add_argument("--text-tokens", type=int, default=100_000, help="wiki calibration-split tokens to train on")
    p.add_argument("--eval-tokens", type=int, default=8192, help="held-out tokens per perplexity set")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()

    torch.manual_seed(0)
    model, tok = load_model("smollm2")
    tokens = {name: eval_tokens(tok, name, max_tokens=args.eval_tokens) for name in SETS}
    dense_params = sum(q.numel() for q in model.parameters())
    rows = {"dense": _ppl(model, tokens)}
    t0 = time.perf_counter()
    fastprune.prune(model, args.ratio, criterion="element1", scope="block", calib="wiki", tokenizer=tok,
                    n_samples=10, seq_len=64, progress=False)
    prune_s = time.perf_counter() - t0
    params = sum(q.numel() for q in model.parameters())
    rows["element1 pruned"] = _ppl(model, tokens)
    result = recover(model, [SAMPLE_DATA, "wiki"], tokenizer=tok, max_steps=args.steps, batch_size=args.batch_size,
                     micro_batch_size=args.micro_batch_size, seq_len=args.seq_len, lr=args.lr,
                     warmup_steps=args.warmup_steps, text_tokens=args.text_tokens,
                     logging_steps=max(1, min(25, args.steps)), progress=False)
    rows["element1 + LoRA"] = _ppl(model, tokens)

    print(f"SmolLM2-135M-Instruct, {args.ratio:.0%} removed: {dense_params:,} -> {params:,} parameters "
          f"(prune {prune_s:.0f} s)")
    print(f"LoRA: {result.steps} steps x {args.batch_size} examples (<= {args.seq_len} tokens), {result.tokens:,} "
          f"tokens, {result.examples} examples, {result.seconds:.0f} s, {result.trainable_params:,} trainable, "
          f"lr {args.lr}, loss {result.losses[0][1]:.3f} -> {result.losses[-1][1]:.3f}\n")
    print("| model | " + " | ".join(f"{s} ppl@128" for s in SETS) + " |")
    print("|---|" + "---|" * len(SETS))
    for name, ppl in rows.items():
        print(f"| {name} | " + " | ".join(f"{ppl[s]:.2f}" for s in SETS) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"settings": vars(args), "params": {"dense": dense_params, "pruned": params},
                       "perplexity": rows, "recovery": result.to_dict(), "prune_seconds": prune_s}, f, indent=1)


if __name__ == "__main__":
    main()
