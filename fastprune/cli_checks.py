"""The command line's inputs, checked before any model is loaded or anything is measured.

Everything that can be checked without a model is: model paths, calibration and evaluation sources,
files to read, folders to write, the device and option combinations.  Each problem raises
:class:`FastpruneError` naming the option (the CLI prints it and exits with code 2, having done nothing).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from fastprune.errors import FastpruneError
from fastprune.optional import available, install_hint


def check_args(args: argparse.Namespace) -> None:
    """Check the parsed arguments of any ``fastprune`` command."""
    checks = {"prune": _check_prune, "sweep": _check_sweep, "eval": _check_eval, "inspect": _check_inspect,
              "bench": _check_bench, "tune": _check_tune}
    if getattr(args, "device", None):
        check_device(args.device)
    if os.environ.get("FASTPRUNE_BACKEND") == "triton" and not available("triton"):
        raise FastpruneError(f"FASTPRUNE_BACKEND=triton, but {install_hint('triton')}")
    checks[args.command](args)


# ---------------------------------------------------------------------------------------------- commands

def _check_prune(args: argparse.Namespace) -> None:
    from fastprune.cli import _sets

    if args.scores and args.save_scores:
        raise FastpruneError("--scores reuses saved scores and --save-scores writes new ones: pass one")
    if args.scores and args.steps != 1:
        raise FastpruneError("--scores holds the scores of one step: iterative pruning (--steps > 1) scores afresh "
                             "at every step")
    if args.dry_run and args.steps != 1:
        raise FastpruneError("--dry-run previews one step: use --steps 1")
    if args.dry_run and args.out:
        raise FastpruneError("--dry-run changes nothing, so there is no checkpoint for --out; "
                             "--report-dir says where the report goes")
    sets = _sets(args.eval)
    _check_model_and_texts(args.model, args, sets, calib=not args.scores)
    if args.scores:
        check_scores_file(args.scores)
    if args.save_scores:
        check_writable_file(args.save_scores, "--save-scores")
    if args.plan_out:
        check_writable_file(args.plan_out, "--plan-out")
    if args.out:
        from fastprune.io import check_replaceable

        check_writable_dir(args.out, "--out")
        check_replaceable(Path(args.out).expanduser().absolute())
    if args.report_dir:
        check_writable_dir(args.report_dir, "--report-dir")


def _check_sweep(args: argparse.Namespace) -> None:
    from fastprune.cli import _sets

    if not args.ratios:
        raise FastpruneError("--ratios holds no ratio")
    sets = _sets(args.eval)
    if not sets:
        raise FastpruneError("sweep needs at least one perplexity set (--eval)")
    _check_model_and_texts(args.model, args, sets, calib=True)
    if args.out:
        check_writable_dir(args.out, "--out")


def _check_eval(args: argparse.Namespace) -> None:
    from fastprune.cli import _sets
    from fastprune.zeroshot import check_zeroshot, resolve_tasks

    tasks = resolve_tasks(args.zeroshot)
    sets = _sets(args.ppl)
    if not tasks and not sets:
        raise FastpruneError("nothing to evaluate: give --ppl sets or --zeroshot tasks")
    for name in args.model or ["smollm2"]:
        check_model(name, "--model")
        if sets or tasks:
            _check_tokenizer(name, "perplexity and zero-shot evaluation")
    for name in sets:
        check_text(name, "--ppl")
    if tasks:
        check_zeroshot(tasks, args.engine, args.limit)
    if args.tasks_dir:
        check_writable_dir(args.tasks_dir, "--tasks-dir")


def _check_inspect(args: argparse.Namespace) -> None:
    check_model(args.model, "model")


def _check_bench(args: argparse.Namespace) -> None:
    if not args.inference:
        return  # a benchmark script checks its own arguments
    check_model(args.model, "--model")
    if args.checkpoint:
        check_model(args.checkpoint, "--checkpoint")
    if args.out:
        check_writable_dir(args.out, "--out")


def _check_tune(args: argparse.Namespace) -> None:
    if getattr(args, "tune_unavailable", None) is not None:
        return  # cmd_tune says why
    check_model(args.model, "--model")
    if args.merge_only is not None:
        if not Path(args.merge_only).expanduser().is_dir():
            raise FastpruneError(f"--merge-only {args.merge_only}: no such adapter directory")
    else:
        for source in args.data:
            check_text(source, "--data")
        if args.val:
            check_text(args.val, "--val")
        if args.fsdp_config and not Path(args.fsdp_config).expanduser().is_file():
            raise FastpruneError(f"--fsdp-config {args.fsdp_config}: no such file")
    check_writable_dir(args.output, "--output")


def _check_model_and_texts(model: str, args: argparse.Namespace, sets: list[str], calib: bool) -> None:
    from fastprune.activation_scores import ACTIVATION_CRITERIA
    from fastprune.importance import GRADIENT_FREE

    calib = calib and args.criterion not in GRADIENT_FREE
    check_model(model, "--model")
    if calib or sets:
        _check_tokenizer(model, "calibration and perplexity text")
    if calib:
        check_text(args.calib, "--calib")
        if args.seq_len < 2:
            raise FastpruneError(f"--seq-len must be at least 2 (a token and the next), got {args.seq_len}")
    for name in sets:
        check_text(name, "--eval")
    recon = getattr(args, "recon_calib", None)
    if recon is not None and (getattr(args, "reconstruct", False) or args.criterion in ACTIVATION_CRITERIA):
        for source in recon if isinstance(recon, list) else [recon]:
            check_text(source, "--recon-calib")
    if args.eval_seq_len < 2 and sets:
        raise FastpruneError(f"--eval-seq-len must be at least 2, got {args.eval_seq_len}")
    if args.layers and not 0 <= args.layers[0] < args.layers[1]:
        raise FastpruneError(f"--layers START END needs 0 <= START < END, got {args.layers[0]} {args.layers[1]}")


# ---------------------------------------------------------------------------------------------- single inputs

def check_model(name: str, option: str) -> None:
    """A model or checkpoint that can be loaded, as far as can be told without loading it."""
    from fastprune.models import check_source

    try:
        check_source(name)
    except FastpruneError as exc:
        raise FastpruneError(f"{option}: {exc}") from None


def _check_tokenizer(name: str, needs: str) -> None:
    """A fastprune checkpoint saved without a tokenizer cannot feed text to the model."""
    from fastprune.io import is_checkpoint

    if is_checkpoint(name) and not (Path(name).expanduser() / "tokenizer_config.json").is_file():
        raise FastpruneError(f"{name} was saved without a tokenizer, and {needs} need one "
                             "(skip them with --eval '' / --ppl '', or save the checkpoint with its tokenizer)")


def check_text(source: str, option: str) -> None:
    """A calibration, evaluation or training text source that exists (or can be fetched)."""
    from fastprune.data import check_text_source

    try:
        check_text_source(source)
    except FastpruneError as exc:
        raise FastpruneError(f"{option}: {exc}") from None


def check_scores_file(path: str) -> None:
    """A readable safetensors file of saved scores."""
    from safetensors import SafetensorError, safe_open

    file = Path(path).expanduser()
    if not file.is_file():
        raise FastpruneError(f"--scores: no such scores file: {path}")
    try:
        with safe_open(file, framework="pt"):
            pass
    except (SafetensorError, OSError) as exc:
        raise FastpruneError(f"--scores: {path} is not a readable safetensors file: {exc}") from None


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable_dir(path: str, option: str) -> None:
    """A folder that exists and is writable, or can be created."""
    folder = Path(path).expanduser().absolute()
    if folder.exists() and not folder.is_dir():
        raise FastpruneError(f"{option} {path} exists and is not a directory")
    _check_creatable(folder, path, option)


def check_writable_file(path: str, option: str) -> None:
    """A file path that can be written (its folder exists and is writable, or can be created)."""
    file = Path(path).expanduser().absolute()
    if file.is_dir():
        raise FastpruneError(f"{option} {path} is a directory; give a file name")
    _check_creatable(file.parent, path, option)


def _check_creatable(folder: Path, path: str, option: str) -> None:
    existing = _nearest_existing(folder)
    if not existing.is_dir():
        raise FastpruneError(f"{option} {path}: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise FastpruneError(f"{option} {path}: {existing} is not writable")


def check_device(device: str) -> None:
    """A device torch knows, and that exists here."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise FastpruneError(f"--device {device!r} is not a device torch knows ({exc})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise FastpruneError(f"--device {device}: no CUDA device is available here (torch {torch.__version__})")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise FastpruneError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")
