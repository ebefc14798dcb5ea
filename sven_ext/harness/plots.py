"""Figures from results files (matplotlib, drawn on bare ``Figure`` objects: no pyplot state).

- ``convergence_<task>.png``: validation metric against epoch and against training wall time,
  each optimizer at its selected value: median over seeds (line) and the range (band); the
  full-batch optimizers against wall time only.
- ``spectra.png``: singular values of the probe batch's Jacobian after each epoch, Sven
  against Adam, first seed, one row per task.
- ``scaling.png``: step time and peak memory against parameter count and against batch size.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .optimizers import OPTIMIZERS
from .report import selected_runs
from .runner import runs_for
from .tasks import Task


def _figure(rows: int, cols: int, width: float, height: float):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
    return fig, np.atleast_2d(fig.subplots(rows, cols, squeeze=False))


def _median_band(runs: list[dict], key: str, metric: str):
    """Per evaluation index: median x (``key``), median, min and max of the metric over the seeds.

    Seeds of one configuration evaluate at the same steps; runs cut short (diverged, or a
    time budget) are used up to their length.
    """
    curves = [r["curve"] for r in runs if r["status"] == "ok"]
    if not curves:
        return None
    length = min(len(c["step"]) for c in curves)
    xs = np.array([c[key][:length] for c in curves], dtype=float)
    ys = np.array([c[f"val_{metric}"][:length] for c in curves], dtype=float)
    return np.median(xs, axis=0), np.median(ys, axis=0), ys.min(axis=0), ys.max(axis=0)


def convergence_plots(runs: list[dict], tasks: list[Task], out_dir: Path) -> list[Path]:
    """One PNG per task with runs; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for task in tasks:
        present = [name for name in OPTIMIZERS if runs_for(runs, task, name)]
        if not present:
            continue
        fig, axes = _figure(1, 2, 5.6, 4.2)
        by_epoch, by_time = axes[0]
        for name in present:
            value, chosen = selected_runs(runs, task, name)
            for axis, key in ((by_epoch, "epoch"), (by_time, "seconds")):
                if key == "epoch" and OPTIMIZERS[name].full_batch:
                    continue  # its steps are calls on the whole set, not passes of mini-batches
                band = _median_band(chosen, key, task.metric)
                if band is None:
                    continue
                x, median, low, high = band
                line, = axis.plot(x, median, label=f"{OPTIMIZERS[name].label} ({OPTIMIZERS[name].hyper} {value:g})",
                                  lw=2.0 if name.startswith("sven") else 1.2)
                axis.fill_between(x, low, high, color=line.get_color(), alpha=0.15, lw=0)
        x_label = "step (full batch)" if task.batch_size is None else "epoch"
        by_epoch.set(xlabel=x_label, ylabel=f"validation {task.metric}", yscale="log")
        by_time.set(xlabel="training wall time (s)", yscale="log")
        for axis in (by_epoch, by_time):
            axis.grid(True, which="both", alpha=0.3)
        by_time.legend(fontsize=7)
        seeds = len(task.seeds)
        fig.suptitle(f"{task.title}\nmedian over {seeds} seeds (band: min to max), each optimizer at its selected value",
                     fontsize=9)
        path = out_dir / f"convergence_{task.name}.png"
        fig.savefig(path, dpi=110)
        written.append(path)
    spectra = spectra_plot(runs, tasks, out_dir / "spectra.png")
    return written + ([spectra] if spectra else [])


def spectra_plot(runs: list[dict], tasks: list[Task], path: Path) -> Path | None:
    """Singular values over training, Sven (gram) and Adam at their selected values, first seed."""
    panels = []
    for task in tasks:
        row = []
        for name in ("sven-gram", "adam"):
            _, chosen = selected_runs(runs, task, name)
            with_spectra = [r for r in chosen if r.get("spectra", {}).get("singular_values")]
            if with_spectra:
                row.append((name, with_spectra[0]))
        if row:
            panels.append((task, row))
    if not panels:
        return None
    fig, axes = _figure(len(panels), 2, 4.6, 3.2)
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    for (task, row), axis_row in zip(panels, axes):
        for axis, (name, run) in zip(axis_row, row):
            epochs = run["spectra"]["epoch"]
            for epoch, values in zip(epochs, run["spectra"]["singular_values"]):
                axis.semilogy(np.arange(1, len(values) + 1), np.maximum(values, 1e-16),
                              color=cmap(epoch / max(epochs[-1], 1)), lw=1.0)
            axis.set_title(f"{task.name}: {OPTIMIZERS[name].label} ({OPTIMIZERS[name].hyper} {run['value']:g}), "
                           f"seed {run['seed']}", fontsize=8)
            axis.set(xlabel="index j", ylabel="singular value s_j")
            axis.grid(True, which="both", alpha=0.3)
        for axis in axis_row[len(row):]:
            axis.set_axis_off()
    fig.suptitle("Jacobian of the per-sample losses of a fixed batch: spectrum after each epoch "
                 "(dark: start, yellow: end)", fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def scaling_plots(results: Path, out_dir: Path) -> list[Path]:
    """``scaling.png`` from a scaling results file: time and memory vs parameters and vs batch."""
    with results.open() as handle:
        points = [p for p in map(json.loads, filter(str.strip, handle)) if p.get("kind") == "point"]
    if not points:
        return []
    fig, axes = _figure(2, 2, 5.2, 3.8)
    for col, sweep, x_key, x_label in ((0, "parameters", "parameters", "parameters"),
                                       (1, "batch", "batch", "batch size (rows)")):
        mine = [p for p in points if p["sweep"] == sweep and p.get("status") == "ok"]
        for method in sorted({p["method"] for p in mine}, key=lambda m: (m != "adam", m)):
            series = sorted((p for p in mine if p["method"] == method), key=lambda p: p[x_key])
            x = [p[x_key] for p in series]
            axes[0][col].loglog(x, [p["median_s"] for p in series], marker="o", ms=3, label=method)
            # Log axes: a step that needed no memory beyond what the process held plots at 1 KiB.
            memory = [(p[x_key], max(p["peak_extra_bytes"], 1024) / 2**20) for p in series
                      if p["peak_extra_bytes"] is not None]
            if memory:
                axes[1][col].loglog(*zip(*memory), marker="o", ms=3, label=method)
        fixed = mine[0]["fixed"] if mine else ""
        axes[0][col].set(ylabel="step time (s), median")
        axes[0][col].set_title(f"vs {x_label}\n({fixed})", fontsize=9)
        axes[1][col].set(xlabel=x_label, ylabel="peak extra resident memory (MiB)")
        for row in range(2):
            axes[row][col].grid(True, which="both", alpha=0.3)
            axes[row][col].legend(fontsize=7)
    fig.suptitle("One optimizer step: Sven backends and Adam (CPU)", fontsize=9)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "scaling.png"
    fig.savefig(path, dpi=110)
    return [path]
