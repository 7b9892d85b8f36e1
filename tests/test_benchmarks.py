"""Smoke tests of the benchmark scripts: they run end to end on a tiny CPU shape and write valid JSON.

No timing is asserted; only that the runs complete and the records carry the expected keys.
"""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
STAGES = {"discovery", "calibration", "scoring", "selection", "compaction"}


def _run(args, timeout=240):
    proc = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_bench_prune_tiny(tmp_path):
    out, lines = tmp_path / "prune.json", tmp_path / "prune.jsonl"
    stdout = _run([BENCH / "bench_prune.py", "--device", "cpu", "--shapes", "tiny", "--tp-timeout", "3",
                   "--dense-in-process", "--json", out, "--jsonl", lines])
    assert "| tiny | fastprune/reference |" in stdout
    data = json.loads(out.read_text())
    assert {"device", "dtype", "torch", "fastprune", "ratio", "criterion", "calibration", "results"} <= set(data)
    runs = {(r["tool"], r["backend"]): r for r in data["results"]}
    ref = runs[("fastprune", "reference")]
    assert ref["status"] == "ok", ref.get("message")
    assert set(ref["stages"]) == STAGES
    for st in ref["stages"].values():
        assert st["seconds"] >= 0 and st["peak_bytes"] > 0
    for key in ("total_s", "wall_s", "peak_bytes", "weight_bytes", "taylor_op_s", "params_before", "params_after",
                "ratio_achieved", "plan", "total_vs_reference", "dense_fwd_bwd_s", "scoring_vs_dense", "total_vs_dense",
                "discovery_selection_compaction_share", "peak_over_pre_model_vs_weights", "discovery_traced_s",
                "discovery_cached_s"):
        assert ref[key] is not None, key
    assert ref["scoring_vs_dense"] == ref["stages"]["scoring"]["seconds"] / ref["dense_fwd_bwd_s"]
    streamed = [json.loads(x) for x in lines.read_text().splitlines()]
    assert [(r["tool"], r["backend"]) for r in streamed] == [(r["tool"], r["backend"]) for r in data["results"]]
    assert 0 < ref["ratio_achieved"] < 1
    assert ref["ran"] == {"taylor": "reference", "gather": "reference"}
    for (tool, backend), r in runs.items():
        if tool == "fastprune":
            assert r["status"] == "ok" and r["ran"]["taylor"] == backend
            assert r["same_plan_as_reference"] is not None
    dense = runs[("dense", None)]
    assert dense["status"] == "ok" and set(dense["stages"]) == {"fwd+bwd"}
    tp = runs.get(("torch-pruning", None))
    if tp is not None:  # installed: finished, or recorded as killed at the limit
        assert tp["status"] in ("ok", "timeout"), tp.get("message")
        if tp["status"] == "timeout":
            assert tp["message"].startswith("did not finish in 3 s")


def test_bench_prune_budget_skips(tmp_path):
    out = tmp_path / "prune.json"
    _run([BENCH / "bench_prune.py", "--device", "cpu", "--shapes", "tiny", "--no-tp", "--no-dense",
          "--budget-s", "1", "--json", out])
    results = json.loads(out.read_text())["results"]
    assert results and all(r["status"] == "skipped" for r in results)


def test_bench_kernels_small(tmp_path):
    out = tmp_path / "kernels.json"
    _run([BENCH / "bench_kernels.py", "--small", "--device", "cpu", "--repeat", "1", "--json", out])
    data = json.loads(out.read_text())
    assert data["copy_gb_s"] > 0
    assert {r["op"] for r in data["results"]} == {"taylor", "gather dim0", "gather dim1"}
    assert all(r["ms"] > 0 and r["speedup"] > 0 for r in data["results"])


def test_gpu_check_is_valid_bash():
    subprocess.run(["bash", "-n", str(BENCH / "gpu_check.sh")], check=True)


def test_build_model_is_ready():
    sys.path.insert(0, str(BENCH))
    try:
        import torch
        from common import build_model, random_calibration
    finally:
        sys.path.remove(str(BENCH))
    model = build_model("tiny", "cpu", torch.float32)
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = random_calibration(model.config.vocab_size, 2, 8)
    assert torch.isfinite(model(input_ids=ids).logits).all()


def test_quality_table_rows(tmp_path):
    """benchmarks/quality.py on the real SmolLM2 with tiny budgets: every job is recorded, tabled and resumable."""
    rows = ["dense", "element1 + LoRA", "Torch-Pruning 1.6.1 (Taylor)"]
    args = [BENCH / "quality.py", "--rows", *rows, "--eval-tokens", "2048", "--zeroshot-items", "2",
            "--lora-steps", "2", "--tp-timeout", "5", "--recon-sizes", "8", "--seeds", "0", "--seed-rows",
            "element1 + LoRA", "--out", tmp_path]
    _run(args, timeout=900)
    lines = [json.loads(x) for x in (tmp_path / "quality.jsonl").read_text().splitlines()]
    assert lines[0]["meta"]["zeroshot_items"] == 2
    results = {r["row"]: r for r in lines[1:] if r["part"] == "main"}
    assert list(results) == rows
    dense, pruned = results["dense"], results["element1 + LoRA"]
    assert 0.78 < pruned["params"] / dense["params"] < 0.82  # 20 % removed
    for r in (dense, pruned):
        assert all(r[f"{s}@{n}"] > 1 for s in ("wiki", "austen") for n in (128, 2048))
        assert len(r["zeroshot"]) == 4 and all(0 <= a <= 100 for a in r["zeroshot"].values())
    assert pruned["lora"]["steps"] == 2 and pruned["peak_bytes"] > 0 and "scoring" in pruned["stages"]
    assert "status" in results["Torch-Pruning 1.6.1 (Taylor)"] or "params" in results["Torch-Pruning 1.6.1 (Taylor)"]
    refit = next(r for r in lines[1:] if r["part"] == "recon_size")
    assert refit["recon_samples"] == 8 and refit["settings"]["reconstruction"]["n_samples"] == 8
    assert refit["forward_over_recon_tokens"]["seconds"] > 0 and "reconstruction" in refit["stages"]
    seeded = next(r for r in lines[1:] if r["part"] == "seeds")  # the same settings as a main row: not run again
    assert seeded["same_run_as"] == pruned["job"] and seeded["wiki@128"] == pruned["wiki@128"]
    table = (tmp_path / "quality.md").read_text()
    assert all(row in table for row in rows) and "Reconstruction calibration size" in table
    _run(args, timeout=300)  # resumed: nothing runs again
    again = [json.loads(x) for x in (tmp_path / "quality.jsonl").read_text().splitlines()]
    assert len([r for r in again if "job" in r]) == len([r for r in lines if "job" in r])


def test_the_tuning_table_in_results_is_what_its_json_lines_render():
    """RESULTS.md's issue-17 tuning table is regenerated, not edited: every line render_tuning.py makes from
    the committed JSON lines is in RESULTS.md, in order."""
    table = _run([BENCH / "render_tuning.py"]).strip()
    results = (BENCH / "RESULTS.md").read_text()
    assert table.count("\n") >= 3
    assert table in results


def test_the_fast_path_tables_in_results_are_what_their_json_lines_render():
    """RESULTS.md's CPU kernel table and fast-path tables (SmolLM2 runs, Llama-3.2-1B shape) are rendered from
    bench_kernels' and bench_prune's committed JSON lines by render_fastpath.py, not typed."""
    tables = _run([BENCH / "render_fastpath.py"]).strip().split("\n\n")
    results = (BENCH / "RESULTS.md").read_text()
    assert len(tables) == 3 and all(t.count("\n") >= 3 for t in tables)
    for table in tables:
        assert table in results
