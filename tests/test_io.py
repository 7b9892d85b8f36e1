import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from models import tiny_llama
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from fastprune.apply import apply, layer_widths
from fastprune.discover import discover
from fastprune.errors import FastpruneError
from fastprune.io import load_pruned, read_plans, save_pruned
from fastprune.plan import Plan
from fastprune.report import PruneReport

ROOT = Path(__file__).resolve().parents[1]
TOKENS = torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(5))


def _plan(graph, keep, remove_layers=()):
    return Plan(fingerprint=graph.fingerprint, keep=keep, remove_layers=list(remove_layers),
                group_sizes={g.name: g.size for g in graph.groups}, settings={"criterion": "l1"})


def _channels(n, seed):
    return sorted(torch.randperm(80, generator=torch.Generator().manual_seed(seed))[:n].tolist())


def _heterogeneous(tied=True):
    """Layer 0 loses a kv group, layers differ in MLP channels, hidden 48 -> 42, layer 1 removed."""
    model = tiny_llama(layers=4, tied=tied)
    graph = discover(model)
    keep = {"model.layers.0.self_attn": [1], "model.layers.0.mlp": _channels(56, 0),
            "model.layers.2.mlp": _channels(32, 1), "hidden": list(range(3, 45))}
    plan = _plan(graph, keep, remove_layers=[1])
    before = layer_widths(model, graph)
    apply(model, plan, graph)
    report = PruneReport(params_before=graph.total_params, params_after=sum(p.numel() for p in model.parameters()),
                         ratio_target=0.3, widths_before=before, widths_after=layer_widths(model, graph, plan),
                         hidden_before=48, hidden_after=42, layers_before=4, layers_after=3,
                         settings={"criterion": "element1", "scope": "block", "calib": "wiki", "n_samples": 10,
                                   "seq_len": 64, "seed": 0, "evaluation": {"wikitext2 ppl": 31.25},
                                   "plans": [plan.to_json()]})
    return model, plan, report


def _uniform(tied=True, dtype=torch.float32):
    """Every layer keeps one of its two kv groups and 48 MLP channels; hidden 48 -> 42; a layer removed."""
    model = tiny_llama(layers=3, tied=tied)
    graph = discover(model)
    keep = {"hidden": list(range(0, 42))}
    for i in range(3):
        keep[f"model.layers.{i}.self_attn"] = [i % 2]
        keep[f"model.layers.{i}.mlp"] = _channels(48, i)
    plan = _plan(graph, keep, remove_layers=[2])
    apply(model, plan, graph)
    for p in model.parameters():  # buffers (rotary frequencies) stay fp32, as from_pretrained keeps them
        p.data = p.data.to(dtype)
    return model, plan


def _tokenizer():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", *(f"w{i}" for i in range(93))])}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def _logits(model):
    with torch.no_grad():
        return model(TOKENS).logits


def _no_pickles(directory):
    pickled = [p.name for p in Path(directory).rglob("*") if p.suffix in {".bin", ".pt", ".pth", ".pkl", ".pickle"}]
    assert not pickled


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_heterogeneous_round_trip(tmp_path, tied):
    model, plan, report = _heterogeneous(tied)
    expected = _logits(model)
    out = save_pruned(model, tmp_path / "ckpt", tokenizer=_tokenizer(), report=report, base_model="tiny/llama")
    _no_pickles(out)
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_fastprune.FastpruneForCausalLM"
    assert (out / "modeling_fastprune.py").is_file()
    assert config["fastprune_layer_widths"]["0"] == {"heads": 3, "kv_heads": 1, "intermediate": 56}
    assert config["hidden_size"] == 42 and config["num_hidden_layers"] == 3
    assert read_plans(out) == [plan]
    assert json.loads((out / "fastprune_report.json").read_text())["params_after"] == report.params_after

    loaded, tokenizer = load_pruned(out)
    assert torch.equal(_logits(loaded), expected)
    assert tokenizer("w3 w7")["input_ids"] == [6, 10]
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == tied

    remote = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert isinstance(remote, type(model))
    assert torch.equal(_logits(remote), expected)


def test_a_loaded_checkpoint_saves_again(tmp_path):
    model, plan, _ = _heterogeneous()
    expected = _logits(model)
    save_pruned(model, tmp_path / "a", plan=plan)
    remote = AutoModelForCausalLM.from_pretrained(tmp_path / "a", trust_remote_code=True)
    save_pruned(remote, tmp_path / "b")
    assert torch.equal(_logits(load_pruned(tmp_path / "b")[0]), expected)


def test_iterative_plans_round_trip(tmp_path):
    model, first, _ = _heterogeneous()
    graph = discover(model)
    second = _plan(graph, {"model.layers.2.mlp": _channels(20, 3)}, remove_layers=[0])
    apply(model, second, graph)
    out = save_pruned(model, tmp_path / "ckpt", plan=[first, second])
    assert read_plans(out) == [first, second]
    assert torch.equal(_logits(load_pruned(out)[0]), _logits(model))


def test_sharded_checkpoint(tmp_path):
    model, plan, _ = _heterogeneous(tied=False)
    out = save_pruned(model, tmp_path / "ckpt", plan=plan, max_shard_size="20KB")
    assert (out / "model.safetensors.index.json").is_file() and len(list(out.glob("*.safetensors"))) > 2
    assert torch.equal(_logits(load_pruned(out)[0]), _logits(model))


@pytest.mark.parametrize("tied,dtype", [(True, torch.float32), (False, torch.float32), (True, torch.bfloat16)],
                         ids=["tied", "untied", "bf16"])
def test_uniform_checkpoint_loads_with_vanilla_transformers(tmp_path, tied, dtype):
    model, plan = _uniform(tied, dtype)
    expected = _logits(model)
    out = save_pruned(model, tmp_path / "ckpt", plan=plan)
    _no_pickles(out)
    config = json.loads((out / "config.json").read_text())
    assert "auto_map" not in config and "fastprune" not in config and "fastprune_layer_widths" not in config
    assert not (out / "modeling_fastprune.py").exists()
    assert {k: config[k] for k in ("num_attention_heads", "num_key_value_heads", "intermediate_size", "hidden_size",
                                   "num_hidden_layers", "head_dim")} == {
        "num_attention_heads": 3, "num_key_value_heads": 1, "intermediate_size": 48, "hidden_size": 42,
        "num_hidden_layers": 2, "head_dim": 8}
    vanilla = AutoModelForCausalLM.from_pretrained(out, dtype=dtype)
    assert vanilla.lm_head.weight.dtype == dtype
    assert torch.equal(_logits(vanilla), expected)
    loaded, _ = load_pruned(out)
    assert loaded.lm_head.weight.dtype == dtype
    assert torch.equal(_logits(loaded), expected)


def test_load_converts_dtype(tmp_path):
    model, plan = _uniform()
    out = save_pruned(model, tmp_path / "ckpt", plan=plan)
    loaded, _ = load_pruned(out, dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    torch.testing.assert_close(_logits(loaded).float(), _logits(model), atol=0.1, rtol=0.1)


def test_model_card(tmp_path):
    model, _, report = _heterogeneous()
    card = (save_pruned(model, tmp_path / "ckpt", report=report, base_model="tiny/llama") / "README.md").read_text()
    for text in ("base_model: tiny/llama", "| criterion | element1 |", "calib wiki, n samples 10, seq len 64",
                 "| 0 | 3 | 1 | 56 |", "| 1 | removed |", "| 2 | 6 | 2 | 32 |", "| hidden size | 48 -> 42 |",
                 "| wikitext2 ppl | 31.25 |", "trust_remote_code=True", "fastprune.load_pruned(path)",
                 f"{report.ratio_achieved:.2%} removed"):
        assert text in card, text


def _corrupt(out, edit):
    path = out / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.fixture
def checkpoint(tmp_path):
    model, plan, _ = _heterogeneous(tied=False)
    return save_pruned(model, tmp_path / "ckpt", plan=plan)


def test_shape_mismatch_names_tensor_and_shapes(checkpoint):
    name = "model.layers.0.self_attn.q_proj.weight"
    _corrupt(checkpoint, lambda t: t.update({name: t[name][:16]}))
    with pytest.raises(FastpruneError, match=rf"'{name}' has shape \[16, 42\] .* expects \[24, 42\]"):
        load_pruned(checkpoint)


def test_missing_and_extra_tensors_are_named(checkpoint):
    _corrupt(checkpoint, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(FastpruneError, match=r"'model.layers.1.mlp.up_proj.weight' \(shape \[32, 42\]\) is missing"):
        load_pruned(checkpoint)
    _corrupt(checkpoint, lambda t: t.update({"model.layers.1.mlp.up_proj.weight": torch.zeros(32, 42),
                                             "model.layers.7.extra": torch.zeros(3)}))
    with pytest.raises(FastpruneError, match=r"'model.layers.7.extra' \(shape \[3\]\), which the model"):
        load_pruned(checkpoint)


def test_truncated_weights_are_reported(checkpoint):
    path = checkpoint / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(FastpruneError, match="model.safetensors is not a readable safetensors file"):
        load_pruned(checkpoint)
    path.write_bytes(data[:5])
    with pytest.raises(FastpruneError, match="not a readable safetensors file"):
        load_pruned(checkpoint)


def test_missing_files_are_reported(tmp_path, checkpoint):
    (checkpoint / "model.safetensors").unlink()
    with pytest.raises(FastpruneError, match="holds no safetensors weights"):
        load_pruned(checkpoint)
    with pytest.raises(FastpruneError, match="no config.json"):
        load_pruned(tmp_path / "nowhere")


def test_config_transformers_rejects_is_refused_before_writing(tmp_path):
    model = tiny_llama()
    graph = discover(model)
    apply(model, _plan(graph, {"hidden": list(range(40))}), graph)  # 40 is not a multiple of 6 heads
    with pytest.raises(FastpruneError, match=r"hidden size \(40\) is not a multiple"):
        save_pruned(model, tmp_path / "ckpt")
    assert not any(tmp_path.iterdir())


def test_refuses_to_replace_a_directory_that_is_not_a_checkpoint(tmp_path):
    model, plan = _uniform()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(FastpruneError, match="holds no checkpoint"):
        save_pruned(model, tmp_path / "notes", plan=plan)
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_save_replaces_a_previous_checkpoint(tmp_path, monkeypatch, exchange):
    import fastprune.io

    calls, real = [], fastprune.io._exchange

    def spy(a, b):
        calls.append(real(a, b) if exchange else False)
        return calls[-1]

    monkeypatch.setattr(fastprune.io, "_exchange", spy)
    first, plan = _uniform()
    save_pruned(first, tmp_path / "ckpt", plan=plan)
    second, _, _ = _heterogeneous()
    save_pruned(second, tmp_path / "ckpt")
    assert torch.equal(_logits(load_pruned(tmp_path / "ckpt")[0]), _logits(second))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary or old directories left
    assert not (tmp_path / "ckpt" / "fastprune_plan.json").exists()
    assert calls == [exchange]  # the atomic exchange is used where the system has it


CHILD = """
import os, signal, sys
import fastprune.io as io
from test_io import _heterogeneous

def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

if sys.argv[2] == "writing":  # die after the weights and config are written, before the rest
    write_config = io._write_config
    io._write_config = lambda *a: (write_config(*a), die())
else:  # die with the complete new checkpoint on disk, just before it replaces the old one
    io._swap_into_place = die
model, plan, report = _heterogeneous()
io.save_pruned(model, sys.argv[1], report=report)
"""


@pytest.mark.parametrize("when,previous", [("writing", True), ("swapping", True), ("writing", False)],
                         ids=["writing-over-previous", "swapping-over-previous", "writing-fresh"])
def test_killed_save_leaves_the_previous_checkpoint_or_none(tmp_path, when, previous):
    target = tmp_path / "ckpt"
    if previous:
        old, plan = _uniform()
        save_pruned(old, target, plan=plan)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(CHILD), str(target), when], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".ckpt.tmp-")]
    assert leftovers  # the child really died mid-save
    if previous:
        assert torch.equal(_logits(load_pruned(target)[0]), _logits(old))
        assert not (target / "fastprune_report.json").exists()
    else:
        assert not target.exists()


def _bloom():
    import transformers as T

    torch.manual_seed(0)
    model = T.BloomForCausalLM(T.BloomConfig(vocab_size=96, hidden_size=48, n_layer=3, n_head=6)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" in name and name.endswith("weight"):
                p.uniform_(0.5, 1.5)
    return model


def _bloom_pruned(steps):
    """Heads pruned unevenly per layer; with two steps the second composes and removes a layer."""
    model = _bloom()
    graph = discover(model)
    heads = [g.name for g in graph.groups_of("heads")]
    plans = [_plan(graph, dict(zip(heads, ([0, 2, 3, 5], [1, 4], [0, 1, 2, 3, 5]))))]
    apply(model, plans[0], graph)
    if steps == 2:
        graph = discover(model)
        plans.append(_plan(graph, {"transformer.h.0.self_attention": [1, 3]}, remove_layers=[1]))
        apply(model, plans[1], graph)
    return model, plans


@pytest.mark.parametrize("steps", [1, 2])
def test_bloom_alibi_heads_survive_save_and_load(tmp_path, steps):
    model, plans = _bloom_pruned(steps)
    expected = _logits(model)
    prompt = TOKENS[:1, :4]
    with torch.no_grad():
        generated = model.generate(prompt, max_new_tokens=6, do_sample=False)
    out = save_pruned(model, tmp_path / "ckpt", plan=plans)
    _no_pickles(out)
    saved = json.loads((out / "config.json").read_text())["fastprune"]["overrides"]["bloom"]["modules"]
    rows = {path: entry["heads"] for path, entry in saved.items()}
    if steps == 1:
        assert rows == {"transformer.h.0.self_attention": [0, 2, 3, 5], "transformer.h.1.self_attention": [1, 4],
                        "transformer.h.2.self_attention": [0, 1, 2, 3, 5]}
    else:  # layer 0 keeps heads 1 and 3 of [0, 2, 3, 5]; old layer 2 is now layer 1
        assert rows == {"transformer.h.0.self_attention": [2, 5], "transformer.h.1.self_attention": [0, 1, 2, 3, 5]}
    loaded, _ = load_pruned(out)
    remote = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    for other in (loaded, remote):
        assert torch.equal(_logits(other), expected)
        with torch.no_grad():
            assert torch.equal(other.generate(prompt, max_new_tokens=6, do_sample=False), generated)
    again = save_pruned(remote, tmp_path / "again")  # what a loaded model carries saves again
    assert torch.equal(_logits(load_pruned(again)[0]), expected)


def test_override_state_needs_a_registered_restore(tmp_path, monkeypatch):
    import fastprune.overrides

    model, plans = _bloom_pruned(1)
    out = save_pruned(model, tmp_path / "ckpt", plan=plans)
    monkeypatch.delitem(fastprune.overrides._OVERRIDES, "bloom")
    with pytest.raises(FastpruneError, match=r"override 'bloom'.*register_override\('bloom'"):
        load_pruned(out)
    config = json.loads((out / "config.json").read_text())
    config["fastprune"]["overrides"] = {"mystery": {}}
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"override 'mystery'.*fastprune.load_pruned"):
        AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)


def _family_pruned(name, kinds):
    """A tiny model of ``name`` (tests/test_families.py) with every other element of ``kinds`` removed."""
    from test_families import _make

    model = _make(name)
    graph = discover(model)
    keep = {g.name: list(range(0, g.size, 2)) for g in graph.groups if g.kind in kinds}
    apply(model, _plan(graph, keep), graph)
    return model


@pytest.mark.parametrize("name", ["gemma_mqa", "gemma2", "gemma3"])
def test_gemma_keeps_its_embedding_scale_when_the_hidden_size_shrinks(tmp_path, name):
    """Gemma scales embeddings by sqrt(hidden size): the pruned model keeps sqrt(48), the config says 24."""
    model = _family_pruned(name, {"hidden"})  # uniform: the config alone gives every shape
    assert model.model.embed_tokens.embed_scale.item() == pytest.approx(48 ** 0.5)
    expected = _logits(model)
    out = save_pruned(model, tmp_path / "ckpt")
    config = json.loads((out / "config.json").read_text())
    assert config["hidden_size"] == 24 and not config["fastprune"]["tensors"]
    saved = config["fastprune"]["values"]["model.embed_tokens"]
    assert saved["scalar_embed_scale"] == 48 ** 0.5 and saved["embed_scale"] == pytest.approx(48 ** 0.5)
    assert config["auto_map"] and (out / "modeling_fastprune.py").is_file()  # plain transformers would use sqrt(24)
    loaded, _ = load_pruned(out)
    remote = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    for other in (loaded, remote):
        assert other.model.embed_tokens.embed_scale.item() == pytest.approx(48 ** 0.5)
        assert torch.equal(_logits(other), expected)
    again = save_pruned(remote, tmp_path / "again")
    assert torch.equal(_logits(load_pruned(again)[0]), expected)


def test_unpruned_hidden_size_keeps_a_vanilla_checkpoint(tmp_path):
    model = _family_pruned("gemma2", {"heads", "channels"})
    out = save_pruned(model, tmp_path / "ckpt")
    config = json.loads((out / "config.json").read_text())
    assert "fastprune" not in config and "auto_map" not in config
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(out)), _logits(model))


FAMILY_NAMES = ["qwen2", "qwen3", "mistral", "gemma_mqa", "gemma2", "gemma3", "phi3_fused", "gpt2_conv1d",
                "gpt_neox", "bloom_alibi", "opt"]


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_every_family_reloads_with_its_hidden_size_pruned(tmp_path, name):
    """Values derived from the hidden size (attention scales where head_dim = hidden / heads, rotary
    frequencies, Gemma's embedding scale) and names transformers converts (GPT-NeoX's ``embed_out``)."""
    model = _family_pruned(name, {"channels", "hidden"})
    expected = _logits(model)
    out = save_pruned(model, tmp_path / "ckpt")
    _no_pickles(out)
    assert torch.equal(_logits(load_pruned(out)[0]), expected)
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()), expected)


def test_compaction_and_saving_show_progress(tmp_path, capsys):
    """``apply(progress=True)`` counts the compacted matrices; ``save_pruned(progress=True)`` its five stages."""
    model = tiny_llama(layers=2)
    graph = discover(model)
    plan = _plan(graph, {"model.layers.0.mlp": _channels(40, 0)})
    apply(model, plan, graph, progress=True)
    save_pruned(model, tmp_path / "ckpt", plan=plan, progress=True)
    err = capsys.readouterr().err
    assert "compaction" in err and "3/3" in err  # gate, up and down of layer 0
    assert "saving" in err and "5/5" in err
    loaded, _ = load_pruned(tmp_path / "ckpt")
    torch.testing.assert_close(_logits(loaded), _logits(model))
