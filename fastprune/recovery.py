"""Recovery after pruning: LoRA fine-tuning with peft and the Hugging Face ``Trainer``, then a merge.

As LLM-Pruner's post-training: LoRA adapters (r=8, alpha=16, dropout 0.05) on every projection of
the decoder layers, trained on instruction data in the Alpaca layout (instruction / input / output)
or on plain text, then merged into the weights so the result is a plain, smaller dense model.

Data (``data``): a local ``.json``/``.jsonl`` file of Alpaca records, plain text (``wiki``,
``austen``, a ``.txt`` file, a hub text set known to :mod:`fastprune.data`), a hub instruction
dataset name (needs the ``datasets`` package and network), an ``(n, seq_len)`` LongTensor of token
ids, or a list of these (concatenated).  Text is packed into ``seq_len`` windows of its
calibration split, so held-out text stays held out.

Checkpoints (``output_dir/checkpoints``) are the ``Trainer``'s: the adapter as safetensors, the
optimizer, scheduler and RNG states as ``torch.save`` files that the ``Trainer`` reads back only
with ``torch.load(weights_only=True)`` (tensors and plain containers, no code runs), and
``trainer_state.json``.  ``training_args.bin`` is written by the ``Trainer`` but never read.
Training runs unchanged under ``torchrun`` or ``accelerate launch`` (DDP): ``batch_size`` is the
global batch.  Under FSDP (``fsdp=True`` with ``torchrun``, or ``accelerate launch --use_fsdp``) the
weights are sharded, so nothing is merged in-process: the adapter is gathered and saved, and
:func:`merge_adapter` (``fastprune tune --merge-only``) merges it afterwards in one process.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fastprune.errors import FastpruneError

SAMPLE_DATA = Path(__file__).parent / "resources" / "alpaca_sample.jsonl"
PROMPT_FORMATS = ("auto", "alpaca", "text")
TEXT_SOURCES = ("wiki", "wiki-excerpt", "austen")
IGNORE_INDEX = -100  # label of tokens that carry no loss

# Our wording of the Alpaca layout: a preamble, then "### Instruction", "### Input" and "### Response".
PROMPT_WITH_INPUT = ("Here is a task together with the material it refers to. Write a reply that carries "
                     "out the task.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
PROMPT_NO_INPUT = ("Here is a task. Write a reply that carries out the task.\n\n"
                   "### Instruction:\n{instruction}\n\n### Response:\n")


def alpaca_prompt(instruction: str, input: str = "") -> str:
    """The prompt of one Alpaca record: everything before the response."""
    if input and input.strip():
        return PROMPT_WITH_INPUT.format(instruction=instruction.strip(), input=input.strip())
    return PROMPT_NO_INPUT.format(instruction=instruction.strip())


# -------------------------------------------------------------------------------------------- data

def _read_records(path: Path) -> list[dict]:
    if path.suffix.lower() == ".jsonl":
        records = []
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError as exc:
                        raise FastpruneError(f"{path}:{n}: not valid JSON ({exc.msg})") from exc
        return records
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise FastpruneError(f"{path}: not valid JSON ({exc.msg})") from exc
    return list(data.values()) if isinstance(data, dict) else list(data)


def _hub_records(name: str) -> list[dict]:
    try:
        import datasets
    except ImportError as exc:
        raise FastpruneError(f"{name!r} is not a local file or a built-in text source; hub instruction datasets "
                             "need the datasets package (pip install datasets) and network access") from exc

    try:
        ds = datasets.load_dataset(name, split="train")
    except Exception as exc:  # connection, not found, gated: the hub raises many kinds
        raise FastpruneError(f"could not load dataset {name!r} from the Hugging Face hub ({type(exc).__name__}). "
                             f"Offline, use a local .json/.jsonl file such as {SAMPLE_DATA}") from exc
    return [dict(r) for r in ds]


def _resolve_format(source: str | Path, prompt_format: str) -> str:
    if prompt_format != "auto":
        return prompt_format
    name = str(source)
    path = Path(name).expanduser()
    if path.is_file() and path.suffix.lower() in (".json", ".jsonl"):
        records = _read_records(path)
        return "alpaca" if records and isinstance(records[0], dict) and "instruction" in records[0] else "text"
    from fastprune.data import HUB_DATASETS

    return "text" if path.is_file() or name in TEXT_SOURCES or name in HUB_DATASETS else "alpaca"


def alpaca_example(tokenizer: Any, record: dict, seq_len: int, train_on_inputs: bool = True) -> dict[str, list[int]]:
    """Token ids and labels of one Alpaca record, cut at ``seq_len`` tokens.

    The prompt is tokenised as the model sees it (with the tokenizer's special tokens), the response
    after it, then the end-of-sequence token.  ``train_on_inputs=False`` gives the prompt tokens the
    label -100 so only the response carries loss.
    """
    if not isinstance(record, dict) or "instruction" not in record or "output" not in record:
        raise FastpruneError(f"an Alpaca record needs 'instruction' and 'output' fields, got {record!r:.120}")
    prompt = tokenizer(alpaca_prompt(str(record["instruction"]), str(record.get("input") or "")))["input_ids"]
    response = tokenizer(str(record["output"]), add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        response = response + [tokenizer.eos_token_id]
    ids = (prompt + response)[:seq_len]
    labels = list(ids) if train_on_inputs else ([IGNORE_INDEX] * len(prompt) + response)[:seq_len]
    return {"input_ids": ids, "labels": labels}


def _windows(ids: list[int] | torch.Tensor, seq_len: int) -> list[dict[str, list[int]]]:
    ids = torch.as_tensor(ids, dtype=torch.long).flatten()
    n = max(1, ids.numel() // seq_len)
    return [{"input_ids": w.tolist(), "labels": w.tolist()} for w in ids[:n * seq_len].split(seq_len)]


def build_examples(data: Any, tokenizer: Any = None, *, seq_len: int = 256, prompt_format: str = "auto",
                   train_on_inputs: bool = True, text_tokens: int | None = None) -> list[dict[str, list[int]]]:
    """Training examples (``input_ids`` and ``labels`` lists) from ``data`` (see the module docstring).

    ``text_tokens`` caps the tokens taken from each plain-text source.
    """
    if prompt_format not in PROMPT_FORMATS:
        raise FastpruneError(f"prompt_format must be one of {PROMPT_FORMATS}, got {prompt_format!r}")
    if isinstance(data, torch.Tensor):
        from fastprune.data import check_tokens

        tokens = check_tokens(data, None, "training tokens")
        return [{"input_ids": row.tolist(), "labels": row.tolist()} for row in tokens]
    if isinstance(data, (list, tuple)):
        return [ex for part in data for ex in build_examples(part, tokenizer, seq_len=seq_len,
                                                             prompt_format=prompt_format,
                                                             train_on_inputs=train_on_inputs,
                                                             text_tokens=text_tokens)]
    if tokenizer is None:
        raise FastpruneError("text and instruction data need a tokenizer (or pass a LongTensor of token ids)")
    fmt = _resolve_format(data, prompt_format)
    if fmt == "text":
        from fastprune.data import eval_tokens

        return _windows(eval_tokens(tokenizer, data, split="calib", max_tokens=text_tokens), seq_len)
    path = Path(str(data)).expanduser()
    records = _read_records(path) if path.is_file() else _hub_records(str(data))
    if not records:
        raise FastpruneError(f"{data}: no records")
    return [alpaca_example(tokenizer, r, seq_len, train_on_inputs) for r in records]


class _Examples(torch.utils.data.Dataset):
    def __init__(self, examples: list[dict[str, list[int]]]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return self.examples[i]


@dataclass
class _Collator:
    """Right-pads a batch; padding gets attention mask 0 and label -100."""

    pad_id: int

    def __call__(self, batch: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(ex["input_ids"]) for ex in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, ex in enumerate(batch):
            n = len(ex["input_ids"])
            ids[i, :n] = torch.tensor(ex["input_ids"])
            labels[i, :n] = torch.tensor(ex["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


# ------------------------------------------------------------------------------------------- model

def default_target_modules(model: torch.nn.Module) -> list[str]:
    """Names of the linear layers inside the decoder layers (Llama: the seven projections).

    The decoder layers are the ``ModuleList`` holding the most parameters.
    """
    from transformers.pytorch_utils import Conv1D

    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    if not lists:
        raise FastpruneError(f"{type(model).__name__} has no list of layers; pass target_modules=[...]")
    layers = max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))
    names = sorted({name.rsplit(".", 1)[-1] for name, m in layers.named_modules()
                    if isinstance(m, (torch.nn.Linear, Conv1D))})
    if not names:
        raise FastpruneError(f"no linear layers inside the layers of {type(model).__name__}; pass target_modules")
    return names


def _world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def _last_checkpoint(directory: Path) -> str | None:
    """The newest complete Trainer checkpoint (``trainer_state.json`` is written last)."""
    if not directory.is_dir():
        return None
    done = [p for p in directory.glob("checkpoint-*") if p.name[11:].isdigit() and (p / "trainer_state.json").is_file()]
    return str(max(done, key=lambda p: int(p.name[11:]))) if done else None


def _perplexity_callback(tokens: torch.Tensor | None, every: int | None, history: list):
    from transformers import TrainerCallback

    from fastprune.evaluate import perplexity

    class HeldOutPerplexity(TrainerCallback):
        """Perplexity of the held-out tokens every ``every`` optimizer steps (main process only).

        Under FSDP every process runs the forward pass (each holds only a shard of the weights).
        """

        every_process = False

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if tokens is None or not every or state.global_step % every:
                return
            if not (state.is_world_process_zero or self.every_process):
                return
            ppl = perplexity(model, tokens, seq_len=128, progress=False).ppl
            if not state.is_world_process_zero:
                return
            history.append((state.global_step, ppl))
            if not args.disable_tqdm:
                print(f"step {state.global_step}: held-out perplexity {ppl:.3f}", flush=True)

    return HeldOutPerplexity()


def _restore(model: torch.nn.Module, flags: dict[str, bool], use_cache: Any) -> torch.nn.Module:
    """The unwrapped model with its ``requires_grad`` flags and cache setting as before, in eval mode."""
    for n, p in model.named_parameters():
        p.requires_grad_(flags.get(n, True))
    model.config.use_cache = use_cache
    return model.eval()


def _fsdp_requested(fsdp: Any) -> bool:
    """FSDP asked for by ``recover(fsdp=...)`` or by ``accelerate launch --use_fsdp`` (its environment)."""
    return bool(fsdp) or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


FSDP_MIN_ACCELERATE = "1.6.0"  # the first accelerate whose FullyShardedDataParallelPlugin takes fsdp_version


def _check_fsdp_support(fsdp: Any) -> None:
    """A clear error, before anything changes, when FSDP is asked for and accelerate is too old for it."""
    import inspect

    import accelerate
    from accelerate.utils import FullyShardedDataParallelPlugin

    if _fsdp_requested(fsdp) and "fsdp_version" not in inspect.signature(FullyShardedDataParallelPlugin).parameters:
        raise FastpruneError(f"FSDP needs accelerate >= {FSDP_MIN_ACCELERATE} (transformers 5 passes fsdp_version to "
                             f"its FSDP plugin); this is accelerate {accelerate.__version__}")


def _adapter_state(trainer: Any, peft_model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trained weights, gathered from the FSDP shards of every process (a collective: call it on all).

    FSDP2 keeps each parameter as a DTensor shard: only the trainable (LoRA) ones are gathered, on
    the CPU.  FSDP1 goes through accelerate's full state dict (the whole model, on process 0 only).
    """
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    for module in peft_model.modules():  # a forward pass can leave parameters unsharded (plain tensors)
        if isinstance(module, FSDPModule):
            module.reshard()
    params = [(n, p) for n, p in peft_model.named_parameters() if p.requires_grad]
    if params and all(isinstance(p, DTensor) for _, p in params):
        return {n: p.full_tensor().detach().cpu() for n, p in params}
    return trainer.accelerator.get_state_dict(trainer.model)


@dataclass
class RecoveryResult:
    """What a recovery run did.

    ``model`` is the merged model (the input model, changed in place) when ``merged``; with
    ``merge=False`` it is the peft model with the trained adapter attached (under FSDP: sharded).
    """

    model: torch.nn.Module
    steps: int
    tokens: int
    examples: int
    seconds: float
    trainable_params: int
    processes: int = 1
    losses: list[tuple[int, float]] = field(default_factory=list)
    perplexity: list[tuple[int, float]] = field(default_factory=list)
    adapter_dir: str | None = None
    merged_dir: str | None = None
    resumed_from: str | None = None
    merged: bool = True
    fsdp: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "model"}


def recover(model: torch.nn.Module, data: Any, *, tokenizer: Any = None, r: int = 8, alpha: int = 16,
            dropout: float = 0.05, target_modules: Sequence[str] | None = None, lr: float = 1e-4,
            epochs: float = 2.0, max_steps: int | None = None, batch_size: int = 128, micro_batch_size: int = 4,
            seq_len: int = 256, prompt_format: str = "auto", train_on_inputs: bool = True,
            text_tokens: int | None = None, warmup_steps: int = 100, weight_decay: float = 0.0,
            val_source: Any = None, val_tokens: int = 4096,
            eval_every: int | None = None, output_dir: str | os.PathLike | None = None, save_every: int = 200,
            keep_checkpoints: int = 2, resume: bool = False, seed: int = 0, bf16: bool | None = None,
            gradient_checkpointing: bool = False, logging_steps: int = 10, plan: Any = None,
            merge: bool | None = None, fsdp: bool | str | None = None, fsdp_config: dict | str | None = None,
            callbacks: Sequence[Any] = (), progress: bool = True) -> RecoveryResult:
    """Fine-tune LoRA adapters on ``data``, merge them into ``model`` (in place) and return the result.

    ``batch_size`` is the global batch (per optimizer step, over all processes), split into
    ``micro_batch_size`` examples per process and forward pass.  ``max_steps`` overrides ``epochs``.
    ``val_source`` (e.g. ``"wiki"``) gives a held-out perplexity at 128 tokens before training,
    every ``eval_every`` steps and after training.  With ``output_dir``, checkpoints go to
    ``output_dir/checkpoints`` every ``save_every`` steps, and the adapter and the merged model
    (``save_pruned`` format, with ``plan``) to ``output_dir/adapter`` and ``output_dir/merged``;
    ``resume=True`` continues from the newest complete checkpoint.  ``bf16`` defaults to True on a
    GPU that supports it and False on the CPU.  Extra ``callbacks`` are ``TrainerCallback`` objects.

    ``merge=False`` trains and saves the adapter but merges nothing and writes no merged model; the
    result (``merged=False``) holds the peft model with the adapter attached.  ``merge`` defaults to
    True, except under FSDP, where the weights are sharded: there the adapter is gathered to
    ``output_dir/adapter`` (required) and :func:`merge_adapter` merges it afterwards in one process;
    ``merge=True`` under FSDP is an error.  FSDP comes from ``accelerate launch --use_fsdp`` (its
    environment) or from ``fsdp=True`` with ``fsdp_config`` (``TrainingArguments``' settings, e.g.
    ``{"version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]}``) under ``torchrun``.
    accelerate enables FSDP only on accelerators (GPU, XPU, ...): asked for on the CPU, it is an error
    here rather than silent DDP.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import PrinterCallback, Trainer, TrainingArguments

    from fastprune.data import eval_tokens
    from fastprune.evaluate import perplexity

    world = _world_size()
    if micro_batch_size < 1 or batch_size % (micro_batch_size * world):
        raise FastpruneError(f"batch_size={batch_size} must be a multiple of micro_batch_size={micro_batch_size} "
                             f"x {world} process(es)")
    if resume and output_dir is None:
        raise FastpruneError("resume=True needs the output_dir of the interrupted run")
    _check_fsdp_support(fsdp)
    examples = build_examples(data, tokenizer, seq_len=seq_len, prompt_format=prompt_format,
                              train_on_inputs=train_on_inputs, text_tokens=text_tokens)
    if not examples:
        raise FastpruneError("the training data holds no examples")
    vocab = model.get_input_embeddings().num_embeddings
    top = max(max(ex["input_ids"]) for ex in examples if ex["input_ids"])
    if top >= vocab:
        raise FastpruneError(f"the training data holds token id {top}, outside the model's vocabulary of {vocab}")
    val = eval_tokens(tokenizer, val_source, "eval", max_tokens=val_tokens) if val_source is not None else None
    history: list[tuple[int, float]] = []
    if val is not None:
        history.append((0, perplexity(model, val, seq_len=128, progress=False).ppl))
    if bf16 is None:
        bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()

    out = Path(output_dir).expanduser().absolute() if output_dir is not None else None
    checkpoint = _last_checkpoint(out / "checkpoints") if (resume and out is not None) else None
    if resume and checkpoint is None:
        warnings.warn(f"no complete checkpoint under {out / 'checkpoints'}; starting from the beginning",
                      stacklevel=2)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    use_cache = getattr(model.config, "use_cache", None)
    model.config.use_cache = False
    torch.manual_seed(seed)  # the LoRA initialisation
    lora = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, bias="none", task_type="CAUSAL_LM",
                      target_modules=list(target_modules or default_target_modules(model)))
    peft_model = get_peft_model(model, lora)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)

    # transformers 5.23 renamed TrainingArguments.gradient_checkpointing* to activation_checkpointing*
    ckpt = "activation_checkpointing" if "activation_checkpointing" in TrainingArguments.__dataclass_fields__ \
        else "gradient_checkpointing"
    sharded = False  # True once FSDP has wrapped the model: then there is nothing to unload on failure
    with tempfile.TemporaryDirectory(prefix="fastprune-tune-") as scratch:
        try:
            args = TrainingArguments(
                output_dir=str(out / "checkpoints") if out is not None else scratch,
                per_device_train_batch_size=micro_batch_size,
                gradient_accumulation_steps=batch_size // (micro_batch_size * world),
                learning_rate=lr, num_train_epochs=epochs, max_steps=max_steps or -1, warmup_steps=warmup_steps,
                weight_decay=weight_decay, lr_scheduler_type="linear", optim="adamw_torch",
                bf16=bf16, **{ckpt: gradient_checkpointing,
                              f"{ckpt}_kwargs": {"use_reentrant": False} if gradient_checkpointing else None},
                logging_steps=logging_steps, save_strategy="steps" if out is not None else "no",
                save_steps=save_every, save_total_limit=keep_checkpoints, seed=seed, data_seed=seed,
                report_to="none", disable_tqdm=not progress, remove_unused_columns=False,
                dataloader_pin_memory=torch.cuda.is_available(), ddp_find_unused_parameters=False,
                include_num_input_tokens_seen="non_padding", use_cpu=not torch.cuda.is_available(),
                fsdp=fsdp or None, fsdp_config=fsdp_config,
            )
            pad = tokenizer.pad_token_id if tokenizer is not None and tokenizer.pad_token_id is not None else None
            if pad is None and tokenizer is not None:
                pad = tokenizer.eos_token_id
            held_out = _perplexity_callback(val, eval_every, history)
            trainer = Trainer(model=peft_model, args=args, train_dataset=_Examples(examples),
                              data_collator=_Collator(pad if pad is not None else 0),
                              callbacks=[held_out, *callbacks])
            on_fsdp = trainer.is_fsdp_enabled
            merge = _check_fsdp(trainer, fsdp, merge, out)
            held_out.every_process = on_fsdp
            if not progress:
                trainer.remove_callback(PrinterCallback)
            start = time.perf_counter()
            sharded = on_fsdp
            trainer.train(resume_from_checkpoint=checkpoint)
        except BaseException:  # interrupted or failed: give the caller back the model without adapters
            if not sharded:
                _restore(peft_model.unload(), flags, use_cache)
            raise
        seconds = time.perf_counter() - start
        state = trainer.state

    adapter_dir = None
    main = trainer.is_world_process_zero()
    if out is not None:
        gathered = _adapter_state(trainer, peft_model) if on_fsdp else None  # every process takes part
        if main:
            adapter_dir = str(out / "adapter")
            peft_model.save_pretrained(adapter_dir, **({"state_dict": gathered} if on_fsdp else {}))
    if merge:
        final = _restore(peft_model.merge_and_unload(), flags, use_cache)
    else:  # the adapter stays attached (and, under FSDP, sharded)
        final = trainer.model if on_fsdp else peft_model
        model.config.use_cache = use_cache
        final.eval()
    if val is not None and (main or on_fsdp):
        ppl = perplexity(final, val, seq_len=128, progress=False).ppl
        if main:
            history.append((state.global_step, ppl))
    result = RecoveryResult(model=final, steps=state.global_step, tokens=int(state.num_input_tokens_seen),
                            examples=len(examples), seconds=seconds, trainable_params=trainable,
                            processes=trainer.args.world_size,
                            losses=[(h["step"], h["loss"]) for h in state.log_history if "loss" in h],
                            perplexity=history, adapter_dir=adapter_dir, resumed_from=checkpoint,
                            merged=bool(merge), fsdp=on_fsdp)
    if out is not None and main:
        from fastprune.io import save_pruned

        if merge:
            evaluation = {"held-out ppl after recovery": history[-1][1]} if val is not None else None
            result.merged_dir = str(save_pruned(final, out / "merged", tokenizer=tokenizer, plan=plan,
                                                evaluation=evaluation, progress=progress))
        (out / "recovery.json").write_text(json.dumps(result.to_dict(), indent=1))
    return result


def _check_fsdp(trainer: Any, fsdp: Any, merge: bool | None, out: Path | None) -> bool:
    """Whether to merge in-process, given FSDP as the ``Trainer`` set it up; raises on what cannot work."""
    on_fsdp = trainer.is_fsdp_enabled
    if _fsdp_requested(fsdp) and not on_fsdp:
        kind = trainer.accelerator.distributed_type
        why = (" accelerate uses FSDP only on accelerators (GPU, XPU, ...): on the CPU it sets up plain DDP"
               if trainer.args.device.type == "cpu" else " it needs a distributed launch (torchrun or accelerate "
               "launch)")
        raise FastpruneError(f"FSDP was asked for (fsdp={fsdp!r}, ACCELERATE_USE_FSDP="
                             f"{os.environ.get('ACCELERATE_USE_FSDP')!r}) but accelerate set up {kind}:{why}. "
                             "Leave FSDP off to train with DDP")
    if not on_fsdp:
        return True if merge is None else merge
    if merge:
        raise FastpruneError("merge=True under FSDP: the weights are sharded across the processes and cannot be "
                             "merged in-process. Train with merge=False (fastprune tune --no-merge), then merge in "
                             "one process with fastprune.recovery.merge_adapter or fastprune tune --merge-only")
    if out is None:
        raise FastpruneError("under FSDP recover needs output_dir: the adapter is not merged in-process, so it "
                             "must be saved to output_dir/adapter")
    if trainer.is_world_process_zero() and merge is None:
        warnings.warn(f"FSDP: the weights are sharded, so the adapter is not merged in-process; it is saved to "
                      f"{out / 'adapter'}. Merge it afterwards in one process: fastprune tune --merge-only "
                      f"{out / 'adapter'} --model MODEL --output DIR (or fastprune.recovery.merge_adapter)",
                      stacklevel=3)
    return False


def merge_adapter(model: str | os.PathLike, adapter_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
                  dtype: torch.dtype | None = None) -> Path:
    """Merge a LoRA adapter saved by :func:`recover` into its base model, in one process, and save the result.

    ``model`` is what was tuned: a checkpoint written by ``save_pruned`` (loaded with ``load_pruned``,
    its plan carried over) or anything :func:`fastprune.models.load_model` takes.  ``dtype`` is the
    dtype the weights are loaded, merged and saved in (default: as stored).  Returns ``out_dir``
    (``save_pruned`` format).  This is the merge step after ``recover(merge=False)`` or FSDP.
    """
    from peft import PeftModel

    from fastprune.io import save_pruned

    adapter = Path(adapter_dir).expanduser()
    if not (adapter / "adapter_config.json").is_file():
        raise FastpruneError(f"{adapter} is not a saved adapter (no adapter_config.json)")
    base, tokenizer, plans = _load_for_tuning(model, dtype=dtype)
    merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    return save_pruned(merged.eval(), out_dir, tokenizer=tokenizer, plan=plans)


def _load_for_tuning(name: str | os.PathLike, dtype: torch.dtype | None = None) -> tuple[Any, Any, Any]:
    """``(model, tokenizer, plans or None)`` of a ``save_pruned`` checkpoint, a hub id or ``smollm2``."""
    from fastprune.io import load_pruned, read_plans

    source = Path(name).expanduser()
    if source.is_dir() and (source / "config.json").is_file():
        model, tokenizer = load_pruned(source, dtype=dtype)
        return model, tokenizer, read_plans(source) or None
    from fastprune.models import load_model

    model, tokenizer = load_model(str(name), dtype=dtype)
    return model, tokenizer, None


# --------------------------------------------------------------------------------------------- CLI

def add_tune_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``fastprune tune`` (see :func:`recover` for their meaning)."""
    p = parser
    p.add_argument("--model", required=True,
                   help="a checkpoint written by fastprune prune/save_pruned, a hub id, or 'smollm2'")
    p.add_argument("--merge-only", metavar="ADAPTER", default=None,
                   help="no training: merge this saved adapter (OUTPUT/adapter of a --no-merge or FSDP run) into "
                        "--model in one process and write the merged model to --output")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="with --merge-only: load, merge and save in this dtype (default: as stored)")
    p.add_argument("--data", nargs="+", default=[str(SAMPLE_DATA)],
                   help="Alpaca .json/.jsonl, wiki, austen, a .txt file or a hub dataset (several are concatenated)")
    p.add_argument("--output", required=True, help="directory for checkpoints, the adapter and the merged model")
    p.add_argument("--no-merge", dest="merge", action="store_false", default=None,
                   help="save the adapter, merge nothing (the default under FSDP: sharded weights cannot be merged)")
    p.add_argument("--fsdp", action="store_true",
                   help="shard with FSDP under torchrun (GPUs only; accelerate launch --use_fsdp needs no flag)")
    p.add_argument("--fsdp-config", default=None, metavar="JSON",
                   help="FSDP settings for TrainingArguments.fsdp_config, a JSON file (implies --fsdp)")
    p.add_argument("--prompt-format", choices=PROMPT_FORMATS, default="auto")
    p.add_argument("--response-only", action="store_true", help="loss on the response tokens only")
    p.add_argument("--r", type=int, default=8, help="LoRA rank")
    p.add_argument("--alpha", type=int, default=16)
    p.add_argument("--dropout", type=float, default=0.05)
    p.add_argument("--target-modules", default=None,
                   help="comma-separated module names (default: every linear layer in the decoder layers)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (overrides --epochs)")
    p.add_argument("--batch-size", type=int, default=128, help="global batch per optimizer step")
    p.add_argument("--micro-batch-size", type=int, default=4, help="examples per forward pass and process")
    p.add_argument("--seq-len", type=int, default=256, help="examples are cut at this many tokens")
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--val", default="wiki", help="held-out perplexity source ('' to skip)")
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--save-every", type=int, default=200)
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --output")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 mixed precision (default: on a GPU that supports it)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def run_tune(args: argparse.Namespace) -> dict:
    """``fastprune tune``: load, recover, save to ``args.output``; returns the run's summary.

    With ``--merge-only ADAPTER`` it only merges a saved adapter into ``--model`` (see :func:`merge_adapter`).
    """
    if args.merge_only is not None:
        dtype = getattr(torch, args.dtype) if args.dtype else None
        merged = merge_adapter(args.model, args.merge_only, args.output, dtype=dtype)
        return {"model": str(args.model), "adapter_dir": str(Path(args.merge_only).expanduser().absolute()),
                "merged_dir": str(merged), "merged": True}
    model, tokenizer, plans = _load_for_tuning(args.model)
    targets = [t for t in args.target_modules.split(",") if t] if args.target_modules else None
    result = recover(model, list(args.data), tokenizer=tokenizer, r=args.r, alpha=args.alpha, dropout=args.dropout,
                     target_modules=targets, lr=args.lr, epochs=args.epochs, max_steps=args.max_steps,
                     batch_size=args.batch_size, micro_batch_size=args.micro_batch_size, seq_len=args.seq_len,
                     prompt_format=args.prompt_format, train_on_inputs=not args.response_only,
                     warmup_steps=args.warmup_steps, val_source=args.val or None, eval_every=args.eval_every,
                     output_dir=args.output, save_every=args.save_every, resume=args.resume, seed=args.seed,
                     bf16=args.bf16, gradient_checkpointing=args.gradient_checkpointing, plan=plans,
                     merge=args.merge, fsdp=bool(args.fsdp or args.fsdp_config) or None, fsdp_config=args.fsdp_config,
                     progress=not args.quiet)
    return result.to_dict()
