"""The ``fastprune`` command line on a tiny Llama saved with a character tokenizer."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from test_data import char_tokenizer
from transformers import LlamaConfig, LlamaForCausalLM

from fastprune.cli import main
from fastprune.io import load_pruned

FAST = ["--calib", "austen", "--n-samples", "4", "--seq-len", "32", "--eval", "austen", "--eval-tokens", "512",
        "--eval-seq-len", "64"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A 4-layer GQA Llama (6 query / 2 kv heads) and its tokenizer, saved as a Hugging Face directory."""
    torch.manual_seed(0)
    tok = char_tokenizer()
    config = LlamaConfig(vocab_size=len(tok), hidden_size=48, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=6, num_key_value_heads=2, head_dim=8, max_position_embeddings=512,
                         tie_word_embeddings=True)
    path = tmp_path_factory.mktemp("tiny")
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def pruned_dir(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "pruned"
    assert main(["prune", "--model", str(tiny_dir), "--ratio", "0.3", *FAST, "--prompt", "", "--out", str(out),
                 "--json"]) == 0
    return out


def run(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse rejects bad arguments itself (exit 2, usage on stderr)
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------------------------- user mistakes

@pytest.mark.parametrize("ratio", ["1.5", "-0.1", "abc"])
def test_bad_ratio_is_a_usage_error(capsys, ratio):
    code, _, err = run(capsys, "prune", "--ratio", ratio)
    assert code == 2
    assert "--ratio" in err and "Traceback" not in err


def test_missing_model_path(capsys, tmp_path):
    code, _, err = run(capsys, "prune", "--model", str(tmp_path / "nope"), "--eval", "")
    assert code == 2
    assert err.startswith("fastprune: error: --model: no such model directory") and "Traceback" not in err


def test_corrupted_checkpoint(capsys, pruned_dir, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in pruned_dir.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    code, _, err = run(capsys, "inspect", str(broken))
    assert code == 2
    assert "fastprune: error:" in err and "model.safetensors" in err and "Traceback" not in err


def test_missing_scores_file(capsys, tiny_dir, tmp_path):
    code, _, err = run(capsys, "prune", "--model", str(tiny_dir), "--eval", "", "--scores", str(tmp_path / "x.st"))
    assert code == 2 and "no such scores file" in err


def test_unknown_option_and_bench_without_choice(capsys):
    code, _, err = run(capsys, "inspect", "smollm2", "--bogus")
    assert code == 2 and "--bogus" in err
    code, _, err = run(capsys, "bench")
    assert code == 2 and "--inference" in err


def test_tune_without_recovery_module(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "fastprune.recovery", None)  # import fails as if the module were absent
    code, _, err = run(capsys, "tune", "--anything", "x")
    assert code == 2 and "not available" in err


# ---------------------------------------------------------------------------------- prune, inspect, sweep

def test_prune_out_writes_checkpoint_and_report(pruned_dir):
    for name in ("config.json", "model.safetensors", "fastprune_plan.json", "report.json", "report.md",
                 "widths.png", "README.md"):
        assert (pruned_dir / name).is_file(), name
    report = json.loads((pruned_dir / "report.json").read_text())
    model, tokenizer = load_pruned(pruned_dir)
    assert sum(p.numel() for p in model.parameters()) == report["report"]["params_after"]
    assert report["report"]["ratio_achieved"] == pytest.approx(0.3, abs=0.01)
    assert set(report["ppl_after"]) == {"austen@64"} and tokenizer is not None
    assert (pruned_dir / "widths.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "perplexity austen@64" in (pruned_dir / "report.md").read_text()


def test_json_output_parses(capsys, tiny_dir, tmp_path):
    code, out, _ = run(capsys, "prune", "--model", str(tiny_dir), "--ratio", "0.2", *FAST, "--prompt", "",
                       "--dry-run", "--report-dir", str(tmp_path / "r"), "--json")
    assert code == 0
    result = json.loads(out)
    assert result["report"]["dry_run"] and "ppl_after" not in result
    assert {p.name for p in (tmp_path / "r").iterdir()} == {"report.json", "report.md", "widths.png"}


def test_save_scores_then_reuse_gives_same_plan(capsys, tiny_dir, tmp_path):
    scores = tmp_path / "scores.safetensors"
    common = ["prune", "--model", str(tiny_dir), "--ratio", "0.25", *FAST, "--eval", "", "--prompt", "",
              "--dry-run", "--report-dir", str(tmp_path / "r"), "--json"]
    assert run(capsys, *common, "--save-scores", str(scores), "--plan-out", str(tmp_path / "a.json"))[0] == 0
    assert run(capsys, *common, "--scores", str(scores), "--plan-out", str(tmp_path / "b.json"))[0] == 0
    a, b = (json.loads((tmp_path / n).read_text()) for n in ("a.json", "b.json"))
    assert a["keep"] == b["keep"]


def test_inspect_checkpoint(capsys, pruned_dir):
    code, out, _ = run(capsys, "inspect", str(pruned_dir), "--json")
    assert code == 0
    info = json.loads(out)
    report = json.loads((pruned_dir / "report.json").read_text())["report"]
    assert info["checkpoint"] and info["params"] == report["params_after"] and info["layers"] == 4
    assert {int(k): v["intermediate"] for k, v in info["widths"].items()} == \
        {int(k): v["intermediate"] for k, v in report["widths_after"].items()}
    code, out, _ = run(capsys, "inspect", str(pruned_dir))
    assert "| layer | query heads | kv heads | MLP channels |" in out


def test_sweep_table_and_chart(capsys, tiny_dir, tmp_path):
    code, out, _ = run(capsys, "sweep", "--model", str(tiny_dir), "--ratios", "0.2,0.4", *FAST,
                       "--out", str(tmp_path / "s"), "--json")
    assert code == 0
    rows = json.loads(out)["rows"]
    assert [r["ratio"] for r in rows] == [0.0, 0.2, 0.4]
    assert rows[0]["params"] > rows[1]["params"] > rows[2]["params"]
    assert all(r["austen@64"] > 1 for r in rows)
    assert {p.name for p in (tmp_path / "s").iterdir()} == {"sweep.json", "sweep.md", "sweep.png"}


def test_eval_table(capsys, tiny_dir, pruned_dir, tmp_path):
    code, out, _ = run(capsys, "eval", "--model", str(tiny_dir), "--model", str(pruned_dir), "--ppl", "austen",
                       "--seq-lens", "32,64", "--eval-tokens", "256", "--zeroshot", "austen_next_sentence",
                       "--limit", "2", "--n-items", "8", "--engine", "native", "--tasks-dir", str(tmp_path), "--json")
    assert code == 0
    result = json.loads(out)
    assert [r["params"] > 0 for r in result["rows"]] == [True, True]
    row = result["rows"][1]
    assert set(row["ppl"]) == {"austen@32", "austen@64"}
    assert row["zeroshot"]["austen_next_sentence"]["n"] == 2
    assert row["mean"] == row["zeroshot"]["austen_next_sentence"]["score"]
    header = result["table"].splitlines()[0]
    assert header == "| model | params | austen@32 | austen@64 | austen_next_sentence | mean |"


# ---------------------------------------------------------------------------------- inputs checked up front

@pytest.fixture
def never_load(monkeypatch):
    """Make loading a model fail the test: the inputs under test must be refused before it."""
    import fastprune.cli

    def load(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad input was reported")

    monkeypatch.setattr(fastprune.cli, "load", load)


def _bad_inputs(tiny: str, tmp) -> list[tuple[list[str], str]]:
    """(arguments, what the error must say): each is refused before any model is loaded."""
    file = tmp / "a-file"
    file.write_text("x")
    not_ckpt = tmp / "not-a-checkpoint"
    not_ckpt.mkdir()
    (not_ckpt / "notes.txt").write_text("mine")
    no_config = tmp / "no-config"
    no_config.mkdir()
    broken_scores = tmp / "broken.safetensors"
    broken_scores.write_bytes(b"not safetensors")
    prune = ["prune", "--model", tiny]
    return [
        (["prune", "--model", str(tmp / "missing")], "--model: no such model directory"),
        (["prune", "--model", str(file)], "is a file; pass a model directory"),
        (["prune", "--model", str(no_config)], "holds no config.json"),
        (["prune", "--model", str(tmp / "m.gguf")], "no such GGUF file"),
        ([*prune, "--calib", str(tmp / "calib.txt")], "--calib: no such text file"),
        ([*prune, "--calib", "./nowhere/calib"], "--calib: no such text file"),
        ([*prune, "--eval", "austen,missing.jsonl"], "--eval: no such text file: missing.jsonl"),
        ([*prune, "--scores", str(tmp / "s.safetensors")], "--scores: no such scores file"),
        ([*prune, "--scores", str(broken_scores)], "not a readable safetensors file"),
        ([*prune, "--scores", str(broken_scores), "--save-scores", str(tmp / "x")], "pass one"),
        ([*prune, "--scores", str(broken_scores), "--steps", "2"], "--steps > 1"),
        ([*prune, "--dry-run", "--steps", "2"], "--dry-run previews one step"),
        ([*prune, "--dry-run", "--out", str(tmp / "o")], "--dry-run changes nothing"),
        ([*prune, "--out", str(file)], "--out " + str(file) + " exists and is not a directory"),
        ([*prune, "--out", str(file / "sub")], "is not a directory"),
        ([*prune, "--out", str(not_ckpt)], "holds no checkpoint"),
        ([*prune, "--report-dir", str(file)], "--report-dir"),
        ([*prune, "--save-scores", str(tmp)], "--save-scores " + str(tmp) + " is a directory"),
        ([*prune, "--plan-out", str(file / "plan.json")], "--plan-out"),
        ([*prune, "--layers", "3", "3"], "--layers START END needs 0 <= START < END"),
        ([*prune, "--seq-len", "1"], "--seq-len must be at least 2"),
        *([] if torch.cuda.is_available() else [([*prune, "--device", "cuda"], "no CUDA device is available")]),
        ([*prune, "--device", "gpu7"], "not a device torch knows"),
        (["sweep", "--model", tiny, "--eval", ""], "sweep needs at least one perplexity set"),
        (["sweep", "--model", tiny, "--ratios", ","], "--ratios holds no ratio"),
        (["sweep", "--model", tiny, "--out", str(file)], "--out"),
        (["eval", "--model", tiny, "--ppl", "", "--zeroshot", ""], "nothing to evaluate"),
        (["eval", "--model", tiny, "--model", str(tmp / "gone")], "--model: no such model directory"),
        (["eval", "--model", tiny, "--ppl", str(tmp / "p.txt")], "--ppl: no such text file"),
        (["eval", "--model", tiny, "--engine", "native", "--zeroshot", "boolq"], "run through lm-eval only"),
        (["eval", "--model", tiny, "--tasks-dir", str(file)], "--tasks-dir"),
        (["inspect", str(tmp / "gone")], "model: no such model directory"),
        (["bench", "--inference", "--model", tiny, "--checkpoint", str(tmp / "gone")], "--checkpoint: no such"),
    ]


def test_bad_inputs_refused_before_loading(capsys, tiny_dir, tmp_path, never_load, monkeypatch):
    import fastprune.zeroshot

    monkeypatch.setattr(fastprune.zeroshot, "hub_reachable", lambda timeout=3.0: False)
    failures = []
    for argv, message in _bad_inputs(str(tiny_dir), tmp_path):
        code, _, err = run(capsys, *argv)
        if code != 2 or message not in err or not err.startswith("fastprune: error: ") or err.count("\n") != 1:
            failures.append((argv, code, err))
    assert not failures, failures


def test_checkpoint_without_tokenizer_refused_before_loading(capsys, pruned_dir, tmp_path, never_load):
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in pruned_dir.iterdir():
        if "token" not in f.name and f.is_file():
            (bare / f.name).write_bytes(f.read_bytes())
    code, _, err = run(capsys, "prune", "--model", str(bare), *FAST)
    assert code == 2 and "saved without a tokenizer" in err


def test_tune_inputs_refused_before_loading(capsys, tiny_dir, tmp_path, monkeypatch):
    import fastprune.recovery

    monkeypatch.setattr(fastprune.recovery, "_load_for_tuning",
                        lambda *a: (_ for _ in ()).throw(AssertionError("loaded before the check")))
    cases = [(["--data", str(tmp_path / "alpaca.json")], "--data: no such text file"),
             (["--val", str(tmp_path / "val.txt")], "--val: no such text file"),
             (["--fsdp-config", str(tmp_path / "fsdp.json")], "--fsdp-config"),
             (["--merge-only", str(tmp_path / "adapter")], "--merge-only"),
             (["--output", str(tiny_dir / "config.json")], "--output")]
    for extra, message in cases:
        argv = ["tune", "--model", str(tiny_dir), "--output", str(tmp_path / "out"), *extra]
        code, _, err = run(capsys, *argv)
        assert code == 2 and message in err, (extra, err)


# ---------------------------------------------------------------------------------- optional dependencies

def test_prune_without_matplotlib_skips_only_the_chart(capsys, tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # not installed
    out = tmp_path / "ckpt"
    code, stdout, err = run(capsys, "prune", "--model", str(tiny_dir), "--ratio", "0.2", *FAST, "--prompt", "",
                            "--out", str(out), "--json")
    assert code == 0
    result = json.loads(stdout)
    assert "chart" not in result["report_files"] and not (out / "widths.png").exists()
    assert (out / "model.safetensors").is_file() and (out / "report.json").is_file()
    assert "widths.png" not in (out / "report.md").read_text()
    lines = [line for line in err.splitlines() if "skipped" in line]
    assert lines == ["fastprune: widths.png skipped: matplotlib is not installed (pip install 'fastprune[charts]')"]


def test_sweep_without_matplotlib_skips_only_the_chart(capsys, tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    code, stdout, err = run(capsys, "sweep", "--model", str(tiny_dir), "--ratios", "0.2", *FAST,
                            "--out", str(tmp_path / "s"), "--json")
    assert code == 0 and "chart" not in json.loads(stdout)["files"]
    assert {p.name for p in (tmp_path / "s").iterdir()} == {"sweep.json", "sweep.md"}
    assert "fastprune: sweep.png skipped: matplotlib is not installed (pip install 'fastprune[charts]')" in err


def test_lm_eval_engine_without_lm_eval_names_the_extra(capsys, tiny_dir, monkeypatch, never_load):
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    code, _, err = run(capsys, "eval", "--model", str(tiny_dir), "--engine", "lm-eval")
    assert code == 2 and "pip install 'fastprune[zeroshot]'" in err


def test_triton_backend_without_triton_names_the_extra(capsys, tiny_dir, monkeypatch, never_load):
    monkeypatch.setitem(sys.modules, "triton", None)
    monkeypatch.setenv("FASTPRUNE_BACKEND", "triton")
    code, _, err = run(capsys, "inspect", str(tiny_dir))
    assert code == 2
    assert "FASTPRUNE_BACKEND=triton, but triton is not installed (pip install 'fastprune[triton]')" in err


def test_gguf_model_without_gguf_names_the_extra(capsys, tmp_path, monkeypatch, never_load):
    monkeypatch.setitem(sys.modules, "gguf", None)
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    code, _, err = run(capsys, "inspect", str(model))
    assert code == 2 and "pip install 'fastprune[gguf]'" in err


# ---------------------------------------------------------------------------------- model card

def test_card_names_the_hub_id_of_the_base_model(capsys, tiny_dir, tmp_path):
    """A model from the hub's download cache is named by its hub id, as the hub reads the card."""
    from huggingface_hub import ModelCard

    snapshot = tmp_path / "hub" / "models--TinyOrg--tiny-llama" / "snapshots" / "0123abcd"
    snapshot.parent.mkdir(parents=True)
    snapshot.symlink_to(tiny_dir, target_is_directory=True)
    out = tmp_path / "ckpt"
    assert run(capsys, "prune", "--model", str(snapshot), "--ratio", "0.2", *FAST, "--eval", "", "--prompt", "",
               "--out", str(out), "--json")[0] == 0
    assert ModelCard.load(out / "README.md").data.base_model == "TinyOrg/tiny-llama"
    again = tmp_path / "again"  # pruning the checkpoint again keeps naming the model it came from
    assert run(capsys, "prune", "--model", str(out), "--ratio", "0.1", *FAST, "--eval", "", "--prompt", "",
               "--out", str(again), "--json")[0] == 0
    assert ModelCard.load(again / "README.md").data.base_model == "TinyOrg/tiny-llama"
