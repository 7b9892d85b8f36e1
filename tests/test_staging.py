"""Staging folders of atomic saves: a killed save leaves the previous checkpoint intact, and the next save
removes what it left, but only what provably belongs to a writer that is gone."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from fastprune import staging
from fastprune.io import load_pruned, save_pruned


def _marker(folder: Path) -> Path:
    return Path(f"{folder}{staging.MARKER_SUFFIX}")


def _siblings(target: Path) -> list[str]:
    return sorted(p.name for p in target.parent.iterdir() if p.name.startswith(f".{target.name}."))


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _litter(target: Path, kind: str = "tmp", **writer) -> Path:
    """A staging sibling whose marker records ``writer`` (defaults: this host and process)."""
    folder = staging.make_sibling(target, kind)
    (folder / "model.safetensors").write_bytes(bytes(2**20))
    record = json.loads(_marker(folder).read_text())
    _marker(folder).write_text(json.dumps({**record, **writer}))
    return folder


def test_sibling_and_marker(tmp_path):
    target = tmp_path / "ckpt"
    folder = staging.make_sibling(target)
    assert folder.is_dir() and folder.name.startswith(".ckpt.tmp-") and not any(folder.iterdir())
    record = json.loads(_marker(folder).read_text())
    assert record == {"host": socket.gethostname(), "pid": os.getpid(), "start": staging._start_time(os.getpid())}
    staging.release_sibling(folder)
    assert _siblings(target) == []


def test_only_provably_stale_siblings_are_removed(tmp_path):
    target = tmp_path / "ckpt"
    target.mkdir()
    dead = _litter(target, pid=_dead_pid())
    reused = _litter(target, start="1")  # this pid, but another process's start time: the writer is gone
    old = _litter(target, "old", pid=_dead_pid())
    live = _litter(target)  # this process: in use
    remote = _litter(target, host="another-machine", pid=_dead_pid())
    unreadable = _litter(target)
    _marker(unreadable).write_text("{not json")
    foreign = tmp_path / ".ckpt.tmp-mine"  # no marker: not provably fastprune's
    foreign.mkdir()
    other_target = _litter(tmp_path / "ckpt2", pid=_dead_pid())
    removed = staging.remove_stale_siblings(target)
    assert set(removed) == {dead, reused, old} and all(size == 2**20 for size in removed.values())
    for folder in (dead, reused, old):
        assert not folder.exists() and not _marker(folder).exists()
    for folder in (live, remote, unreadable, foreign, other_target):
        assert folder.exists()


def test_previous_version_kept_while_target_is_missing(tmp_path):
    """An ``old`` sibling may hold the only copy of the target (a crash between the two renames)."""
    target = tmp_path / "ckpt"
    old = _litter(target, "old", pid=_dead_pid())
    assert staging.remove_stale_siblings(target) == {} and old.exists()
    target.mkdir()
    assert set(staging.remove_stale_siblings(target)) == {old}


def _tiny(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    return LlamaForCausalLM(config).eval()


KILLED_SAVE = """
import os, signal, sys
import torch
import fastprune.io as io
from transformers import LlamaConfig, LlamaForCausalLM
target, point = sys.argv[1], sys.argv[2]
def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)
if point == "after-weights":
    io._write_config = die
elif point == "flushing":
    io._fsync_tree = die
else:  # after the swap, before the previous checkpoint is removed
    io.release_sibling = die
torch.manual_seed(1)
config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=8)
io.save_pruned(LlamaForCausalLM(config).eval(), target)
"""


@pytest.mark.parametrize("point", ["after-weights", "flushing", "after-swap"])
def test_killed_save_keeps_a_checkpoint_and_the_next_save_cleans_up(tmp_path, point):
    target = tmp_path / "ckpt"
    previous, new = _tiny(0), _tiny(1)
    save_pruned(previous, target)
    result = subprocess.run([sys.executable, "-c", KILLED_SAVE, str(target), point], capture_output=True, text=True)
    assert result.returncode == -signal.SIGKILL, result.stderr
    litter = _siblings(target)
    assert len(litter) == 2 and litter[1] == litter[0] + staging.MARKER_SUFFIX, litter  # a folder and its marker
    expected = new if point == "after-swap" else previous  # the swap is one atomic step
    loaded, _ = load_pruned(target)
    for name, tensor in expected.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    with pytest.warns(UserWarning, match=r"removed 1 temporary folder\(s\) that an interrupted save .* left behind"):
        save_pruned(_tiny(2), target)
    assert _siblings(target) == []
