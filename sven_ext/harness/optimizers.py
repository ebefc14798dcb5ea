"""The optimizers compared, each with an equal-size grid of one hyper-parameter.

Every optimizer tunes exactly one value (its learning rate, or for Polyak-SGD the cap on its
step size, for one-iteration L-BFGS the initial step length of its line search, for full-batch
L-BFGS its history size) over :data:`GRID_SIZE` values; everything else is fixed and listed
here. The Sven backends compute the same update (``dense`` and ``gram`` exactly, ``sketch`` approximately): ``sven-gram`` is
tuned, the other backends run at the value it selected (``follows``), which measures what the
backend changes rather than spending the budget on re-tuning the same step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..optimizer import Sven
from ..polyak import PolyakSGD
from .tasks import Problem, Task

GRID_SIZE = 4

# Default grids (a task may override one with another of the same size). Spacing ~3x; the
# ranges were placed around the values each optimizer is commonly run at on small MLPs.
DEFAULT_GRIDS: dict[str, tuple[float, ...]] = {
    "sven": (0.3, 0.6, 1.0, 1.5),
    "adam": (1e-3, 3e-3, 1e-2, 3e-2),
    "sgd": (3e-3, 1e-2, 3e-2, 1e-1),
    "rmsprop": (3e-4, 1e-3, 3e-3, 1e-2),
    "polyak": (0.1, 0.3, 1.0, 3.0),
    "lbfgs": (0.1, 0.3, 1.0, 3.0),
    "lbfgs_full": (10, 20, 50, 100),
}

SGD_MOMENTUM = 0.9
LBFGS_HISTORY = 10
# Full-batch L-BFGS: iterations per call of ``step`` (each call is one point of its curve; the run
# makes calls until its wall-time budget is spent). Its tolerances are far below float32 rounding,
# so that it stops only when the budget does (or its line search can no longer move).
LBFGS_FULL_ITERATIONS = 20
LBFGS_FULL_TOLERANCES = dict(tolerance_grad=1e-12, tolerance_change=1e-15)


class Stepper:
    """One optimizer bound to one problem.

    Attributes:
        optimizer: the ``torch.optim.Optimizer`` (its ``param_groups[i]["lr"]`` is what schedules scale).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, step: Callable[[object], float]):
        self.optimizer = optimizer
        self._step = step

    def step(self, batch) -> float:
        """One step on ``batch``; returns the batch's mean loss before the step."""
        return self._step(batch)


def _first_order(optimizer_class, **fixed):
    def build(problem: Problem, value: float, task: Task) -> Stepper:
        del task
        optimizer = optimizer_class(problem.model.parameters(), lr=value, **fixed)

        def step(batch):
            optimizer.zero_grad()
            loss = problem.loss(batch)
            loss.backward()
            optimizer.step()
            return float(loss.detach())

        return Stepper(optimizer, step)

    return build


def _closure_optimizer(optimizer_class, **fixed):
    """Optimizers whose ``step`` takes a closure that computes the loss and its gradient."""

    def build(problem: Problem, value: float, task: Task) -> Stepper:
        del task
        optimizer = optimizer_class(problem.model.parameters(), lr=value, **fixed)
        return _gradient_stepper(optimizer, problem)

    return build


def _full_batch_lbfgs(problem: Problem, value: float, task: Task) -> Stepper:
    """``torch.optim.LBFGS`` on the whole training set: strong-Wolfe line search, history ``value``."""
    del task
    optimizer = torch.optim.LBFGS(problem.model.parameters(), lr=1.0, max_iter=LBFGS_FULL_ITERATIONS,
                                  history_size=int(value), line_search_fn="strong_wolfe", **LBFGS_FULL_TOLERANCES)
    return _gradient_stepper(optimizer, problem)


def _gradient_stepper(optimizer: torch.optim.Optimizer, problem: Problem) -> Stepper:
    """A torch.optim optimizer's step on a batch, with the closure that optimizers like L-BFGS call again."""

    def step(batch):
        def closure():
            optimizer.zero_grad()
            loss = problem.loss(batch)
            loss.backward()
            return loss

        return float(optimizer.step(closure).detach())

    return Stepper(optimizer, step)


def _sven(backend: str):
    def build(problem: Problem, value: float, task: Task) -> Stepper:
        settings = dict(task.sven)
        rows = settings.pop("rows", "losses")  # what the closure returns, not a Sven argument
        if backend == "functional":
            settings.setdefault("functional_mode", "exact")
        optimizer = Sven(problem.model, lr=value, backend=backend, **settings)

        def step(batch):
            losses = optimizer.step(lambda: problem.rows(batch, rows))
            # Mini-batches: the mean of the per-sample losses (for residual rows, each sample's sum
            # of squares, which the problem scales to its loss); full batch: their sum (the loss).
            return float(losses.sum()) if task.batch_size is None else float(losses.mean())

        return Stepper(optimizer, step)

    return build


@dataclass(frozen=True)
class OptimizerSpec:
    """An optimizer of the comparison.

    Attributes:
        name: identifier (command line, results).
        label: legend label.
        grid_name: which grid it tunes (a key of :data:`DEFAULT_GRIDS` and of ``Task.grids``).
        hyper: what the grid value is, in words.
        build: ``build(problem, value, task) -> Stepper``.
        scheduled: follows the task's schedule (where the task has one): a linear decay to 0.
        warmup: the schedule starts with a one-epoch linear warm-up.
        full_batch: each step is a call on the whole training set, the run ends at the task's
            ``full_batch_seconds`` (its ``epochs`` and batches do not apply).
        backend: the Sven backend (``None`` for the others).
        follows: run only at the value this other optimizer selected, instead of tuning.
        fixed: the settings it does not tune, for the record.
    """

    name: str
    label: str
    grid_name: str
    hyper: str
    build: Callable[[Problem, float, Task], Stepper]
    scheduled: bool = True
    warmup: bool = True
    full_batch: bool = False
    backend: str | None = None
    follows: str | None = None
    fixed: str = ""

    def applies_to(self, task: Task) -> bool:
        """Whether this optimizer runs on ``task`` (Sven: only the backends the task supports)."""
        return self.backend is None or self.backend in task.sven_backends

    def grid(self, task: Task) -> tuple[float, ...]:
        """The values tuned on ``task``."""
        return tuple(task.grids.get(self.grid_name, DEFAULT_GRIDS[self.grid_name]))


def _sven_spec(backend: str, follows: str | None) -> OptimizerSpec:
    return OptimizerSpec(
        f"sven-{backend}", f"Sven ({backend})", "sven", "lr", _sven(backend), backend=backend, follows=follows,
        warmup=False,
        fixed="k, rtol, the safeguard and the rows per task (Task.sven): per-sample losses as rows (kappa = 2) "
              "by default, signed residuals per output where the task says so, residual rows on poisson; "
              "linear decay of lr without warm-up",
    )


OPTIMIZERS: dict[str, OptimizerSpec] = {
    spec.name: spec
    for spec in (
        _sven_spec("gram", None),
        _sven_spec("functional", None),
        _sven_spec("sketch", "sven-gram"),
        _sven_spec("dense", "sven-gram"),
        OptimizerSpec("adam", "Adam", "adam", "lr", _first_order(torch.optim.Adam), fixed="betas (0.9, 0.999)"),
        OptimizerSpec("sgd", "SGD", "sgd", "lr", _first_order(torch.optim.SGD, momentum=SGD_MOMENTUM),
                      fixed=f"momentum {SGD_MOMENTUM}"),
        OptimizerSpec("rmsprop", "RMSprop", "rmsprop", "lr", _first_order(torch.optim.RMSprop),
                      fixed="alpha 0.99"),
        OptimizerSpec("polyak", "Polyak-SGD", "polyak", "max lr", _closure_optimizer(PolyakSGD), fixed="f_star 0"),
        OptimizerSpec("lbfgs-full", "L-BFGS (full batch)", "lbfgs_full", "history", _full_batch_lbfgs,
                      scheduled=False, full_batch=True,
                      fixed=f"whole training set, lr 1 (the strong-Wolfe line search sets the step), "
                            f"{LBFGS_FULL_ITERATIONS} iterations per call, calls until Task.full_batch_seconds"),
        OptimizerSpec("lbfgs", "L-BFGS (1 iteration per batch)", "lbfgs", "lr (initial step)",
                      _closure_optimizer(torch.optim.LBFGS, max_iter=1, history_size=LBFGS_HISTORY,
                                         line_search_fn="strong_wolfe"),
                      scheduled=False,
                      fixed=f"one iteration per batch, history {LBFGS_HISTORY}, strong-Wolfe line search, "
                            "constant lr (the line search sets the step)"),
    )
}

OPTIMIZER_NAMES = tuple(OPTIMIZERS)


def get_optimizers(names: list[str] | None = None) -> list[OptimizerSpec]:
    """The optimizers called ``names`` (default: all), in the order a run needs (tuned ones first)."""
    unknown = sorted(set(names or ()) - set(OPTIMIZERS))
    if unknown:
        raise ValueError(f"unknown optimizer(s) {unknown}; choose from {OPTIMIZER_NAMES}")
    specs = [OPTIMIZERS[n] for n in (names or OPTIMIZER_NAMES)]
    return sorted(specs, key=lambda spec: spec.follows is not None)
