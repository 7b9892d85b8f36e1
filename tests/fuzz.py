"""A seeded generator of small random models and pruning plans across the supported families.

``random_case(seed)`` draws a family and a configuration (head counts, kv heads, head width,
hidden and MLP widths, layer count, tied embeddings, biases); ``random_plan(case, graph)`` draws a
scope (block, channel, layer or all three) and random kept elements at random ratios.  The same
seed always gives the same case and plan.  Widths respect what the family needs to run and to be
saved: hidden sizes a multiple of the head count (every Hugging Face config checks it), expert
widths and an MoE model's hidden size a multiple of 8 (``torch._grouped_mm`` needs 16-byte rows).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import transformers as T

from fastprune.graph import PruningGraph
from fastprune.plan import Plan

VOCAB = 64
SCOPES = ("block", "channel", "layer", "all")


@dataclass
class Case:
    """One drawn model: its family, the config it is built from, and what a plan must respect."""

    seed: int
    family: str
    config: T.PretrainedConfig
    model_class: type
    hidden_unit: int  # a kept hidden size is a multiple of this
    expert_unit: int = 1  # a kept expert width is a multiple of this
    notes: dict = field(default_factory=dict)

    def make(self) -> torch.nn.Module:
        torch.manual_seed(self.seed)
        model = self.model_class(self.config).eval()
        with torch.no_grad():  # non-trivial norm scales so masking mistakes show
            for name, p in model.named_parameters():
                if p.dim() == 1 and "norm" in name.lower():
                    p.add_(torch.rand_like(p) * 0.5)
                if name.endswith("mlp.gate.weight"):  # decisive routing: no near-ties between experts
                    p.normal_(0.0, 0.5)
        return model

    def describe(self) -> str:
        c = self.config
        heads = getattr(c, "num_attention_heads", None)
        kv = getattr(c, "num_key_value_heads", heads)
        return (f"seed {self.seed}: {self.family}, {getattr(c, 'num_hidden_layers', None)} layers, hidden "
                f"{getattr(c, 'hidden_size', None)}, heads {heads}/{kv}, {self.notes}")


def _heads(rng: random.Random, mqa: bool = True) -> tuple[int, int]:
    kv = rng.choice([1, 2, 3] if mqa else [2, 3])
    return kv * rng.choice([1, 2, 3]), kv


def _llama_like(rng: random.Random, family: str) -> tuple[T.PretrainedConfig, type, dict]:
    heads, kv = _heads(rng)
    head_dim = rng.choice([4, 6, 8])
    common = dict(vocab_size=VOCAB, hidden_size=heads * rng.choice([2, 4, 6]), intermediate_size=rng.randint(6, 40),
                  num_hidden_layers=rng.randint(1, 3), num_attention_heads=heads, num_key_value_heads=kv,
                  head_dim=head_dim, tie_word_embeddings=rng.random() < 0.5, max_position_embeddings=64)
    notes: dict = {"tied": common["tie_word_embeddings"]}
    if family == "llama":
        notes.update(attention_bias=rng.random() < 0.5, mlp_bias=rng.random() < 0.5)
        return T.LlamaConfig(**common, **notes), T.LlamaForCausalLM, notes
    if family == "qwen2":  # biased q/k/v projections
        common.pop("head_dim")
        common["hidden_size"] = heads * head_dim
        return T.Qwen2Config(**common), T.Qwen2ForCausalLM, notes
    if family == "qwen3":  # q/k norms over the head width
        return T.Qwen3Config(**common), T.Qwen3ForCausalLM, notes
    if family == "mistral":
        common["sliding_window"] = rng.choice([3, 64])
        return T.MistralConfig(**common), T.MistralForCausalLM, notes
    if family == "gemma":  # embeddings scaled by sqrt(hidden)
        return T.GemmaConfig(**common), T.GemmaForCausalLM, notes
    if family == "gemma2":  # logit soft-capping, alternating sliding windows
        return T.Gemma2Config(**common, sliding_window=3), T.Gemma2ForCausalLM, notes
    common["sliding_window"] = 3
    return T.Gemma3TextConfig(**common), T.Gemma3ForCausalLM, notes  # gemma3


def _fused(rng: random.Random, family: str) -> tuple[T.PretrainedConfig, type, dict]:
    """Families whose head width is hidden // heads (and Phi-3's fused qkv / gate_up projections)."""
    heads, kv = _heads(rng, mqa=family == "phi3")
    if family != "phi3":
        kv = heads  # multi-head attention only
    hidden = heads * rng.choice([4, 6, 8])
    layers, inner, tied = rng.randint(1, 3), rng.randint(6, 40), rng.random() < 0.5
    notes: dict = {"tied": tied}
    if family == "phi3":
        return (T.Phi3Config(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=inner, num_hidden_layers=layers,
                             num_attention_heads=heads, num_key_value_heads=kv, pad_token_id=0,
                             tie_word_embeddings=tied), T.Phi3ForCausalLM, notes)
    if family == "opt":
        notes["enable_bias"] = rng.random() < 0.5
        return (T.OPTConfig(vocab_size=VOCAB, hidden_size=hidden, ffn_dim=inner, num_hidden_layers=layers,
                            num_attention_heads=heads, word_embed_proj_dim=hidden, tie_word_embeddings=tied,
                            **notes), T.OPTForCausalLM, notes)
    if family == "gpt2":
        return (T.GPT2Config(vocab_size=VOCAB, n_embd=hidden, n_inner=inner, n_layer=layers, n_head=heads,
                             bos_token_id=0, eos_token_id=0, tie_word_embeddings=tied), T.GPT2LMHeadModel, notes)
    if family == "gpt_neox":
        notes.update(use_parallel_residual=rng.random() < 0.5, attention_bias=rng.random() < 0.5)
        return (T.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=inner,
                                num_hidden_layers=layers, num_attention_heads=heads,
                                rotary_pct=rng.choice([0.5, 1.0]), tie_word_embeddings=tied, **notes),
                T.GPTNeoXForCausalLM, notes)
    return (T.BloomConfig(vocab_size=VOCAB, hidden_size=hidden, n_layer=layers, n_head=heads,
                          tie_word_embeddings=tied), T.BloomForCausalLM, notes)  # bloom: ALiBi


def _moe(rng: random.Random, family: str) -> tuple[T.PretrainedConfig, type, dict]:
    kv = rng.choice([1, 2])
    heads = kv * rng.choice([1, 2])  # hidden sizes stay small: a multiple of lcm(heads, 8)
    experts = rng.randint(2, 4)
    common = dict(vocab_size=VOCAB, hidden_size=math.lcm(heads, 8) * rng.choice([2, 3]),
                  num_hidden_layers=rng.randint(1, 3), num_attention_heads=heads, num_key_value_heads=kv,
                  head_dim=rng.choice([4, 8]), num_experts_per_tok=rng.randint(1, 2),
                  tie_word_embeddings=rng.random() < 0.5)
    notes: dict = {"tied": common["tie_word_embeddings"], "experts": experts}
    if family == "mixtral":
        return (T.MixtralConfig(**common, intermediate_size=8 * rng.randint(2, 4), num_local_experts=experts),
                T.MixtralForCausalLM, notes)
    if family == "qwen2_moe":
        return (T.Qwen2MoeConfig(**common, intermediate_size=rng.randint(6, 40), num_experts=experts,
                                 moe_intermediate_size=8 * rng.randint(2, 4),
                                 shared_expert_intermediate_size=rng.randint(6, 40)), T.Qwen2MoeForCausalLM, notes)
    layers = common["num_hidden_layers"]
    notes["mlp_only_layers"] = sorted(rng.sample(range(layers), rng.randint(0, layers - 1)))
    return (T.Qwen3MoeConfig(**common, intermediate_size=rng.randint(6, 40), num_experts=experts,
                             moe_intermediate_size=8 * rng.randint(2, 4), mlp_only_layers=notes["mlp_only_layers"]),
            T.Qwen3MoeForCausalLM, notes)


BUILDERS: dict[str, Callable[[random.Random, str], tuple[T.PretrainedConfig, type, dict]]] = {
    **{f: _llama_like for f in ("llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "gemma3")},
    **{f: _fused for f in ("phi3", "opt", "gpt2", "gpt_neox", "bloom")},
    **{f: _moe for f in ("mixtral", "qwen2_moe", "qwen3_moe")},
}
FAMILIES = tuple(BUILDERS)


def random_case(seed: int) -> Case:
    """The model drawn by ``seed``: the family cycles with the seed, the rest is random."""
    rng = random.Random(seed)
    family = FAMILIES[seed % len(FAMILIES)]
    config, model_class, notes = BUILDERS[family](rng, family)
    moe = family in ("mixtral", "qwen2_moe", "qwen3_moe")
    return Case(seed, family, config, model_class, hidden_unit=math.lcm(config.num_attention_heads, 8 if moe else 1),
                expert_unit=8 if moe else 1, notes=notes)


def _kept(rng: random.Random, size: int, unit: int, fraction: float) -> list[int] | None:
    """``round(fraction * size)`` random elements, rounded to a multiple of ``unit`` (None: nothing removed)."""
    n = max(unit, round(fraction * size / unit) * unit)
    return sorted(rng.sample(range(size), n)) if n < size else None


def random_plan(case: Case, graph: PruningGraph) -> Plan:
    """A plan for ``graph`` at a random scope and ratio (something is always removed)."""
    rng = random.Random(case.seed * 7919 + 1)
    for _ in range(20):
        scope = rng.choice(SCOPES)
        keep: dict[str, list[int]] = {}
        remove: list[int] = []
        if scope in ("block", "all"):
            for g in graph.groups:
                if g.kind in ("heads", "channels") and rng.random() < 0.8:
                    unit = case.expert_unit if g.experts else 1
                    kept = _kept(rng, g.size, unit, rng.uniform(0.3, 0.9))
                    if kept is not None:
                        keep[g.name] = kept
        if scope in ("channel", "all"):
            for g in graph.groups_of("hidden"):
                kept = _kept(rng, g.size, case.hidden_unit, rng.uniform(0.4, 0.9))
                if kept is not None:
                    keep[g.name] = kept
        if scope in ("layer", "all") and graph.num_layers > 1:
            remove = sorted(rng.sample(range(graph.num_layers), rng.randint(1, graph.num_layers - 1)))
        if keep or remove:
            return Plan(graph.fingerprint, keep, remove, {g.name: g.size for g in graph.groups},
                        {"scope": scope, "fuzz_seed": case.seed})
    raise AssertionError(f"{case.describe()}: no plan removes anything")  # never seen: 20 draws all empty
