"""End-to-end benchmark of ``fastprune.prune``: wall time and peak memory per stage, against baselines.

Every run is a fresh subprocess (so peak memory and timeouts are per run) on a random-initialised
model of the chosen shape, with random calibration token ids (``--n-samples`` x ``--seq-len``,
10 x 64 by default; the timings do not depend on the text):

- ``fastprune/<backend>``: ``fastprune.prune(model, ratio)`` with each kernel backend: the eager
  PyTorch ``reference`` and the compiled ones available on the device (``cpp`` on the CPU, ``cuda``
  and ``triton`` on a GPU).  Stages: discovery, calibration, scoring (the calibration
  forward/backward plus the streaming Taylor reduction; the ``taylor op`` column is the time spent
  inside the reduction op, measured with CUDA events on a GPU), selection, compaction.  The
  ``prune() wall`` column is the whole call.  One warm-up prune runs first (same shape on a GPU, so
  Triton compiles outside the timing; the tiny shape on the CPU).
- ``dense fwd+bwd``: one eager forward/backward of the same batch keeping every gradient (what
  scoring costs without streaming; its peak is weights + gradients + activations).
- ``torch-pruning``: Torch-Pruning 1.6.1 ``MetaPruner`` with ``GroupTaylorImportance`` pruning heads
  (``num_heads`` mapping, whole heads) and MLP channels at the same ratio, ``lm_head`` ignored (and the
  projections into the residual stream, so the hidden size stays as in fastprune's block scope).  It
  is killed after ``--tp-timeout`` seconds and recorded as "did not finish in N s" with the stages
  it completed.

Peak memory: ``torch.cuda.max_memory_allocated`` per stage on a GPU; on the CPU the process's peak
resident set size so far (it never goes down).  ``--budget-s`` caps the whole run: later runs get
what is left, or are skipped.

    python benchmarks/bench_prune.py --shapes small                       # CPU, a minute
    python benchmarks/bench_prune.py --shapes llama2-7b llama3-8b --json prune.json --budget-s 300
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402
from common import (  # noqa: E402
    CPU_SHAPES,
    GPU_SHAPES,
    REAL,
    SHAPES,
    build_model,
    device_name,
    random_calibration,
    torch_pruning_targets,
    weight_bytes,
)

RESULT = "BENCH_RESULT "
STAGE = "BENCH_STAGE "
AT = "BENCH_AT "
COLUMNS = ("discovery", "calibration", "scoring", "taylor op", "selection", "compaction", "fwd+bwd", "step")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# ---------------------------------------------------------------- child side: one run

def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _emit(prefix: str, data: dict) -> None:
    print(prefix + json.dumps(data), flush=True)


def _lm_loss(model, ids: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids, use_cache=False).logits
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


class OpTimer:
    """Replaces ``module.name`` with a wrapper that adds up the time spent inside it.

    On a GPU each call is bracketed by CUDA events (no synchronisation, so the pipeline is not
    perturbed); on the CPU by the host clock.  ``seconds`` is None when the op was never called.
    """

    def __init__(self, module, name: str, device: str):
        self.module, self.name, self.cuda = module, name, device == "cuda"
        self.calls, self.host_s, self.events = 0, 0.0, []
        self.original = getattr(module, name, None)

    def __enter__(self):
        if self.original is not None:
            setattr(self.module, self.name, self._timed)
        return self

    def __exit__(self, *exc):
        if self.original is not None:
            setattr(self.module, self.name, self.original)

    def _timed(self, *args, **kwargs):
        self.calls += 1
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = self.original(*args, **kwargs)
            end.record()
            self.events.append((start, end))
            return out
        t0 = time.perf_counter()
        out = self.original(*args, **kwargs)
        self.host_s += time.perf_counter() - t0
        return out

    @property
    def seconds(self) -> float | None:
        if not self.calls:
            return None
        if self.cuda:
            torch.cuda.synchronize()
            return sum(s.elapsed_time(e) for s, e in self.events) / 1e3
        return self.host_s


def _resident_bytes(device: str) -> int | None:
    """Memory in use now: allocated CUDA memory, or the process's resident set on Linux."""
    if device == "cuda":
        return torch.cuda.memory_allocated()
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return None


def _stages_dict(stages) -> dict:
    return {name: {"seconds": st.seconds, "peak_bytes": st.peak_bytes} for name, st in stages.items()}


def _plan_digest(report) -> str | None:
    plans = report.settings.get("plans") or []
    if not plans:
        return None
    plan = json.loads(plans[0])
    key = json.dumps({"keep": plan["keep"], "remove_layers": plan["remove_layers"]}, sort_keys=True)
    return hashlib.sha1(key.encode()).hexdigest()[:12]


def _model_and_calib(spec: dict):
    dtype = DTYPES[spec["dtype"]]
    if spec["shape"] == REAL and spec.get("calib") == "wiki":  # the real model on its real calibration text
        from fastprune.data import calibration_batch
        from fastprune.models import load_model

        model, tokenizer = load_model("smollm2", dtype=dtype, device=spec["device"])
        return model, calibration_batch(tokenizer, "wiki", spec["n_samples"], spec["seq_len"], spec["seed"])
    model = build_model(spec["shape"], spec["device"], dtype, spec["seed"])
    calib = random_calibration(model.config.vocab_size, spec["n_samples"], spec["seq_len"], spec["seed"])
    return model, calib


def _dense_seconds(model, calib: torch.Tensor, device: str) -> float:
    """A dense forward+backward of ``calib`` keeping every gradient, the second of two (the first warms up)."""
    calib = calib.to(device)
    model.requires_grad_(True)
    seconds = []
    for _ in range(2):
        _sync(device)
        t0 = time.perf_counter()
        _lm_loss(model, calib).backward()
        _sync(device)
        seconds.append(time.perf_counter() - t0)
        model.zero_grad(set_to_none=True)
    return seconds[-1]


def _discovery_seconds(fastprune, model, device: str) -> tuple[float, float]:
    """Discovery of the pruned model by a fresh trace, and from the graph ``apply`` derived (the next step's)."""
    times = []
    for cache in (False, True):
        _sync(device)
        t0 = time.perf_counter()
        fastprune.discover(model, cache=cache)
        times.append(time.perf_counter() - t0)
    return times[0], times[1]


def run_fastprune(spec: dict) -> dict:
    import fastprune
    import fastprune.importance as importance
    from fastprune import backends, graph_cache

    device = spec["device"]
    with backends.use(spec["backend"]):
        return _timed_prune(spec, fastprune, importance, backends, graph_cache, device)


def _timed_prune(spec, fastprune, importance, backends, graph_cache, device) -> dict:
    options = dict(method="llm-pruner", criterion=spec["criterion"], progress=False, loss_chunk=spec.get("loss_chunk"),
                   gradient_checkpointing=spec.get("gradient_checkpointing", False))
    warm_shape = spec["shape"] if device == "cuda" else "tiny"
    warm = build_model(warm_shape, device, DTYPES[spec["dtype"]], spec["seed"])
    warm_calib = random_calibration(warm.config.vocab_size, spec["n_samples"], spec["seq_len"], spec["seed"])
    fastprune.prune(warm, spec["ratio"], calib=warm_calib, **options)
    del warm
    graph_cache.clear()  # the timed run traces its model, as a first prune of it does
    gc.collect()  # free the warm-up model before the timed one is built
    if device == "cuda":
        torch.cuda.empty_cache()

    before_model = _resident_bytes(device)
    model, calib = _model_and_calib(spec)
    weights = weight_bytes(model)
    dense = _dense_seconds(model, calib, device) if spec.get("dense_in_process") else None
    gc.collect()
    start_bytes = _resident_bytes(device)
    with OpTimer(importance, "taylor_accumulate_", device) as timer:
        _sync(device)
        t0 = time.perf_counter()
        report = fastprune.prune(model, spec["ratio"], calib=calib, **options)
        _sync(device)
        wall = time.perf_counter() - t0
    stages = _stages_dict(report.stages)
    traced, cached = _discovery_seconds(fastprune, model, device)
    dtype = DTYPES[spec["dtype"]]
    ran = {"taylor": backends.active("taylor_accumulate_", device, dtype),
           "gather": backends.active("gather", device, dtype)}
    return dict(stages=stages, taylor_op_s=timer.seconds, taylor_op_calls=timer.calls, wall_s=wall,
                weight_bytes=weights, start_bytes=start_bytes, before_model_bytes=before_model,
                dense_fwd_bwd_s=dense, discovery_traced_s=traced, discovery_cached_s=cached,
                params_before=report.params_before, params_after=report.params_after,
                ratio_achieved=report.ratio_achieved, plan=_plan_digest(report), ran=ran)


def run_dense(spec: dict) -> dict:
    from fastprune.report import stage

    device = spec["device"]
    warm = build_model(spec["shape"] if device == "cuda" else "tiny", device, DTYPES[spec["dtype"]], spec["seed"])
    _lm_loss(warm, random_calibration(warm.config.vocab_size, 2, 8)).backward()  # as fastprune's warm-up prune
    del warm
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    before_model = _resident_bytes(device)
    model, calib = _model_and_calib(spec)
    calib = calib.to(device)
    weights = weight_bytes(model)
    model.requires_grad_(True)
    stages: dict = {}
    start_bytes = _resident_bytes(device)
    t0 = time.perf_counter()
    with stage(stages, "fwd+bwd", torch.device(device)):
        _lm_loss(model, calib).backward()
    wall = time.perf_counter() - t0
    params = sum(p.numel() for p in model.parameters())
    return dict(stages=_stages_dict(stages), wall_s=wall, weight_bytes=weights, start_bytes=start_bytes,
                before_model_bytes=before_model, params_before=params)


def run_torch_pruning(spec: dict) -> dict:
    import torch_pruning as tp

    from fastprune.report import stage

    device = spec["device"]
    model, calib = _model_and_calib(spec)
    calib = calib.to(device)
    weights = weight_bytes(model)
    num_heads, ignored = torch_pruning_targets(model)  # keeps the residual (hidden) width
    params_before = sum(p.numel() for p in model.parameters())
    stages: dict = {}
    dev = torch.device(device)

    def done(name: str) -> None:
        _emit(STAGE, {"name": name, **_stages_dict(stages)[name]})

    start_bytes = _resident_bytes(device)
    t0 = time.perf_counter()
    _emit(AT, {"name": "discovery (MetaPruner construction)"})
    with stage(stages, "discovery", dev):
        pruner = tp.pruner.MetaPruner(
            model, example_inputs=calib[:1], importance=tp.importance.GroupTaylorImportance(),
            pruning_ratio=spec["ratio"], head_pruning_ratio=spec["ratio"], num_heads=num_heads,
            prune_num_heads=True, prune_head_dims=False, global_pruning=False, ignored_layers=ignored,
            output_transform=lambda out: out.logits)
    done("discovery")
    _emit(AT, {"name": "scoring (forward/backward)"})
    with stage(stages, "scoring", dev):
        _lm_loss(model, calib).backward()
    done("scoring")
    _emit(AT, {"name": "step (importance, selection, pruning)"})
    with stage(stages, "step", dev):
        pruner.step()
    done("step")
    _sync(device)
    wall = time.perf_counter() - t0
    params_after = sum(p.numel() for p in model.parameters())
    return dict(stages=_stages_dict(stages), wall_s=wall, weight_bytes=weights, start_bytes=start_bytes,
                params_before=params_before, params_after=params_after, ratio_achieved=1 - params_after / params_before)


def child_main(spec: dict) -> None:
    import warnings

    warnings.filterwarnings("ignore")
    run = {"fastprune": run_fastprune, "dense": run_dense, "torch-pruning": run_torch_pruning}[spec["tool"]]
    _emit(RESULT, run(spec))


# ---------------------------------------------------------------- parent side: plan, run, report

def _parse(out: str) -> tuple[dict | None, dict, str | None]:
    """The result, the stages finished so far and the stage last entered, from a child's output."""
    result, stages, at = None, {}, None
    for line in out.splitlines():
        if line.startswith(AT):
            at = json.loads(line[len(AT):])["name"]
        elif line.startswith(RESULT):
            result = json.loads(line[len(RESULT):])
        elif line.startswith(STAGE):
            st = json.loads(line[len(STAGE):])
            stages[st.pop("name")] = st
    return result, stages, at


def run_child(spec: dict, timeout: float) -> dict:
    """Run one spec in a fresh process group, killed after ``timeout`` seconds."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    timed_out = False
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
    result, partial, at = _parse(out or "")
    record = dict(spec)
    if result is not None:
        record.update(result, status="ok")
    elif timed_out:
        where = f" (stuck in {at})" if at else ""
        record.update(status="timeout", message=f"did not finish in {timeout:.0f} s{where}", stages=partial)
    else:
        lines = [x for x in (err or "").splitlines() if x.strip()]
        record.update(status="error", message=lines[-1] if lines else f"exit code {proc.returncode}",
                      stages=partial, stderr_tail=(err or "")[-3000:])
    return record


def _finish(record: dict) -> dict:
    stages = record.get("stages") or {}
    seconds = {name: st["seconds"] for name, st in stages.items()}
    record["total_s"] = total = sum(seconds.values()) if stages else None
    record["peak_bytes"] = peak = max((st["peak_bytes"] for st in stages.values()), default=None)
    start, before, weights = record.get("start_bytes"), record.get("before_model_bytes"), record.get("weight_bytes")
    record["peak_over_start_bytes"] = peak - start if peak is not None and start is not None else None
    over = peak - before if peak is not None and before is not None else None
    record["peak_over_pre_model_bytes"] = over
    record["peak_over_pre_model_vs_weights"] = over / weights if over is not None and weights else None
    if record.get("taylor_op_s") is not None and "scoring" in stages:
        record["fwd_bwd_in_scoring_s"] = stages["scoring"]["seconds"] - record["taylor_op_s"]
    dense = record.get("dense_fwd_bwd_s")
    if dense and "scoring" in seconds:
        record["scoring_vs_dense"] = seconds["scoring"] / dense
        record["total_vs_dense"] = total / dense
    if total and record.get("tool") == "fastprune":
        around = sum(seconds.get(k, 0.0) for k in ("discovery", "selection", "compaction"))
        record["discovery_selection_compaction_share"] = around / total
    return record


def _compare(records: list[dict]) -> None:
    """Speedups over the reference backend of the same shape, whether the plans agree, and time over the
    dense forward+backward of a separate run where the same process did not measure it."""
    for r in records:
        dense = next((x for x in records if x["shape"] == r["shape"] and x["tool"] == "dense"
                      and x["status"] == "ok"), None)
        if r["tool"] == "fastprune" and r["status"] == "ok" and r.get("total_vs_dense") is None and dense:
            r["total_vs_dense"] = r["total_s"] / dense["total_s"]
            r["scoring_vs_dense"] = r["stages"]["scoring"]["seconds"] / dense["total_s"]
    for r in records:
        ref = next((x for x in records if x["shape"] == r["shape"] and x["tool"] == "fastprune"
                    and x["backend"] == "reference" and x["status"] == "ok"), None)
        if ref is None or r["status"] != "ok" or r["tool"] == "dense":
            continue
        r["total_vs_reference"] = ref["total_s"] / r["total_s"] if r.get("total_s") else None
        if r.get("taylor_op_s") and ref.get("taylor_op_s"):
            r["taylor_op_vs_reference"] = ref["taylor_op_s"] / r["taylor_op_s"]
        if r["tool"] == "fastprune":
            r["same_plan_as_reference"] = r.get("plan") == ref.get("plan")


def _label(r: dict) -> str:
    return {"fastprune": f"fastprune/{r['backend']}", "dense": "dense fwd+bwd"}.get(r["tool"], r["tool"])


def _secs(x) -> str:
    return "–" if x is None else f"{x:.3f}"


def _mem(n) -> str:
    if n is None:
        return "–"
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def _ratio(x, fmt="{:.2f}x") -> str:
    return "–" if x is None else fmt.format(x)


def markdown(records: list[dict]) -> str:
    from fastprune.tables import markdown_table

    present = {c for r in records for c in (r.get("stages") or {})}
    if any(r.get("taylor_op_s") is not None for r in records):
        present.add("taylor op")
    cols = [c for c in COLUMNS if c in present]
    head = ["shape", "run", *cols, "stages total", "prune() wall", "dense f+b (same process)", "scoring / f+b",
            "total / f+b", "disc+sel+comp share", "peak mem", "peak over start", "(peak - pre-model) / weights",
            "removed", "taylor op vs ref", "total vs ref", "plan = ref", "status"]
    body = []
    for r in records:
        stages = r.get("stages") or {}
        cells = []
        for c in cols:
            cells.append(_secs(r.get("taylor_op_s")) if c == "taylor op" else _secs(stages.get(c, {}).get("seconds")))
        same = r.get("same_plan_as_reference")
        status = r["status"] if r["status"] == "ok" else f"{r['status']}: {r.get('message', '')}"
        row = [r["shape"], _label(r), *cells, _secs(r.get("total_s")), _secs(r.get("wall_s")),
               _secs(r.get("dense_fwd_bwd_s")), _ratio(r.get("scoring_vs_dense")), _ratio(r.get("total_vs_dense")),
               _ratio(r.get("discovery_selection_compaction_share"), "{:.1%}"), _mem(r.get("peak_bytes")),
               _mem(r.get("peak_over_start_bytes")), _ratio(r.get("peak_over_pre_model_vs_weights")),
               _ratio(r.get("ratio_achieved"), "{:.1%}"),
               _ratio(r.get("taylor_op_vs_reference")), _ratio(r.get("total_vs_reference")),
               "–" if same is None else ("yes" if same else "no"), status.replace("|", "/")]
        body.append(row)
    return markdown_table(head, body, align="ll" + "r" * (len(head) - 3) + "l")


def plan_runs(args, device: str) -> list[dict]:
    from fastprune import backends as kernel_backends

    backends = [b for b in kernel_backends.available(device) if device == "cuda" or b != "triton"]
    if args.backends:
        backends = [b for b in backends if b in args.backends]
    base = dict(device=device, dtype=args.dtype, ratio=args.ratio, criterion=args.criterion,
                n_samples=args.n_samples, seq_len=args.seq_len, seed=args.seed, loss_chunk=args.loss_chunk,
                gradient_checkpointing=args.gradient_checkpointing,
                dense_in_process=args.dense_in_process, calib=args.calib)
    shapes = args.shapes + ([REAL] if args.real and REAL not in args.shapes else [])
    runs = []
    for shape in shapes:
        runs += [dict(base, shape=shape, tool="fastprune", backend=b) for b in backends]
        if not args.no_dense:
            runs.append(dict(base, shape=shape, tool="dense", backend=None))
    if not args.no_tp:
        tp_shapes = args.tp_shapes if args.tp_shapes is not None else shapes
        runs += [dict(base, shape=s, tool="torch-pruning", backend=None) for s in tp_shapes if s != REAL]
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES) + [REAL], help="model shapes (default: "
                        f"{' '.join(GPU_SHAPES[:2])} on a GPU, {' '.join(CPU_SHAPES[:2])} on the CPU)")
    parser.add_argument("--real", action="store_true", help="also the real embedded SmolLM2-135M")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default: bf16 on a GPU, fp32 on the CPU")
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--criterion", default="element1")
    parser.add_argument("--n-samples", type=int, default=10)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-dense", action="store_true", help="skip the dense forward/backward run")
    parser.add_argument("--no-tp", action="store_true", help="skip Torch-Pruning")
    parser.add_argument("--tp-shapes", nargs="*", choices=sorted(SHAPES), help="Torch-Pruning shapes (default: all)")
    parser.add_argument("--tp-timeout", type=float, default=60, help="seconds before a Torch-Pruning run is killed")
    parser.add_argument("--run-timeout", type=float, default=600, help="seconds before any other run is killed")
    parser.add_argument("--budget-s", type=float, default=None, help="wall-clock cap of the whole benchmark")
    parser.add_argument("--loss-chunk", type=int, default=None, metavar="TOKENS",
                        help="score with the chunked loss, this many tokens of logits at a time")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="score with activation checkpointing (prune(gradient_checkpointing=True))")
    parser.add_argument("--dense-in-process", action="store_true",
                        help="also time a dense forward+backward in each fastprune run's own process, before it")
    parser.add_argument("--calib", choices=["random", "wiki"], default="random",
                        help="calibration tokens: random ids, or Wikipedia text for the real SmolLM2")
    parser.add_argument("--backends", nargs="+", help="kernel backends to run (default: every one available)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--jsonl", metavar="PATH", help="append each result as a JSON line as soon as it is measured")
    args = parser.parse_args()
    if args.child:
        child_main(json.loads(args.child))
        return

    start = time.perf_counter()
    device = args.device
    args.dtype = args.dtype or ("bf16" if device == "cuda" else "fp32")
    args.shapes = args.shapes or list(GPU_SHAPES[:2] if device == "cuda" else CPU_SHAPES[:2])
    try:
        import torch_pruning  # noqa: F401
    except ImportError:
        print("torch-pruning is not installed: skipping that baseline (pip install torch-pruning==1.6.1)",
              file=sys.stderr)
        args.no_tp = True

    records = []
    for spec in plan_runs(args, device):
        left = float("inf") if args.budget_s is None else args.budget_s - (time.perf_counter() - start)
        limit = args.tp_timeout if spec["tool"] == "torch-pruning" else args.run_timeout
        label = f"{spec['shape']} {_label(spec)}"
        if left < 10:
            record = dict(spec, status="skipped", message="out of --budget-s")
        else:
            print(f"running {label} (limit {min(limit, left):.0f} s)", file=sys.stderr, flush=True)
            record = run_child(spec, min(limit, left))
        records.append(_finish(record))
        print(f"  {label}: {record['status']} {record.get('message', '')}", file=sys.stderr, flush=True)
        if args.jsonl:
            with open(args.jsonl, "a") as f:
                f.write(json.dumps({"benchmark": "prune", **record}) + "\n")
    _compare(records)

    import fastprune

    where = device_name(device)
    text = "Wikipedia text for smollm2-real, random token ids otherwise" if args.calib == "wiki" else "random token ids"
    calibration = f"{text}, {args.n_samples} x {args.seq_len}"
    print(f"\ndevice: {where}; dtype {args.dtype}; fastprune {fastprune.__version__}, torch {torch.__version__}; "
          f"{args.criterion}, ratio {args.ratio}; calibration: {calibration}; loss_chunk {args.loss_chunk}; "
          f"gradient checkpointing {args.gradient_checkpointing}; "
          f"peak memory: {'max_memory_allocated' if device == 'cuda' else 'process peak RSS so far'}\n")
    print(markdown(records))
    print(f"\ntotal benchmark wall time {time.perf_counter() - start:.0f} s")
    if args.json:
        meta = dict(device=where, device_type=device, dtype=args.dtype, torch=torch.__version__,
                    fastprune=fastprune.__version__, ratio=args.ratio, criterion=args.criterion,
                    calibration=calibration, loss_chunk=args.loss_chunk,
                    gradient_checkpointing=args.gradient_checkpointing)
        with open(args.json, "w") as f:
            json.dump({**meta, "results": records}, f, indent=1)


if __name__ == "__main__":
    main()
