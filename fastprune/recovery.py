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

import dataclasses
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

from fastprune.data import ALPACA_SAMPLE, HUB_DATASETS, check_tokens, eval_tokens, hub_records, read_records
from fastprune.errors import FastpruneError

SAMPLE_DATA = ALPACA_SAMPLE  # the default training data: the bundled Alpaca-format records
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

def _resolve_format(source: str | Path, prompt_format: str) -> str:
    if prompt_format != "auto":
        return prompt_format
    name = str(source)
    path = Path(name).expanduser()
    if path.is_file() and path.suffix.lower() in (".json", ".jsonl"):
        records = [r for _, r in read_records(path)]
        return "alpaca" if records and isinstance(records[0], dict) and "instruction" in records[0] else "text"
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
        return _windows(eval_tokens(tokenizer, data, split="calib", max_tokens=text_tokens), seq_len)
    path = Path(str(data)).expanduser()
    records = [r for _, r in read_records(path)] if path.is_file() else hub_records(str(data))
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


@dataclass
class RecoveryConfig:
    """The settings of a recovery run (see :func:`recover` for what each does).

    LoRA: ``r``, ``alpha``, ``dropout``, ``target_modules`` (default: every linear layer of the decoder
    layers).  Data: ``seq_len``, ``prompt_format``, ``train_on_inputs``, ``text_tokens``.  Optimisation:
    ``lr``, ``epochs`` (``max_steps`` overrides it), ``batch_size`` (global, per optimizer step),
    ``micro_batch_size`` (per forward pass and process), ``warmup_steps``, ``weight_decay``, ``seed``,
    ``bf16``, ``gradient_checkpointing``, ``logging_steps``.  Held-out perplexity: ``val_source``,
    ``val_tokens``, ``eval_every``.  Outputs: ``output_dir``, ``save_every``, ``keep_checkpoints``,
    ``resume``, ``merge``.  Sharding: ``fsdp``, ``fsdp_config``.
    """

    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: Sequence[str] | None = None
    lr: float = 1e-4
    epochs: float = 2.0
    max_steps: int | None = None
    batch_size: int = 128
    micro_batch_size: int = 4
    seq_len: int = 256
    prompt_format: str = "auto"
    train_on_inputs: bool = True
    text_tokens: int | None = None
    warmup_steps: int = 100
    weight_decay: float = 0.0
    val_source: Any = None
    val_tokens: int = 4096
    eval_every: int | None = None
    output_dir: str | os.PathLike | None = None
    save_every: int = 200
    keep_checkpoints: int = 2
    resume: bool = False
    seed: int = 0
    bf16: bool | None = None
    gradient_checkpointing: bool = False
    logging_steps: int = 10
    merge: bool | None = None
    fsdp: bool | str | None = None
    fsdp_config: dict | str | None = None


def recover(model: torch.nn.Module, data: Any, config: RecoveryConfig | None = None, *, tokenizer: Any = None,
            plan: Any = None, callbacks: Sequence[Any] = (), progress: bool = True, **options: Any) -> RecoveryResult:
    """Fine-tune LoRA adapters on ``data``, merge them into ``model`` (in place) and return the result.

    The settings are ``config`` (a :class:`RecoveryConfig`, default ``RecoveryConfig()``) with any of its
    fields given as keyword ``options`` taking precedence (``recover(model, data, max_steps=3)``).

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
    from transformers import PrinterCallback, Trainer

    from fastprune.evaluate import perplexity

    cfg = _config(config, options)
    world = _world_size()
    if cfg.micro_batch_size < 1 or cfg.batch_size % (cfg.micro_batch_size * world):
        raise FastpruneError(f"batch_size={cfg.batch_size} must be a multiple of micro_batch_size="
                             f"{cfg.micro_batch_size} x {world} process(es)")
    if cfg.resume and cfg.output_dir is None:
        raise FastpruneError("resume=True needs the output_dir of the interrupted run")
    _check_fsdp_support(cfg.fsdp)
    examples = _training_examples(model, data, tokenizer, cfg)
    val = eval_tokens(tokenizer, cfg.val_source, "eval", max_tokens=cfg.val_tokens) \
        if cfg.val_source is not None else None
    history: list[tuple[int, float]] = []
    if val is not None:
        history.append((0, perplexity(model, val, seq_len=128, progress=False).ppl))

    out = Path(cfg.output_dir).expanduser().absolute() if cfg.output_dir is not None else None
    checkpoint = _last_checkpoint(out / "checkpoints") if (cfg.resume and out is not None) else None
    if cfg.resume and checkpoint is None:
        warnings.warn(f"no complete checkpoint under {out / 'checkpoints'}; starting from the beginning",
                      stacklevel=2)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    use_cache = getattr(model.config, "use_cache", None)
    model.config.use_cache = False
    torch.manual_seed(cfg.seed)  # the LoRA initialisation
    lora = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, bias="none", task_type="CAUSAL_LM",
                      target_modules=list(cfg.target_modules or default_target_modules(model)))
    peft_model = get_peft_model(model, lora)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)

    sharded = False  # True once FSDP has wrapped the model: then there is nothing to unload on failure
    with tempfile.TemporaryDirectory(prefix="fastprune-tune-") as scratch:
        try:
            args = _training_arguments(cfg, str(out / "checkpoints") if out is not None else scratch, world,
                                       progress)
            pad = tokenizer.pad_token_id if tokenizer is not None and tokenizer.pad_token_id is not None else None
            if pad is None and tokenizer is not None:
                pad = tokenizer.eos_token_id
            held_out = _perplexity_callback(val, cfg.eval_every, history)
            trainer = Trainer(model=peft_model, args=args, train_dataset=_Examples(examples),
                              data_collator=_Collator(pad if pad is not None else 0),
                              callbacks=[held_out, *callbacks])
            on_fsdp = trainer.is_fsdp_enabled
            merge = _check_fsdp(trainer, cfg.fsdp, cfg.merge, out)
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
        _save_merged(result, out, tokenizer, plan, val is not None, progress)
    return result


def recover_from(source: str | os.PathLike, data: Any, config: RecoveryConfig | None = None, *,
                 progress: bool = True) -> RecoveryResult:
    """:func:`recover` of the model named ``source``: a checkpoint written by ``save_pruned`` (its plans go into
    the merged checkpoint), a hub id or ``smollm2`` (the embedded default)."""
    model, tokenizer, plans = _load_for_tuning(source)
    return recover(model, data, config, tokenizer=tokenizer, plan=plans, progress=progress)


def _config(config: RecoveryConfig | None, options: dict[str, Any]) -> RecoveryConfig:
    fields = {f.name for f in dataclasses.fields(RecoveryConfig)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise TypeError(f"recover() got unexpected keyword argument(s) {', '.join(map(repr, unknown))}")
    return dataclasses.replace(config or RecoveryConfig(), **options)


def _training_examples(model: torch.nn.Module, data: Any, tokenizer: Any, cfg: RecoveryConfig) -> list[dict]:
    """The examples of ``data``, checked against the model's vocabulary."""
    examples = build_examples(data, tokenizer, seq_len=cfg.seq_len, prompt_format=cfg.prompt_format,
                              train_on_inputs=cfg.train_on_inputs, text_tokens=cfg.text_tokens)
    if not examples:
        raise FastpruneError("the training data holds no examples")
    vocab = model.get_input_embeddings().num_embeddings
    top = max(max(ex["input_ids"]) for ex in examples if ex["input_ids"])
    if top >= vocab:
        raise FastpruneError(f"the training data holds token id {top}, outside the model's vocabulary of {vocab}")
    return examples


def _training_arguments(cfg: RecoveryConfig, output_dir: str, world: int, progress: bool) -> Any:
    """The ``TrainingArguments`` of a run (``bf16`` resolved: on where the GPU supports it)."""
    from transformers import TrainingArguments

    bf16 = cfg.bf16 if cfg.bf16 is not None else torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    # transformers 5.23 renamed TrainingArguments.gradient_checkpointing* to activation_checkpointing*
    ckpt = "activation_checkpointing" if "activation_checkpointing" in TrainingArguments.__dataclass_fields__ \
        else "gradient_checkpointing"
    saving = cfg.output_dir is not None
    return TrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=cfg.micro_batch_size,
        gradient_accumulation_steps=cfg.batch_size // (cfg.micro_batch_size * world),
        learning_rate=cfg.lr, num_train_epochs=cfg.epochs, max_steps=cfg.max_steps or -1,
        warmup_steps=cfg.warmup_steps, weight_decay=cfg.weight_decay, lr_scheduler_type="linear", optim="adamw_torch",
        bf16=bf16, **{ckpt: cfg.gradient_checkpointing,
                      f"{ckpt}_kwargs": {"use_reentrant": False} if cfg.gradient_checkpointing else None},
        logging_steps=cfg.logging_steps, save_strategy="steps" if saving else "no",
        save_steps=cfg.save_every, save_total_limit=cfg.keep_checkpoints, seed=cfg.seed, data_seed=cfg.seed,
        report_to="none", disable_tqdm=not progress, remove_unused_columns=False,
        dataloader_pin_memory=torch.cuda.is_available(), ddp_find_unused_parameters=False,
        include_num_input_tokens_seen="non_padding", use_cpu=not torch.cuda.is_available(),
        fsdp=cfg.fsdp or None, fsdp_config=cfg.fsdp_config,
    )


def _save_merged(result: RecoveryResult, out: Path, tokenizer: Any, plan: Any, evaluated: bool,
                 progress: bool) -> None:
    """The merged model (when merged) and ``recovery.json`` under ``out`` (the main process only)."""
    from fastprune.io import save_pruned

    if result.merged:
        evaluation = {"held-out ppl after recovery": result.perplexity[-1][1]} if evaluated else None
        result.merged_dir = str(save_pruned(result.model, out / "merged", tokenizer=tokenizer, plan=plan,
                                            evaluation=evaluation, progress=progress))
    (out / "recovery.json").write_text(json.dumps(result.to_dict(), indent=1))


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
