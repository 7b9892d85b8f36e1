import copy

import pytest
import torch
import torch.nn.functional as F
from models import UnseenLM, tiny_llama
from safetensors.torch import save_file
from torch.utils._python_dispatch import TorchDispatchMode

import fastprune.importance as importance
from fastprune.discover import discover
from fastprune.errors import FastpruneError
from fastprune.importance import CRITERIA, Scores, aggregate, score

TAYLOR = ("element1", "element2", "mix", "vectorwise")


def _model(kind):
    return tiny_llama(layers=2) if kind == "llama" else UnseenLM(depth=2)


def _calib(model, n=3, seq=9, seed=1):
    vocab = model.get_input_embeddings().num_embeddings if hasattr(model, "config") else model.tok.num_embeddings
    return torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(seed))


def _loss(model, ids):
    """The calibration loss, obtained independently of fastprune (HF's own loss where there is one)."""
    if hasattr(model, "config"):
        return model(input_ids=ids, labels=ids).loss
    logits = model(ids).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def _grads(model, ids):
    params = dict(model.named_parameters())
    grads = torch.autograd.grad(_loss(model, ids), list(params.values()), allow_unused=True)
    return {n: (torch.zeros_like(p) if g is None else g).double() for (n, p), g in zip(params.items(), grads)}


def _fisher(model, ids):
    per_sample = [_grads(model, ids[s:s + 1]) for s in range(ids.shape[0])]
    return {n: sum(g[n] ** 2 for g in per_sample) / len(per_sample) for n in per_sample[0]}


def _by_hand(criterion, w, g=None, fisher=None):
    """The criterion over a bunch of weights (a row or column of one parameter), summed by loops."""
    if criterion == "l1":
        return w.abs().sum()
    if criterion == "l2":
        return (w * w).sum()
    if criterion in ("element1", "vectorwise"):
        total = 0.0
        for wi, gi in zip(w.flatten().tolist(), g.flatten().tolist()):
            total += abs(wi * gi) if criterion == "element1" else wi * gi
        return torch.tensor(total, dtype=torch.float64)
    if criterion == "element2":
        return (w * w * fisher).sum()
    return _by_hand("element1", w, g) - 0.5 * _by_hand("element2", w, fisher=fisher)


def _expected(model, graph, criterion, ids):
    params = {n: p.detach().double() for n, p in model.named_parameters()}
    grads = _grads(model, ids) if criterion in ("element1", "vectorwise", "mix") else {}
    fisher = _fisher(model, ids) if criterion in ("element2", "mix") else {}
    out = {}
    for group in graph.groups:
        table = torch.zeros(len(group.slices), group.size, dtype=torch.float64)
        for s, sl in enumerate(group.slices):
            w = params[sl.param]
            for e in range(group.size):
                picked = [b + e * sl.stride for b in sl.base]
                # vectorwise takes |.| of the whole slice sum; the others add per index
                ws = torch.stack([w.select(sl.dim, i) for i in picked])
                gs = torch.stack([grads[sl.param].select(sl.dim, i) for i in picked]) if grads else None
                fs = torch.stack([fisher[sl.param].select(sl.dim, i) for i in picked]) if fisher else None
                value = _by_hand(criterion, ws, gs, fs)
                table[s, e] = value.abs() if criterion == "vectorwise" else value
        out[group.name] = table
    return out


@pytest.mark.parametrize("kind", ["llama", "unseen"])
@pytest.mark.parametrize("criterion", ["l1", "l2", "element1", "element2", "mix", "vectorwise"])
def test_criteria_match_values_by_hand(kind, criterion):
    model = _model(kind)
    graph = discover(model)
    ids = _calib(model)
    got = score(model, graph, ids, criterion, progress=False)
    expected = _expected(model, graph, criterion, ids)
    assert got.criterion == criterion and got.fingerprint == graph.fingerprint
    for name, table in expected.items():
        assert got.groups[name].dtype == torch.float32
        assert got.groups[name].shape == table.shape
        torch.testing.assert_close(got.groups[name].double(), table, rtol=2e-4, atol=1e-7 * table.abs().max())


@pytest.mark.parametrize("criterion", ["l1", "element1", "element2", "mix", "vectorwise"])
def test_layer_scores_sum_the_criterion_over_each_layer(criterion):
    model = _model("llama")
    graph = discover(model)
    ids = _calib(model)
    got = score(model, graph, ids, criterion, progress=False).layer_scores
    grads = _grads(model, ids)
    fisher = _fisher(model, ids) if criterion in ("element2", "mix") else {}
    expected = torch.zeros(graph.num_layers, dtype=torch.float64)
    for name, p in model.named_parameters():
        if name.startswith("model.layers."):
            layer = int(name.split(".")[2])
            w, g = p.detach().double(), grads[name]
            value = _by_hand(criterion, w, g, fisher.get(name))
            expected[layer] += value.abs() if criterion == "vectorwise" else value
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=0)


def test_random_is_seeded():
    model = _model("llama")
    graph = discover(model)
    a, b = (score(model, graph, None, "random", seed=3) for _ in range(2))
    c = score(model, graph, None, "random", seed=4)
    for name in a.groups:
        assert torch.equal(a.groups[name], b.groups[name])
        assert not torch.equal(a.groups[name], c.groups[name])
    assert a.layer_scores.shape == (graph.num_layers,)


def _hand_scores(graph):
    gen = torch.Generator().manual_seed(0)
    groups = {g.name: torch.rand(len(g.slices), g.size, generator=gen) + 0.1 for g in graph.groups}
    return Scores(groups, torch.rand(graph.num_layers), "element1", graph.fingerprint)


@pytest.mark.parametrize("how", ["sum", "mean", "max", "prod", "first"])
def test_aggregations_by_hand(how):
    graph = discover(UnseenLM(depth=2))  # fused qkv: three root slices in one parameter
    scores = _hand_scores(graph)
    got = aggregate(scores, graph, how)
    for g in graph.groups:
        table = scores.groups[g.name].tolist()
        for e in range(g.size):
            column = [row[e] for row in table]
            if how == "sum":
                want = sum(column)
            elif how == "mean":
                want = sum(column) / len(column)
            elif how == "max":
                want = max(column)
            elif how == "prod":
                want = 1.0
                for v in column:
                    want *= v
            else:
                want = sum(column[i] for i in g.root)
            assert got[g.name][e].item() == pytest.approx(want, rel=1e-6)


def test_prod_does_not_underflow_like_fp32():
    graph = discover(tiny_llama(layers=2))
    scores = _hand_scores(graph)
    scores.groups["hidden"] = torch.full_like(scores.groups["hidden"], 1e-5)  # 20 slices: 1e-100
    assert (aggregate(scores, graph, "prod")["hidden"] > 0).all()


@pytest.mark.parametrize("criterion", TAYLOR)
def test_streaming_keeps_at_most_one_gradient_alive(monkeypatch, criterion):
    model = _model("llama")
    graph = discover(model)
    params = list(model.parameters())
    calls, live = [], []
    real = importance.taylor_accumulate_

    def spy(weight, grad, rows, cols, row_block, col_block):
        live.append(sum(p.grad is not None for p in params))
        calls.append(tuple(weight.shape))
        real(weight, grad, rows, cols, row_block, col_block)

    monkeypatch.setattr(importance, "taylor_accumulate_", spy)
    ids = _calib(model)
    got = score(model, graph, ids, criterion, progress=False)
    passes = {"element1": 1, "vectorwise": 1, "element2": 3, "mix": 4}[criterion]
    assert len(calls) == passes * len(params)
    assert max(live) == 1
    assert all(p.grad is None for p in params)
    expected = _expected(model, graph, criterion, ids)  # a reference that keeps every gradient
    for name, table in expected.items():
        torch.testing.assert_close(got.groups[name].double(), table, rtol=2e-4, atol=1e-7 * table.abs().max())


class _BigFloat32(TorchDispatchMode):
    """Records every fp32 tensor an op outputs whose size equals some parameter's size."""

    def __init__(self, sizes):
        super().__init__()
        self.sizes, self.seen = sizes, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.numel() in self.sizes:
                self.seen.append((str(func), tuple(t.shape)))
        return out


@pytest.mark.parametrize("criterion", ["element2", "mix"])
def test_second_order_needs_no_parameter_sized_fp32_buffer(monkeypatch, criterion):
    model = _model("llama").to(torch.bfloat16)
    graph = discover(model)
    ids = _calib(model, n=2, seq=6)  # fp32 logits of 1152, 960 or 480 values: no parameter size
    accumulators = []
    real = importance.taylor_accumulate_

    def spy(weight, grad, rows, cols, row_block, col_block):
        assert weight.dtype == grad.dtype == torch.bfloat16
        accumulators.append((weight.shape, rows.numel() + cols.numel()))
        real(weight, grad, rows, cols, row_block, col_block)  # seen by the mode as one op

    monkeypatch.setattr(importance, "taylor_accumulate_", spy)
    sizes = {p.numel() for p in model.parameters() if p.numel() >= 256}
    with _BigFloat32(sizes) as mode:
        score(model, graph, ids, criterion, progress=False)
    assert mode.seen == []
    for (r, c), n in accumulators:
        assert n <= 3 * (r + c)


def test_model_state_is_restored():
    model = _model("llama").train()
    graph = discover(model)
    before = copy.deepcopy(model.state_dict())
    frozen = "model.layers.0.mlp.up_proj.weight"
    old_grad = torch.randn(48)
    for name, p in model.named_parameters():
        p.requires_grad_(name != frozen)
        if name == "model.norm.weight":
            p.grad = old_grad.clone()
    for criterion in CRITERIA:
        score(model, graph, _calib(model), criterion, progress=False)
    assert model.training
    for name, p in model.named_parameters():
        assert p.requires_grad == (name != frozen)
        assert torch.equal(p.detach(), before[name])
        if name == "model.norm.weight":
            assert torch.equal(p.grad, old_grad)
        else:
            assert p.grad is None


@pytest.mark.parametrize("criterion", TAYLOR)
def test_micro_batches_and_checkpointing_give_the_same_scores(criterion):
    model = _model("llama")
    graph = discover(model)
    ids = _calib(model, n=4)
    whole = score(model, graph, ids, criterion, progress=False)
    split = score(model, graph, ids, criterion, batch_size=3, progress=False)
    ckpt = score(model, graph, ids, criterion, gradient_checkpointing=True, progress=False)
    assert not importance._is_checkpointing(model) and not model.training
    for other in (split, ckpt):
        for name in whole.groups:
            torch.testing.assert_close(other.groups[name], whole.groups[name], rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("criterion", TAYLOR)
def test_shard_sum_hook_as_two_processes_holding_the_same_shard(criterion):
    """``shard_sum`` doubling every tensor is what two processes with identical shards would all-reduce:
    the scores of the shard repeated twice."""
    model = _model("llama")
    graph = discover(model)
    ids = _calib(model, n=3)
    summed = []

    def shard_sum(t: torch.Tensor) -> None:
        summed.append(t.dtype)
        t.mul_(2)

    got = score(model, graph, ids, criterion, batch_size=2, progress=False, shard_sum=shard_sum)
    want = score(model, graph, torch.cat([ids, ids]), criterion, progress=False)
    assert torch.long in summed and len(summed) > 1 and got.settings["n_samples"] == 6
    for name in want.groups:
        torch.testing.assert_close(got.groups[name], want.groups[name], rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(got.layer_scores, want.layer_scores, rtol=1e-4, atol=1e-9)
    with pytest.raises(FastpruneError, match="fused_linear cannot score a shard"):
        score(model, graph, ids, criterion, fused_linear=True, progress=False, shard_sum=shard_sum)


def test_scores_round_trip(tmp_path):
    model = _model("llama")
    graph = discover(model)
    s = score(model, graph, _calib(model), "mix", progress=False)
    path = tmp_path / "scores.safetensors"
    s.save(path)
    back = Scores.load(path)
    assert back.criterion == "mix" and back.fingerprint == graph.fingerprint and back.settings == s.settings
    assert back.groups.keys() == s.groups.keys()
    for name in s.groups:
        assert torch.equal(back.groups[name], s.groups[name])
    assert torch.equal(back.layer_scores, s.layer_scores)
    (tmp_path / "bad.safetensors").write_bytes(b"not a scores file")
    with pytest.raises(FastpruneError, match="cannot read"):
        Scores.load(tmp_path / "bad.safetensors")
    save_file({"x": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(FastpruneError, match="not a fastprune scores file"):
        Scores.load(tmp_path / "other.safetensors")


def test_bad_arguments():
    model = _model("llama")
    graph = discover(model)
    with pytest.raises(FastpruneError, match="criterion"):
        score(model, graph, _calib(model), "taylor")
    with pytest.raises(FastpruneError, match="calib"):
        score(model, graph, None, "element1")
    with pytest.raises(FastpruneError, match="calib"):
        score(model, graph, _calib(model).float(), "element1")
    with pytest.raises(FastpruneError, match="aggregation"):
        aggregate(score(model, graph, None, "l1"), graph, "median")


@pytest.mark.parametrize("criterion", ["element1", "element2", "vectorwise"])
def test_scoring_named_groups_gives_their_scores_and_no_embedding_gradient(criterion):
    """``groups=`` scores the named groups exactly as a full run does, and the parameters outside them
    and outside every layer (the tied embedding and output head) take no gradient while it runs."""
    model = tiny_llama(layers=2)
    graph = discover(model)
    ids = _calib(model)
    wanted = [g.name for g in graph.groups if g.kind != "hidden"]
    assert len(wanted) < len(graph.groups)  # the hidden group is left out
    full = score(model, graph, ids, criterion=criterion, progress=False)
    seen = []
    emb = model.get_input_embeddings()
    hook = emb.register_forward_pre_hook(lambda mod, args: seen.append(mod.weight.requires_grad))
    try:
        part = score(model, graph, ids, criterion=criterion, progress=False, groups=wanted)
    finally:
        hook.remove()
    assert seen == [False] * len(seen) and seen, "the embedding required grad while only layer groups scored"
    assert emb.weight.requires_grad  # restored afterwards
    assert sorted(part.groups) == sorted(wanted)
    for name in wanted:
        assert torch.equal(part.groups[name], full.groups[name]), name
    # layer totals sum the same weights, possibly from differently laid-out partials: equal up to rounding
    torch.testing.assert_close(part.layer_scores, full.layer_scores, rtol=1e-5, atol=0)


def test_scoring_unknown_groups_is_refused():
    model = tiny_llama(layers=2)
    graph = discover(model)
    with pytest.raises(FastpruneError, match="'nope'"):
        score(model, graph, _calib(model), groups=["nope"], progress=False)
    with pytest.raises(FastpruneError, match="collection of group names"):
        score(model, graph, _calib(model), groups="hidden", progress=False)
