"""Save pruned models as safetensors checkpoints that load with or without fastprune.

A checkpoint is a Hugging Face model directory.  When every layer keeps the same widths (and no
value the config derives changes) the config alone describes the model and vanilla
``from_pretrained`` loads it.  Otherwise ``config.json`` carries the one width record,
``fastprune_layer_widths`` (per layer: heads, kv heads, MLP channels), and lists under
``fastprune`` every tensor shape that differs from the architecture its config describes, the
module attributes that follow a width as bindings to that record (``widths``, from the width
resolver: :mod:`fastprune.widths`), the other integer module attributes that differ, every
float module attribute and non-persistent float buffer whose value differs (``values``: Gemma keeps
its embedding scale at ``sqrt`` of the original hidden size, which a smaller ``hidden_size`` would
change), plus the state a family override attached to modules (``overrides``: BLOOM's kept ALiBi
heads per layer), and names the copied ``modeling_fastprune.py`` in ``auto_map`` so
``from_pretrained(..., trust_remote_code=True)`` rebuilds them.  Everything is JSON; no pickle is
written.  Writes go to a temporary sibling directory that replaces the target only once
everything is on disk; what a killed save leaves there, the next save to the same place removes
(:mod:`fastprune.staging`).
"""

from __future__ import annotations

import copy
import ctypes
import errno
import json
import os
import shutil
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack
from functools import partial
from pathlib import Path
from typing import Any

import torch

from fastprune.errors import FastpruneError
from fastprune.model_card import model_card
from fastprune.overrides import restore_state, saved_state
from fastprune.plan import Plan
from fastprune.remote import modeling_fastprune as remote
from fastprune.report import PruneReport, json_safe
from fastprune.staging import make_sibling, release_sibling, remove_stale_siblings

PLAN_FILE = "fastprune_plan.json"
REPORT_FILE = "fastprune_report.json"
MODELING_FILE = "modeling_fastprune.py"
AUTO_MAP = {"AutoModelForCausalLM": "modeling_fastprune.FastpruneForCausalLM"}
MAX_SAVED_BUFFER = 65536  # elements of a non-persistent buffer that config.json may carry


# ---------------------------------------------------------------------------------------------- save


def save_pruned(model: torch.nn.Module, directory: str | os.PathLike, *, tokenizer: Any = None,
                plan: Plan | Sequence[Plan] | None = None, report: PruneReport | None = None,
                base_model: str | None = None, evaluation: Mapping[str, Any] | None = None,
                max_shard_size: int | str = "2GB", progress: bool = False) -> Path:
    """Write ``model`` (a pruned Hugging Face model) to ``directory`` as a checkpoint, atomically.

    Weights go to safetensors (sharded above ``max_shard_size``), next to ``config.json``, the
    tokenizer, the plan(s) (``fastprune_plan.json``; taken from ``report`` when not given), the
    report (``fastprune_report.json``) and a model card.  ``evaluation`` (metric -> value, or
    ``report.settings["evaluation"]``) goes into the card.  An existing checkpoint at ``directory``
    is replaced only once the new one is complete.  ``progress`` shows a bar over the stages
    (weights, config, tokenizer, plan/report/card, flush to disk and swap).
    """
    from tqdm.auto import tqdm
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        raise FastpruneError(f"save_pruned needs a Hugging Face PreTrainedModel, got {type(model).__name__}")
    _check_config(model.config)
    target = Path(directory).expanduser().absolute()
    check_replaceable(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_litter(target)
    plans = _plans(plan, report)
    tmp = make_sibling(target)
    bar = tqdm(total=5, desc="saving", unit="stage", disable=not progress)
    try:
        bar.set_postfix_str("weights")
        model.save_pretrained(tmp, max_shard_size=max_shard_size)
        bar.update()
        bar.set_postfix_str("config")
        vanilla = _write_config(model, tmp)
        if not vanilla:
            shutil.copyfile(Path(remote.__file__), tmp / MODELING_FILE)
        bar.update()
        bar.set_postfix_str("tokenizer")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        bar.update()
        bar.set_postfix_str("plan, report, card")
        if plans:
            text = plans[0].to_json() if len(plans) == 1 else json.dumps([json.loads(p.to_json()) for p in plans],
                                                                        indent=1)
            (tmp / PLAN_FILE).write_text(text)
        if report is not None:
            (tmp / REPORT_FILE).write_text(json.dumps(json_safe(report.to_dict()), indent=1))
        if evaluation is None and report is not None:
            evaluation = report.settings.get("evaluation")
        card = model_card(model, report, plans, base_model, evaluation, vanilla, target.name)
        (tmp / "README.md").write_text(card)
        bar.update()
        bar.set_postfix_str("flush and swap")
        _fsync_tree(tmp)
        _swap_into_place(tmp, target)
        bar.update()
    except BaseException:
        release_sibling(tmp)
        raise
    finally:
        bar.close()
    return target


def _remove_litter(target: Path) -> None:
    """Remove what saves to ``target`` killed before finishing left beside it, and say so."""
    removed = remove_stale_siblings(target)
    if removed:
        names = ", ".join(f"{p.name} ({size / 2**20:.0f} MB)" for p, size in removed.items())
        warnings.warn(f"removed {len(removed)} temporary folder(s) that an interrupted save to {target} left "
                      f"behind: {names}", stacklevel=3)


def is_checkpoint(path: str | Path) -> bool:
    """A directory written by ``save_pruned`` (it holds a plan, a report or a fastprune config entry)."""
    root = Path(path).expanduser()
    config = root / "config.json"
    if not config.is_file():
        return False
    if (root / PLAN_FILE).is_file() or (root / REPORT_FILE).is_file():
        return True
    try:
        return "fastprune" in json.loads(config.read_text())
    except ValueError:
        return False


def read_plans(directory: str | os.PathLike) -> list[Plan]:
    """The plan(s) stored in a checkpoint, in the order they were applied (empty if none)."""
    path = Path(directory) / PLAN_FILE
    if not path.exists():
        return []
    data = json.loads(path.read_text())
    items = data if isinstance(data, list) else [data]
    return [Plan.from_json(json.dumps(item)) for item in items]


def _check_config(config: Any) -> None:
    """Refuse a config that transformers itself would refuse to save or load."""
    validate = getattr(config, "validate", None)
    if validate is None:
        return
    try:
        validate()
    except Exception as exc:  # transformers' strict-dataclass validation error wraps the cause
        cause = exc.__cause__ or exc
        raise FastpruneError(f"transformers cannot save or load this pruned config: {cause}. Keep the pruned "
                             "widths expressible (e.g. a hidden size that is a multiple of the head count)") from exc


def check_replaceable(target: Path) -> None:
    """Raise :class:`FastpruneError` unless a checkpoint may be written at ``target``: absent, empty, or a
    checkpoint (a folder with ``config.json``) that the new one replaces."""
    if not target.exists():
        return
    if not target.is_dir():
        raise FastpruneError(f"{target} exists and is not a directory")
    if any(target.iterdir()) and not (target / "config.json").exists():
        raise FastpruneError(f"{target} is a non-empty directory that holds no checkpoint (no config.json); "
                             "refusing to replace it")


def _plans(plan: Plan | Sequence[Plan] | None, report: PruneReport | None) -> list[Plan]:
    if isinstance(plan, Plan):
        return [plan]
    if plan is not None:
        return list(plan)
    if report is not None:
        return [Plan.from_json(p) for p in report.settings.get("plans", [])]
    return []


def _write_config(model: torch.nn.Module, directory: Path) -> bool:
    """Rewrite the saved config.json for the checkpoint; True when it needs no remote code."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    path = directory / "config.json"
    data = json.loads(path.read_text())
    for key in ("auto_map", remote.SPEC_KEY):
        data.pop(key, None)
    base = getattr(type(model), "_fastprune_base", type(model))
    data["architectures"] = [base.__name__]
    path.write_text(json.dumps(data, indent=2, sort_keys=True))
    config = AutoConfig.from_pretrained(directory)
    with init_empty_weights(include_buffers=False):  # real buffers: their values are compared
        reference = base._from_config(config)
    spec = _pruned_spec(model, reference)
    states = saved_state(model)
    if states:  # per-layer state of a family override (e.g. each layer's ALiBi heads): remote code restores it
        spec["overrides"] = states
    # shapes and values decide: when every tensor and float value matches, the config describes the model,
    # and the integer module attributes it builds are the right ones (pruning can leave unused stale ones,
    # e.g. hidden_size)
    if spec["tensors"] or spec["values"] or states:
        _bind_widths(model, data, spec)
        data[remote.SPEC_KEY] = spec
        data["auto_map"] = AUTO_MAP
    else:
        data.pop(remote.RECORD_KEY, None)  # every layer has the widths the config states
    path.write_text(json.dumps(data, indent=2, sort_keys=True))
    return remote.SPEC_KEY not in data


def _bind_widths(model: torch.nn.Module, data: dict[str, Any], spec: dict) -> None:
    """Store the module attributes that follow a width as bindings to the width record, not as values.

    The width map comes from discovering ``model`` as it is; the record is the config's
    ``fastprune_layer_widths`` (written here from the model's widths when the config has none).
    Every binding is checked to give the model's value; the others stay values under ``attributes``.
    """
    from fastprune.discover import discover
    from fastprune.widths import checkpoint_bindings, layer_widths

    try:
        graph = discover(model)
    except FastpruneError:  # nothing prunable is left: nothing follows a width
        return
    record = data.get(remote.RECORD_KEY) or {str(i): w for i, w in layer_widths(model, graph).items()}
    bound: dict[str, dict[str, list]] = {}
    for path, attrs in checkpoint_bindings(model, graph, record, getattr(model.config, "hidden_size", None)).items():
        listed = spec["attributes"].get(path, {})
        for attr, binding in attrs.items():
            if attr in listed:  # it differs from what the config builds: the record gives it
                bound.setdefault(path, {})[attr] = binding
                del listed[attr]
    spec["attributes"] = {path: attrs for path, attrs in spec["attributes"].items() if attrs}
    if bound:
        spec["widths"] = bound
        data[remote.RECORD_KEY] = record


def _named_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(model.named_buffers(remove_duplicate=False))
    return tensors


def _is_width(value: Any) -> bool:
    if type(value) is int:
        return True
    return type(value) is tuple and bool(value) and all(type(v) is int for v in value)


def _pruned_spec(model: torch.nn.Module, reference: torch.nn.Module) -> dict[str, dict]:
    """What differs between ``model`` and ``reference`` (same architecture, built from the config).

    ``tensors``: name -> shape of every parameter or buffer whose shape differs; ``attributes``:
    module path -> {attribute: value} of every integer (or tuple of integers) module attribute
    that differs, except the sizes Linear, Embedding, LayerNorm and Conv1D read off their weights
    (``config.<field>``: an integer field of a config the module holds on its own);
    ``values``: module path -> {name: value} of every float attribute and
    non-persistent float buffer (not in the checkpoint) whose value differs.  Raises
    :class:`FastpruneError` when the module trees themselves differ.
    """
    mine, theirs = _named_tensors(model), _named_tensors(reference)
    if mine.keys() != theirs.keys():
        extra = sorted(mine.keys() - theirs.keys()) or sorted(theirs.keys() - mine.keys())
        raise FastpruneError(f"the model's tensors do not match the architecture its config describes "
                             f"(first difference: {extra[0]!r}); was a module added or removed by hand?")
    tensors = {n: list(t.shape) for n, t in mine.items() if t.shape != theirs[n].shape}
    ref_modules = dict(reference.named_modules())
    attributes: dict[str, dict[str, Any]] = {}
    values: dict[str, dict[str, Any]] = {}
    for path, module in model.named_modules():
        ref = ref_modules.get(path)
        if ref is None:
            raise FastpruneError(f"module {path!r} is not in the architecture the config describes")
        follows_weights = remote.shape_attribute_names(module)
        for attr, value in vars(module).items():
            if attr in follows_weights:  # the loader reads these off the weights
                continue
            if _is_width(value) and getattr(ref, attr, None) != value:
                attributes.setdefault(path, {})[attr] = list(value) if isinstance(value, tuple) else value
            elif type(value) is float and getattr(ref, attr, None) != value:
                values.setdefault(path, {})[attr] = value
        own = getattr(module, "config", None)
        if own is not None and own is not getattr(model, "config", None) and hasattr(ref, "config"):
            for name, value in vars(own).items():  # a config of the module's own (Phi-3's per-layer head counts)
                if type(value) is int and getattr(ref.config, name, None) != value:
                    attributes.setdefault(path, {})[f"config.{name}"] = value
        for name in sorted(module._non_persistent_buffers_set):
            mine = module._buffers.get(name)
            if mine is not None and mine.is_floating_point() and _buffer_differs(mine, ref._buffers.get(name)):
                if mine.numel() > MAX_SAVED_BUFFER:
                    raise FastpruneError(f"buffer {path}.{name} ({list(mine.shape)}) differs from what the config "
                                         "builds and is too large to store in config.json")
                values.setdefault(path, {})[name] = mine.tolist()
    return {"tensors": tensors, "attributes": attributes, "values": values}


def _buffer_differs(mine: torch.Tensor, theirs: torch.Tensor | None) -> bool:
    if theirs is None or theirs.shape != mine.shape:
        return True
    return not torch.equal(theirs.to(mine.device, mine.dtype), mine)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux ``renameat2``); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _swap_into_place(new: Path, target: Path) -> None:
    """Put the complete directory ``new`` at ``target``, removing what was there."""
    if not target.exists():
        os.rename(new, target)
    elif _exchange(new, target):
        pass  # ``new`` now holds the previous checkpoint, removed below
    else:
        # two renames: a crash between them leaves no checkpoint at ``target`` (never a half one);
        # the previous one then survives as the hidden ``.<name>.old-*`` sibling
        old = make_sibling(target, "old")
        os.rename(target, old / "checkpoint")
        os.rename(new, target)
        release_sibling(old)
    release_sibling(new)
    _fsync_dir(target.parent)


# ---------------------------------------------------------------------------------------------- load


def load_pruned(directory: str | os.PathLike, dtype: torch.dtype | None = None,
                device: str | torch.device | None = None) -> tuple[torch.nn.Module, Any]:
    """Load a checkpoint written by :func:`save_pruned`: ``(model, tokenizer or None)``.

    The architecture is built with empty weights, given the pruned shapes and filled from the
    safetensors files after every tensor name and shape has been checked.  Stored names are mapped
    to the model's as ``from_pretrained`` maps them (e.g. a mixture-of-experts layer's per-expert
    matrices are stacked into its 3-D expert tensors).  ``dtype`` converts floating-point weights
    (default: as stored); ``device`` is where they are loaded (default CPU).
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    root = Path(directory)
    if not (root / "config.json").is_file():
        raise FastpruneError(f"{root} is not a checkpoint directory (no config.json)")
    config = AutoConfig.from_pretrained(root)
    base = remote.base_class(config)
    cls = remote.pruned_class(base) if getattr(config, remote.SPEC_KEY, None) else base
    files = list(_weight_files(root).values())
    stored = {name: (path, shape) for path in files for name, shape in _header(path).items()}
    with init_empty_weights(include_buffers=False):
        model = cls._from_config(config, dtype=dtype or config.dtype)
    model.tie_weights()  # empty-weight init registers tied parameters separately
    empty_loaders = {name: partial(torch.empty, shape, device="meta") for name, (_, shape) in stored.items()}
    _check_tensors(model, {name: tuple(t.shape) for name, t in _as_model_tensors(model, empty_loaders)})
    device = torch.device(device or "cpu")
    from safetensors import safe_open

    with ExitStack() as stack:
        opened = {path: stack.enter_context(safe_open(path, framework="pt", device=str(device))) for path in files}
        loaders = {name: partial(opened[path].get_tensor, name) for name, (path, _) in stored.items()}
        for name, tensor in _as_model_tensors(model, loaders):
            if dtype is not None and tensor.is_floating_point():
                tensor = tensor.to(dtype)
            model.load_state_dict({name: tensor}, strict=False, assign=True)
    model.tie_weights()
    empty = [n for n, t in _named_tensors(model).items() if t.is_meta]
    if empty:
        raise FastpruneError(f"tensor {empty[0]!r} was not filled from the checkpoint")
    spec = getattr(config, remote.SPEC_KEY, None) or {}
    remote.restore_values(model, spec)
    restore_state(model, spec.get("overrides") or {})
    model.to(device).eval()
    tokenizer = None
    if (root / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(root)
    return model, tokenizer


def _weight_files(root: Path) -> dict[str, Path]:
    """Shard file name -> path, from the index when the weights are sharded."""
    index = root / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, AttributeError) as exc:
            raise FastpruneError(f"{index} is corrupted: {exc!r}") from exc
    elif (root / "model.safetensors").is_file():
        names = ["model.safetensors"]
    else:
        raise FastpruneError(f"{root} holds no safetensors weights (model.safetensors or its index)")
    missing = [n for n in names if not (root / n).is_file()]
    if missing:
        raise FastpruneError(f"weight file {missing[0]} listed in the index is missing from {root}")
    return {n: root / n for n in names}


def _as_model_tensors(model: torch.nn.Module,
                      loaders: dict[str, Callable[[], torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint's tensors (stored name -> loader) under the model's names, one at a time.

    ``save_pretrained`` may store tensors under other names or split (transformers 5 saves a
    mixture-of-experts layer's 3-D stacks as the legacy per-expert matrices): this applies the
    model's own weight conversion mapping from transformers, as ``from_pretrained`` does.  Each
    layer's stacks take the shapes of its stored matrices.
    """
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    converter_of = {pattern: c for c in converters for pattern in c.source_patterns}
    model_names = model.state_dict(keep_vars=True)
    combined: dict[str, WeightConverter] = {}
    sources: dict[str, list[str]] = {}
    for stored in sorted(loaders, key=dot_natural_key):
        name, pattern = rename_source_key(stored, renamings, converters, model.base_model_prefix, model_names)
        if name not in model_names and stored in model_names:  # as from_pretrained: a model name stays as is
            name, pattern = stored, None
        if pattern is None:
            yield name, loaders[stored]()
        else:
            combined.setdefault(name, copy.deepcopy(converter_of[pattern])).add_tensor(name, stored, pattern,
                                                                                      loaders[stored])
            sources.setdefault(name, []).append(stored)
    for name, converter in combined.items():
        try:
            converted = converter.convert(name, model=model, config=model.config)
        except Exception as exc:  # e.g. experts of one layer with different shapes
            raise FastpruneError(f"the checkpoint's tensors {sources[name][0]!r} ... ({len(sources[name])}) do not "
                                 f"combine into {name!r}: {exc}") from exc
        for target, tensor in converted.items():
            yield target, tensor[0] if isinstance(tensor, list) else tensor


def _header(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from a safetensors header, or a clear error for an unreadable file."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError) as exc:
        raise FastpruneError(f"{path} is not a readable safetensors file (truncated or corrupted?): {exc}") from exc


def _check_tensors(model: torch.nn.Module, stored: dict[str, tuple[int, ...]]) -> None:
    """Every model tensor once in the checkpoint (tied tensors: under any of their names), same shapes."""
    aliases: dict[int, list[str]] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        aliases.setdefault(id(tensor), []).append(name)
        shapes[name] = tuple(tensor.shape)
    for names in aliases.values():
        if not any(n in stored for n in names):
            raise FastpruneError(f"tensor {names[0]!r} (shape {list(shapes[names[0]])}) is missing from the "
                                 "checkpoint")
    for name, shape in stored.items():
        if name not in shapes:
            raise FastpruneError(f"the checkpoint has tensor {name!r} (shape {list(shape)}), which the model "
                                 "built from config.json does not have")
        if shape != shapes[name]:
            raise FastpruneError(f"tensor {name!r} has shape {list(shape)} in the checkpoint, but the model built "
                                 f"from config.json expects {list(shapes[name])}")
