"""What every benchmark in bench/ shares: the commit, the device, how to wait for it, the one
timing helper (:func:`time_fn`, :func:`percentiles`) and the one peak-memory helper
(:class:`PeakMemory`). Imported by the scripts, which run as ``python bench/<script>.py``."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import torch

ROOT = Path(__file__).resolve().parent.parent


def git_commit() -> str:
    """Short commit of the checkout ($GH_COMMIT where the tree was copied without .git)."""
    if os.environ.get("GH_COMMIT"):
        return os.environ["GH_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip() or "unknown"
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU with its cores and torch's threads."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], object], dev: torch.device, reps: int, warmup: int = 3,
            budget_s: float = 5.0, inner: int = 1) -> list[float]:
    """Per-call times in ms of ``fn`` (CUDA events on GPU, perf_counter on CPU after a sync).

    Each of up to ``reps`` samples times ``inner`` back-to-back calls and reports their mean
    (``inner > 1`` on a GPU lets host launch overhead count where it dominates); sampling stops
    early after ``budget_s`` seconds once 5 samples exist.
    """
    for _ in range(warmup):
        fn()
    sync(dev)
    times: list[float] = []
    t_start = time.perf_counter()
    for _ in range(reps):
        if dev.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for _ in range(inner):
                fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / inner)
        else:
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            times.append((time.perf_counter() - t0) * 1e3 / inner)
        if time.perf_counter() - t_start > budget_s and len(times) >= 5:
            break
    return times


def time_call(fn: Callable[[], object], dev: torch.device) -> float:
    """One call of ``fn`` in ms, the device synchronized before and after (for loops that
    interleave several candidates, e.g. one training step of each variant per round)."""
    sync(dev)
    t0 = time.perf_counter()
    fn()
    sync(dev)
    return (time.perf_counter() - t0) * 1e3


def percentiles(times: list[float]) -> tuple[float, float, float]:
    """(median, 20th, 80th percentile) of the samples."""
    # "inclusive": interpolate within the samples (numpy's default); "exclusive" extrapolates past them for few samples
    q = statistics.quantiles(times, n=10, method="inclusive") if len(times) >= 2 else [times[0]] * 9
    return statistics.median(times), q[1], q[7]


class PeakMemory:
    """Peak extra memory of a block: CUDA allocator on GPU; on CPU, the running sum of the
    CPU allocator's allocation/free events recorded by the profiler (VmHWM misses memory
    that malloc reuses from pages already resident, i.e. everything after a warm-up)."""

    def __init__(self, dev: torch.device) -> None:
        self.dev = dev
        self.peak_mb: Optional[float] = None

    def __enter__(self) -> "PeakMemory":
        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)
            torch.cuda.reset_peak_memory_stats(self.dev)
            self.base = torch.cuda.memory_allocated(self.dev)
        else:
            from torch.profiler import ProfilerActivity, profile

            self.prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            self.prof.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)
            self.peak_mb = (torch.cuda.max_memory_allocated(self.dev) - self.base) / 2**20
            return
        self.prof.__exit__(*exc)
        try:
            fd, path = tempfile.mkstemp(suffix=".json")
            os.close(fd)
            self.prof.export_chrome_trace(path)
            events = json.loads(Path(path).read_text())["traceEvents"]
            os.unlink(path)
            deltas = [(e["ts"], e["args"]["Bytes"]) for e in events
                      if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type", 0) == 0]
            cur = peak = 0
            for _, nbytes in sorted(deltas):
                cur += nbytes
                peak = max(peak, cur)
            self.peak_mb = peak / 2**20
        except Exception:  # no kineto trace: report no figure rather than a wrong one
            self.peak_mb = None
