"""Shared benchmark plumbing: medians, peak memory, environment block, JSON output.

The measuring itself lives in :mod:`sven_ext.harness.environment` (so ``python -m sven_ext bench``
has it in an installed wheel); this module adds the results folder of the scripts in ``bench/``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from sven_ext.harness.environment import (PeakMemory, environment, interleaved_times, measure, median_seconds,
                                          status_kib)
from sven_ext.harness.environment import exact_memory_accounting as _exact_memory_accounting

RESULTS = Path(__file__).resolve().parent / "results"


def exact_memory_accounting() -> None:
    """Re-executes this script with the allocator settings of exact peak-memory accounting unless in force."""
    _exact_memory_accounting(sys.argv)


MEMORY_PASS = "--memory-pass"


def memory_pass_file() -> str | None:
    """In the memory pass (see :func:`exact_peaks`): the file its peaks go to, after re-executing
    under exact memory accounting; else ``None``."""
    if MEMORY_PASS not in sys.argv:
        return None
    exact_memory_accounting()
    return sys.argv[sys.argv.index(MEMORY_PASS) + 1]


def exact_peaks(results: dict) -> None:
    """Sets each result's ``peak_extra_bytes`` from a second run of this script under exact memory
    accounting, which the script writes with :func:`write_peaks`; that run's median time goes to
    ``median_s_exact_accounting``, to show what the allocator setting costs.

    Two passes because no single allocator setting serves both: exact accounting maps fresh pages
    for every allocation over 64 KiB (which slows allocation-heavy steps), the default one hides peaks.
    """
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "peaks.json"
        subprocess.run([sys.executable, *sys.argv, MEMORY_PASS, str(path)], check=True, stdout=subprocess.DEVNULL)
        measured = json.loads(path.read_text())
    for key, (peak, seconds) in measured.items():
        results[key]["peak_extra_bytes"] = peak
        results[key]["median_s_exact_accounting"] = seconds


def write_peaks(path: str, results: dict) -> None:
    Path(path).write_text(json.dumps({key: (r["peak_extra_bytes"], r["median_s"]) for key, r in results.items()}))


def write_json(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    path.write_text(json.dumps({"environment": environment(), **payload}, indent=2) + "\n")
    return path


__all__ = ["RESULTS", "PeakMemory", "environment", "interleaved_times", "measure", "median_seconds", "status_kib",
           "exact_memory_accounting",
           "exact_peaks", "memory_pass_file", "write_json", "write_peaks"]
