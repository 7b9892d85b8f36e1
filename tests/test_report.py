"""Peak memory of a stage (fastprune.report.stage) on the CPU: the kernel's high-water mark or a sampler."""

import time

import pytest
import torch

from fastprune import report

MB = 2**20


def _allocate_and_free(n_bytes: int) -> None:
    block = torch.ones(n_bytes // 4, dtype=torch.float32)  # touched: resident
    assert float(block[-1]) == 1.0
    del block


@pytest.fixture(params=["high-water mark", "sampler"])
def mechanism(request, monkeypatch):
    if request.param == "sampler":
        monkeypatch.setattr(report, "_reset_high_water", lambda: False)
    elif not report._reset_high_water():
        pytest.skip("this kernel does not let a process reset its high-water mark (/proc/self/clear_refs)")
    return request.param


def test_a_stage_sees_memory_freed_before_it_ends(mechanism):
    stages = {}
    with report.stage(stages, "work", torch.device("cpu")):
        _allocate_and_free(300 * MB)
        if mechanism == "sampler":  # give the 2 ms sampler a chance to see it: hold it a while
            block = torch.ones(300 * MB // 4)
            time.sleep(0.05)
            del block
    st = stages["work"]
    assert st.extra_bytes >= 250 * MB, st


def test_a_nested_stage_does_not_hide_the_outer_peak():
    """Only the high-water mark is reset by a stage (a sampler thread per stage resets nothing)."""
    if not report._reset_high_water():
        pytest.skip("this kernel does not let a process reset its high-water mark (/proc/self/clear_refs)")
    stages = {}
    with report.stage(stages, "outer", torch.device("cpu")):
        _allocate_and_free(300 * MB)  # before the inner stage resets the high-water mark
        with report.stage(stages, "inner", torch.device("cpu")):
            _allocate_and_free(20 * MB)
    assert stages["outer"].extra_bytes >= 250 * MB
    assert stages["inner"].extra_bytes < 250 * MB
    assert not report._OPEN_PEAKS
