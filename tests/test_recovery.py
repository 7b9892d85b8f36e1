import argparse
import json
import os
import signal
import string
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from models import UnseenLM, tiny_llama
from tokenizers import Tokenizer
from tokenizers import models as tok_models
from transformers import PreTrainedTokenizerFast, TrainerCallback

import fastprune
from fastprune.cli import add_tune_arguments, run_tune
from fastprune.errors import FastpruneError
from fastprune.io import load_pruned, save_pruned
from fastprune.recovery import (
    IGNORE_INDEX,
    SAMPLE_DATA,
    RecoveryConfig,
    alpaca_example,
    alpaca_prompt,
    build_examples,
    default_target_modules,
    recover,
)

TESTS = Path(__file__).parent
RECORDS = [{"instruction": "Name a colour.", "input": "", "output": "Blue."},
           {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5."},
           {"instruction": "Give an antonym.", "input": "hot", "output": "Cold."},
           {"instruction": "Spell it backwards.", "input": "cat", "output": "tac."}]


def char_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer whose 93 ids fit tiny_llama's vocabulary of 96."""
    chars = string.ascii_letters + string.digits + " \n.,:;!?'-#()/+="
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    model = tok_models.BPE(vocab=vocab, merges=[], unk_token="<unk>")
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(model), pad_token="<pad>", eos_token="<eos>",
                                   unk_token="<unk>")


def _write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_alpaca_prompt_and_response_only_labels():
    tok = char_tokenizer()
    with_input = alpaca_prompt("Add the numbers.", "2 and 3")
    assert "### Instruction:\nAdd the numbers.\n\n### Input:\n2 and 3\n\n### Response:\n" in with_input
    assert "### Input" not in alpaca_prompt("Name a colour.") and alpaca_prompt("Name a colour.").endswith(
        "### Response:\n")

    full = alpaca_example(tok, RECORDS[1], seq_len=512, train_on_inputs=True)
    masked = alpaca_example(tok, RECORDS[1], seq_len=512, train_on_inputs=False)
    prompt_len = len(tok(with_input)["input_ids"])
    response = tok("5.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert full["input_ids"] == masked["input_ids"] == tok(with_input)["input_ids"] + response
    assert full["labels"] == full["input_ids"]
    assert masked["labels"] == [IGNORE_INDEX] * prompt_len + response

    cut = alpaca_example(tok, RECORDS[1], seq_len=20, train_on_inputs=False)
    assert len(cut["input_ids"]) == len(cut["labels"]) == 20 and set(cut["labels"]) == {IGNORE_INDEX}
    with pytest.raises(FastpruneError, match="instruction"):
        alpaca_example(tok, {"output": "x"}, seq_len=8)


def test_build_examples_sources(tmp_path, monkeypatch):
    tok = char_tokenizer()
    alpaca = build_examples(_write_jsonl(tmp_path / "a.jsonl", RECORDS), tok, seq_len=64)
    assert len(alpaca) == 4 and all(len(ex["input_ids"]) <= 64 for ex in alpaca)
    (tmp_path / "t.txt").write_text("\n\n".join(f"Paragraph {i} about something plain." for i in range(40)))
    text = build_examples(tmp_path / "t.txt", tok, seq_len=32)
    assert text and all(len(ex["input_ids"]) == 32 and ex["labels"] == ex["input_ids"] for ex in text)
    ids = torch.randint(0, 90, (3, 16))
    both = build_examples([ids, tmp_path / "a.jsonl"], tok, seq_len=64)
    assert len(both) == 7 and both[0]["input_ids"] == ids[0].tolist()
    assert len(build_examples(SAMPLE_DATA, tok, seq_len=128)) >= 50
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed (no network here either)
    with pytest.raises(FastpruneError, match="datasets package"):
        build_examples("someone/some-instructions", tok)
    with pytest.raises(FastpruneError, match="prompt_format"):
        build_examples(ids, tok, prompt_format="chat")


def test_default_target_modules():
    assert default_target_modules(tiny_llama()) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    assert default_target_modules(UnseenLM()) == ["down", "out", "qkv", "up"]


def test_recover_lowers_loss_and_merges():
    torch.manual_seed(0)
    model = tiny_llama()
    before = _weights(model)
    tokens = torch.randint(3, 90, (4, 24))  # a tiny dataset, seen again every epoch
    val = torch.randint(3, 90, (1, 260))
    result = recover(model, tokens, max_steps=12, batch_size=4, micro_batch_size=2,
                     lr=1e-2, warmup_steps=0, dropout=0.0, val_source=val, eval_every=6, logging_steps=1,
                     progress=False)
    assert result.model is model and result.steps == 12 and result.tokens == 12 * 4 * 24
    assert result.losses[-1][1] < 0.9 * result.losses[0][1]
    assert [s for s, _ in result.perplexity] == [0, 6, 12, 12]
    assert not any("lora" in n for n, _ in model.named_modules()) and not hasattr(model, "peft_config")
    after = _weights(model)
    assert after.keys() == before.keys() and all(after[k].shape == before[k].shape for k in before)
    assert not torch.equal(after["model.layers.0.self_attn.q_proj.weight"],
                           before["model.layers.0.self_attn.q_proj.weight"])
    assert torch.equal(after["model.embed_tokens.weight"], before["model.embed_tokens.weight"])
    assert all(p.requires_grad for p in model.parameters()) and not model.training


def test_recover_takes_a_config_that_keyword_options_override():
    tokens = torch.randint(3, 90, (4, 24), generator=torch.Generator().manual_seed(0))
    config = RecoveryConfig(max_steps=2, batch_size=4, micro_batch_size=2, lr=1e-2, warmup_steps=0, dropout=0.0,
                            logging_steps=1, seed=3)
    runs = []
    for args, options in (((config,), {}), ((), dict(max_steps=2, batch_size=4, micro_batch_size=2, lr=1e-2,
                                                      warmup_steps=0, dropout=0.0, logging_steps=1, seed=3)),
                          ((RecoveryConfig(max_steps=5, seed=3, logging_steps=1),),
                           dict(max_steps=2, batch_size=4, micro_batch_size=2, lr=1e-2, warmup_steps=0,
                                dropout=0.0))):
        torch.manual_seed(0)
        result = recover(tiny_llama(), tokens, *args, progress=False, **options)
        runs.append((result.steps, result.losses, _weights(result.model)))
    for steps, losses, weights in runs[1:]:  # the same run however the settings were given
        assert steps == runs[0][0] == 2 and losses == runs[0][1]
        assert all(torch.equal(weights[k], v) for k, v in runs[0][2].items())
    with pytest.raises(TypeError, match="'max_step'"):
        recover(tiny_llama(), tokens, max_step=2, progress=False)


def test_tune_on_pruned_checkpoint(tmp_path):
    """Heterogeneous widths, loaded with load_pruned, tuned through the CLI entry point, saved and reloaded."""
    model = tiny_llama(layers=3)
    calib = torch.randint(3, 90, (4, 16), generator=torch.Generator().manual_seed(0))
    report = fastprune.prune(model, 0.3, calib=calib, ranking="global", method="llm-pruner", progress=False)
    widths = {n: tuple(p.shape) for n, p in model.named_parameters()}
    assert len({widths[f"model.layers.{i}.mlp.up_proj.weight"] for i in range(3)}) > 1  # heterogeneous
    save_pruned(model, tmp_path / "pruned", tokenizer=char_tokenizer(), report=report)
    tuned_before = _weights(load_pruned(tmp_path / "pruned")[0])

    parser = argparse.ArgumentParser()
    add_tune_arguments(parser)
    data = _write_jsonl(tmp_path / "d.jsonl", RECORDS * 2)
    args = parser.parse_args(["--model", str(tmp_path / "pruned"), "--data", str(data), "--output",
                              str(tmp_path / "tuned"), "--max-steps", "3", "--batch-size", "4", "--micro-batch-size",
                              "2", "--warmup-steps", "0", "--lr", "1e-2", "--val", "", "--response-only", "--quiet"])
    summary = run_tune(args)
    assert summary["steps"] == 3 and Path(summary["adapter_dir"], "adapter_model.safetensors").is_file()
    tuned, tok = load_pruned(summary["merged_dir"])
    assert {n: tuple(p.shape) for n, p in tuned.named_parameters()} == widths and tok is not None
    assert not torch.equal(_weights(tuned)["model.layers.1.mlp.up_proj.weight"],
                           tuned_before["model.layers.1.mlp.up_proj.weight"])
    assert (tmp_path / "tuned" / "merged" / "fastprune_plan.json").is_file()


# ------------------------------------------------------------------------------------------- resume

_RUN = """
import os, signal, sys
sys.path[:0] = {paths!r}
import torch
from safetensors.torch import save_file
from transformers import TrainerCallback
from models import tiny_llama
from test_recovery import char_tokenizer, resume_run

class Kill(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == {kill_at}:
            os.kill(os.getpid(), signal.SIGKILL)

resume_run({out!r}, resume={resume}, callbacks=[Kill()])
"""


def resume_run(out: str, resume: bool = False, callbacks=()):
    """8 steps, a checkpoint every 2, dropout 0, seeded data order; returns the merged weights."""
    torch.set_num_threads(1)
    data = _write_jsonl(Path(out).parent / "resume.jsonl", RECORDS * 4)
    result = recover(tiny_llama(), data, tokenizer=char_tokenizer(), max_steps=8, batch_size=4, micro_batch_size=2,
                     seq_len=48, lr=3e-3, warmup_steps=2, dropout=0.0, output_dir=out, save_every=2, resume=resume,
                     logging_steps=1, progress=False, callbacks=callbacks)
    return result


def _child(out: Path, kill_at: int, resume: bool) -> subprocess.CompletedProcess:
    code = _RUN.format(paths=[str(TESTS.parent), str(TESTS)], out=str(out), kill_at=kill_at, resume=resume)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path):
    killed = _child(tmp_path / "run", kill_at=5, resume=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-4"]
    assert not (tmp_path / "run" / "merged").exists()
    resumed = _child(tmp_path / "run", kill_at=0, resume=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    summary = json.loads((tmp_path / "run" / "recovery.json").read_text())
    assert summary["resumed_from"].endswith("checkpoint-4") and summary["steps"] == 8

    reference = resume_run(str(tmp_path / "reference"))
    got = load_pruned(tmp_path / "run" / "merged")[0].state_dict()
    want = reference.model.state_dict()
    for name, tensor in want.items():  # tolerance: 1e-6 absolute (observed: bit-identical)
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=1e-6, msg=name)
    assert json.loads((tmp_path / "reference" / "recovery.json").read_text())["losses"][4:] == summary["losses"][4:]


class _Fail(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        raise RuntimeError("stop here")


def test_failed_run_gives_back_the_model_without_adapters():
    model = tiny_llama()
    before = _weights(model)
    with pytest.raises(RuntimeError, match="stop here"):
        recover(model, torch.randint(3, 90, (2, 8)), max_steps=2, batch_size=2, micro_batch_size=2, warmup_steps=0,
                progress=False, callbacks=[_Fail()])
    assert not any("lora" in n for n, _ in model.named_modules())
    after = _weights(model)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_resume_without_checkpoint_starts_fresh(tmp_path):
    with pytest.warns(UserWarning, match="no complete checkpoint"):
        result = recover(tiny_llama(), torch.randint(3, 90, (2, 8)), max_steps=1, batch_size=2, micro_batch_size=2,
                         warmup_steps=0, output_dir=tmp_path / "out", resume=True, progress=False)
    assert result.resumed_from is None and result.steps == 1
    with pytest.raises(FastpruneError, match="multiple"):
        recover(tiny_llama(), torch.randint(3, 90, (2, 8)), batch_size=3, micro_batch_size=2)


# --------------------------------------------------------------------------------- merge=False, merge_adapter

def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(ids).logits


def test_no_merge_then_merge_adapter_matches_in_process_merge(tmp_path):
    """--no-merge saves only the adapter; merge_adapter and --merge-only give the in-process merge's logits."""
    from peft import PeftModel

    from fastprune.recovery import merge_adapter

    model = tiny_llama(layers=2)
    calib = torch.randint(3, 90, (4, 16), generator=torch.Generator().manual_seed(0))
    report = fastprune.prune(model, 0.3, calib=calib, ranking="global", method="llm-pruner", progress=False)
    save_pruned(model, tmp_path / "pruned", tokenizer=char_tokenizer(), report=report)
    data = _write_jsonl(tmp_path / "d.jsonl", RECORDS * 2)
    parser = argparse.ArgumentParser()
    add_tune_arguments(parser)

    def tune(*extra):
        return run_tune(parser.parse_args(["--model", str(tmp_path / "pruned"), *extra]))

    train = ["--data", str(data), "--max-steps", "3", "--batch-size", "4", "--micro-batch-size", "2",
             "--warmup-steps", "0", "--lr", "1e-2", "--dropout", "0", "--val", "", "--quiet"]
    merged = tune(*train, "--output", str(tmp_path / "merged-run"))
    unmerged = tune(*train, "--output", str(tmp_path / "adapter-run"), "--no-merge")
    assert merged["merged"] and Path(merged["merged_dir"]).is_dir()
    assert unmerged["merged"] is False and unmerged["merged_dir"] is None and not unmerged["fsdp"]
    assert not (tmp_path / "adapter-run" / "merged").exists()
    assert Path(unmerged["adapter_dir"], "adapter_model.safetensors").is_file()
    assert json.loads((tmp_path / "adapter-run" / "recovery.json").read_text())["merged"] is False
    assert unmerged["losses"] == merged["losses"]

    out = merge_adapter(tmp_path / "pruned", unmerged["adapter_dir"], tmp_path / "merged-later")
    cli = tune("--merge-only", unmerged["adapter_dir"], "--output", str(tmp_path / "merged-cli"))
    assert cli["merged_dir"] == str(tmp_path / "merged-cli") and cli["merged"]
    assert (out / "fastprune_plan.json").is_file() and (out / "tokenizer.json").is_file()

    ids = torch.randint(3, 90, (2, 20), generator=torch.Generator().manual_seed(5))
    want = _logits(load_pruned(merged["merged_dir"])[0], ids)
    before = _logits(load_pruned(tmp_path / "pruned")[0], ids)
    assert (want - before).abs().max() > 1e-3  # training changed the model
    for path in (out, tmp_path / "merged-cli"):  # the same ops on the same adapter: 1e-6 (observed: identical)
        torch.testing.assert_close(_logits(load_pruned(path)[0], ids), want, rtol=0, atol=1e-6)
    attached = PeftModel.from_pretrained(load_pruned(tmp_path / "pruned")[0], unmerged["adapter_dir"])
    torch.testing.assert_close(_logits(attached, ids), want, rtol=0, atol=1e-5)  # merged vs. unmerged: rounding
    bf16 = merge_adapter(tmp_path / "pruned", unmerged["adapter_dir"], tmp_path / "merged-bf16", dtype=torch.bfloat16)
    assert next(load_pruned(bf16)[0].parameters()).dtype == torch.bfloat16
    with pytest.raises(FastpruneError, match="adapter_config.json"):
        merge_adapter(tmp_path / "pruned", tmp_path / "pruned", tmp_path / "nope")


def test_no_merge_returns_the_adapter_model():
    torch.manual_seed(0)
    model = tiny_llama()
    before = _weights(model)
    tokens = torch.randint(3, 90, (4, 24))
    result = recover(model, tokens, max_steps=2, batch_size=4, micro_batch_size=2, lr=1e-2, warmup_steps=0,
                     dropout=0.0, val_source=torch.randint(3, 90, (1, 260)), merge=False, progress=False)
    assert result.merged is False and result.adapter_dir is None and result.merged_dir is None
    assert hasattr(result.model, "peft_config") and not result.model.training
    assert [s for s, _ in result.perplexity] == [0, 2]  # measured with the adapter attached
    base = result.model.get_base_model().state_dict()
    assert torch.equal(base["model.layers.0.self_attn.q_proj.base_layer.weight"],
                       before["model.layers.0.self_attn.q_proj.weight"])  # nothing merged
    merged = result.model.merge_and_unload()
    assert not torch.equal(merged.state_dict()["model.layers.0.self_attn.q_proj.weight"],
                           before["model.layers.0.self_attn.q_proj.weight"])


class _FakeTrainer:
    """What _check_fsdp reads from a Trainer."""

    def __init__(self, fsdp: bool, device: str = "cuda"):
        self.is_fsdp_enabled = fsdp
        self.accelerator = argparse.Namespace(distributed_type="MULTI_CPU" if device == "cpu" else "NO")
        self.args = argparse.Namespace(device=torch.device(device))

    def is_world_process_zero(self) -> bool:
        return True


def test_merge_rules_under_fsdp(tmp_path, monkeypatch):
    from fastprune.recovery import _check_fsdp

    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    assert _check_fsdp(_FakeTrainer(False), None, None, None) is True  # no FSDP: merge by default
    assert _check_fsdp(_FakeTrainer(False), None, False, tmp_path) is False
    with pytest.warns(UserWarning, match="--merge-only"):  # FSDP: no merge by default, said once
        assert _check_fsdp(_FakeTrainer(True), True, None, tmp_path) is False
    assert _check_fsdp(_FakeTrainer(True), True, False, tmp_path) is False
    with pytest.raises(FastpruneError, match="sharded.*--no-merge"):
        _check_fsdp(_FakeTrainer(True), True, True, tmp_path)
    with pytest.raises(FastpruneError, match="needs output_dir"):
        _check_fsdp(_FakeTrainer(True), True, None, None)
    with pytest.raises(FastpruneError, match="only on accelerators"):  # asked for, but accelerate set up DDP
        _check_fsdp(_FakeTrainer(False, "cpu"), True, None, tmp_path)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what accelerate launch --use_fsdp sets
    with pytest.raises(FastpruneError, match="ACCELERATE_USE_FSDP='true'"):
        _check_fsdp(_FakeTrainer(False, "cpu"), None, None, tmp_path)


def _accelerate_has_fsdp2() -> bool:
    import inspect

    from accelerate.utils import FullyShardedDataParallelPlugin
    return "fsdp_version" in inspect.signature(FullyShardedDataParallelPlugin).parameters


needs_fsdp2 = pytest.mark.skipif(not _accelerate_has_fsdp2(), reason="accelerate < 1.6 has no FSDP2 (fsdp_version)")


def test_fsdp_with_old_accelerate_is_a_clear_error(monkeypatch):
    import accelerate.utils

    class OldPlugin:  # accelerate < 1.6: no fsdp_version argument
        def __init__(self, sharding_strategy=None):
            pass

    monkeypatch.setattr(accelerate.utils, "FullyShardedDataParallelPlugin", OldPlugin)
    model = tiny_llama()
    before = _weights(model)
    with pytest.raises(FastpruneError, match=r"FSDP needs accelerate >= 1\.6"):
        recover(model, torch.randint(3, 90, (2, 8)), max_steps=1, batch_size=2, micro_batch_size=2,
                fsdp=True, progress=False)
    assert not any("lora" in n for n, _ in model.named_modules())
    assert all(torch.equal(v, before[k]) for k, v in _weights(model).items())


@needs_fsdp2
def test_fsdp_in_one_process_fails_cleanly():
    model = tiny_llama()
    before = _weights(model)
    with pytest.raises(ValueError, match="distributed"):  # the Trainer's own check
        recover(model, torch.randint(3, 90, (2, 8)), max_steps=1, batch_size=2, micro_batch_size=2,
                fsdp=True, progress=False)
    assert not any("lora" in n for n, _ in model.named_modules())
    assert all(torch.equal(v, before[k]) for k, v in _weights(model).items())


def test_tune_merge_options_parse():
    parser = argparse.ArgumentParser()
    add_tune_arguments(parser)
    base = ["--model", "m", "--output", "o"]
    args = parser.parse_args(base)
    assert args.merge is None and args.merge_only is None and not args.fsdp and args.fsdp_config is None
    args = parser.parse_args([*base, "--no-merge", "--fsdp-config", "f.json"])
    assert args.merge is False and args.fsdp_config == "f.json"
    assert parser.parse_args([*base, "--merge-only", "a", "--dtype", "bfloat16"]).dtype == "bfloat16"
