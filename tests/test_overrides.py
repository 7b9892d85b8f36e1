"""An op the tracer cannot map is named with its module and the fix; a declared coupling unblocks it."""

from types import SimpleNamespace

import pytest
import torch
from equivalence import masked_reference
from models import FusedSelfAttention, ScaleNorm
from torch import nn

import fastprune
from fastprune.apply import apply
from fastprune.discover import discover
from fastprune.errors import FastpruneError
from fastprune.overrides import _OVERRIDES
from fastprune.plan import Plan


@torch.library.custom_op("fastprune_test::soft_gate", mutates_args=())
def soft_gate(x: torch.Tensor) -> torch.Tensor:
    """A user's own kernel: elementwise, so each channel stays apart (the tracer cannot know)."""
    return x * torch.sigmoid(1.5 * x)


@soft_gate.register_fake
def _(x):
    return torch.empty_like(x)


class KernelMLP(nn.Module):
    def __init__(self, dim: int, inner: int) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(dim, inner), nn.Linear(inner, dim)

    def forward(self, x):
        return self.down(torch.ops.fastprune_test.soft_gate(self.up(x)))


class KernelBlock(nn.Module):
    def __init__(self, dim: int, heads: int, inner: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = ScaleNorm(dim), ScaleNorm(dim)
        self.attn, self.mlp = FusedSelfAttention(dim, heads), KernelMLP(dim, inner)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class KernelLM(nn.Module):
    def __init__(self, vocab: int = 50, dim: int = 40, heads: int = 5, inner: int = 36, depth: int = 3) -> None:
        torch.manual_seed(0)
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(KernelBlock(dim, heads, inner) for _ in range(depth))
        self.norm = ScaleNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, input_ids, **_):
        x = self.tok(input_ids)
        for block in self.blocks:
            x = block(x)
        return SimpleNamespace(logits=self.head(self.norm(x)))


COUPLINGS = [((f"blocks.{i}.mlp.up.weight", 0), (f"blocks.{i}.mlp.down.weight", 1)) for i in range(3)]


@pytest.fixture
def registry():
    yield
    _OVERRIDES.pop("KernelLM", None)


def test_unmapped_op_is_named_with_its_module_and_the_fix():
    graph = discover(KernelLM())
    assert not graph.groups_of("channels")  # the MLP channels meet the op: kept, never pruned wrong
    assert len(graph.warnings) == 3
    message = graph.warnings[0]
    assert message.startswith("fastprune_test.soft_gate in module 'blocks.0.mlp' (no rule)")
    assert "stays unpruned" in message
    assert ("fastprune.register_override('KernelLM', fastprune.Override(couplings=[((producer_param, out_dim), "
            "(consumer_param, in_dim))]))") in message
    with pytest.warns(UserWarning) as issued:
        report = fastprune.prune(KernelLM(), None, group_ratio=0.2, criterion="l1", layers=(0, 3),
                                 method="llm-pruner", progress=False)
    assert [str(w.message) for w in issued] == report.settings["warnings"] == graph.warnings


def test_a_declared_coupling_unblocks_the_channels(registry):
    fastprune.register_override("KernelLM", fastprune.Override(couplings=COUPLINGS))
    model = KernelLM()
    graph = discover(model)
    mlp = graph.groups_of("channels")
    assert [g.name for g in mlp] == [f"blocks.{i}.mlp" for i in range(3)]
    assert {(s.param.rsplit(".", 2)[-2], s.dim) for s in mlp[0].slices} == {("up", 0), ("down", 1)}
    keep = {g.name: list(range(0, g.size, 2)) for g in graph.groups if g.kind in ("channels", "heads", "hidden")}
    plan = Plan(graph.fingerprint, keep, [1], {g.name: g.size for g in graph.groups})
    reference = masked_reference(model, plan, graph)
    ids = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(ids).logits
        apply(model, plan, graph)
        got = model(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert model.blocks[0].mlp.up.out_features == 18


def test_saved_state_needs_a_restore():
    with pytest.raises(FastpruneError, match="save_state and restore go together"):
        fastprune.register_override("Nothing", fastprune.Override(save_state=lambda model: {}))
