"""``python -m sven_ext bench <part>``: convergence, scaling, plots and report.

    python -m sven_ext bench convergence --quick            # every task and optimizer, toy sizes
    python -m sven_ext bench convergence --tasks regression_1d --out convergence.jsonl
    python -m sven_ext bench report convergence.jsonl
    python -m sven_ext bench plots convergence.jsonl --scaling scaling.jsonl
    python -m sven_ext bench scaling --quick

Results go to JSON lines, in the current directory unless ``--out`` says otherwise (the
project's recorded results in bench/results/ are only written when named); running the
same command again resumes (finished runs are skipped).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``bench`` subcommand's parts and their flags."""
    from .optimizers import OPTIMIZER_NAMES
    from .tasks import TASK_NAMES

    parts = parser.add_subparsers(dest="part", metavar="{convergence,scaling,report,plots}", required=True)

    convergence = parts.add_parser("convergence", help="train every task x optimizer x grid value x seed",
                                   description="Train every task x optimizer x grid value x seed; "
                                               "append one JSON line per run (resumable).")
    convergence.add_argument("--tasks", nargs="+", choices=TASK_NAMES, default=None,
                             help="tasks (default: all)")
    convergence.add_argument("--optimizers", nargs="+", choices=OPTIMIZER_NAMES, default=None,
                             help="optimizers (default: all)")
    convergence.add_argument("--quick", action="store_true", help="toy sizes, 2 seeds: a few minutes in all")
    convergence.add_argument("--out", type=Path, default=None,
                             help="results file (default: convergence.jsonl, or convergence_quick.jsonl, "
                                  "in the current directory)")
    convergence.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    convergence.add_argument("--no-progress", action="store_true", help="no progress bars")
    convergence.set_defaults(bench=_run_convergence)

    scaling = parts.add_parser("scaling", help="step time and peak memory vs parameters and batch size",
                               description="Step time and peak memory of each Sven backend and of Adam, "
                                           "against parameter count and against batch size.")
    scaling.add_argument("--quick", action="store_true", help="small sizes only")
    scaling.add_argument("--out", type=Path, default=None,
                         help="results file (default: scaling.jsonl, or scaling_quick.jsonl, in the current directory)")
    scaling.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    scaling.add_argument("--repeats", type=int, default=3, help="timed steps per point (median reported)")
    scaling.add_argument("--max-seconds", type=float, default=60.0,
                         help="a method whose step took longer is not run at larger sizes")
    scaling.add_argument("--no-progress", action="store_true", help="no progress bars")
    scaling.set_defaults(bench=_run_scaling)

    report = parts.add_parser("report", help="Markdown tables from results files",
                              description="Print Markdown tables computed from convergence results.")
    report.add_argument("results", type=Path, nargs="+", help="convergence results files (JSON lines)")
    report.add_argument("--tasks", nargs="+", choices=TASK_NAMES, default=None, help="tasks (default: all)")
    report.add_argument("--quick", action="store_true", help="the files hold --quick results")
    report.add_argument("--out", type=Path, default=None, help="also write the report to this file")
    report.set_defaults(bench=_run_report)

    plots = parts.add_parser("plots", help="PNG figures from results files",
                             description="Loss curves per task, singular-value spectra and scaling figures.")
    plots.add_argument("results", type=Path, nargs="*", help="convergence results files (JSON lines)")
    plots.add_argument("--scaling", type=Path, default=None, help="scaling results file")
    plots.add_argument("--tasks", nargs="+", choices=TASK_NAMES, default=None, help="tasks (default: all)")
    plots.add_argument("--quick", action="store_true", help="the files hold --quick results")
    plots.add_argument("--out-dir", type=Path, default=Path("."),
                       help="where the PNGs go (default: the current directory)")
    plots.set_defaults(bench=_run_plots)


def main(args: argparse.Namespace) -> int:
    """Runs the ``bench`` part chosen on the command line; returns the exit status."""
    return args.bench(args)


def _command() -> str:
    return "python -m sven_ext " + shlex.join(sys.argv[1:])


def _default_results(name: str, quick: bool) -> Path:
    return Path(f"{name}_quick.jsonl" if quick else f"{name}.jsonl")


def _run_convergence(args: argparse.Namespace) -> int:
    from .optimizers import get_optimizers
    from .runner import run
    from .tasks import get_tasks

    tasks = get_tasks(args.tasks, quick=args.quick)
    optimizers = get_optimizers(args.optimizers)
    path = args.out or _default_results("convergence", args.quick)
    runs = run(tasks, optimizers, path, command=_command(), threads=args.threads, progress=not args.no_progress)
    from .report import format_report

    print(format_report(runs, tasks))
    print(f"results: {path}")
    return 0


def _run_scaling(args: argparse.Namespace) -> int:
    from .scaling import run_scaling

    path = args.out or _default_results("scaling", args.quick)
    run_scaling(path, quick=args.quick, threads=args.threads, repeats=args.repeats, command=_command(),
                progress=not args.no_progress, max_seconds=args.max_seconds)
    print(f"results: {path}")
    return 0


def _run_report(args: argparse.Namespace) -> int:
    from .report import format_report
    from .runner import load_runs
    from .tasks import get_tasks

    runs = [r for path in args.results for r in load_runs(path)]
    names = args.tasks or sorted({r["task"] for r in runs}, key=_task_order)
    text = format_report(runs, get_tasks(names, quick=args.quick))
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


def _run_plots(args: argparse.Namespace) -> int:
    from . import plots
    from .runner import load_runs
    from .tasks import get_tasks

    written = []
    runs = [r for path in args.results for r in load_runs(path)]
    if runs:
        names = args.tasks or sorted({r["task"] for r in runs}, key=_task_order)
        written += plots.convergence_plots(runs, get_tasks(names, quick=args.quick), args.out_dir)
    if args.scaling is not None:
        written += plots.scaling_plots(args.scaling, args.out_dir)
    for path in written:
        print(f"wrote {path}")
    return 0


def _task_order(name: str) -> int:
    from .tasks import TASK_NAMES

    return TASK_NAMES.index(name) if name in TASK_NAMES else len(TASK_NAMES)
