"""How Sven's rows were chosen for ``digits_regression``: a short sweep on one seed, recorded.

    python -m sven_ext.harness.formulations --out bench/results/convergence_digits_formulations.jsonl

The convergence protocol gives Sven one fixed formulation per task (``Task.sven``). On the
digits label regression that formulation was chosen from the few below, each run with Sven's
default learning-rate grid on the task's first seed only, next to Adam on the same seed; this
command reruns that sweep into an ordinary results file (resumable: finished runs are skipped)
and prints the table. The sweep is tuning that only Sven gets, so BENCHMARKS.md reports it.

Formulations (``rows``, ``k``):

- ``losses``: one row per image, its mean squared error over the 10 outputs (32 rows a step);
  ``k = 16`` (the first pass) or ``k = 32`` (every row).
- ``residuals``: ten signed rows per image, output minus one-hot target (320 rows a step);
  ``k = 64``, ``None`` (half the rows: 160) or ``320`` (every row; ``rtol`` still truncates).
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

FORMULATIONS: tuple[tuple[str, int | None], ...] = (
    ("losses", 16), ("losses", 32), ("residuals", 64), ("residuals", None), ("residuals", 320),
)
TASK = "digits_regression"


def variants(base: Task) -> list[Task]:
    """``base`` on its first seed, once per formulation (``rtol`` as in ``base``)."""
    return [dataclasses.replace(base, seeds=base.seeds[:1],
                                sven={"k": k, "rtol": base.sven.get("rtol", 1e-3), "rows": rows})
            for rows, k in FORMULATIONS]


def table(runs: list[dict], base: Task) -> str:
    """Markdown: final validation loss of each formulation (and of Adam) at each grid value."""
    lines = [f"| optimizer | rows | k | final validation {base.metric} on seed {base.seeds[0]}, by value |",
             "|---|---|---|---|"]
    first = dataclasses.replace(base, seeds=base.seeds[:1])
    for task, (rows, k) in zip(variants(base), FORMULATIONS):
        mine = sorted(runs_for(runs, task, "sven-gram"), key=lambda r: r["value"])
        cells = ", ".join(f"lr {r['value']:g}: {_fmt(final_metric(r, task.metric))}" for r in mine)
        current = " (the task's)" if task.sven == base.sven else ""
        lines.append(f"| Sven (gram){current} | {rows} | {'half' if k is None else k} | {cells} |")
    adam = sorted((r for r in runs_for(runs, first, "adam") if r["seed"] == base.seeds[0]), key=lambda r: r["value"])
    cells = ", ".join(f"lr {r['value']:g}: {_fmt(final_metric(r, base.metric))}" for r in adam)
    lines.append(f"| Adam | – | – | {cells} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/convergence_digits_formulations.jsonl"))
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    args = parser.parse_args(argv)
    base = get_tasks([TASK])[0]
    command = "python -m sven_ext.harness.formulations " + shlex.join(sys.argv[1:] if argv is None else argv)
    run(variants(base), [OPTIMIZERS["sven-gram"]], args.out, command=command, threads=args.threads,
        progress=False)
    run([dataclasses.replace(base, seeds=base.seeds[:1])], [OPTIMIZERS["adam"]], args.out, command=command,
        threads=args.threads, progress=False)
    print(table(load_runs(args.out), base))
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
