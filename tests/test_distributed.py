"""Two CPU processes (gloo) against one: distributed importance scoring and DDP LoRA training."""

import json
import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from models import tiny_llama
from safetensors.torch import load_file, save_file
from test_recovery import RECORDS, _write_jsonl, char_tokenizer

from fastprune.discover import discover
from fastprune.distributed import score_distributed
from fastprune.importance import Scores, score
from fastprune.recovery import recover

WORLD = 2
CASES = [("element1", None), ("element1", 2), ("vectorwise", 1), ("element2", None), ("mix", None), ("l2", None)]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _calib() -> torch.Tensor:
    return torch.randint(0, 96, (5, 9), generator=torch.Generator().manual_seed(1))


def _env(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)


def _score_worker(rank: int, port: int, out: str) -> None:
    _env(rank, port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        model = tiny_llama(layers=2)
        graph = discover(model)
        shard = _calib()[:3] if rank == 0 else _calib()[3:]  # unequal shards: 3 and 2 samples
        for criterion, batch in CASES:
            scores = score_distributed(model, graph, shard, criterion, batch_size=batch, progress=False)
            scores.save(os.path.join(out, f"{criterion}-{batch}-{rank}.safetensors"))
    finally:
        dist.destroy_process_group()


def test_distributed_scores_match_one_process(tmp_path):
    mp.spawn(_score_worker, args=(_port(), str(tmp_path)), nprocs=WORLD)
    model = tiny_llama(layers=2)
    graph = discover(model)
    for criterion, batch in CASES:
        want = score(model, graph, _calib(), criterion, progress=False)
        for rank in range(WORLD):
            got = Scores.load(tmp_path / f"{criterion}-{batch}-{rank}.safetensors")
            assert got.groups.keys() == want.groups.keys()
            for name in want.groups:  # fp32 sums in another order: 1e-4 relative
                torch.testing.assert_close(got.groups[name], want.groups[name], rtol=1e-4, atol=1e-7,
                                           msg=f"{criterion} batch={batch} {name}")
            torch.testing.assert_close(got.layer_scores, want.layer_scores, rtol=1e-4, atol=1e-7)


def _train(out: str, rank: int = 0):
    data = _write_jsonl(Path(out) / f"data{rank}.jsonl", RECORDS * 4)
    result = recover(tiny_llama(), data, tokenizer=char_tokenizer(), max_steps=3, batch_size=4, micro_batch_size=2,
                     seq_len=48, lr=3e-3, warmup_steps=0, dropout=0.0, logging_steps=1, progress=False)
    save_file({k: v.clone() for k, v in result.model.state_dict().items()},
              os.path.join(out, f"weights{rank}.safetensors"))
    with open(os.path.join(out, f"result{rank}.json"), "w") as f:
        json.dump(result.to_dict(), f)
    return result


def _train_worker(rank: int, port: int, out: str) -> None:
    _env(rank, port)  # what torchrun sets: the Trainer starts DDP from it
    _train(out, rank)


def test_ddp_training_matches_one_process(tmp_path):
    mp.spawn(_train_worker, args=(_port(), str(tmp_path)), nprocs=WORLD)
    (tmp_path / "single").mkdir()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = _train(str(tmp_path / "single"))
    finally:
        torch.set_num_threads(threads)
    want = single.model.state_dict()
    for rank in range(WORLD):
        summary = json.loads((tmp_path / f"result{rank}.json").read_text())
        assert summary["processes"] == WORLD and summary["tokens"] == single.tokens == 3 * 4 * 48
        # the same global batches: losses within 1e-5 relative, weights within 1e-6 (observed: identical)
        for (s1, a), (s2, b) in zip(summary["losses"], single.losses, strict=True):
            assert s1 == s2 and abs(a - b) <= 1e-5 * abs(b)
        got = load_file(tmp_path / f"weights{rank}.safetensors")
        for name, tensor in want.items():
            torch.testing.assert_close(got[name], tensor, rtol=0, atol=1e-6, msg=name)
    assert single.processes == 1
