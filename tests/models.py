"""Tiny models for tests: random Hugging Face configs and a model no library defines."""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_llama(heads: int = 6, kv_heads: int = 2, layers: int = 3, tied: bool = True, attn: str = "sdpa",
               hidden: int = 48, intermediate: int = 80, head_dim: int = 8, seed: int = 0) -> LlamaForCausalLM:
    """A random LlamaForCausalLM small enough for unit tests (GQA when kv_heads < heads)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=96, hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      head_dim=head_dim, tie_word_embeddings=tied, max_position_embeddings=128)
    cfg._attn_implementation = attn
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial norm weights so masking mistakes show up
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


class ScaleNorm(nn.Module):
    """A norm no library defines: root-mean-square with a learned gain and a fixed floor."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.rand(dim) + 0.5)

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * self.gain


class FusedSelfAttention(nn.Module):
    def __init__(self, dim: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads, self.head_dim = n_heads, dim // n_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.out = nn.Linear(n_heads * self.head_dim, dim, bias=True)

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = self.qkv(x).split(self.n_heads * self.head_dim, dim=-1)
        q, k, v = (t.view(b, s, self.n_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)
        causal = torch.ones(s, s, dtype=torch.bool, device=x.device).tril()
        probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        ctx = (probs @ v).transpose(1, 2).reshape(b, s, self.n_heads * self.head_dim)
        return self.out(ctx)


class OddGatedMLP(nn.Module):
    def __init__(self, dim: int, inner: int) -> None:
        super().__init__()
        self.up = nn.Linear(dim, 2 * inner, bias=False)
        self.down = nn.Linear(inner, dim, bias=False)

    def forward(self, x):
        a, b = self.up(x).chunk(2, dim=-1)
        return self.down(a * torch.tanh(b) + 0.1 * a)


class Block(nn.Module):
    def __init__(self, dim: int, n_heads: int, inner: int) -> None:
        super().__init__()
        self.pre_attn, self.pre_mlp = ScaleNorm(dim), ScaleNorm(dim)
        self.mixer, self.ffn = FusedSelfAttention(dim, n_heads), OddGatedMLP(dim, inner)

    def forward(self, x):
        x = x + self.mixer(self.pre_attn(x))
        return x + self.ffn(self.pre_mlp(x))


class UnseenLM(nn.Module):
    """A causal LM written here: renamed modules, fused qkv split, chunked gated MLP, own norm."""

    def __init__(self, vocab: int = 50, dim: int = 40, n_heads: int = 5, inner: int = 36, depth: int = 3,
                 seed: int = 0) -> None:
        torch.manual_seed(seed)
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.stack = nn.ModuleList(Block(dim, n_heads, inner) for _ in range(depth))
        self.final = ScaleNorm(dim)
        self.readout = nn.Linear(dim, vocab, bias=False)

    def forward(self, input_ids, **_):
        x = self.tok(input_ids)
        for block in self.stack:
            x = block(x)
        return SimpleNamespace(logits=self.readout(self.final(x)))
