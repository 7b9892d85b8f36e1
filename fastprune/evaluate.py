"""Perplexity in non-overlapping windows, and a greedy generated sample."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from fastprune.data import check_tokens
from fastprune.errors import FastpruneError


@dataclass
class PerplexityResult:
    """Perplexity over ``windows`` windows of ``seq_len`` tokens (``tokens`` in all).

    The mean negative log-likelihood is over every predicted token: ``seq_len - 1`` per window.
    ``tokens_per_s`` counts tokens through the model (forward passes only).
    """

    ppl: float
    nll: float
    tokens: int
    windows: int
    seq_len: int
    seconds: float
    tokens_per_s: float

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return (f"ppl {self.ppl:.3f} ({self.windows} x {self.seq_len} tokens, "
                f"{self.seconds:.1f} s, {self.tokens_per_s:,.0f} tokens/s)")


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def perplexity(model: torch.nn.Module, tokens: torch.Tensor, seq_len: int = 128, batch_size: int = 8,
               max_windows: int | None = None, progress: bool = True,
               bos_token_id: int | None = None) -> PerplexityResult:
    """Perplexity of ``model`` on ``tokens`` ((1, N) or (N,) token ids) in non-overlapping ``seq_len`` windows.

    With ``bos_token_id`` every window is that token followed by ``seq_len - 1`` text tokens (as lm-eval
    feeds models whose tokenizer adds a BOS token; Gemma-family models need it); the loss covers the
    text tokens only, ``seq_len - 1`` per window either way.

    The tail shorter than ``seq_len`` is dropped.  Runs under ``no_grad`` in eval mode on the model's
    device (the model's training mode is restored afterwards) and accumulates the loss in float64.
    """
    if seq_len < 2 or batch_size < 1:
        raise FastpruneError(f"need seq_len >= 2 and batch_size >= 1, got {seq_len} and {batch_size}")
    flat = check_tokens(tokens.reshape(1, -1) if tokens.dim() == 1 else tokens,
                        getattr(getattr(model, "config", None), "vocab_size", None), "evaluation tokens").reshape(-1)
    step = seq_len - (bos_token_id is not None)
    windows = flat.numel() // step
    if max_windows is not None:
        windows = min(windows, max_windows)
    if windows < 1:
        raise FastpruneError(f"{flat.numel()} tokens are fewer than one window of seq_len={seq_len}")
    text = flat[:windows * step].view(windows, step)
    if bos_token_id is not None:
        text = torch.cat([torch.full((windows, 1), bos_token_id, dtype=text.dtype), text], dim=1)
    batches = text.split(batch_size)

    device = _device(model)
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    start = time.perf_counter()
    try:
        with torch.no_grad(), tqdm(total=windows, disable=not progress, desc="perplexity", unit="window") as bar:
            for batch in batches:
                batch = batch.to(device)
                logits = model(input_ids=batch, use_cache=False).logits[:, :-1]
                nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1),
                                      reduction="sum")
                total += nll.double()
                bar.update(batch.shape[0])
        mean_nll = float(total) / (windows * (seq_len - 1))
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - start
    return PerplexityResult(ppl=math.exp(mean_nll), nll=mean_nll, tokens=windows * seq_len, windows=windows,
                            seq_len=seq_len, seconds=seconds, tokens_per_s=windows * seq_len / max(seconds, 1e-9))


def generate_sample(model: torch.nn.Module, tokenizer: Any, prompt: str, max_new_tokens: int = 32,
                    chat_template: bool = False) -> str:
    """Greedy continuation of ``prompt`` (new text only), decoded with the KV cache on.

    ``chat_template=True`` sends the prompt as a user message through the tokenizer's chat template
    (when it has one) and returns the assistant's reply.
    """
    device = _device(model)
    if chat_template and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        enc = tokenizer(text, add_special_tokens=False, return_tensors="pt")
    else:
        enc = tokenizer(prompt, return_tensors="pt")
    input_ids = enc["input_ids"].to(device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                 max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                                 pad_token_id=pad)
    finally:
        model.train(was_training)
    return tokenizer.decode(out[0, input_ids.shape[1]:], skip_special_tokens=True)
