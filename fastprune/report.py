"""PruneReport: what a pruning run did, with time and memory per stage."""

from __future__ import annotations

import math
import os
import resource
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any

import torch


def json_safe(value: Any) -> Any:
    """``value`` with dataclasses, tuples, paths and non-finite floats made JSON-friendly."""
    if is_dataclass(value) and not isinstance(value, type):
        value = asdict(value)
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


@dataclass
class StageStat:
    """Wall time of one stage and the peak memory seen during it.

    On CUDA ``peak_bytes`` is ``torch.cuda.max_memory_allocated`` over the stage; on the CPU
    it is the peak resident set size of the process, sampled every few milliseconds.
    ``extra_bytes`` is that peak minus the memory in use when the stage started.
    """

    seconds: float
    peak_bytes: int
    extra_bytes: int
    device: str


@dataclass
class PruneReport:
    """Parameters before/after, achieved ratio, per-layer widths and per-stage costs."""

    params_before: int
    params_after: int
    ratio_target: float
    widths_before: dict[int, dict[str, int]]
    widths_after: dict[int, dict[str, int]]
    hidden_before: int | None
    hidden_after: int | None
    layers_before: int
    layers_after: int
    stages: dict[str, StageStat] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    dry_run: bool = False

    @property
    def ratio_achieved(self) -> float:
        return 1 - self.params_after / self.params_before

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["ratio_achieved"] = self.ratio_achieved
        return data

    def summary(self) -> str:
        """A short human-readable table."""
        verb = "would remove" if self.dry_run else "removed"
        lines = [f"parameters: {self.params_before:,} -> {self.params_after:,} "
                 f"({verb} {self.ratio_achieved:.2%}, target {self.ratio_target:.2%})",
                 f"layers: {self.layers_before} -> {self.layers_after}"]
        if self.hidden_before is not None:
            lines.append(f"hidden size: {self.hidden_before} -> {self.hidden_after}")
        lines.append("layer  heads      kv heads   mlp channels")
        for layer in sorted(self.widths_before):
            b, a = self.widths_before[layer], self.widths_after.get(layer)
            if a is None:
                lines.append(f"{layer:>5}  removed")
                continue
            cells = [f"{b.get(k, '-')}->{a.get(k, '-')}" for k in ("heads", "kv_heads", "intermediate")]
            lines.append(f"{layer:>5}  {cells[0]:<10} {cells[1]:<10} {cells[2]}")
        meaning = self.settings.get("ratio_meaning") or {}
        cuts = list((meaning.get("layer_cut") or {}).values())
        if cuts:
            lines.append(f"ratio meaning: embeddings are {meaning['embedding_share']:.0%} of the model, heads and "
                         f"MLP channels {meaning['prunable_share']:.0%}; the {len(cuts)} pruned layers lose "
                         f"{sum(cuts) / len(cuts):.0%} of those on average, at most {max(cuts):.0%}")
        recon = self.settings.get("reconstruction")
        if recon and recon.get("steps"):
            done = recon["steps"][-1]
            left = done.get("mean_error_left")
            lines.append(f"reconstruction: {done['consumers']} projections refitted on {done['tokens']:,} tokens "
                         f"({recon['calib']}), ridge {recon['ridge']}, bias {'on' if recon['bias'] else 'off'}"
                         + (f"; {left:.0%} of the removal error left" if left is not None else ""))
        for text in self.settings.get("warnings") or ():
            lines.append(f"warning: {text}")
        for name, st in self.stages.items():
            lines.append(f"stage {name:<12} {st.seconds:8.3f} s   peak {st.peak_bytes / 2**20:9.1f} MiB"
                         f"  (+{st.extra_bytes / 2**20:.1f} MiB during the stage, {st.device})")
        return "\n".join(lines)


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):  # not Linux: fall back to the lifetime peak
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


class _RssSampler(threading.Thread):
    """Samples the process's resident set size until stopped; keeps the maximum (where the kernel's
    high-water mark cannot be reset: it wakes every 2 ms and competes for the GIL)."""

    def __init__(self, interval: float = 0.002) -> None:
        super().__init__(daemon=True)
        self.interval, self.peak, self._stop_event = interval, _rss_bytes(), threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            self.peak = max(self.peak, _rss_bytes())

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        return max(self.peak, _rss_bytes())


def _high_water_bytes() -> int | None:
    """The kernel's peak resident set of this process since its last reset (Linux ``VmHWM``)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


_OPEN_PEAKS: list[_PeakRss] = []  # measurements running now (stages may nest)


def _reset_high_water() -> bool:
    """Reset the kernel's high-water mark (``/proc/self/clear_refs``); the running measurements keep
    the peak they had seen.  False where the kernel does not offer it."""
    hwm = _high_water_bytes()
    if hwm is None:
        return False
    for m in _OPEN_PEAKS:
        m.peak = max(m.peak, hwm)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


class _PeakRss:
    """The peak resident set between ``start`` and ``stop``: the kernel's high-water mark where Linux lets
    it be reset (no thread, no cost while the stage runs), else :class:`_RssSampler`."""

    def __init__(self) -> None:
        self.peak = _rss_bytes()
        self._sampler: _RssSampler | None = None

    def start(self) -> None:
        if _reset_high_water():
            _OPEN_PEAKS.append(self)
        else:
            self._sampler = _RssSampler()
            self._sampler.start()

    def stop(self) -> int:
        if self._sampler is not None:
            return self._sampler.stop()
        _OPEN_PEAKS.remove(self)
        return max(self.peak, _high_water_bytes() or 0, _rss_bytes())


@contextmanager
def stage(stages: dict[str, StageStat], name: str, device: torch.device):
    """Time a block and record its peak memory under ``stages[name]`` (accumulates)."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start_bytes = torch.cuda.memory_allocated(device)
    else:
        sampler = _PeakRss()
        start_bytes = sampler.peak  # the resident set now, read once
        sampler.start()
    start = time.perf_counter()
    try:
        yield
    finally:
        if cuda:
            torch.cuda.synchronize(device)
            peak = torch.cuda.max_memory_allocated(device)
        else:
            peak = sampler.stop()
        seconds = time.perf_counter() - start
        extra = max(0, peak - start_bytes)
        prev = stages.get(name)
        if prev is not None:
            seconds += prev.seconds
            peak, extra = max(peak, prev.peak_bytes), max(extra, prev.extra_bytes)
        stages[name] = StageStat(seconds, peak, extra, str(device))
