"""Benchmark fastprune's ops against the eager PyTorch reference, in the same run.

For each op, shape and backend: median time, achieved GB/s (bytes the op must move), that as a
fraction of the device's copy bandwidth (measured with a large ``clone``), and the speedup over
the reference.  bf16 on a GPU (backends: reference, cuda, triton), fp32 on the CPU (reference,
cpp; the SmolLM2-135M shapes are added there).  Prints a markdown table; ``--json PATH`` saves it.

    python benchmarks/bench_kernels.py --small            # CPU-friendly
    python benchmarks/bench_kernels.py --json bench.json  # GPU: Llama-sized matrices
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from fastprune import backends, ops
from fastprune.tables import markdown_table

LLAMA_SHAPES = [(4096, 4096), (11008, 4096), (14336, 4096), (128256, 4096)]
SMOLLM2_SHAPES = [(576, 1536), (1536, 576), (49152, 576)]


def time_call(fn, device: str, repeat: int) -> float:
    """Median time of ``fn()`` in seconds after one warm-up call: ``triton.testing.do_bench`` on a GPU
    (CUDA events, L2 flushed between calls), the host clock on the CPU."""
    if device == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=max(25, 5 * repeat), return_mode="median") / 1e3  # ms budgets
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def copy_bandwidth(device: str, nbytes: int, repeat: int) -> float:
    """Bytes per second of ``clone`` (one read plus one write) on a large tensor."""
    x = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    seconds = time_call(lambda: x.clone(), device, repeat)
    return 2 * nbytes / seconds


def cases(shape, dtype, device):
    """(op name, bytes moved, callable) for every op on an (R, C) matrix."""
    r, c = shape
    w = torch.randn(r, c, device=device).to(dtype)
    g = torch.randn(r, c, device=device).to(dtype)
    rows = torch.zeros(3, r, device=device)
    cols = torch.zeros(3, c, device=device)
    keep_r = torch.arange(r, device=device)[torch.arange(r, device=device) % 4 != 0]  # prune 25 %
    keep_c = torch.arange(c, device=device)[torch.arange(c, device=device) % 4 != 0]
    es = w.element_size()
    return [
        ("taylor", 2 * r * c * es, lambda: ops.taylor_accumulate_(w, g, rows, cols, 1, 1)),
        ("gather dim0", 2 * len(keep_r) * c * es, lambda: ops.gather(w, 0, keep_r)),
        ("gather dim1", 2 * r * len(keep_c) * es, lambda: ops.gather(w, 1, keep_c)),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="fewer, smaller shapes")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeat", type=int, default=None, help="timed calls per case (median)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--jsonl", metavar="PATH", help="append each result as a JSON line as soon as it is measured")
    args = parser.parse_args()

    device = args.device
    on_gpu = device == "cuda"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    repeat = args.repeat or (20 if on_gpu else 5)
    shapes = LLAMA_SHAPES[:1] if args.small else LLAMA_SHAPES
    if not on_gpu:
        shapes = SMOLLM2_SHAPES + shapes
    compiled = [b for b in backends.available(device) if b != "reference" and (b != "triton" or on_gpu)]
    copy_bw = copy_bandwidth(device, (1 << 30) if on_gpu and not args.small else (256 << 20), repeat)

    results = []
    for shape in shapes:
        for name, nbytes, fn in cases(shape, dtype, device):
            ref_s = None
            for backend in ["reference"] + compiled:
                with backends.use(backend):
                    seconds = time_call(fn, device, repeat)
                ref_s = ref_s or seconds
                results.append({"op": name, "shape": list(shape), "dtype": str(dtype).removeprefix("torch."),
                                "backend": backend, "ms": seconds * 1e3, "gb_s": nbytes / seconds / 1e9,
                                "copy_fraction": nbytes / seconds / copy_bw, "speedup": ref_s / seconds})
                if args.jsonl:
                    with open(args.jsonl, "a") as f:
                        f.write(json.dumps({"benchmark": "kernels", **results[-1]}) + "\n")

    where = torch.cuda.get_device_name() if on_gpu else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {where}; copy bandwidth {copy_bw / 1e9:.1f} GB/s (clone)\n")
    print(markdown_table(("op", "shape", "dtype", "backend", "ms", "GB/s", "of copy BW", "vs reference"),
                         [(r["op"], f"{r['shape'][0]}x{r['shape'][1]}", r["dtype"], r["backend"], f"{r['ms']:.3f}",
                           f"{r['gb_s']:.1f}", f"{r['copy_fraction']:.0%}", f"{r['speedup']:.2f}x") for r in results],
                         align="llllrrrr"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": where, "copy_gb_s": copy_bw / 1e9, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
