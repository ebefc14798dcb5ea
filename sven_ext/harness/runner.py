"""The grid x seeds loop: one JSON line per run, resumable, with hyper-parameter selection.

A results file holds JSON lines of two kinds: ``{"kind": "environment", ...}``, written each
time a run of the harness starts (machine, versions, load, the command), and
``{"kind": "run", ...}``, one per training run, appended and flushed as soon as it finishes.
Starting again with the same file skips every run already in it (same task protocol,
optimizer, value and seed), so an interrupted benchmark resumes where it stopped.

Timing counts the optimizer steps only (forward, backward, update); evaluations are excluded.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Iterable

import torch
from tqdm.auto import tqdm

from ..backends.gram import gram_matrix
from ..demo import warmup_then_decay
from .environment import environment, torch_threads
from .optimizers import OPTIMIZERS, OptimizerSpec
from .tasks import Problem, Task, parameter_count

# A run counts as diverged once its batch loss is not finite or its validation metric grows
# this far above its initial value (the models here start at a validation loss of about 1).
DIVERGENCE_FACTOR = 1e3
EVALS_PER_EPOCH = 8
_UNBOUNDED = 10**9  # epochs of a run that ends at its wall-time budget
# Optimizers that follow another one's selection (the other Sven backends) run this many seeds:
# they repeat the tuned configuration to measure the backend's time, not to tune.
FOLLOWER_SEEDS = 2


def protocol(config: dict, optimizer: str) -> dict:
    """The part of a task's ``config`` that identifies ``optimizer``'s runs: Sven's settings
    (``"sven"``) only for Sven, the full-batch budget (``"full_batch_seconds"``) only for the
    full-batch optimizers, so changing either sets aside only the runs it concerns."""
    spec = OPTIMIZERS[optimizer]
    dropped = set()
    if not optimizer.startswith("sven"):
        dropped.add("sven")
    if not spec.full_batch:
        dropped.add("full_batch_seconds")
    return {key: value for key, value in config.items() if key not in dropped}


def run_id(task: str, config: dict, optimizer: str, value: float, seed: int) -> str:
    """The identity of a run in a results file: task, its protocol (:func:`protocol`), optimizer,
    value, seed."""
    return json.dumps([task, protocol(config, optimizer), optimizer, value, seed], sort_keys=True)


def load_runs(path: Path) -> list[dict]:
    """The ``"run"`` records of a results file (empty if it does not exist)."""
    if not path.exists():
        return []
    with path.open() as handle:
        records = [json.loads(line) for line in handle if line.strip()]
    return [r for r in records if r.get("kind") == "run"]


def final_metric(run: dict, metric: str) -> float:
    """The run's final validation ``metric``; ``inf`` unless the run finished normally."""
    if run["status"] != "ok":
        return math.inf
    value = run["final"].get(f"val_{metric}", math.inf)
    return value if math.isfinite(value) else math.inf


def runs_for(runs: Iterable[dict], task: Task, optimizer: str) -> list[dict]:
    """The runs of ``optimizer`` on ``task`` under the task's current protocol (:func:`protocol`)
    and, for a tuned optimizer, at the values of its current grid (so every optimizer is selected
    from equally many values even when a results file also holds runs of an earlier grid); for a
    follower, at the value its leader selects."""
    runs = list(runs)
    config = json.dumps(protocol(task.config(), optimizer), sort_keys=True)
    spec = OPTIMIZERS[optimizer]
    if spec.follows:
        # A follower counts at the value its leader selects now (its runs at an earlier selection do not).
        chosen = select(runs_for(runs, task, spec.follows), task.metric)
        values = None if chosen is None else {chosen[0]}
    else:
        values = set(spec.grid(task))
    return [r for r in runs if r["task"] == task.name and r["optimizer"] == optimizer
            and json.dumps(protocol(r["task_config"], optimizer), sort_keys=True) == config
            and (values is None or r["value"] in values)]


def select(runs: list[dict], metric: str) -> tuple[float, float] | None:
    """The grid value with the lowest median final validation ``metric`` over seeds.

    Diverged runs count as ``inf``, so a value whose runs diverge for half the seeds or more
    cannot win. Ties go to the smaller value.

    Returns:
        ``(value, median)``, or ``None`` when there are no runs.
    """
    by_value: dict[float, list[float]] = {}
    for run in runs:
        by_value.setdefault(run["value"], []).append(final_metric(run, metric))
    if not by_value:
        return None
    medians = {value: statistics.median(scores) for value, scores in by_value.items()}
    best = min(sorted(medians), key=lambda value: medians[value])
    return best, medians[best]


def grid_for(spec: OptimizerSpec, task: Task, runs: list[dict]) -> tuple[float, ...]:
    """The values ``spec`` runs at: its grid, or the value its ``follows`` optimizer selected.

    An optimizer that follows another one that has no runs on the task tunes its own grid.
    """
    if spec.follows is not None:
        chosen = select(runs_for(runs, task, spec.follows), task.metric)
        if chosen is not None:
            return (chosen[0],)
    return spec.grid(task)


def _spectrum(problem: Problem) -> list[float]:
    """Singular values of the Jacobian of the probe batch's per-sample losses, descending."""
    eigenvalues = torch.linalg.eigvalsh(gram_matrix(problem.model, problem.probe(), check=False))
    return [float(f"{s:.4g}") for s in eigenvalues.clamp_min(0).sqrt().flip(0).tolist()]


class _Curves:
    """What one run records as it goes: validation curves, per-epoch losses, spectra, ranks."""

    def __init__(self, task: Task, problem, steps_per_epoch: int, spectra: bool):
        self.task, self.problem, self.steps_per_epoch, self.spectra = task, problem, steps_per_epoch, spectra
        self.curve: dict[str, list] = {"step": [], "epoch": [], "seconds": []}
        self.per_epoch: dict[str, list] = {"epoch": [], "seconds": [], "train_loss": []}
        self.record = {"spectra": {"epoch": [], "singular_values": []}} if spectra else {}
        self.ranks: list[int] = []

    def evaluate(self, step: int, seconds: float) -> float:
        """Validation metrics after ``step`` steps; returns the task's metric."""
        metrics = self.problem.evaluate("val")
        self.curve["step"].append(step)
        self.curve["epoch"].append(step / self.steps_per_epoch)
        self.curve["seconds"].append(seconds)
        for name, number in metrics.items():
            self.curve.setdefault(f"val_{name}", []).append(number)
        return metrics[self.task.metric]

    def snapshot(self, epoch: int) -> None:
        if self.spectra:
            self.record["spectra"]["epoch"].append(epoch)
            self.record["spectra"]["singular_values"].append(_spectrum(self.problem))

    def end_epoch(self, epoch: int, seconds: float, train_loss: float) -> None:
        self.per_epoch["epoch"].append(epoch)
        self.per_epoch["seconds"].append(seconds)
        self.per_epoch["train_loss"].append(train_loss)


def train(task: Task, spec: OptimizerSpec, value: float, seed: int, *, evals_per_epoch: int = EVALS_PER_EPOCH,
          spectra: bool = False, progress: bool = True) -> dict:
    """Trains one run and returns its record (without the ``kind`` field).

    Args:
        task: the problem and protocol.
        spec: the optimizer.
        value: its tuned hyper-parameter.
        seed: initial weights and batch order.
        evals_per_epoch: validation evaluations per epoch (for curves against wall time).
        spectra: record the probe batch's Jacobian singular values after every epoch.
        progress: show a progress bar of the steps.
    """
    problem = task.build(seed)
    stepper = spec.build(problem, value, task)
    generator = torch.Generator().manual_seed(seed)
    if spec.full_batch:
        # One call on the whole training set per "epoch", as many as the budget allows.
        epochs, budget, steps_per_epoch = _UNBOUNDED, task.full_batch_seconds, 1
        batches = lambda: [problem.full_batch()]  # noqa: E731
    else:
        epochs, budget, steps_per_epoch = task.epochs, task.budget_seconds, problem.steps_per_epoch()
        batches = lambda: problem.batches(generator)  # noqa: E731
    schedule = None
    if task.schedule and spec.scheduled:
        warmup = steps_per_epoch if spec.warmup else 0
        schedule = torch.optim.lr_scheduler.LambdaLR(stepper.optimizer,
                                                     warmup_then_decay(warmup, epochs * steps_per_epoch))
    curves = _Curves(task, problem, steps_per_epoch,
                     spectra and problem.probe() is not None and not spec.full_batch)
    bar = tqdm(total=None if budget else epochs * steps_per_epoch, desc=f"  {spec.name} {value:g} seed {seed}",
               leave=False, disable=not progress, dynamic_ncols=True)
    try:
        status, reason, step, seconds, evaluations = _epochs(
            curves, stepper, schedule, batches, epochs, budget, max(1, steps_per_epoch // evals_per_epoch), bar)
    finally:
        bar.close()
    final = {name: values[-1] for name, values in curves.curve.items() if name.startswith("val_")}
    if status == "ok":
        for split in problem.splits[1:]:
            final.update({f"{split}_{name}": number for name, number in problem.evaluate(split).items()})
        final["train_loss"] = curves.per_epoch["train_loss"][-1]
    record = curves.record
    record.update({
        "task": task.name, "task_config": task.config(), "optimizer": spec.name, "hyper": spec.hyper,
        "value": value, "seed": seed, "status": status, "reason": reason,
        "parameters": parameter_count(problem.model), "steps": step, "seconds": seconds,
        "final": final, "epochs": curves.per_epoch, "curve": curves.curve,
    })
    if curves.ranks:
        record["ranks"] = curves.ranks
    if evaluations:
        record["safeguard_evaluations"] = evaluations  # closure evaluations of the safeguard, all steps
    return record


def _epochs(curves: _Curves, stepper, schedule, batches, epochs: int, budget: float | None, eval_every: int,
            bar) -> tuple[str, str | None, int, float, int]:
    """The training loop of :func:`train`: ``(status, reason, steps, seconds, safeguard evaluations)``.
    A non-finite batch loss, a validation metric beyond ``DIVERGENCE_FACTOR`` times the initial one or
    an error from the step ends the run as diverged."""
    metric = curves.task.metric
    initial = curves.evaluate(0, 0.0)
    curves.snapshot(0)
    status, reason = "ok", None
    seconds, step, evaluations = 0.0, 0, 0
    info = lambda: getattr(stepper.optimizer, "last_info", {})  # noqa: E731
    try:
        for epoch in range(1, epochs + 1):
            weighted, examples = 0.0, 0
            for batch, size in batches():
                start = time.perf_counter()
                loss = stepper.step(batch)
                if schedule is not None:
                    schedule.step()
                seconds += time.perf_counter() - start
                evaluations += info().get("safeguard", {}).get("trials", 0)
                step += 1
                weighted += loss * size
                examples += size
                bar.update()
                if not math.isfinite(loss):
                    status, reason = "diverged", f"non-finite batch loss at step {step}"
                    break
                if step % eval_every == 0:
                    latest = curves.evaluate(step, seconds)
                    if not math.isfinite(latest) or latest > DIVERGENCE_FACTOR * initial:
                        status, reason = "diverged", f"validation {metric} {latest:.3g} at step {step}"
                        break
                    bar.set_postfix({f"val_{metric}": f"{latest:.3e}"}, refresh=False)
                if budget is not None and seconds >= budget:
                    break
            curves.end_epoch(epoch, seconds, weighted / max(examples, 1))
            if status != "ok":
                break
            if curves.curve["step"][-1] != step:
                curves.evaluate(step, seconds)
            curves.snapshot(epoch)
            if "rank" in info():
                curves.ranks.append(info()["rank"])
            if budget is not None and seconds >= budget:
                break
    except (RuntimeError, ValueError, FloatingPointError, torch.linalg.LinAlgError) as error:
        status, reason = "diverged", f"{type(error).__name__} at step {step}: {str(error).splitlines()[0][:200]}"
    return status, reason, step, seconds, evaluations


def run(tasks: list[Task], optimizers: list[OptimizerSpec], path: Path, *, command: str, threads: int = 1,
        evals_per_epoch: int = EVALS_PER_EPOCH, progress: bool = True, stream=None) -> list[dict]:
    """Runs every (task, optimizer, grid value, seed) not yet in ``path``; appends each to it.

    Spectra are recorded for the first seed of each task. ``torch`` runs on ``threads``
    intra-op threads (restored afterwards): the models are small, and on a shared machine more
    threads mostly wait on each other.

    Returns:
        Every run record in ``path`` afterwards.
    """
    stream = sys.stderr if stream is None else stream
    path.parent.mkdir(parents=True, exist_ok=True)
    done = {run_id(r["task"], r["task_config"], r["optimizer"], r["value"], r["seed"]) for r in load_runs(path)}
    with torch_threads(threads), path.open("a") as handle:
        handle.write(json.dumps({"kind": "environment", "command": command, **environment()}) + "\n")
        handle.flush()
        outer = tqdm(total=_planned(tasks, optimizers), desc="runs", disable=not progress, dynamic_ncols=True,
                     file=stream)
        for task in tasks:
            for spec in optimizers:
                if not spec.applies_to(task):
                    continue
                for value in grid_for(spec, task, load_runs(path)):
                    for seed in seeds_for(spec, task):
                        outer.set_description(f"{task.name} {spec.name}")
                        key = run_id(task.name, task.config(), spec.name, value, seed)
                        if key not in done:
                            result = train(task, spec, value, seed, evals_per_epoch=evals_per_epoch,
                                           spectra=seed == task.seeds[0], progress=progress)
                            handle.write(json.dumps({"kind": "run", **result}) + "\n")
                            handle.flush()
                            done.add(key)
                        outer.update()
        outer.close()
    return load_runs(path)


def seeds_for(spec: OptimizerSpec, task: Task) -> tuple[int, ...]:
    """The seeds ``spec`` runs: all of the task's, or the first :data:`FOLLOWER_SEEDS` for a follower."""
    return task.seeds[:FOLLOWER_SEEDS] if spec.follows else task.seeds


def _planned(tasks: list[Task], optimizers: list[OptimizerSpec]) -> int:
    return sum(len(seeds_for(spec, task)) * (1 if spec.follows else len(spec.grid(task)))
               for task in tasks for spec in optimizers if spec.applies_to(task))

