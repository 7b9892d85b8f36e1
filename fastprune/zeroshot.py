"""Zero-shot multiple-choice evaluation: an offline suite generated from held-out text, and lm-eval.

The offline suite needs no network.  Its tasks are built deterministically from the *evaluation*
split of the built-in corpora (held-out Wikipedia articles, Austen's *Emma*), so no item overlaps
the calibration text:

- ``wiki_next_sentence`` / ``austen_next_sentence``: two consecutive sentences, then pick the true
  next sentence among four (three distractors are sentences of similar length from other documents);
- ``wiki_continuation`` / ``austen_continuation``: the first half of a sentence (after the sentence
  before it), then pick its true second half among four.

Items are written as jsonl next to lm-eval task YAMLs (copies of ``fastprune/tasks/*.yaml`` with the
data path filled in), so ``lm_eval --include_path DIR`` runs them too.  Scoring follows lm-eval's
``multiple_choice``: the log-likelihood of ``" " + choice`` after the context; ``acc`` takes the
best total, ``acc_norm`` the best total per character of the choice.  Two engines give the same
numbers: ``lm-eval`` (its ``HFLM`` wrapping the in-memory model; also runs the standard hub tasks)
and ``native`` (the same scoring in plain PyTorch, used when lm-eval is not installed).
"""

from __future__ import annotations

import json
import os
import random
import re
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from fastprune.errors import FastpruneError
from fastprune.optional import available, install_hint

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
OFFLINE_TASKS: dict[str, tuple[str, str]] = {  # name -> (text source, kind)
    "wiki_next_sentence": ("wiki", "next_sentence"),
    "wiki_continuation": ("wiki", "continuation"),
    "austen_next_sentence": ("austen", "next_sentence"),
    "austen_continuation": ("austen", "continuation"),
}
STANDARD_TASKS = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
# the metric LLM-Pruner's tables report per task (acc_norm where lm-eval's README recommends it)
PRIMARY_METRIC = {"hellaswag": "acc_norm", "arc_easy": "acc_norm", "arc_challenge": "acc_norm",
                  "openbookqa": "acc_norm", "piqa": "acc_norm", **{t: "acc_norm" for t in OFFLINE_TASKS}}
LM_EVAL_PREFIX = "fastprune_"  # offline task names inside lm-eval, clear of its own task names
N_CHOICES = 4
ENGINES = ("auto", "lm-eval", "native")
MIN_WORDS, MAX_WORDS = 6, 40

_ABBREVIATIONS = ("Mr", "Mrs", "Ms", "Dr", "St", "Jr", "Sr", "Co", "vs", "No")
_SENTENCE_END = re.compile("".join(rf"(?<!\b{a}\.)" for a in _ABBREVIATIONS)
                           + r"(?<!\b[A-Z]\.)(?<=[.!?])\s+(?=[\"'“‘(]?[A-Z])")


# ------------------------------------------------------------------------------------ generation

def split_sentences(text: str) -> list[str]:
    """Sentences of a paragraph: whitespace normalised, ``_emphasis_`` marks removed."""
    text = re.sub(r"\s+", " ", text.replace("_", "")).strip()
    return [s.strip() for s in _SENTENCE_END.split(text) if s.strip()]


def _usable(sentence: str) -> bool:
    return MIN_WORDS <= len(sentence.split()) <= MAX_WORDS


def _distractors(rng: random.Random, pool: list[tuple[int, str]], doc: int, answer: str, k: int) -> list[str]:
    """``k`` distinct strings from ``pool`` (doc, text) of other documents, of a length near ``answer``'s."""
    n = len(answer.split())
    picked: list[str] = []
    for _ in range(200 * k):
        other_doc, text = pool[rng.randrange(len(pool))]
        if other_doc != doc and text != answer and text not in picked and 0.5 * n <= len(text.split()) <= 2 * n:
            picked.append(text)
            if len(picked) == k:
                return picked
    raise FastpruneError("too little text to draw distractors for the offline zero-shot tasks")


def _item(rng: random.Random, context: str, answer: str, distractors: list[str]) -> dict[str, Any]:
    label = rng.randrange(len(distractors) + 1)
    choices = distractors[:label] + [answer] + distractors[label:]
    return {"context": context, "choices": choices, "label": label}


def make_items(texts: Sequence[str], kind: str, n_items: int = 500, seed: int = 0) -> list[dict[str, Any]]:
    """Multiple-choice items (``context``, ``choices``, ``label``) from ``texts``; same inputs, same items."""
    if kind not in ("next_sentence", "continuation"):
        raise FastpruneError(f"unknown offline task kind {kind!r}")
    docs = [split_sentences(t) for t in texts]
    rng = random.Random(f"fastprune-zeroshot:{kind}:{seed}")
    candidates: list[tuple[int, int]] = []
    pool: list[tuple[int, str]] = []
    for d, sentences in enumerate(docs):
        for i, s in enumerate(sentences):
            if not _usable(s):
                continue
            if kind == "next_sentence":
                pool.append((d, s))
                if i >= 2:
                    candidates.append((d, i))
            elif len(s.split()) >= 8:
                words = s.split()
                pool.append((d, " ".join(words[len(words) // 2:])))
                candidates.append((d, i))
    rng.shuffle(candidates)
    items = []
    for d, i in candidates[:n_items]:
        sentences = docs[d]
        if kind == "next_sentence":
            context, answer = " ".join(sentences[i - 2:i]), sentences[i]
        else:
            words = sentences[i].split()
            half = " ".join(words[:len(words) // 2])
            before = [s for s in sentences[max(0, i - 1):i] if len(s.split()) <= MAX_WORDS]
            context = " ".join([*before, half])
            answer = " ".join(words[len(words) // 2:])
        items.append(_item(rng, context, answer, _distractors(rng, pool, d, answer, N_CHOICES - 1)))
    if not items:
        raise FastpruneError(f"no text long enough to build {kind} items")
    return items


def offline_items(task: str, n_items: int = 500, seed: int = 0) -> list[dict[str, Any]]:
    """The items of one offline task (see the module docstring), from the evaluation split."""
    from fastprune.data import load_texts

    if task not in OFFLINE_TASKS:
        raise FastpruneError(f"unknown offline task {task!r}; choose from {', '.join(OFFLINE_TASKS)}")
    source, kind = OFFLINE_TASKS[task]
    return make_items(load_texts(source, "eval"), kind, n_items=n_items, seed=seed)


def write_offline_tasks(directory: str | os.PathLike, tasks: Sequence[str] = tuple(OFFLINE_TASKS),
                        n_items: int = 500, seed: int = 0) -> dict[str, Path]:
    """Write each task's items (``<task>.jsonl``) and its lm-eval YAML (``<task>.yaml``) to ``directory``."""
    import yaml

    root = Path(directory).expanduser().absolute()
    root.mkdir(parents=True, exist_ok=True)
    paths = {}
    for task in tasks:
        items = offline_items(task, n_items=n_items, seed=seed)
        data = root / f"{task}.jsonl"
        data.write_text("".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items), encoding="utf-8")
        config = yaml.safe_load((TASKS_DIR / f"{task}.yaml").read_text())
        config["dataset_kwargs"]["data_files"]["test"] = str(data)
        (root / f"{task}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        paths[task] = data
    return paths


def read_items(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Items of a jsonl task file."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# ------------------------------------------------------------------------------------ scoring

@dataclass
class TaskResult:
    """Accuracy of one task over ``n`` items."""

    acc: float
    acc_norm: float
    n: int

    def primary(self, task: str) -> float:
        return self.acc_norm if PRIMARY_METRIC.get(task) == "acc_norm" else self.acc


def _encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's split: trailing context spaces move to the continuation; tokens of the whole, cut after the context."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation, context = context[-n_spaces:] + continuation, context[:-n_spaces]
    whole = tokenizer.encode(context + continuation)
    ctx = tokenizer.encode(context)
    return ctx, whole[len(ctx):]


def _prefix_id(tokenizer: Any) -> int:
    for tid in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return tid
    raise FastpruneError("the tokenizer has neither a BOS nor an EOS token to start an empty context")


def max_length(model: torch.nn.Module, tokenizer: Any) -> int:
    """The longest input scored, found as lm-eval's HFLM finds it (config, then tokenizer, else 2048)."""
    config = getattr(model, "config", None)
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        if isinstance(getattr(config, attr, None), int):
            return getattr(config, attr)
    limit = getattr(tokenizer, "model_max_length", None)
    return limit if isinstance(limit, int) and limit < 10**9 else 2048


@torch.no_grad()
def choice_loglikelihoods(model: torch.nn.Module, tokenizer: Any, context: str, choices: Sequence[str],
                          delimiter: str = " ") -> list[float]:
    """Log-likelihood of ``delimiter + choice`` after ``context`` for each choice (one padded batch)."""
    pairs = [_encode_pair(tokenizer, context, delimiter + c) for c in choices]
    limit = max_length(model, tokenizer) + 1  # as lm-eval: keep the last max_length + 1 tokens
    rows = [(((ctx or [_prefix_id(tokenizer)]) + cont)[-limit:], cont) for ctx, cont in pairs]
    width = max(len(r) for r, _ in rows) - 1
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for b, (r, _) in enumerate(rows):
        ids[b, :len(r) - 1] = torch.tensor(r[:-1])
        mask[b, :len(r) - 1] = 1
    device = next(model.parameters()).device
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
    logprobs = F.log_softmax(logits.float(), dim=-1).cpu()
    out = []
    for b, (r, cont) in enumerate(rows):
        start = len(r) - 1 - len(cont)
        positions = torch.arange(start, len(r) - 1)
        out.append(float(logprobs[b, positions, torch.tensor(cont)].sum()))
    return out


def score_items(model: torch.nn.Module, tokenizer: Any, items: Sequence[dict[str, Any]],
                progress: bool = True, desc: str = "zero-shot") -> TaskResult:
    """Accuracy (best log-likelihood) and length-normalised accuracy (best per character) of ``model``."""
    was_training = model.training
    model.eval()
    correct = correct_norm = 0
    try:
        for item in tqdm(items, desc=desc, unit="item", disable=not progress):
            lls = choice_loglikelihoods(model, tokenizer, item["context"], item["choices"])
            norm = [ll / max(len(c), 1) for ll, c in zip(lls, item["choices"])]
            correct += int(max(range(len(lls)), key=lls.__getitem__) == item["label"])
            correct_norm += int(max(range(len(norm)), key=norm.__getitem__) == item["label"])
    finally:
        model.train(was_training)
    n = len(items)
    if n == 0:
        raise FastpruneError("no items to score")
    return TaskResult(acc=correct / n, acc_norm=correct_norm / n, n=n)


# ------------------------------------------------------------------------------------ suites

def lm_eval_available() -> bool:
    return available("lm_eval")


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers (and offline mode is not set)."""
    if any(os.environ.get(v, "0") not in ("0", "") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")):
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def resolve_tasks(spec: str) -> list[str]:
    """``offline``, ``standard``, ``all`` or a comma-separated list of task names."""
    names: list[str] = []
    for part in (p.strip() for p in spec.split(",")):
        if part == "offline":
            names += list(OFFLINE_TASKS)
        elif part == "standard":
            names += list(STANDARD_TASKS)
        elif part == "all":
            names += list(OFFLINE_TASKS) + list(STANDARD_TASKS)
        elif part:
            names.append(part)
    return list(dict.fromkeys(names))


def check_zeroshot(tasks: Sequence[str], engine: str = "auto", limit: int | None = None) -> str:
    """The engine that will run ``tasks`` (``auto`` resolved), or :class:`FastpruneError` when they cannot
    run here (lm-eval missing for the engine or hub tasks, the hub unreachable): checked before any model
    is loaded."""
    if limit is not None and limit < 1:
        raise FastpruneError(f"limit must be at least 1, got {limit}")
    if engine not in ENGINES:
        raise FastpruneError(f"engine must be auto, lm-eval or native, got {engine!r}")
    hub_tasks = [t for t in tasks if t not in OFFLINE_TASKS]
    if engine == "auto":
        engine = "lm-eval" if lm_eval_available() else "native"
    if engine == "lm-eval" and not lm_eval_available():
        raise FastpruneError(f"the lm-eval engine: {install_hint('lm_eval')}; or use --engine native")
    if hub_tasks and engine == "native":
        raise FastpruneError(f"{', '.join(hub_tasks)} run through lm-eval only: {install_hint('lm_eval')}")
    if hub_tasks and not hub_reachable():
        raise FastpruneError(f"{', '.join(hub_tasks)} need the Hugging Face hub, which is not reachable from "
                             "here; the offline suite (--zeroshot offline) runs without it")
    return engine


def evaluate_zeroshot(model: torch.nn.Module, tokenizer: Any, tasks: Sequence[str] = tuple(OFFLINE_TASKS), *,
                      limit: int | None = None, engine: str = "auto", tasks_dir: str | os.PathLike | None = None,
                      n_items: int = 500, seed: int = 0, batch_size: int = 8,
                      progress: bool = True) -> dict[str, TaskResult]:
    """Zero-shot accuracy of ``model`` per task, on the first ``limit`` items of each.

    Offline tasks are generated into ``tasks_dir`` (default: a folder under fastprune's cache);
    any other name is an lm-eval task (the standard ones need the Hugging Face hub).  ``engine``:
    ``lm-eval``, ``native`` (offline tasks only) or ``auto`` (lm-eval when installed).
    """
    if tokenizer is None:
        raise FastpruneError("zero-shot evaluation needs the model's tokenizer")
    engine = check_zeroshot(tasks, engine, limit)
    hub_tasks = [t for t in tasks if t not in OFFLINE_TASKS]
    offline = [t for t in tasks if t in OFFLINE_TASKS]
    if tasks_dir is None:
        from fastprune.models import cache_dir

        tasks_dir = cache_dir() / "zeroshot" / f"n{n_items}-seed{seed}"
    paths = write_offline_tasks(tasks_dir, offline, n_items=n_items, seed=seed) if offline else {}
    if engine == "native":
        return {t: score_items(model, tokenizer, read_items(paths[t])[:limit], progress=progress, desc=t)
                for t in offline}
    return _run_lm_eval(model, tokenizer, offline, hub_tasks, Path(tasks_dir), limit, batch_size, progress)


def _run_lm_eval(model, tokenizer, offline: list[str], hub_tasks: list[str], tasks_dir: Path,
                 limit: int | None, batch_size: int, progress: bool) -> dict[str, TaskResult]:
    import logging

    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    if not progress:
        for name in ("lm-eval", "lm_eval"):
            logging.getLogger(name).setLevel(logging.ERROR)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    manager = TaskManager(include_path=str(tasks_dir) if offline else None, include_defaults=bool(hub_tasks))
    names = [LM_EVAL_PREFIX + t for t in offline] + hub_tasks
    out = simple_evaluate(lm, tasks=names, limit=limit, task_manager=manager, bootstrap_iters=0,
                          log_samples=False, verbosity="ERROR" if not progress else None)
    results: dict[str, TaskResult] = {}
    for name in names:
        metrics = out["results"][name]
        short = name.removeprefix(LM_EVAL_PREFIX)
        acc = metrics["acc,none"]
        results[short] = TaskResult(acc=acc, acc_norm=metrics.get("acc_norm,none", acc),
                                    n=int(out["n-samples"][name]["effective"]))
    return results
