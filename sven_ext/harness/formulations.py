"""How Sven's fixed settings were chosen on two tasks: short sweeps on one seed, recorded.

    python -m sven_ext.harness.formulations --task digits_regression --out bench/results/convergence_digits_formulations.jsonl
    python -m sven_ext.harness.formulations --task regression_1d --out bench/results/convergence_regression_1d_formulations.jsonl
    python -m sven_ext.harness.formulations --task digits_ce --out bench/results/convergence_digits_ce_formulations.jsonl

The convergence protocol gives Sven one fixed formulation per task (``Task.sven``: its rows, ``k``
and ``rtol``) and tunes only its learning rate. On the tasks below that formulation was chosen
from a few, each run with Sven's learning-rate grid on the task's first seed only, next to Adam
on the same seed; this command reruns such a sweep into an ordinary results file (resumable:
finished runs are skipped) and prints the table. The sweep is tuning that only Sven gets, so
BENCHMARKS.md reports it.

- ``digits_regression``, the rows and ``k`` (``rtol`` as the task's): ``losses``, one row per
  image (its mean squared error over the 10 outputs, 32 rows a step) with ``k = 16`` (the first
  pass) or ``32`` (every row); ``residuals``, ten signed rows per image (output minus one-hot
  target, 320 rows a step) with ``k = 64``, ``None`` (half the rows: 160) or ``320`` (every row;
  ``rtol`` still truncates).
- ``regression_1d``, the cut-off ``rtol`` (``k = 16``, the first pass's ``rtol = 1e-3``
  included): a smaller ``rtol`` keeps more of each step's singular directions.
- ``digits_ce``, the rows: per-sample cross-entropies (``k = 16``, the task's) or the
  generalised Gauss-Newton rows of :func:`sven_ext.harness.tasks.fisher_rows` (ten per image,
  ``k = 32`` or half the rows).
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
from pathlib import Path

from .optimizers import OPTIMIZERS
from .report import _fmt
from .runner import final_metric, load_runs, run, runs_for
from .tasks import Task, get_tasks

# Per task: the changes to ``Task.sven`` that its sweep runs.
FORMULATIONS: dict[str, tuple[dict, ...]] = {
    "digits_regression": (
        {"rows": "losses", "k": 16}, {"rows": "losses", "k": 32}, {"rows": "residuals", "k": 64},
        {"rows": "residuals", "k": None}, {"rows": "residuals", "k": 320},
    ),
    "regression_1d": ({"rtol": 1e-3}, {"rtol": 1e-4}, {"rtol": 1e-5}, {"rtol": 1e-6}),
    "digits_ce": ({"rows": "losses", "k": 16}, {"rows": "fisher", "k": 32}, {"rows": "fisher", "k": None}),
}


def variants(base: Task) -> list[Task]:
    """``base`` on its first seed, once per formulation of its sweep."""
    return [dataclasses.replace(base, seeds=base.seeds[:1], sven={**base.sven, **change})
            for change in FORMULATIONS[base.name]]


def _describe(value) -> str:
    return "half" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def table(runs: list[dict], base: Task) -> str:
    """Markdown: final validation loss of each formulation (and of Adam) at each grid value."""
    keys = list(FORMULATIONS[base.name][0])
    lines = [f"| optimizer | {' | '.join(keys)} | final validation {base.metric} on seed {base.seeds[0]}, by value |",
             "|---|" + "---|" * len(keys) + "---|"]
    first = dataclasses.replace(base, seeds=base.seeds[:1])
    for task in variants(base):
        mine = sorted(runs_for(runs, task, "sven-gram"), key=lambda r: r["value"])
        cells = ", ".join(f"lr {r['value']:g}: {_fmt(final_metric(r, task.metric))}" for r in mine)
        current = " (the task's)" if task.sven == base.sven else ""
        settings = " | ".join(_describe(task.sven[key]) for key in keys)
        lines.append(f"| Sven (gram){current} | {settings} | {cells} |")
    adam = sorted((r for r in runs_for(runs, first, "adam") if r["seed"] == base.seeds[0]), key=lambda r: r["value"])
    cells = ", ".join(f"lr {r['value']:g}: {_fmt(final_metric(r, base.metric))}" for r in adam)
    lines.append(f"| Adam |{' – |' * len(keys)} {cells} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=sorted(FORMULATIONS), default="digits_regression")
    parser.add_argument("--out", type=Path, required=True, help="results file (JSON lines)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    args = parser.parse_args(argv)
    base = get_tasks([args.task])[0]
    out = args.out
    command = "python -m sven_ext.harness.formulations " + shlex.join(sys.argv[1:] if argv is None else argv)
    run(variants(base), [OPTIMIZERS["sven-gram"]], out, command=command, threads=args.threads, progress=False)
    run([dataclasses.replace(base, seeds=base.seeds[:1])], [OPTIMIZERS["adam"]], out, command=command,
        threads=args.threads, progress=False)
    print(table(load_runs(out), base))
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
