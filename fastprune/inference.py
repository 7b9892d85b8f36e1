"""Inference cost of a model: prefill and decode speed, latency, weight and KV-cache memory.

``benchmark({"dense": a, "pruned": b})`` measures every model under every attention implementation
in the same process, one after the other, with the same random prompt: the point of pruning is the
difference between those rows.  ``compile_check`` runs a model under ``torch.compile`` and compares
its logits with eager mode.
"""

from __future__ import annotations

import inspect
import statistics
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from fastprune.errors import FastpruneError
from fastprune.tables import markdown_table


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cache_kwarg(model: torch.nn.Module) -> str:
    """The forward argument that takes the KV cache (``cache`` in recent transformers, else ``past_key_values``)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _cache_of(output: Any) -> Any:
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def kv_cache_bytes(cache: Any) -> int:
    """Bytes held by the key and value tensors of a transformers cache."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return sum(t.numel() * t.element_size() for layer in layers
                   for t in (getattr(layer, "keys", None), getattr(layer, "values", None)) if torch.is_tensor(t))
    return sum(t.numel() * t.element_size() for kv in cache for t in kv if torch.is_tensor(t))


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters and buffers (tied tensors once)."""
    seen = {}
    for t in (*model.parameters(), *model.buffers()):
        seen[t.data_ptr()] = t.numel() * t.element_size()
    return sum(seen.values())


@torch.no_grad()
def measure(model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int = 32, repeat: int = 3) -> dict[str, float]:
    """Median prefill and greedy-decode times of ``model`` on ``prompt`` (batch, length), KV cache on."""
    if new_tokens < 1 or repeat < 1:
        raise FastpruneError(f"need new_tokens >= 1 and repeat >= 1, got {new_tokens} and {repeat}")
    device = next(model.parameters()).device
    prompt = prompt.to(device)
    key = _cache_kwarg(model)
    prefill, decode, kv = [], [], 0
    for run in range(repeat + 1):  # the first run warms up
        _sync(device)
        t0 = time.perf_counter()
        out = model(input_ids=prompt, use_cache=True)
        _sync(device)
        t1 = time.perf_counter()
        cache, token = _cache_of(out), out.logits[:, -1:].argmax(-1)
        for _ in range(new_tokens):
            out = model(input_ids=token, use_cache=True, **{key: cache})
            cache, token = _cache_of(out), out.logits[:, -1:].argmax(-1)
        _sync(device)
        t2 = time.perf_counter()
        if run:
            prefill.append(t1 - t0)
            decode.append(t2 - t1)
        kv = kv_cache_bytes(cache)
    batch, length = prompt.shape
    p, d = statistics.median(prefill), statistics.median(decode)
    return {"prefill_s": p, "prefill_tokens_per_s": batch * length / p, "decode_s": d,
            "decode_tokens_per_s": batch * new_tokens / d, "decode_ms_per_token": 1000 * d / new_tokens,
            "kv_cache_bytes": kv, "kv_bytes_per_token": kv / (batch * (length + new_tokens))}


def benchmark(models: Mapping[str, torch.nn.Module], attn: Sequence[str] = ("sdpa", "eager"),
              prompt_len: int = 128, new_tokens: int = 32, batch_size: int = 1, repeat: int = 3,
              seed: int = 0, progress: bool = True) -> list[dict[str, Any]]:
    """One row per (model, attention implementation): parameters, memory, prefill/decode speed, latency."""
    if not models:
        raise FastpruneError("nothing to benchmark")
    vocab = min(getattr(m.config, "vocab_size", 2) for m in models.values())
    prompt = torch.randint(0, vocab, (batch_size, prompt_len), generator=torch.Generator().manual_seed(seed))
    rows = []
    with tqdm(total=len(models) * len(attn), desc="inference bench", disable=not progress) as bar:
        for impl in attn:
            for label, model in models.items():
                previous = model.config._attn_implementation
                model.set_attn_implementation(impl)
                was_training = model.training
                model.eval()
                try:
                    row = measure(model, prompt, new_tokens=new_tokens, repeat=repeat)
                finally:
                    model.set_attn_implementation(previous)
                    model.train(was_training)
                rows.append({"model": label, "attn": impl, "params": sum(p.numel() for p in model.parameters()),
                             "weight_bytes": weight_bytes(model), "batch": batch_size, "prompt_len": prompt_len,
                             "new_tokens": new_tokens, **row})
                bar.update()
    return rows


@torch.no_grad()
def compile_check(model: torch.nn.Module, backend: str = "inductor", seq_len: int = 16,
                  seed: int = 0) -> dict[str, Any]:
    """Run ``model`` under ``torch.compile``; report whether it ran and how far its logits are from eager."""
    vocab = getattr(model.config, "vocab_size", 2)
    device = next(model.parameters()).device
    ids = torch.randint(0, vocab, (1, seq_len), generator=torch.Generator().manual_seed(seed)).to(device)
    was_training = model.training
    model.eval()
    try:
        eager = model(input_ids=ids, use_cache=False).logits
        start = time.perf_counter()
        compiled = torch.compile(model, backend=backend, dynamic=False)
        logits = compiled(input_ids=ids, use_cache=False).logits
        seconds = time.perf_counter() - start
    except Exception as exc:  # report any compiler failure as data: the question is whether it works
        return {"ok": False, "backend": backend, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0]}"}
    finally:
        model.train(was_training)
    diff = float((logits.float() - eager.float()).abs().max())
    return {"ok": diff < 1e-2 * max(1.0, float(eager.abs().max())), "backend": backend, "max_abs_diff": diff,
            "compile_and_run_s": seconds}


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Markdown table of :func:`benchmark` rows, with each model's speed relative to the first model."""
    base = {r["attn"]: r for r in rows if r["model"] == rows[0]["model"]}
    header = ("model", "attn", "params", "weights MiB", "KV cache KiB/token", "prefill tok/s", "decode tok/s",
              "decode ms/token", "prefill speedup", "decode speedup")
    body = []
    for r in rows:
        b = base.get(r["attn"], r)
        body.append((r["model"], r["attn"], f"{r['params'] / 1e6:.1f} M", f"{r['weight_bytes'] / 2**20:.1f}",
                     f"{r['kv_bytes_per_token'] / 1024:.1f}", f"{r['prefill_tokens_per_s']:,.0f}",
                     f"{r['decode_tokens_per_s']:,.1f}", f"{r['decode_ms_per_token']:.1f}",
                     f"{r['prefill_tokens_per_s'] / b['prefill_tokens_per_s']:.2f}x",
                     f"{r['decode_tokens_per_s'] / b['decode_tokens_per_s']:.2f}x"))
    return markdown_table(header, body, align="ll" + "r" * 8)
