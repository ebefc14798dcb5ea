"""Markdown tables computed from convergence results (the numbers BENCHMARKS.md quotes).

For each task: every optimizer at its selected value (median final validation metric over
seeds, with the range; test metrics where the task has a test split; median training wall
time; diverged runs), the whole grid, and Sven against the best-tuned Adam and the best-tuned
full-batch L-BFGS (ratio of final losses, and how much sooner in wall time Sven reaches the
other's final loss).
"""

from __future__ import annotations

import math
import statistics

from .optimizers import OPTIMIZERS
from .runner import final_metric, runs_for, select
from .tasks import Task

SVEN = "sven-gram"


def _fmt(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if math.isinf(value):
        return "diverged"
    if value == 0 or 1e-2 <= abs(value) < 1e4:
        return f"{value:.3g}"
    return f"{value:.2e}"


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def first_time_at_or_below(run: dict, target: float, metric: str = "loss") -> float | None:
    """Training wall time at the first evaluation whose validation ``metric`` is <= ``target``."""
    for seconds, value in zip(run["curve"]["seconds"], run["curve"][f"val_{metric}"]):
        if value <= target:
            return seconds
    return None


def selected_runs(runs: list[dict], task: Task, optimizer: str) -> tuple[float | None, list[dict]]:
    """The selected value of ``optimizer`` on ``task`` and its runs (one per seed)."""
    mine = runs_for(runs, task, optimizer)
    chosen = select(mine, task.metric)
    if chosen is None:
        return None, []
    return chosen[0], sorted((r for r in mine if r["value"] == chosen[0]), key=lambda r: r["seed"])


def versus(runs: list[dict], task: Task, other: str = "adam") -> dict | None:
    """Sven (gram, or the task's first backend) against the best-tuned ``other``, seed by seed.

    Returns:
        ``None`` without both; else medians over seeds: ``sven``, ``other`` (final validation
        metric), ``ratio`` (the other's / Sven's median), ``speedups`` (the other's time to first
        reach its own final value over Sven's time to reach it; ``None`` entries where Sven never
        did) and their median ``speedup`` (a seed where Sven never did counts as the worst, 0),
        ``sven_seconds`` and ``other_seconds`` (those times), ``seeds``.
    """
    sven_name = SVEN if SVEN in [r["optimizer"] for r in runs] else f"sven-{task.sven_backends[0]}"
    _, sven = selected_runs(runs, task, sven_name)
    _, adam = selected_runs(runs, task, other)
    adam_by_seed = {r["seed"]: r for r in adam}
    pairs = [(s, adam_by_seed[s["seed"]]) for s in sven if s["seed"] in adam_by_seed]
    if not pairs:
        return None
    speedups, sven_times, adam_times = [], [], []
    for s, a in pairs:
        target = final_metric(a, task.metric)
        reach_adam = first_time_at_or_below(a, target, task.metric)
        reach_sven = first_time_at_or_below(s, target, task.metric) if s["status"] == "ok" else None
        adam_times.append(reach_adam)
        sven_times.append(reach_sven)
        speedups.append(reach_adam / reach_sven if reach_sven else None)
    sven_median = _median([final_metric(s, task.metric) for s, _ in pairs])
    adam_median = _median([final_metric(a, task.metric) for _, a in pairs])
    return {
        "sven_optimizer": sven_name,
        "sven": sven_median, "other": adam_median, "ratio": adam_median / sven_median if sven_median else None,
        "speedup": _median([0.0 if x is None else x for x in speedups]),
        "speedups": speedups, "sven_seconds": sven_times, "other_seconds": adam_times,
        "seeds": [s["seed"] for s, _ in pairs],
    }


def task_table(runs: list[dict], task: Task) -> list[str]:
    """The Markdown lines of one task's summary, grid and Sven-vs-Adam comparison."""
    present = [name for name in OPTIMIZERS if runs_for(runs, task, name)]
    if not present:
        return []
    lines = [f"**{task.title}**", "", *_summary(runs, task, present)]
    lines += ["", f"Grid: median final validation {task.metric} over seeds at each value (selected in bold).", ""]
    lines += _grid(runs, task, present)
    for other in ("adam", "lbfgs-full"):
        comparison = versus(runs, task, other)
        if comparison is not None:
            lines += ["", _comparison(comparison, task.metric, OPTIMIZERS[other].label)]
    return lines


def _summary(runs: list[dict], task: Task, present: list[str]) -> list[str]:
    """The summary table: one row per optimizer at its selected value."""
    metric = task.metric
    first = runs_for(runs, task, present[0])
    splits = sorted({k.split("_", 1)[0] for r in first for k in r["final"]} - {"train"})
    extra = [k for k in ("accuracy",) if any(f"val_{k}" in r["final"] for r in first)]
    test_accuracy = bool(extra) and "test" in splits
    header = ["optimizer", "tuned", "selected", "seeds", f"val {metric} median", "range"]
    if "test" in splits:
        header.append(f"test {metric}")
    header += [f"val {k}" for k in extra] + (["test accuracy"] if test_accuracy else [])
    header += ["wall time (s)", "diverged runs"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in present:
        spec = OPTIMIZERS[name]
        value, chosen = selected_runs(runs, task, name)
        mine = runs_for(runs, task, name)
        finals = [final_metric(r, metric) for r in chosen]
        ok = [r for r in chosen if r["status"] == "ok"]

        def median_of(key: str) -> str:
            return _fmt(_median([r["final"].get(key) for r in ok]))

        row = [spec.label, f"{spec.hyper} at gram's value" if spec.follows else spec.hyper, _fmt(value),
               str(len(chosen)), _fmt(_median(finals)), f"{_fmt(min(finals))} – {_fmt(max(finals))}"]
        if "test" in splits:
            row.append(median_of(f"test_{metric}"))
        row += [median_of(f"val_{k}") for k in extra]
        if test_accuracy:
            row.append(median_of("test_accuracy"))
        row.append(_fmt(_median([r["seconds"] for r in chosen])))
        row.append(f"{sum(r['status'] != 'ok' for r in mine)} of {len(mine)}")
        lines.append("| " + " | ".join(row) + " |")
    return lines


def _grid(runs: list[dict], task: Task, present: list[str]) -> list[str]:
    """One line per tuned optimizer: the median final validation metric at each value of its grid."""
    lines = []
    for name in present:
        spec = OPTIMIZERS[name]
        if spec.follows:
            continue
        mine = runs_for(runs, task, name)
        chosen = select(mine, task.metric)
        cells = []
        for value in sorted({r["value"] for r in mine}):
            median = _median([final_metric(r, task.metric) for r in mine if r["value"] == value])
            cell = f"{value:g}: {_fmt(median)}"
            cells.append(f"**{cell}**" if chosen and value == chosen[0] else cell)
        lines.append(f"- {spec.label} ({spec.hyper}): " + ", ".join(cells))
    return lines


def _comparison(comparison: dict, metric: str, label: str) -> str:
    """The sentence comparing Sven with another optimizer (what :func:`versus` returned)."""
    speedups = ", ".join(_fmt(x) if x is not None else "never" for x in comparison["speedups"])
    sven_seconds = ", ".join(_fmt(x) if x is not None else "never" for x in comparison["sven_seconds"])
    other_seconds = ", ".join(_fmt(x) for x in comparison["other_seconds"])
    median = _fmt(comparison["speedup"]) if comparison["speedup"] else "never"
    return (f"Sven vs best-tuned {label} (seeds {comparison['seeds']}): median final validation {metric} "
            f"{_fmt(comparison['sven'])} vs {_fmt(comparison['other'])}, {label} / Sven = "
            f"{_fmt(comparison['ratio'])}. Time to first reach {label}'s final validation {metric} (same seed): "
            f"Sven {sven_seconds} s, {label} {other_seconds} s; {label}'s time / Sven's: {speedups} "
            f"(median {median}, never counted as the worst).")


def format_report(runs: list[dict], tasks: list[Task]) -> str:
    """The whole report: one section per task that has runs."""
    sections = []
    for task in tasks:
        lines = task_table(runs, task)
        if lines:
            sections.append("\n".join(lines))
    return "\n\n".join(sections) if sections else "no runs"
