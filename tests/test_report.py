"""Peak memory of a stage (fastprune.report.stage) on the CPU: the kernel's high-water mark or a sampler."""

import subprocess
import sys

import pytest

from fastprune import report

MB = 2**20


@pytest.fixture(params=["high-water mark", "sampler"])
def mechanism(request):
    """The mechanism the fresh process below uses (it turns the high-water mark off for the sampler)."""
    if request.param == "high-water mark" and not report._reset_high_water():
        pytest.skip("this kernel does not let a process reset its high-water mark (/proc/self/clear_refs)")
    return request.param


_FRESH_PROCESS = """
import sys, time, torch
from fastprune import report
if sys.argv[1] == "sampler":
    report._reset_high_water = lambda: False
stages = {}
with report.stage(stages, "work", torch.device("cpu")):
    block = torch.ones(300 * 2**20 // 4)  # touched: resident
    assert float(block[-1]) == 1.0
    if sys.argv[1] == "sampler":  # give the 2 ms sampler a chance to see it: hold it a while
        time.sleep(0.05)
    del block
print(stages["work"].extra_bytes)
"""


def test_a_stage_sees_memory_freed_before_it_ends(mechanism):
    """In a fresh process: one that has run the rest of the suite may reuse resident memory or lose
    file-backed pages meanwhile, so its resident set need not grow by what the stage allocates."""
    run = subprocess.run([sys.executable, "-c", _FRESH_PROCESS, mechanism], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    assert int(run.stdout.split()[-1]) >= 250 * MB, run.stdout


def test_a_nested_stage_does_not_hide_the_outer_peak():
    """Only the high-water mark is reset by a stage (a sampler thread per stage resets nothing)."""
    if not report._reset_high_water():
        pytest.skip("this kernel does not let a process reset its high-water mark (/proc/self/clear_refs)")
    code = """
import torch
from fastprune import report
stages = {}
def allocate_and_free(n):
    block = torch.ones(n // 4)
    assert float(block[-1]) == 1.0
with report.stage(stages, "outer", torch.device("cpu")):
    allocate_and_free(300 * 2**20)  # before the inner stage resets the high-water mark
    with report.stage(stages, "inner", torch.device("cpu")):
        allocate_and_free(20 * 2**20)
print(stages["outer"].extra_bytes, stages["inner"].extra_bytes, len(report._OPEN_PEAKS))
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    outer, inner, still_open = (int(x) for x in run.stdout.split()[-3:])  # in a fresh process, as above
    assert outer >= 250 * MB and inner < 250 * MB and still_open == 0, run.stdout
