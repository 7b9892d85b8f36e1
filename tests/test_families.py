"""Architecture coverage: tiny random configs of each family, discovered with no family code.

For each family: the expected groups are found, masking the removed channels (heads, MLP channels,
hidden dimension, one whole layer) in the original model gives the compacted model's logits, and
``generate`` with a KV cache runs on the pruned model.
"""

import math
from types import SimpleNamespace

import pytest
import torch
import transformers as T
from equivalence import masked_reference
from torch import nn

import fastprune
from fastprune.apply import apply
from fastprune.discover import discover
from fastprune.overrides import override_key
from fastprune.plan import Plan

ATTN = dict(num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=2)
FAMILIES = {
    "qwen2": (T.Qwen2Config, T.Qwen2ForCausalLM, dict(hidden_size=48, intermediate_size=80, **ATTN)),
    "qwen3": (T.Qwen3Config, T.Qwen3ForCausalLM, dict(hidden_size=48, intermediate_size=80, head_dim=8, **ATTN)),
    "mistral": (T.MistralConfig, T.MistralForCausalLM,
                dict(hidden_size=48, intermediate_size=80, sliding_window=4, **ATTN)),
    "gemma_mqa": (T.GemmaConfig, T.GemmaForCausalLM, dict(hidden_size=48, intermediate_size=80, num_hidden_layers=3,
                                                          num_attention_heads=4, num_key_value_heads=1, head_dim=16)),
    "gemma2": (T.Gemma2Config, T.Gemma2ForCausalLM, dict(hidden_size=48, intermediate_size=80, num_hidden_layers=3,
                                                         num_attention_heads=4, num_key_value_heads=2, head_dim=16)),
    "phi3_fused": (T.Phi3Config, T.Phi3ForCausalLM,
                   dict(hidden_size=48, intermediate_size=80, pad_token_id=0, **ATTN)),
    "opt": (T.OPTConfig, T.OPTForCausalLM, dict(hidden_size=48, ffn_dim=80, num_hidden_layers=3,
                                                num_attention_heads=6, word_embed_proj_dim=48)),
    "gpt2_conv1d": (T.GPT2Config, T.GPT2LMHeadModel, dict(n_embd=48, n_inner=80, n_layer=3, n_head=6)),
    "gpt_neox": (T.GPTNeoXConfig, T.GPTNeoXForCausalLM, dict(hidden_size=48, intermediate_size=80, num_hidden_layers=3,
                                                             num_attention_heads=6, rotary_pct=0.5)),
    "bloom_alibi": (T.BloomConfig, T.BloomForCausalLM, dict(hidden_size=48, n_layer=3, n_head=6)),
    "gemma3": (T.Gemma3TextConfig, T.Gemma3ForCausalLM, dict(hidden_size=48, intermediate_size=80, num_hidden_layers=3,
                                                             num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                                             sliding_window=4)),
}


class BaichuanStyleAttention(nn.Module):
    """Baichuan-7B's layout: one fused ``W_pack`` = [q; k; v], unflattened into 3 x hidden."""

    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.hidden_size, self.num_heads, self.head_dim = hidden, heads, hidden // heads
        self.W_pack = nn.Linear(hidden, 3 * hidden, bias=False)
        self.o_proj = nn.Linear(hidden, hidden, bias=False)
        inv = 1.0 / (10000 ** (torch.arange(0, self.head_dim, 2).float() / self.head_dim))
        self.register_buffer("inv_freq", inv, persistent=False)

    def rope(self, x):
        pos = torch.arange(x.shape[-2], dtype=torch.float32)
        freqs = torch.outer(pos, self.inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * emb.cos() + rotated * emb.sin()

    def forward(self, x):
        b, s, _ = x.shape
        proj = self.W_pack(x).unflatten(-1, (3, self.hidden_size)).unsqueeze(0).transpose(0, -2).squeeze(-2)
        q, k, v = (proj[i].view(b, s, self.num_heads, self.head_dim).transpose(1, 2) for i in range(3))
        q, k = self.rope(q), self.rope(k)
        out = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, self.num_heads * self.head_dim))


class BaichuanStyleLayer(nn.Module):
    def __init__(self, hidden: int, heads: int, inter: int) -> None:
        super().__init__()
        self.input_layernorm = T.models.llama.modeling_llama.LlamaRMSNorm(hidden)
        self.post_attention_layernorm = T.models.llama.modeling_llama.LlamaRMSNorm(hidden)
        self.self_attn = BaichuanStyleAttention(hidden, heads)
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x):
        x = x + self.self_attn(self.input_layernorm(x))
        h = self.post_attention_layernorm(x)
        return x + self.down_proj(nn.functional.silu(self.gate_proj(h)) * self.up_proj(h))


class BaichuanStyleLM(nn.Module):
    """Baichuan's modeling code lives on the hub; this local module has its structure and names."""

    def __init__(self, vocab=96, hidden=48, heads=6, inter=80, layers=3) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, hidden)
        self.layers = nn.ModuleList(BaichuanStyleLayer(hidden, heads, inter) for _ in range(layers))
        self.norm = T.models.llama.modeling_llama.LlamaRMSNorm(hidden)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)

    def forward(self, input_ids, **_):
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(x)
        return T.modeling_outputs.CausalLMOutput(logits=self.lm_head(self.norm(x)))


def _alibi_mask(heads: int, length: int) -> torch.Tensor:
    """[heads, length, length]: -inf above the diagonal plus a per-head linear bias on the key distance."""
    slopes = 2.0 ** (-8.0 * torch.arange(1, heads + 1) / heads)
    position = torch.arange(length, dtype=torch.float32)
    bias = slopes[:, None, None] * (position[None, None, :] - position[None, :, None])
    return bias + torch.full((length, length), float("-inf")).triu(1)


class Baichuan13Attention(nn.Module):
    """Baichuan-13B's attention: fused ``W_pack``, no rotary, the model-wide ALiBi mask added to the scores."""

    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.hidden_size, self.num_heads, self.head_dim = hidden, heads, hidden // heads
        self.W_pack = nn.Linear(hidden, 3 * hidden, bias=False)
        self.o_proj = nn.Linear(hidden, hidden, bias=False)

    def forward(self, hidden_states, attention_mask, past_key_value=None, use_cache=False):
        b, s, _ = hidden_states.shape
        proj = self.W_pack(hidden_states).unflatten(-1, (3, self.hidden_size)).unsqueeze(0).transpose(0, -2)
        q, k, v = (proj.squeeze(-2)[i].view(b, s, self.num_heads, self.head_dim).transpose(1, 2) for i in range(3))
        if past_key_value is not None:
            k, v = torch.cat([past_key_value[0], k], dim=2), torch.cat([past_key_value[1], v], dim=2)
        scores = q @ k.transpose(2, 3) / math.sqrt(self.head_dim)
        if s == 1:  # one new token against the cache: the mask's last query row
            attention_mask = attention_mask[:, -1:, :]
        scores = torch.max(scores + attention_mask, torch.tensor(torch.finfo(scores.dtype).min))
        out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, s, self.hidden_size)
        return self.o_proj(out), ((k, v) if use_cache else None)


class Baichuan13MLP(nn.Module):
    def __init__(self, hidden: int, inter: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class Baichuan13Layer(nn.Module):
    def __init__(self, hidden: int, heads: int, inter: int) -> None:
        super().__init__()
        self.input_layernorm = T.models.llama.modeling_llama.LlamaRMSNorm(hidden)
        self.post_attention_layernorm = T.models.llama.modeling_llama.LlamaRMSNorm(hidden)
        self.self_attn = Baichuan13Attention(hidden, heads)
        self.mlp = Baichuan13MLP(hidden, inter)

    def forward(self, x, attention_mask, past_key_value=None, use_cache=False):
        h, present = self.self_attn(self.input_layernorm(x), attention_mask=attention_mask,
                                    past_key_value=past_key_value, use_cache=use_cache)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), present


class Baichuan13Model(nn.Module):
    """Builds the ALiBi mask once for all heads (a buffer) and hands every layer the same one."""

    def __init__(self, vocab: int, hidden: int, heads: int, inter: int, layers: int, max_positions: int = 32) -> None:
        super().__init__()
        self.n_head = heads
        self.embed_tokens = nn.Embedding(vocab, hidden)
        self.layers = nn.ModuleList(Baichuan13Layer(hidden, heads, inter) for _ in range(layers))
        self.norm = T.models.llama.modeling_llama.LlamaRMSNorm(hidden)
        self.register_buffer("future_mask", _alibi_mask(heads, max_positions), persistent=False)

    def get_alibi_mask(self, length: int) -> torch.Tensor:
        return self.future_mask[: self.n_head, :length, :length]

    def forward(self, input_ids, past_key_values=None, use_cache=False):
        past = past_key_values or [None] * len(self.layers)
        length = input_ids.shape[1] + (0 if past_key_values is None else past_key_values[0][0].shape[2])
        mask = self.get_alibi_mask(length)
        x, presents = self.embed_tokens(input_ids), []
        for layer, layer_past in zip(self.layers, past):
            x, present = layer(x, attention_mask=mask, past_key_value=layer_past, use_cache=use_cache)
            presents.append(present)
        return self.norm(x), (presents if use_cache else None)


class Baichuan13StyleLM(nn.Module):
    """Baichuan-13B's structure and names (its code lives on the hub): ALiBi instead of RoPE."""

    def __init__(self, vocab=96, hidden=48, heads=6, inter=80, layers=3) -> None:
        super().__init__()
        self.config = SimpleNamespace(model_type="baichuan", hidden_size=hidden, num_attention_heads=heads,
                                      intermediate_size=inter, num_hidden_layers=layers)
        self.model = Baichuan13Model(vocab, hidden, heads, inter, layers)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)

    def forward(self, input_ids, past_key_values=None, use_cache=False, **_):
        hidden, presents = self.model(input_ids, past_key_values, use_cache)
        return T.modeling_outputs.CausalLMOutputWithPast(logits=self.lm_head(hidden), past_key_values=presents)


def _make(name):
    torch.manual_seed(0)
    if name == "baichuan_wpack":
        return BaichuanStyleLM()
    if name == "baichuan13_alibi":
        model = Baichuan13StyleLM().eval()
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "norm" in n:
                    p.add_(torch.rand_like(p) * 0.5)
        return model
    config_cls, model_cls, kw = FAMILIES[name]
    model = model_cls(config_cls(vocab_size=96, **kw)).eval()
    with torch.no_grad():  # non-trivial norm scales so masking mistakes show
        for n, p in model.named_parameters():
            if p.dim() == 1 and "norm" in n.lower():
                p.add_(torch.rand_like(p) * 0.5)
    return model


def _keep_every_other(graph, kinds):
    return {g.name: list(range(0, g.size, 2)) for g in graph.groups if g.kind in kinds}


@pytest.mark.parametrize("name", sorted([*FAMILIES, "baichuan_wpack", "baichuan13_alibi"]))
def test_family_discovery_and_equivalence(name):
    model = _make(name)
    graph = discover(model)
    kinds = {g.kind for g in graph.groups}
    assert kinds == {"heads", "channels", "hidden"}, graph
    assert graph.num_layers == 3 and not graph.warnings
    heads = graph.groups_of("heads")
    assert len(heads) == 3 and all(g.layer == i for i, g in enumerate(heads))
    assert all(len(g.root) >= 1 for g in heads)
    plan = Plan(graph.fingerprint, _keep_every_other(graph, {"heads", "channels", "hidden"}), [1],
                {g.name: g.size for g in graph.groups})
    reference = masked_reference(model, plan, graph)
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(ids).logits
        apply(model, plan, graph)
        got = model(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert sum(p.numel() for p in model.parameters()) < graph.total_params
    if hasattr(model, "generate"):
        with torch.no_grad():
            cached = model.generate(ids[:1, :4], max_new_tokens=5, do_sample=False, use_cache=True)
            uncached = model.generate(ids[:1, :4], max_new_tokens=5, do_sample=False, use_cache=False)
        assert torch.equal(cached, uncached)


def test_gqa_and_mqa_prune_whole_kv_groups_or_query_heads():
    qwen = discover(_make("qwen2")).groups_of("heads")[0]
    assert qwen.size == 2 and qwen.heads_per_element == 3 and qwen.kv_heads_per_element == 1
    gemma = discover(_make("gemma_mqa")).groups_of("heads")[0]
    assert gemma.size == 4 and gemma.heads_per_element == 1 and gemma.kv_heads_per_element == 0


def test_head_dim_and_rotary_dims_are_never_groups():
    head_dim = 8  # in every family below; rotary halves would be groups of 4
    for name in ("qwen3", "gpt_neox", "baichuan_wpack"):
        graph = discover(_make(name))
        inside = [g.name for g in graph.groups if g.kind != "hidden" and g.size in (head_dim, head_dim // 2)]
        assert not inside, (name, inside)
        for g in graph.groups_of("heads"):
            assert all(sl.width % head_dim == 0 for sl in g.slices), name


def test_bloom_alibi_follows_the_kept_heads_across_iterative_steps():
    model = _make("bloom_alibi")
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(2))
    graph = discover(model)
    first = Plan(graph.fingerprint, {g.name: [0, 2, 3, 5] for g in graph.groups_of("heads")}, [],
                 {g.name: g.size for g in graph.groups})
    reference = masked_reference(model, first, graph)
    apply(model, first, graph)
    graph2 = discover(model)
    second = Plan(graph2.fingerprint, {g.name: [1, 3] for g in graph2.groups_of("heads")}, [],
                  {g.name: g.size for g in graph2.groups})
    apply(model, second, graph2)
    with torch.no_grad():  # heads 2 and 5 of the original remain: mask the others in the reference
        params = dict(reference.named_parameters())
        for g in graph.groups_of("heads"):
            removed = torch.tensor([0, 2])  # positions in the first plan's kept list [0, 2, 3, 5]
            for sl in g.slices:
                kept_first = torch.tensor([0, 2, 3, 5])
                idx = sl.indices(kept_first[removed])
                params[sl.param].data.index_fill_(sl.dim, idx, 0.0)
        expected = reference(ids).logits
        got = model(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert math.isfinite(got.abs().sum().item())


def _greedy(model, ids, steps, use_cache):
    """Greedy decoding by hand (the local Baichuan-13B model has a cache but no ``generate``)."""
    out, past, step_logits = ids, None, []
    with torch.no_grad():
        for _ in range(steps):
            feed = out if past is None or not use_cache else out[:, -1:]
            result = model(feed, past_key_values=past if use_cache else None, use_cache=use_cache)
            past = result.past_key_values
            step_logits.append(result.logits[:, -1])
            out = torch.cat([out, result.logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return out, torch.stack(step_logits)


def test_baichuan13_override_needs_its_alibi_mask():
    assert override_key(Baichuan13StyleLM()) == "baichuan"
    seven_b = BaichuanStyleLM()  # Baichuan-7B and Baichuan2-7B share the model type but use RoPE
    seven_b.config = SimpleNamespace(model_type="baichuan")
    assert override_key(seven_b) is None


def test_baichuan13_alibi_mask_follows_the_kept_heads_with_a_cache():
    model = _make("baichuan13_alibi")
    ids = torch.randint(0, 96, (2, 5), generator=torch.Generator().manual_seed(3))
    graph = discover(model)
    uneven = {g.name: kept for g, kept in zip(graph.groups_of("heads"), ([0, 2, 3, 5], [1, 4], [5]))}
    plan = Plan(graph.fingerprint, uneven, [], {g.name: g.size for g in graph.groups})
    reference = masked_reference(model, plan, graph)
    apply(model, plan, graph)
    expected, expected_logits = _greedy(reference, ids, 6, use_cache=True)
    cached, cached_logits = _greedy(model, ids, 6, use_cache=True)
    uncached, uncached_logits = _greedy(model, ids, 6, use_cache=False)
    assert torch.equal(cached, expected) and torch.equal(uncached, expected)
    torch.testing.assert_close(cached_logits, expected_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(uncached_logits, expected_logits, rtol=1e-5, atol=1e-5)
    assert model.model.layers[2].self_attn.num_heads == 1


def test_baichuan13_prunes_iteratively():
    model = _make("baichuan13_alibi")
    ids = torch.randint(0, 96, (2, 6), generator=torch.Generator().manual_seed(4))
    report = fastprune.prune(model, None, group_ratio=0.4, criterion="l1", layers=(0, 3), steps=2,
                             method="llm-pruner", progress=False)
    assert [w["heads"] for w in report.widths_after.values()] == [4, 4, 4]  # one head per step and layer
    for layer in model.model.layers:  # the mask rows kept are the surviving heads' original indices
        rows = layer.self_attn._fastprune_head_rows["heads"]
        assert len(rows) == 4 == len(set(rows)) and all(0 <= h < 6 for h in rows)
    cached, cached_logits = _greedy(model, ids, 4, use_cache=True)
    uncached, uncached_logits = _greedy(model, ids, 4, use_cache=False)
    assert torch.equal(cached, uncached)
    torch.testing.assert_close(cached_logits, uncached_logits, rtol=1e-5, atol=1e-5)
