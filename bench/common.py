"""Shared benchmark plumbing: medians, peak memory, environment block, JSON output.

The measuring itself lives in :mod:`sven_ext.harness.environment` (so ``python -m sven_ext bench``
has it in an installed wheel); this module adds the results folder of the scripts in ``bench/``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from sven_ext.harness.environment import PeakMemory, environment, measure, median_seconds, status_kib
from sven_ext.harness.environment import exact_memory_accounting as _exact_memory_accounting

RESULTS = Path(__file__).resolve().parent / "results"


def exact_memory_accounting() -> None:
    """Re-executes this script with the allocator settings of exact peak-memory accounting unless in force."""
    _exact_memory_accounting(sys.argv)


def write_json(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    path.write_text(json.dumps({"environment": environment(), **payload}, indent=2) + "\n")
    return path


__all__ = ["RESULTS", "PeakMemory", "environment", "measure", "median_seconds", "status_kib", "exact_memory_accounting", "write_json"]
