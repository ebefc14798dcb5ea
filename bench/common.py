"""Shared benchmark plumbing: medians, peak memory, environment block, JSON output."""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def environment() -> dict:
    """Versions, machine and git revision, recorded with every result."""
    cpu = "unknown"
    try:
        cpu = re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text()).group(1)
    except (OSError, AttributeError):
        pass
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        sha = "unknown"
    import sven_ext

    return {
        "sven_ext": sven_ext.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "git": sha,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def _status_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


# glibc keeps freed memory for reuse and raises its mmap threshold after frees, so a freed
# tensor's pages stay resident and a later peak would go unseen. A fixed threshold makes every
# allocation over 64 KiB its own mapping, returned on free: resident memory tracks live tensors.
_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def exact_memory_accounting() -> None:
    """Re-executes this script with the allocator settings above unless they are already in force."""
    if any(os.environ.get(key) != value for key, value in _MALLOC_ENV.items()):
        os.environ.update(_MALLOC_ENV)
        os.execv(sys.executable, [sys.executable, *sys.argv])


class PeakMemory:
    """Peak resident memory of this process over a region, above what it held at the start.

    Uses Linux's resettable high-water mark (``/proc/self/clear_refs``), so it counts
    every allocation, torch's and the BLAS library's alike. On CUDA tensors use
    ``torch.cuda.max_memory_allocated`` instead.
    """

    def __enter__(self):
        Path("/proc/self/clear_refs").write_text("5")
        self.start_kib = _status_kib("VmRSS")
        return self

    def __exit__(self, *exc):
        self.extra_bytes = (_status_kib("VmHWM") - self.start_kib) * 1024
        return False


def measure(fn, *, repeats: int, warmup: int = 1) -> dict:
    """Median wall time of ``fn()`` over ``repeats`` calls after ``warmup`` calls, and its peak extra memory."""
    for _ in range(warmup):
        fn()
    times, peaks = [], []
    for _ in range(repeats):
        with PeakMemory() as mem:
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        peaks.append(mem.extra_bytes)
    return {"median_s": statistics.median(times), "times_s": times, "peak_extra_bytes": max(peaks)}


def write_json(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    path.write_text(json.dumps({"environment": environment(), **payload}, indent=2) + "\n")
    return path
