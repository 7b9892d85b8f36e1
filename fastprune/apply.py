"""``apply(model, plan)``: validate the whole plan, then compact the model in place."""

from __future__ import annotations

import copy
import re
from collections import defaultdict

import torch

from fastprune import graph_cache, ops
from fastprune.errors import FastpruneError
from fastprune.graph import PruningGraph
from fastprune.overrides import override_for
from fastprune.plan import Plan
from fastprune.transfers import upload


def validate(plan: Plan, graph: PruningGraph) -> None:
    """Raise :class:`FastpruneError` naming the first problem; never touches the model."""
    if plan.fingerprint != graph.fingerprint:
        raise FastpruneError(f"this plan was made for a different model (plan fingerprint "
                             f"{plan.fingerprint}, model {graph.fingerprint})")
    known = {g.name: g for g in graph.groups}
    for name, size in plan.group_sizes.items():
        if name in known and known[name].size != size:
            raise FastpruneError(f"group {name!r} has {known[name].size} elements in this model, "
                                 f"the plan expects {size}")
    for name, kept in plan.keep.items():
        group = known.get(name)
        if group is None:
            raise FastpruneError(f"the plan names group {name!r}, which this model does not have")
        if not kept:
            what = "head group" if group.kind == "heads" else "element"
            raise FastpruneError(f"the plan removes every {what} of {name!r}; keep at least one")
        if any(type(i) is not int for i in kept):
            raise FastpruneError(f"kept indices of {name!r} must be integers")
        if any(b <= a for a, b in zip(kept, kept[1:])):
            raise FastpruneError(f"kept indices of {name!r} must be sorted and distinct (duplicates or "
                                 f"disorder found)")
        if kept[0] < 0 or kept[-1] >= group.size:
            bad = kept[0] if kept[0] < 0 else kept[-1]
            raise FastpruneError(f"kept index {bad} of {name!r} is out of range [0, {group.size})")
    layers = plan.remove_layers
    if layers:
        if graph.layer_container is None:
            raise FastpruneError("the plan removes layers but the model has no repeated layers")
        if len(set(layers)) != len(layers):
            raise FastpruneError("the plan removes a layer twice")
        bad = [i for i in layers if not 0 <= i < graph.num_layers]
        if bad:
            raise FastpruneError(f"layer {bad[0]} is out of range [0, {graph.num_layers})")
        if len(layers) >= graph.num_layers:
            raise FastpruneError("the plan removes every layer")


def kept_indices(plan: Plan, graph: PruningGraph) -> dict[tuple[str, int], torch.Tensor]:
    """Per (parameter, dim) the sorted indices that stay, for every dimension that shrinks."""
    masks: dict[tuple[str, int], torch.Tensor] = {}
    for group in graph.groups:
        kept = plan.keep.get(group.name)
        if kept is None or len(kept) == group.size:
            continue
        removed = torch.ones(group.size, dtype=torch.bool)
        removed[torch.tensor(kept, dtype=torch.long)] = False
        removed_elements = removed.nonzero().flatten()
        for sl in group.slices:
            key = (sl.param, sl.dim)
            if key not in masks:
                masks[key] = torch.ones(graph.param_shapes[sl.param][sl.dim], dtype=torch.bool)
            masks[key][sl.indices(removed_elements)] = False
    return {k: m.nonzero().flatten() for k, m in masks.items()}


def apply(model: torch.nn.Module, plan: Plan, graph: PruningGraph | None = None, *, progress: bool = False) -> None:
    """Prune ``model`` in place as ``plan`` says (validated first, one matrix at a time).

    ``progress`` shows a bar over the matrices being compacted.
    """
    from tqdm.auto import tqdm

    if graph is None:
        from fastprune.discover import discover
        graph = discover(model)
    validate(plan, graph)
    key_before = graph_cache.structure_key(model)
    keep = kept_indices(plan, graph)
    removed_layers = set(plan.remove_layers)
    params = dict(model.named_parameters())
    by_param: dict[str, list[tuple[int, torch.Tensor]]] = defaultdict(list)
    for (name, dim), idx in keep.items():
        if graph.layer_of(name) not in removed_layers:  # removed layers are dropped whole below
            by_param[name].append((dim, idx))
    with torch.no_grad():
        for name, dims in tqdm(list(by_param.items()), desc="compaction", unit="matrix", disable=not progress):
            p = params[name]
            data = p.data
            dims = sorted(dims, key=lambda x: x[0])
            # validated above: one upload of this matrix's indices, no check on the device
            for (dim, _), idx in zip(dims, upload([idx for _, idx in dims], data.device)):
                data = ops.gather(data, dim, idx)
            p.data = data  # the old storage is freed here: peak overhead is one matrix
            p.grad = None
    _update_module_attributes(model, plan, graph)
    _adapt_attention_modules(model, plan, graph)
    override = override_for(model)
    if override is not None and override.adapt is not None:
        override.adapt(model, plan, graph)
    _update_config(model, plan, graph)
    if removed_layers:
        _remove_layers(model, graph, sorted(removed_layers))
    graph_cache.remember_pruned(model, graph, plan, key_before)  # the next discovery of this model needs no trace


def _update_module_attributes(model: torch.nn.Module, plan: Plan, graph: PruningGraph) -> None:
    modules = dict(model.named_modules())
    for module_name, attrs in graph.attribute_links.items():
        for attr, (group_name, per) in attrs.items():
            if group_name in plan.keep:
                setattr(modules[module_name], attr, len(plan.keep[group_name]) * per)
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover
        Conv1D = ()  # noqa: N806
    for mod in model.modules():
        if isinstance(mod, torch.nn.Linear):
            mod.out_features, mod.in_features = mod.weight.shape
        elif isinstance(mod, torch.nn.Embedding):
            mod.num_embeddings, mod.embedding_dim = mod.weight.shape
        elif isinstance(mod, torch.nn.LayerNorm) and mod.weight is not None:
            mod.normalized_shape = tuple(mod.weight.shape)
        elif Conv1D and isinstance(mod, Conv1D):
            mod.nx, mod.nf = mod.weight.shape


_HEAD_COUNT = re.compile(r"^(num_heads|num_attention_heads|n_heads?|num_q_heads)$")
_KV_COUNT = re.compile(r"^(num_key_value_heads|num_kv_heads|n_kv_heads?)$")


def _adapt_attention_modules(model: torch.nn.Module, plan: Plan, graph: PruningGraph) -> None:
    """Keep an attention module's head counts in step with its kept heads.

    Head-count attributes are updated by name; a module that reads head counts from a shared
    config (Phi-3 slices its fused qkv by ``config.num_attention_heads``) gets a private copy of
    the config with this layer's counts.
    """
    for g in graph.groups_of("heads"):
        if g.name not in plan.keep or g.layer in plan.remove_layers:
            continue
        try:
            attn = model.get_submodule(g.name)
        except AttributeError:
            continue
        kept = len(plan.keep[g.name])
        old_q, new_q = g.size * g.heads_per_element, kept * g.heads_per_element
        counts = {"q": (old_q, new_q)}
        if g.kv_heads_per_element:
            counts["kv"] = (g.size * g.kv_heads_per_element, kept * g.kv_heads_per_element)
        for attr, value in list(vars(attn).items()):
            if type(value) is not int:
                continue
            for key, pattern in (("q", _HEAD_COUNT), ("kv", _KV_COUNT)):
                if key in counts and pattern.match(attr) and value == counts[key][0]:
                    setattr(attn, attr, counts[key][1])
        config = getattr(attn, "config", None)
        if config is not None and hasattr(config, "num_attention_heads"):
            own = copy.copy(config)
            if own.num_attention_heads == old_q:
                own.num_attention_heads = new_q
            if "kv" in counts and getattr(own, "num_key_value_heads", None) == counts["kv"][0]:
                own.num_key_value_heads = counts["kv"][1]
            attn.config = own


def _update_config(model: torch.nn.Module, plan: Plan, graph: PruningGraph) -> None:
    config = getattr(model, "config", None)
    if config is not None:
        update_config(config, plan, graph, layer_widths(model, graph, plan))


_INTERMEDIATE = ("intermediate_size", "ffn_dim", "n_inner", "ffn_hidden_size")  # first one the config has
_MOE_INTERMEDIATE = ("moe_intermediate_size", "expert_intermediate_size", "intermediate_size")  # per expert


def update_config(config, plan: Plan, graph: PruningGraph, widths: dict[int, dict]) -> None:
    """Write ``plan``'s widths into ``config``: hidden size, the widths every layer shares, per-layer widths.

    ``widths`` is :func:`layer_widths` for the plan.  Widths that differ between layers go to
    ``config.fastprune_layer_widths`` (keyed by the layer's index once the plan's layers are removed);
    when none differ, a stale entry from an earlier step is dropped.  Layer counts are updated by
    the layer removal itself.
    """
    hidden = [g for g in graph.groups if g.kind == "hidden"]
    if hidden and hidden[0].name in plan.keep:
        old, new = hidden[0].size, len(plan.keep[hidden[0].name])
        heads = getattr(config, "num_attention_heads", None)
        if heads and getattr(config, "head_dim", None) is None:
            config.head_dim = old // heads  # keep the per-head width explicit once hidden shrinks
        for attr in ("hidden_size", "n_embd", "d_model", "dim", "word_embed_proj_dim"):
            if getattr(config, attr, None) == old:
                setattr(config, attr, new)
    keys = ("heads", "kv_heads", "intermediate", "shared_intermediate")
    uniform = {}
    for key in keys:
        values = {w[key] for w in widths.values() if w.get(key) is not None}
        if len(values) == 1:
            uniform[key] = values.pop()
    if "heads" in uniform and getattr(config, "num_attention_heads", None) is not None:
        if getattr(config, "head_dim", None) is None and getattr(config, "hidden_size", None):  # Mixtral: derived
            config.head_dim = config.hidden_size // config.num_attention_heads  # before the head count changes
        config.num_attention_heads = uniform["heads"]
    if "kv_heads" in uniform and getattr(config, "num_key_value_heads", None) is not None:
        config.num_key_value_heads = uniform["kv_heads"]
    moe = {g.layer for g in graph.groups if g.experts}
    classes = ((set(widths) - moe, _INTERMEDIATE), (set(widths) & moe, _MOE_INTERMEDIATE))  # dense, experts
    for layers, names in classes:
        values = {widths[i]["intermediate"] for i in layers if widths[i].get("intermediate") is not None}
        attr = next((a for a in names if hasattr(config, a)), None)
        if len(values) == 1 and attr is not None:  # dense and expert widths each when every layer shares it
            setattr(config, attr, values.pop())
    if "shared_intermediate" in uniform and hasattr(config, "shared_expert_intermediate_size"):
        config.shared_expert_intermediate_size = uniform["shared_intermediate"]
    differ = any(len({w.get(k) for w in widths.values()}) > 1 for k in keys if k != "intermediate")
    if differ or any(len({widths[i].get("intermediate") for i in layers}) > 1 for layers, _ in classes):
        removed = set(plan.remove_layers)
        index = {old: new for new, old in enumerate(i for i in range(graph.num_layers) if i not in removed)}
        config.fastprune_layer_widths = {str(index[i]): w for i, w in sorted(widths.items())}
    elif "fastprune_layer_widths" in vars(config):
        del config.fastprune_layer_widths


def layer_widths(model: torch.nn.Module, graph: PruningGraph, plan: Plan | None = None) -> dict[int, dict]:
    """Per layer: query heads, kv heads and MLP channels after ``plan``, keyed by the graph's layer index.

    Counts come from the graph's groups.  With a config, every attention layer reports heads and kv
    heads: where a layer's heads form no group (one kv head with one query head left, say) nothing can
    change them and the config states them (``fastprune_layer_widths``, else its head counts); where
    the elements are query heads, the config tells shared kv heads (multi-query, or a GQA layer left
    with one kv head) from one kv head per query head (fused interleaved qkv).  In a layer with stacked
    experts, ``intermediate`` is each expert's width and ``shared_intermediate`` its shared expert's.
    Call it before ``plan`` is applied, while the config still describes the model the graph was
    discovered on.
    """
    removed = set(plan.remove_layers) if plan else set()
    out: dict[int, dict] = {}
    query_elements: dict[int, int] = {}  # layer -> query heads of groups whose elements own no kv head
    moe_layers = {g.layer for g in graph.groups if g.experts}  # "intermediate" there: each expert's width
    for g in graph.groups:
        if g.layer is None or g.layer in removed:
            continue
        n = len(plan.keep[g.name]) if plan and g.name in plan.keep else g.size
        w = out.setdefault(g.layer, {})
        if g.kind == "heads":
            w["heads"] = w.get("heads", 0) + n * g.heads_per_element
            if g.kv_heads_per_element:
                w["kv_heads"] = w.get("kv_heads", 0) + n * g.kv_heads_per_element
            else:
                query_elements[g.layer] = query_elements.get(g.layer, 0) + n * g.heads_per_element
        elif g.kind == "channels":  # an MoE layer's dense channels are its shared expert
            key = "shared_intermediate" if not g.experts and g.layer in moe_layers else "intermediate"
            w[key] = w.get(key, 0) + n
    config = getattr(model, "config", None)
    for i in range(graph.num_layers if config is not None else 0):
        stated = {} if i in removed else _config_heads(config, i, graph.num_layers)
        if not stated:
            continue
        w = out.setdefault(i, {})
        if "heads" not in w:
            w.update(stated)
        elif i in query_elements:  # multi-query (shared kv heads) or one kv head per query head (fused qkv)
            shared = stated.get("kv_heads", stated["heads"]) < stated["heads"]
            w["kv_heads"] = w.get("kv_heads", 0) + (stated["kv_heads"] if shared else query_elements[i])
    return dict(sorted(out.items()))


def _config_heads(config, layer: int, num_layers: int) -> dict[str, int]:
    """Query and kv heads of ``layer`` as the config states them (empty if it does not, or no attention)."""
    stored = (getattr(config, "fastprune_layer_widths", None) or {}).get(str(layer)) or {}
    if "heads" in stored:
        return {k: stored[k] for k in ("heads", "kv_heads") if k in stored}
    types = getattr(config, "layer_types", None)
    if isinstance(types, (list, tuple)) and len(types) == num_layers:
        kind = str(types[layer])
        if "attention" not in kind or kind.startswith("linear"):
            return {}
    heads = getattr(config, "num_attention_heads", None)
    if type(heads) is not int or heads < 1:
        return {}
    kv = getattr(config, "num_key_value_heads", None)
    if type(kv) is not int:
        kv = 1 if getattr(config, "multi_query", False) is True else heads
    return {"heads": heads, "kv_heads": kv}


def _remove_layers(model: torch.nn.Module, graph: PruningGraph, removed: list[int]) -> None:
    container = model.get_submodule(graph.layer_container)
    kept = [m for i, m in enumerate(container) if i not in set(removed)]
    new = torch.nn.ModuleList(kept)
    parent_name, _, attr = graph.layer_container.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)
    for new_index, layer in enumerate(new):
        for mod in layer.modules():
            for name in ("layer_idx", "layer_id", "layer_number"):
                if type(getattr(mod, name, None)) is int:
                    setattr(mod, name, new_index)
    config = getattr(model, "config", None)
    if config is None:
        return
    old = graph.num_layers
    for attr in ("num_hidden_layers", "n_layer", "num_layers", "n_layers"):
        if getattr(config, attr, None) == old:
            setattr(config, attr, len(new))
    for attr, value in list(vars(config).items()):
        if isinstance(value, list) and len(value) == old and re.search(r"layer", attr):
            setattr(config, attr, [v for i, v in enumerate(value) if i not in set(removed)])
    if isinstance(getattr(config, "mlp_only_layers", None), list):  # Qwen MoE: dense layers listed by index
        config.mlp_only_layers = [i for i, layer in enumerate(new) if not any(p.dim() == 3 for p in layer.parameters())]
        if getattr(config, "decoder_sparse_step", 1) != 1:  # the step pattern no longer fits: the list says it all
            config.decoder_sparse_step = 1
