"""What every result records about where it ran, peak resident memory on Linux, and timing.

Inside the package so ``python -m sven_ext bench`` works from an installed wheel; the scripts
in ``bench/`` use it through ``bench/common.py``. The load average is recorded because timings
on a shared machine mean little without it.
"""

from __future__ import annotations

import contextlib
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch


def environment() -> dict:
    """Versions, machine, threads and their environment variables, load, and the git revision
    (``+dirty`` with uncommitted changes; ``"unknown"`` outside a checkout)."""
    cpu = "unknown"
    try:
        cpu = re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text()).group(1)
    except (OSError, AttributeError):
        pass
    here = Path(__file__).parent
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=here, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=here, timeout=10).stdout.strip()
        sha = (sha + ("+dirty" if dirty else "")) if sha else "unknown"
    except (OSError, subprocess.SubprocessError):
        sha = "unknown"
    import sven_ext

    try:
        load = list(os.getloadavg())
    except OSError:
        load = None
    return {
        "sven_ext": sven_ext.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "thread_env": {k: v for k, v in os.environ.items() if k.startswith(("OMP_", "MKL_", "GOMP_"))},
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "cuda": torch.version.cuda,
        "load_average": load,
        "git": sha,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def status_kib(field: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``)."""
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


# glibc keeps freed memory for reuse and raises its mmap threshold after frees, so a freed
# tensor's pages stay resident and a later peak would go unseen. A fixed threshold makes every
# allocation over 64 KiB its own mapping, returned on free: resident memory tracks live tensors.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def exact_memory_accounting(argv: list[str]) -> None:
    """Re-executes ``python argv...`` with the allocator settings above unless they are in force.

    Args:
        argv: the arguments after the interpreter that reproduce this invocation
            (e.g. ``["-m", "sven_ext", "bench", "scaling", ...]``).
    """
    if sys.platform.startswith("linux") and any(os.environ.get(k) != v for k, v in MALLOC_ENV.items()):
        os.environ.update(MALLOC_ENV)
        os.execv(sys.executable, [sys.executable, *argv])


class PeakMemory:
    """Peak resident memory of this process over a region, above what it held at the start.

    Uses Linux's resettable high-water mark (``/proc/self/clear_refs``), so it counts every
    allocation, torch's and the BLAS library's alike. ``extra_bytes`` is ``None`` where that
    is unavailable.
    """

    def __enter__(self):
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.start_kib = status_kib("VmRSS")
        except (OSError, AttributeError):
            self.start_kib = None
        return self

    def __exit__(self, *exc):
        self.extra_bytes = None if self.start_kib is None else (status_kib("VmHWM") - self.start_kib) * 1024
        return False


def median_seconds(fn, *, repeats: int, warmup: int = 1) -> tuple[float, object]:
    """Median wall time of ``fn()`` over ``repeats`` calls after ``warmup`` calls, and the last result.

    CUDA work is waited for around each call (when CUDA is in use), so the times are the device's.
    """
    sync = torch.cuda.synchronize if torch.cuda.is_available() and torch.cuda.is_initialized() else (lambda: None)
    out = None
    for _ in range(warmup):
        out = fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def interleaved_times(fns: dict, *, repeats: int, warmup: int = 1) -> dict:
    """``{name: {"median_s", "times_s"}}`` of each ``fns[name]()``, called in turn, one call of each
    per round, so that a load that comes and goes on a shared machine touches every entry alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: {"median_s": statistics.median(t), "times_s": t} for name, t in times.items()}


def measure(fn, *, repeats: int, warmup: int = 1) -> dict:
    """Median wall time of ``fn()`` over ``repeats`` calls after ``warmup`` calls, and its peak extra memory
    (``None`` where the high-water mark is unavailable).

    The peak is exact only under :data:`MALLOC_ENV` (:func:`exact_memory_accounting`), and the time
    is realistic only without it: there every allocation over 64 KiB maps fresh pages, whose
    first-touch faults slowed the steps of ``bench/step_bench.py`` 1.4-2.4x.
    """
    for _ in range(warmup):
        fn()
    times, peaks = [], []
    for _ in range(repeats):
        with PeakMemory() as memory:
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        peaks.append(memory.extra_bytes)
    return {"median_s": statistics.median(times), "times_s": times,
            "peak_extra_bytes": None if None in peaks else max(peaks)}


@contextlib.contextmanager
def torch_threads(count: int):
    """Runs the block with ``count`` torch intra-op threads, then restores the previous count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
