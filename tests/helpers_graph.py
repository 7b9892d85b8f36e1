"""Hand-built pruning graphs and scores (no model, no tracing) for selection tests."""

from __future__ import annotations

import torch

from fastprune.graph import Group, PruningGraph, Slice
from fastprune.importance import Scores


def llama_graph(layers: int = 4, hidden: int = 48, inter: int = 80, heads: int = 6, kv: int = 2,
                head_dim: int = 8, vocab: int = 64, tied: bool = True) -> PruningGraph:
    """The graph discovery gives a Llama: kv head groups, MLP channels and the hidden dim."""
    rep = heads // kv
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    hidden_slices = [Slice("model.embed_tokens.weight", 1, (0,), 1, "other")]
    groups = []
    for i in range(layers):
        p = f"model.layers.{i}."
        a, m = p + "self_attn.", p + "mlp."
        shapes.update({a + "q_proj.weight": (heads * head_dim, hidden), a + "k_proj.weight": (kv * head_dim, hidden),
                       a + "v_proj.weight": (kv * head_dim, hidden), a + "o_proj.weight": (hidden, heads * head_dim),
                       m + "gate_proj.weight": (inter, hidden), m + "up_proj.weight": (inter, hidden),
                       m + "down_proj.weight": (hidden, inter),
                       p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,)})
        q_width = rep * head_dim
        groups.append(Group(
            name=f"model.layers.{i}.self_attn", kind="heads", layer=i, size=kv,
            slices=[Slice(a + "q_proj.weight", 0, tuple(range(q_width)), q_width, "out"),
                    Slice(a + "k_proj.weight", 0, tuple(range(head_dim)), head_dim, "out"),
                    Slice(a + "v_proj.weight", 0, tuple(range(head_dim)), head_dim, "out"),
                    Slice(a + "o_proj.weight", 1, tuple(range(q_width)), q_width, "in")],
            root=[0, 1], heads_per_element=rep, kv_heads_per_element=1))
        groups.append(Group(
            name=f"model.layers.{i}.mlp", kind="channels", layer=i, size=inter,
            slices=[Slice(m + "gate_proj.weight", 0, (0,), 1, "out"), Slice(m + "up_proj.weight", 0, (0,), 1, "out"),
                    Slice(m + "down_proj.weight", 1, (0,), 1, "in")],
            root=[0, 1]))
        hidden_slices += [Slice(a + n, 1, (0,), 1, "in") for n in ("q_proj.weight", "k_proj.weight", "v_proj.weight")]
        hidden_slices += [Slice(a + "o_proj.weight", 0, (0,), 1, "out"),
                          Slice(m + "gate_proj.weight", 1, (0,), 1, "in"),
                          Slice(m + "up_proj.weight", 1, (0,), 1, "in"),
                          Slice(m + "down_proj.weight", 0, (0,), 1, "out"),
                          Slice(p + "input_layernorm.weight", 0, (0,), 1, "other"),
                          Slice(p + "post_attention_layernorm.weight", 0, (0,), 1, "other")]
    shapes["model.norm.weight"] = (hidden,)
    hidden_slices.append(Slice("model.norm.weight", 0, (0,), 1, "other"))
    if not tied:
        shapes["lm_head.weight"] = (vocab, hidden)
        hidden_slices.append(Slice("lm_head.weight", 1, (0,), 1, "in"))
    groups.insert(0, Group(name="hidden", kind="hidden", layer=None, size=hidden, slices=hidden_slices,
                           root=[0], normalized=True))
    return PruningGraph(groups=groups, layer_container="model.layers", num_layers=layers,
                        param_shapes=shapes, fingerprint=f"synthetic-{layers}-{hidden}-{inter}-{heads}-{kv}")


def random_scores(graph: PruningGraph, seed: int = 0, criterion: str = "element1") -> Scores:
    """Positive random per-slice scores for every group and layer."""
    gen = torch.Generator().manual_seed(seed)
    groups = {g.name: torch.rand(len(g.slices), g.size, generator=gen) + 0.01 for g in graph.groups}
    return Scores(groups=groups, layer_scores=torch.rand(graph.num_layers, generator=gen) + 0.01,
                  criterion=criterion, fingerprint=graph.fingerprint)
