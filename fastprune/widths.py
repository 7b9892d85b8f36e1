"""The width resolver: where each group's count lives outside the weights, and when it is written.

A pruned group changes more than tensor shapes: module attributes (a head count used in a
``view``, ``repeat_kv``'s copy count, GPT-2's ``split_size``) and config fields (``hidden_size``,
``num_attention_heads``, ``intermediate_size``, ``num_hidden_layers``...) hold its width too.
:func:`resolve_widths` decides, at discovery, which ones carry each count and records the answer
in the graph as a :class:`WidthMap` (plain data); :func:`write_widths` (called by ``apply``) and
:func:`remove_layer_widths` only execute it.

How each carrier is found:

- **module attributes**, traced literals first: an integer attribute of a module whose value is
  a literal size that module passed to ``view``/``reshape``/``expand``/``split``, where that size
  is (kept elements of one group) x (a fixed multiplier), and whose name fits the group's kind
  (``*head*`` for heads, ``*intermediate*`` for channels, ``*hidden*``/``*embed*`` for the hidden
  size: the tie-breaker when a head count equals the head width).  Where tracing cannot see an
  attribute (it is read in arithmetic, or from a config the module shares with every layer), the
  family's :class:`~fastprune.overrides.Override` declares it (``widths``; Phi-3 slices its fused
  qkv by ``config.num_attention_heads``, so each of its attention modules gets a config of its own).
- **shape-following attributes** (``Linear.in_features``, ``Embedding.embedding_dim``,
  ``LayerNorm.normalized_shape``, GPT-2's ``Conv1D.nf``) are read off the compacted weights.
- **config fields**, by the Hugging Face naming conventions (:data:`CONFIG_FIELDS`; a config's
  ``attribute_map`` turns ``hidden_size`` into GPT-2's ``n_embd``), resolved against the config
  at discovery: a field carries a count when it exists (and, for the hidden size and the layer
  count, equals it).
- **the layer index** (``layer_idx`` and its spellings) of every module of a removable layer, and
  config lists with one entry per layer (``layer_types``), for layer removal.

Which is written when: module attributes always, from the kept counts; a config field when every
layer shares the count and the config can express it (a head count must divide the hidden size,
every Hugging Face config checks that).  Counts that differ between layers, or that the config
cannot express, go to the one width record, ``config.fastprune_layer_widths`` (per layer:
``heads``, ``kv_heads``, ``intermediate``, ``shared_intermediate``), keyed by the layer's index
once removed layers are gone.  Checkpoints store that record and, for module attributes that
follow it, the binding (:func:`checkpoint_bindings`), never the values twice.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from fastprune.errors import FastpruneError
from fastprune.remote import modeling_fastprune as remote

if TYPE_CHECKING:
    from fastprune.graph import Group, PruningGraph
    from fastprune.overrides import Override
    from fastprune.plan import Plan
    from fastprune.trace import TraceResult

RECORD = "fastprune_layer_widths"  # the config attribute holding per-layer widths
LAYER_KEYS = ("heads", "kv_heads", "intermediate", "shared_intermediate")  # the record's per-layer counts

# names that fit a kind: a traced literal is bound only to an attribute named like its group's kind
_NAME_HINTS = {
    "heads": re.compile(r"head(?!_dim|_size|dim)|groups|split|hidden|embed", re.I),
    "channels": re.compile(r"intermediate|ffn|inner|mlp|hidden_dim", re.I),
    "hidden": re.compile(r"hidden|embed|embd|d_model|model_dim", re.I),
}

# module attributes that hold a module's query-head count by name, bound even when no traced view uses them
HEAD_COUNT_NAMES = re.compile(r"n_heads?|num_heads|num_attention_heads|n_head")
# query heads per kv head; a width only where the elements are the query heads of one shared kv head
QUERY_GROUP_NAMES = re.compile(r"num_key_value_groups|num_queries_per_kv|n_rep")

# count -> config fields by Hugging Face convention.  "first": only the first field the config has
# carries it; otherwise every field whose value equals the count at discovery does.
CONFIG_FIELDS: dict[str, tuple[tuple[str, ...], bool]] = {
    "hidden": (("hidden_size", "n_embd", "d_model", "dim", "word_embed_proj_dim"), False),
    "heads": (("num_attention_heads",), True),
    "kv_heads": (("num_key_value_heads",), True),
    "intermediate": (("intermediate_size", "ffn_dim", "n_inner", "ffn_hidden_size"), True),  # dense MLPs
    "expert_intermediate": (("moe_intermediate_size", "expert_intermediate_size", "intermediate_size"), True),
    "shared_intermediate": (("shared_expert_intermediate_size",), True),
    "layers": (("num_hidden_layers", "n_layer", "num_layers", "n_layers"), False),
}
LAYER_INDEX_ATTRS = ("layer_idx", "layer_id", "layer_number")  # a module's index in the layer stack


@dataclass(frozen=True)
class WidthLink:
    """Module attribute ``module.attr`` equals ``per`` x the kept elements of group ``group``.

    ``attr`` of the form ``config.<field>`` is a field of the module's own copy of the config.
    ``found`` says how: ``"trace"`` (a literal size the module used), ``"override <key>"`` or ``"name"``
    (an unused query-head count, see :data:`HEAD_COUNT_NAMES`).
    """

    module: str
    attr: str
    group: str
    per: int
    found: str = "trace"


@dataclass
class WidthMap:
    """Everything outside the weights that holds a width, as discovery resolved it (plain data)."""

    links: list[WidthLink] = field(default_factory=list)
    config_fields: dict[str, list[str]] = field(default_factory=dict)  # count -> config fields
    layer_lists: list[str] = field(default_factory=list)  # config fields with one entry per layer
    # (layer, module path inside the layer, attribute): attributes holding their layer's index
    layer_index: list[tuple[int, str, str]] = field(default_factory=list)
    override: str | None = None  # key of the family override whose ``adapt`` runs with the widths

    def links_of(self, module: str) -> dict[str, WidthLink]:
        """The links of one module, by attribute."""
        return {link.attr: link for link in self.links if link.module == module}


# ---------------------------------------------------------------------------------------------- discovery


def resolve_widths(model: torch.nn.Module, result: TraceResult, leaf_groups: dict[int, Group],
                   container: str | None, num_layers: int, override: Override | None, key: str | None) -> WidthMap:
    """Decide where each group's count lives: traced module attributes, declared ones, config fields."""
    modules = dict(model.named_modules())
    links = _traced_links(result, leaf_groups, modules)
    seen = {(link.module, link.attr) for link in links}
    if override is not None and override.widths:
        for link in _declared_links(override.widths, leaf_groups.values(), modules, key):
            if (link.module, link.attr) not in seen:  # traced literals first
                links.append(link)
                seen.add((link.module, link.attr))
    links += _named_head_counts(leaf_groups.values(), modules, seen)
    config = getattr(model, "config", None)
    hidden = next((g.size for g in leaf_groups.values() if g.kind == "hidden"), None)
    widths = WidthMap(links=links, override=key)
    if config is not None:
        widths.config_fields = _config_fields(config, hidden, num_layers)
        widths.layer_lists = [name for name, value in vars(config).items()
                              if isinstance(value, list) and len(value) == num_layers and "layer" in name]
    if container is not None:
        layers = model.get_submodule(container)
        for i, layer in enumerate(layers):
            for path, module in layer.named_modules():
                widths.layer_index += [(i, path, a) for a in LAYER_INDEX_ATTRS if type(getattr(module, a, None)) is int]
    return widths


def _traced_links(result: TraceResult, leaf_groups: dict[int, Group], modules: dict) -> list[WidthLink]:
    sp = result.spaces
    links: dict[tuple[str, str], WidthLink] = {}
    int_attrs: dict[str, dict[int, list[str]]] = {}  # module -> its integer attributes by value
    for module_name, atom, literal in result.view_literals:
        if module_name not in modules:
            continue
        if (by_value := int_attrs.get(module_name)) is None:
            by_value = int_attrs[module_name] = defaultdict(list)
            for attr, value in vars(modules[module_name]).items():
                if type(value) is int:
                    by_value[value].append(attr)
        if literal not in by_value:  # no attribute holds this size: nothing to link (skip the layout)
            continue
        found = [(leaf_groups[leaf], len(base)) for leaf, base, *_ in sp.layout(atom) if leaf in leaf_groups]
        if len(found) != 1:
            continue
        group, per = found[0]
        if group.size * per != literal:
            continue
        hint = _NAME_HINTS[group.kind]
        for attr in by_value[literal]:
            if hint.search(attr):
                links[(module_name, attr)] = WidthLink(module_name, attr, group.name, per)
    return list(links.values())


def _named_head_counts(groups, modules: dict, seen: set) -> list[WidthLink]:
    """Query-head counts no traced view used (GPT-2's ``num_heads`` under older transformers; a multi-query
    model's ``num_key_value_groups`` where the traced attention took SDPA's own GQA path): bound by name.

    A module's attribute is the same count whether or not this transformers release reads it in
    ``forward``; binding it keeps the pruned module, and checkpoints loaded by another release, consistent.
    """
    links = []
    for group in groups:
        module = modules.get(group.name)
        if group.kind != "heads" or not group.heads_per_element or module is None:
            continue
        multi_query = group.kv_heads_per_element == 0  # query heads of one shared kv head: also their count
        for attr, value in vars(module).items():
            named = HEAD_COUNT_NAMES.fullmatch(attr) or (multi_query and QUERY_GROUP_NAMES.fullmatch(attr))
            if (named and (group.name, attr) not in seen and type(value) is int
                    and value == group.size * group.heads_per_element):
                links.append(WidthLink(group.name, attr, group.name, group.heads_per_element, "name"))
    return links


def _declared_links(declared: dict[str, str], groups, modules: dict, key: str | None) -> list[WidthLink]:
    """An override's ``widths`` ({attribute: count}) on the module of every heads or channels group."""
    links = []
    for group in groups:
        for attr, count in declared.items():
            per = {"heads": group.heads_per_element, "kv_heads": group.kv_heads_per_element,
                   "intermediate": int(group.kind == "channels")}.get(count)
            if per is None:
                raise FastpruneError(f"override {key!r} declares {attr!r} as {count!r}; a declared width is one of "
                                     "'heads', 'kv_heads', 'intermediate'")
            if not per or (count == "intermediate") != (group.kind == "channels"):
                continue  # not this group's count (e.g. kv heads of query-head elements: one shared kv head)
            module = modules.get(group.name)
            if module is None:  # a group not named after one module (a suffixed duplicate name)
                continue
            owner, _, name = attr.rpartition(".")
            target = getattr(module, owner, None) if owner else module
            if type(getattr(target, name, None)) is not int:
                raise FastpruneError(f"override {key!r} declares the integer attribute {attr!r} on the module of group "
                                     f"{group.name!r}, which has none")
            links.append(WidthLink(group.name, attr, group.name, per, f"override {key}"))
    return links


def _config_fields(config: Any, hidden: int | None, num_layers: int) -> dict[str, list[str]]:
    equals = {"hidden": hidden, "layers": num_layers}
    out: dict[str, list[str]] = {}
    for count, (names, first) in CONFIG_FIELDS.items():
        if first:
            present = [n for n in names if hasattr(config, n)][:1]
        else:
            present = [n for n in names if equals[count] is not None and getattr(config, n, None) == equals[count]]
        if present:
            out[count] = present
    return out


# ---------------------------------------------------------------------------------------------- apply


def write_widths(model: torch.nn.Module, plan: Plan, graph: PruningGraph) -> None:
    """Give every module attribute and config field the width ``plan`` leaves (weights already compacted).

    Called by ``apply`` before removed layers leave the model.  The family override's ``adapt``
    (per-layer state such as BLOOM's ALiBi rows) runs here too.
    """
    from fastprune.overrides import registered_override

    widths = layer_widths(model, graph, plan)  # while the config still describes the graph's model
    removed = set(plan.remove_layers)
    layer = {g.name: g.layer for g in graph.groups}
    for link in graph.widths.links:
        if link.group in plan.keep and layer[link.group] not in removed:
            remote.set_module_attribute(model, model.get_submodule(link.module), link.attr,
                                        len(plan.keep[link.group]) * link.per)
    remote.follow_weight_shapes(model)
    override = registered_override(graph.widths.override)
    if override is not None and override.adapt is not None:
        override.adapt(model, plan, graph)
    config = getattr(model, "config", None)
    if config is not None:
        update_config(config, plan, graph, widths)


def remove_layer_widths(model: torch.nn.Module, graph: PruningGraph, removed: list[int]) -> None:
    """Renumber the kept layers' index attributes and recount the config's layers (before they leave the model)."""
    gone = set(removed)
    new_index = {i: new for new, i in enumerate(i for i in range(graph.num_layers) if i not in gone)}
    layers = model.get_submodule(graph.layer_container)
    for i, path, attr in graph.widths.layer_index:
        if i in new_index:
            setattr(layers[i].get_submodule(path), attr, new_index[i])
    config = getattr(model, "config", None)
    if config is None:
        return
    for name in graph.widths.config_fields.get("layers", []):
        setattr(config, name, len(new_index))
    for name in graph.widths.layer_lists:
        value = getattr(config, name, None)
        if isinstance(value, list) and len(value) == graph.num_layers:
            setattr(config, name, [v for i, v in enumerate(value) if i not in gone])


def update_config(config: Any, plan: Plan, graph: PruningGraph, widths: dict[int, dict]) -> None:
    """Write ``plan``'s widths into ``config``: hidden size, the counts every layer shares, the width record.

    ``widths`` is :func:`layer_widths` for the plan.  Counts that differ between layers, and head
    counts the config cannot express (they must divide the hidden size), go to
    ``config.fastprune_layer_widths`` (keyed by the layer's index once the plan's layers are
    removed); when every count is in the config, a stale record from an earlier step is dropped.
    Layer counts are updated by the layer removal itself (:func:`remove_layer_widths`).
    """
    fields = graph.widths.config_fields
    hidden = [g for g in graph.groups if g.kind == "hidden"]
    if hidden and hidden[0].name in plan.keep:
        old, new = hidden[0].size, len(plan.keep[hidden[0].name])
        heads = getattr(config, "num_attention_heads", None)
        if heads and getattr(config, "head_dim", None) is None:
            config.head_dim = old // heads  # keep the per-head width explicit once hidden shrinks
        for attr in fields.get("hidden", []):
            if getattr(config, attr, None) == old:
                setattr(config, attr, new)
    uniform = {}
    for key in LAYER_KEYS:
        values = {w[key] for w in widths.values() if w.get(key) is not None}
        if len(values) == 1:
            uniform[key] = values.pop()
    heads_field = next(iter(fields.get("heads", [])), None)
    hidden_size = next((getattr(config, f) for f in fields.get("hidden", [])), getattr(config, "hidden_size", None))
    stated = getattr(config, heads_field, None) if heads_field is not None else None
    declined = ("heads" in uniform and stated is not None and uniform["heads"] != stated
                and type(hidden_size) is int and hidden_size % uniform["heads"] != 0)  # configs check divisibility
    if "heads" in uniform and stated is not None and not declined:
        if getattr(config, "head_dim", None) is None and getattr(config, "hidden_size", None):  # Mixtral: derived
            config.head_dim = config.hidden_size // getattr(config, heads_field)  # before the head count changes
        setattr(config, heads_field, uniform["heads"])
    kv_field = next(iter(fields.get("kv_heads", [])), None)
    if "kv_heads" in uniform and kv_field is not None and getattr(config, kv_field, None) is not None and not declined:
        setattr(config, kv_field, uniform["kv_heads"])
    moe = {g.layer for g in graph.groups if g.experts}
    classes = ((set(widths) - moe, "intermediate"), (set(widths) & moe, "expert_intermediate"))  # dense, experts
    for layers, count in classes:
        values = {widths[i]["intermediate"] for i in layers if widths[i].get("intermediate") is not None}
        attr = next(iter(fields.get(count, [])), None)
        if len(values) == 1 and attr is not None:  # dense and expert widths each when every layer shares it
            setattr(config, attr, values.pop())
    shared_field = next(iter(fields.get("shared_intermediate", [])), None)
    if "shared_intermediate" in uniform and shared_field is not None:
        setattr(config, shared_field, uniform["shared_intermediate"])
    differ = any(len({w.get(k) for w in widths.values()}) > 1 for k in LAYER_KEYS if k != "intermediate")
    if differ or declined or any(len({widths[i].get("intermediate") for i in layers}) > 1 for layers, _ in classes):
        removed = set(plan.remove_layers)
        index = {old: new for new, old in enumerate(i for i in range(graph.num_layers) if i not in removed)}
        setattr(config, RECORD, {str(index[i]): w for i, w in sorted(widths.items())})
    elif RECORD in vars(config):
        delattr(config, RECORD)


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


def _config_heads(config: Any, layer: int, num_layers: int) -> dict[str, int]:
    """Query and kv heads of ``layer`` as the config states them (empty if it does not, or no attention)."""
    stored = (getattr(config, RECORD, None) or {}).get(str(layer)) or {}
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


# ---------------------------------------------------------------------------------------------- checkpoints


def checkpoint_bindings(model: torch.nn.Module, graph: PruningGraph, record: dict[str, dict],
                        hidden: int | None) -> dict[str, dict[str, list]]:
    """The graph's module links as a checkpoint stores them: ``{module: {attribute: [layer, count, per]}}``.

    ``layer`` (an index of ``record``, the width record) and ``count`` (one of its keys, or
    ``"hidden"`` with layer None: the config's hidden size ``hidden``) say where the count is read;
    the attribute is ``per`` times it.  Only links that give the model's current value are kept.
    """
    moe_layers = {g.layer for g in graph.groups if g.experts}
    counts: dict[str, tuple[int | None, str]] = {}
    for g in graph.groups:
        if g.kind == "hidden":
            counts[g.name] = (None, "hidden")
        elif g.kind == "heads":
            counts[g.name] = (g.layer, "kv_heads" if g.kv_heads_per_element else "heads")
        else:
            counts[g.name] = (g.layer, "shared_intermediate" if not g.experts and g.layer in moe_layers
                              else "intermediate")
    out: dict[str, dict[str, list]] = {}
    for link in graph.widths.links:
        binding = [*counts[link.group], link.per]
        current = remote.module_attribute(model.get_submodule(link.module), link.attr)
        if remote.binding_value(binding, record, hidden) == current:
            out.setdefault(link.module, {})[link.attr] = binding
    return out
