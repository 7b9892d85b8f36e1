"""Inference benchmark: keys, memory accounting and the torch.compile check on tiny models."""

from __future__ import annotations

import copy

import pytest
from models import tiny_llama

import fastprune
from fastprune.errors import FastpruneError
from fastprune.inference import benchmark, compile_check, format_table, kv_cache_bytes, weight_bytes


@pytest.fixture(scope="module")
def pair():
    dense = tiny_llama(heads=6, kv_heads=3, layers=4)
    pruned = copy.deepcopy(dense)
    fastprune.prune(pruned, None, group_ratio=0.5, criterion="l2", layers=(0, 4), method="llm-pruner", progress=False)
    return dense, pruned


def test_benchmark_rows(pair):
    dense, pruned = pair
    rows = benchmark({"dense": dense, "pruned": pruned}, attn=("sdpa", "eager"), prompt_len=12, new_tokens=3,
                     repeat=1, progress=False)
    assert [(r["model"], r["attn"]) for r in rows] == [("dense", "sdpa"), ("pruned", "sdpa"), ("dense", "eager"),
                                                        ("pruned", "eager")]
    keys = {"params", "weight_bytes", "prefill_tokens_per_s", "decode_tokens_per_s", "decode_ms_per_token",
            "prefill_s", "kv_cache_bytes", "kv_bytes_per_token"}
    assert all(keys <= r.keys() and r["prefill_tokens_per_s"] > 0 and r["decode_tokens_per_s"] > 0 for r in rows)
    d, p = rows[0], rows[1]
    assert p["params"] < d["params"] and p["weight_bytes"] < d["weight_bytes"]
    # 4 layers x (k + v) x kv heads x head_dim 8 x fp32, per token; pruning halved the kv heads (3 -> 2 of 3)
    assert d["kv_bytes_per_token"] == 4 * 2 * 3 * 8 * 4
    assert p["kv_bytes_per_token"] < d["kv_bytes_per_token"]
    assert dense.config._attn_implementation == "sdpa"  # restored
    assert "| pruned | eager |" in format_table(rows)


def test_memory_helpers(pair):
    dense, _ = pair
    assert weight_bytes(dense) == sum(p.numel() * 4 for p in dense.parameters()) + \
        sum(b.numel() * b.element_size() for b in dense.buffers())
    assert kv_cache_bytes([]) == 0
    with pytest.raises(FastpruneError):
        benchmark({})


def test_pruned_model_runs_under_torch_compile(pair):
    result = compile_check(pair[1], backend="eager")  # dynamo tracing; the CLI uses inductor
    assert result["ok"], result
