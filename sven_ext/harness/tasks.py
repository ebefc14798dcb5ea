"""The benchmark problems, behind one small interface the optimizers and the runner share.

A :class:`Task` describes a problem and its protocol (epochs, batch size, seeds, which Sven
backends apply); :meth:`Task.build` makes a :class:`Problem` for one seed: the model with
that seed's initial weights and the data. The data (and its train / validation / test split)
does not depend on the seed, so the seed moves only the initial weights and the batch order,
and every optimizer run with one seed starts from the same weights and sees the same batches.

Tasks:

- ``regression_1d``: the paper's ``y = exp(-10 x^2) sin(2 x)``, MLP 1-16-16-16-1 (GELU).
- ``polynomial``: a random polynomial of true degree 4 in 6 inputs, every monomial up to
  degree 4 present (interaction terms included), MLP 6-16-16-16-1 (GELU).
- ``digits_regression`` / ``digits_ce``: scikit-learn's bundled 8x8 digits (1,797 images,
  nothing downloaded), MLP 64-32-32-10 (GELU), fitted to one-hot targets by squared error or
  to the labels by cross-entropy; separate validation and test splits.
- ``poisson``: the 2-D Poisson problem of :mod:`sven_ext.examples.poisson` (full batch, signed
  residual rows through the functional backend), each run given the same wall-time budget.

Every task gives Sven its safeguard explicitly (``Task.sven["safeguard"]``, the library's
default), so that its runs are told apart from runs recorded before the safeguard existed.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..data import regression_1d
from ..residuals import Residuals

DATA_SEED = 0  # the data of every task; run seeds move weights and batch order only
# What Sven's closure returns (``Task.sven["rows"]``, default "losses"): per-sample losses (one row
# per sample), signed residuals (one row per sample and output, the Gauss-Newton rows of squared
# errors), or the generalised Gauss-Newton rows of the cross-entropy (:func:`fisher_rows`).
SVEN_ROWS = ("losses", "residuals", "fisher")


def fisher_rows(logits: torch.Tensor, labels: torch.Tensor) -> Residuals:
    """Generalised Gauss-Newton rows of the cross-entropy, ``C`` per sample, scaled to its value.

    With ``p = softmax(z)``, the cross-entropy's gradient in the logits is ``g = p - y`` and its
    Hessian ``H = diag(p) - p p^T`` (the Fisher). Rows ``H^(1/2) x`` with ``H x = g`` and the
    Jacobian ``H^(1/2) dz/dtheta`` (``H`` held fixed) make the Gauss-Newton model of the rows the
    cross-entropy's second-order model in the logits (the Sven step of all of them is the
    natural-gradient step); their sum of squares is ``x^T H x = 1 / p_label - 1``. Each sample's
    rows are scaled by ``sqrt(CE / (1 / p_label - 1))`` so that their sum of squares is its
    cross-entropy (the loss the safeguard checks): 1 near a fit, less for a sample far from one.
    With ``x = 1 - y / p`` and ``H 1 = 0`` the rows are ``-H^(1/2) e_label / p_label``.
    """
    log_p = torch.log_softmax(logits.detach().double(), dim=1)
    p = log_p.exp()
    hessian = torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)
    values, vectors = torch.linalg.eigh(hessian)
    root = (vectors * values.clamp_min(0).sqrt().unsqueeze(1)) @ vectors.transpose(1, 2)
    label_log = log_p.gather(1, labels.unsqueeze(1)).squeeze(1)
    # CE / (1 - p_label), evaluated where both vanish together (a fitted sample) as its limit 1.
    ratio = torch.where(label_log < 0, label_log / torch.expm1(label_log).clamp_max(-1e-300), 1.0)
    column = root.gather(2, labels.view(-1, 1, 1).expand(-1, root.shape[1], 1)).squeeze(2)
    target = -column * (ratio / label_log.exp().clamp_min(1e-300)).sqrt().unsqueeze(1)
    linear = (root.to(logits.dtype) @ logits.unsqueeze(2)).squeeze(2)
    return Residuals(linear - linear.detach() + target.to(logits.dtype))


def mlp(sizes: list[int]) -> nn.Sequential:
    """``Linear - GELU - ... - Linear`` with the given widths (float32), seeded by the caller."""
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        if i:
            layers.append(nn.GELU())
        layers.append(nn.Linear(fan_in, fan_out))
    return nn.Sequential(*layers)


class Problem:
    """One seed's model and data, and the few operations the optimizers need.

    Attributes:
        model: the module being trained (its initial weights fixed by the seed).
        splits: names of the evaluation splits, ``"val"`` first, then ``"test"`` if there is one.
    """

    model: nn.Module
    splits: tuple[str, ...] = ("val",)

    def steps_per_epoch(self) -> int:
        """Steps in one epoch."""
        raise NotImplementedError

    def batches(self, generator: torch.Generator) -> Iterator[tuple[object, int]]:
        """One epoch: ``(batch, examples)`` pairs, ``batch`` opaque to everyone but this problem."""
        raise NotImplementedError

    def rows(self, batch, kind: str = "losses") -> torch.Tensor | Residuals:
        """Sven's rows for ``batch``: per-sample losses ``(B,)`` or :class:`sven_ext.Residuals`.

        ``kind`` is the task's ``sven["rows"]`` (:data:`SVEN_ROWS`): ``"losses"`` (one row per
        sample, its loss) or ``"residuals"`` (one signed row per sample and output), where the
        problem supports it; a problem whose rows are residuals by nature ignores it.
        """
        raise NotImplementedError

    def loss(self, batch) -> torch.Tensor:
        """The scalar loss first-order optimizers minimise on ``batch`` (the mean of the rows' losses)."""
        raise NotImplementedError

    @torch.no_grad()
    def evaluate(self, split: str) -> dict[str, float]:
        """Metrics of the current model on ``split``; ``"loss"`` always among them."""
        raise NotImplementedError

    def probe(self) -> Callable[[], torch.Tensor] | None:
        """A closure of per-sample losses on a fixed batch, whose Jacobian spectrum is tracked (or None)."""
        return None

    def full_batch(self) -> tuple[object, int]:
        """The whole training set as one batch: ``(batch, examples)`` (for full-batch optimizers)."""
        raise NotImplementedError


class SupervisedProblem(Problem):
    """Mini-batches of ``(x, y)`` pairs, a per-sample loss, validation (and test) splits.

    Args:
        model: the module.
        data: ``{"train": (x, y), "val": (x, y), "test": (x, y)}``, test optional.
        loss: ``"mse"`` (per-sample mean squared error over the outputs) or ``"ce"``
            (per-sample cross-entropy of integer labels).
        batch_size: samples per step (the last batch holds the remainder).
        accuracy: report the arg-max accuracy (targets one-hot for ``"mse"``, labels for ``"ce"``).
    """

    def __init__(self, model: nn.Module, data: dict, loss: str, batch_size: int, accuracy: bool):
        self.model = model
        self.data = data
        self.kind = loss
        self.batch_size = batch_size
        self.accuracy = accuracy
        self.splits = tuple(s for s in ("val", "test") if s in data)

    def per_sample(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        if self.kind == "ce":
            return F.cross_entropy(out, y, reduction="none")
        return (out - y).square().mean(dim=1)

    def steps_per_epoch(self):
        return -(-self.data["train"][0].shape[0] // self.batch_size)

    def full_batch(self):
        x, y = self.data["train"]
        return (x, y), x.shape[0]

    def batches(self, generator):
        x, y = self.data["train"]
        order = torch.randperm(x.shape[0], generator=generator)
        for start in range(0, x.shape[0], self.batch_size):
            index = order[start : start + self.batch_size]
            yield (x[index], y[index]), index.numel()

    def rows(self, batch, kind="losses"):
        if kind == "losses":
            return self.per_sample(*batch)
        if kind == "fisher" and self.kind == "ce":
            x, y = batch
            return fisher_rows(self.model(x), y)
        if kind != "residuals" or self.kind != "mse":
            raise ValueError(f"rows {kind!r}: a {self.kind!r} problem gives rows 'losses' or "
                             + ("'residuals'" if self.kind == "mse" else "'fisher'"))
        x, y = batch
        # Scaled by 1/sqrt(outputs): each sample's sum of squares is its mean squared error, the
        # per-sample loss the other optimizers minimise (a constant scale leaves Sven's step unchanged).
        return Residuals((self.model(x) - y) / math.sqrt(y.shape[1]))

    def loss(self, batch):
        return self.per_sample(*batch).mean()

    @torch.no_grad()
    def evaluate(self, split):
        x, y = self.data[split]
        out = self.model(x)
        if self.kind == "ce":
            metrics = {"loss": float(F.cross_entropy(out, y))}
            labels = y
        else:
            metrics = {"loss": float((out - y).square().mean())}
            labels = y.argmax(dim=1)
        if self.accuracy:
            metrics["accuracy"] = float((out.argmax(dim=1) == labels).double().mean())
        return metrics

    def probe(self):
        x, y = self.data["train"]
        x, y = x[: self.batch_size], y[: self.batch_size]
        return lambda: self.per_sample(x, y)


class PoissonTaskProblem(Problem):
    """The 2-D Poisson problem, full batch: every step sees all collocation rows.

    ``evaluate("val")`` reports the PINN loss and the relative L2 error on the held-out grid
    (``rel_l2``, the metric the task is judged by).
    """

    def __init__(self, problem, model: nn.Module, steps_per_epoch: int):
        self.problem = problem
        self.model = model
        self.steps = steps_per_epoch
        self.splits = ("val",)

    def steps_per_epoch(self):
        return self.steps

    def batches(self, generator):
        del generator  # full batch: nothing to shuffle
        for _ in range(self.steps):
            yield self.full_batch()

    def full_batch(self):
        return None, self.problem.rows

    def rows(self, batch, kind="residuals"):
        del kind  # signed residual rows by nature
        return self.problem.residuals(self.model)

    def loss(self, batch):
        return self.problem.loss(self.model)

    def evaluate(self, split):
        with torch.enable_grad():  # the loss needs the Laplacian, through autograd
            loss = float(self.problem.loss(self.model).detach())
        return {"loss": loss, "rel_l2": self.problem.relative_l2(self.model)}


@dataclass(frozen=True)
class Task:
    """A problem and its protocol.

    Attributes:
        name: identifier (command line, results).
        title: one line for tables and plots.
        epochs: passes over the training data (``poisson``: records of ``steps_per_epoch`` steps,
            at most; its runs stop at ``budget_seconds``).
        batch_size: samples per step (``None``: full batch).
        seeds: run seeds.
        settings: sizes and other knobs of the data and model (recorded with every result).
        metric: the validation metric hyper-parameters are selected by (lower is better).
        schedule: whether learning rates decay linearly to 0 (after a one-epoch warm-up for the
            optimizers that take one: every one but Sven, whose safeguard needs none).
        sven_backends: the Sven backends that apply.
        sven: fixed Sven settings (``k``, ``rtol``, ...), the same for every backend, and
            ``"rows"``: what the closure returns (:data:`SVEN_ROWS`; default ``"losses"``). They
            are part of the identity of Sven's runs only (see :func:`runner.run_id`).
        grids: per-optimizer grid overrides for this task (same length as the defaults).
        budget_seconds: training wall time per run (``None``: run all epochs).
        full_batch_seconds: training wall time of a full-batch optimizer's run (its protocol only).
        builder: ``builder(task, seed) -> Problem``.
    """

    name: str
    title: str
    epochs: int
    batch_size: int | None
    seeds: tuple[int, ...]
    settings: dict
    metric: str = "loss"
    schedule: bool = True
    sven_backends: tuple[str, ...] = ("gram", "sketch", "dense")
    sven: dict = field(default_factory=dict)
    grids: dict = field(default_factory=dict)
    budget_seconds: float | None = None
    full_batch_seconds: float | None = None
    builder: Callable[["Task", int], Problem] | None = None

    def build(self, seed: int) -> Problem:
        """The problem for ``seed``: the model initialised with ``torch.manual_seed(seed)``, the task's data."""
        return self.builder(self, seed)

    def config(self) -> dict:
        """What identifies this task's protocol in a results file (two runs compare only if equal)."""
        return {"epochs": self.epochs, "batch_size": self.batch_size, "settings": self.settings,
                "metric": self.metric, "schedule": self.schedule, "sven": self.sven,
                "budget_seconds": self.budget_seconds, "full_batch_seconds": self.full_batch_seconds}


# ---------------------------------------------------------------- data sets


def polynomial_data(n: int, inputs: int, degree: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Points of a random polynomial with every monomial of total degree <= ``degree``.

    Coefficients are standard normal, so interaction terms (``x_1 x_3^2 x_6``, ...) carry as
    much weight as pure powers; the polynomial and the points come from one generator.

    Returns:
        ``x`` ``(n, inputs)`` uniform in ``[-1, 1]``, raw targets ``y`` ``(n, 1)`` (float64),
        and the number of monomials.
    """
    generator = torch.Generator().manual_seed(seed)
    exponents = [e for e in itertools.product(range(degree + 1), repeat=inputs) if sum(e) <= degree]
    powers = torch.tensor(exponents, dtype=torch.float64)  # (M, inputs)
    coefficients = torch.randn(len(exponents), generator=generator, dtype=torch.float64)
    x = torch.rand(n, inputs, generator=generator, dtype=torch.float64) * 2.0 - 1.0
    monomials = (x.unsqueeze(1) ** powers).prod(dim=2)  # (n, M)
    return x, (monomials @ coefficients).unsqueeze(1), len(exponents)


def load_digits_arrays() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's bundled 8x8 digits: ``(1797, 64)`` pixels in ``[0, 1]`` and ``(1797,)`` labels."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise ImportError(
            "the digits tasks need scikit-learn (its bundled 8x8 digits, nothing is downloaded): "
            "pip install scikit-learn"
        ) from error
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    return x, torch.tensor(digits.target, dtype=torch.long)


def _split(n: int, fractions: tuple[float, float]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(DATA_SEED))
    n_val, n_test = round(fractions[0] * n), round(fractions[1] * n)
    return order[n_val + n_test :], order[:n_val], order[n_val : n_val + n_test]


# ---------------------------------------------------------------- builders


def _build_regression_1d(task: Task, seed: int) -> Problem:
    s = task.settings
    data = regression_1d(s["n_train"], s["n_val"], seed=DATA_SEED)
    torch.manual_seed(seed)
    model = mlp([1, 16, 16, 16, 1])
    return SupervisedProblem(model, {"train": (data.x_train, data.y_train), "val": (data.x_val, data.y_val)},
                             "mse", task.batch_size, accuracy=False)


def _build_polynomial(task: Task, seed: int) -> Problem:
    s = task.settings
    n = s["n_train"] + s["n_val"] + s["n_test"]
    x, y, _ = polynomial_data(n, s["inputs"], s["degree"], DATA_SEED)
    train, val, test = torch.arange(s["n_train"]), torch.arange(s["n_train"], s["n_train"] + s["n_val"]), \
        torch.arange(s["n_train"] + s["n_val"], n)
    mean, std = y[train].mean(), y[train].std()
    y = (y - mean) / std  # a validation MSE of 1 is what predicting the mean achieves
    x, y = x.float(), y.float()
    torch.manual_seed(seed)
    model = mlp([s["inputs"], 16, 16, 16, 1])
    data = {name: (x[index], y[index]) for name, index in (("train", train), ("val", val), ("test", test))}
    return SupervisedProblem(model, data, "mse", task.batch_size, accuracy=False)


def _build_digits(task: Task, seed: int) -> Problem:
    x, labels = load_digits_arrays()
    train, val, test = _split(x.shape[0], (task.settings["val_fraction"], task.settings["test_fraction"]))
    targets = labels if task.settings["loss"] == "ce" else F.one_hot(labels, 10).float()
    if task.settings.get("n_train"):
        train = train[: task.settings["n_train"]]
    torch.manual_seed(seed)
    model = mlp([64, 32, 32, 10])
    data = {name: (x[index], targets[index]) for name, index in (("train", train), ("val", val), ("test", test))}
    return SupervisedProblem(model, data, task.settings["loss"], task.batch_size, accuracy=True)


def _build_poisson(task: Task, seed: int) -> Problem:
    from ..examples.poisson import PoissonProblem

    s = task.settings
    problem = PoissonProblem(s["interior"], s["boundary"], s["boundary_weight"], s["grid"], seed=seed)
    model = problem.model(s["width"], s["depth"], seed=seed)
    return PoissonTaskProblem(problem, model, s["steps_per_epoch"])


# ---------------------------------------------------------------- the task list

_FIRST_ORDER_ONE_STEP_UP = {"adam": (3e-3, 1e-2, 3e-2, 1e-1), "sgd": (1e-2, 3e-2, 1e-1, 3e-1),
                            "rmsprop": (1e-3, 3e-3, 1e-2, 3e-2), "polyak": (0.3, 1.0, 3.0, 10.0)}
_RMSPROP_TWO_STEPS_UP = (3e-3, 1e-2, 3e-2, 1e-1)

_FULL = {
    "regression_1d": Task(
        "regression_1d", "1-D regression exp(-10x^2) sin(2x), MLP 1-16-16-16-1, batch 32", epochs=20, batch_size=32,
        seeds=(0, 1, 2, 3, 4), settings={"n_train": 10_000, "n_val": 10_000},
        # rtol: see the seed-0 sweep of python -m sven_ext.harness.formulations --task regression_1d
        # in BENCHMARKS.md (recorded after this value was fixed; it favours 1e-5).
        sven={"k": 16, "rtol": 1e-4, "safeguard": "backtracking"}, builder=_build_regression_1d,
        full_batch_seconds=20.0,
        # The default grids put every first-order optimizer's best value at their top: one step up.
        grids=_FIRST_ORDER_ONE_STEP_UP),
    "polynomial": Task(
        "polynomial", "random degree-4 polynomial of 6 inputs (210 monomials), MLP 6-16-16-16-1, batch 32",
        epochs=10, batch_size=32, seeds=(0, 1, 2),
        settings={"n_train": 4096, "n_val": 2048, "n_test": 2048, "inputs": 6, "degree": 4},
        sven={"k": 16, "rtol": 1e-3, "safeguard": "backtracking"}, builder=_build_polynomial, full_batch_seconds=8.0,
        # The default grids put every first-order optimizer's best value at their top: one step up
        # (RMSprop's best was still its top value: two steps).
        grids={**_FIRST_ORDER_ONE_STEP_UP, "rmsprop": _RMSPROP_TWO_STEPS_UP}),
    "digits_regression": Task(
        "digits_regression", "8x8 digits, squared error to one-hot labels, MLP 64-32-32-10, batch 32", epochs=20,
        batch_size=32, seeds=(0, 1, 2), settings={"loss": "mse", "val_fraction": 0.2, "test_fraction": 0.2},
        # Ten signed residual rows per image (output minus one-hot target), the Gauss-Newton rows
        # of a vector output, and k = None: half of each step's rows (160 of 320). One row per
        # image (its squared error) with k = 16 ended at 1.6x Adam's validation loss.
        sven={"k": None, "rtol": 1e-3, "rows": "residuals", "safeguard": "backtracking"}, builder=_build_digits,
        full_batch_seconds=15.0,
        # The default grids put the first-order optimizers' best values at their top: one step up.
        grids=_FIRST_ORDER_ONE_STEP_UP),
    "digits_ce": Task(
        "digits_ce", "8x8 digits, cross-entropy, MLP 64-32-32-10, batch 32", epochs=20, batch_size=32,
        seeds=(0, 1, 2), settings={"loss": "ce", "val_fraction": 0.2, "test_fraction": 0.2},
        sven={"k": 16, "rtol": 1e-3, "safeguard": "backtracking"}, builder=_build_digits, full_batch_seconds=5.0,
        # The default grids put every optimizer's best value but L-BFGS's at their top: one step up
        # (RMSprop's best was still its top value: two steps).
        grids={"sven": (0.6, 1.0, 1.5, 2.5), **_FIRST_ORDER_ONE_STEP_UP, "rmsprop": _RMSPROP_TWO_STEPS_UP}),
    "poisson": Task(
        "poisson", "2-D Poisson, tanh MLP 2-32-1, 256 interior + 64 boundary rows, full batch, float64",
        epochs=10_000, batch_size=None, seeds=(0, 1, 2), metric="rel_l2", schedule=False,
        # The example's net (python -m sven_ext.examples.poisson): 2-32-1, 129 parameters. (A 2-16-16-1
        # net, 337 parameters, ran first: Sven 0.050 against Adam 0.095, both far from 1e-5.)
        settings={"interior": 256, "boundary": 64, "boundary_weight": 1.0, "grid": 101, "width": 32, "depth": 1,
                  "steps_per_epoch": 5},
        # Without the safeguard fixed steps overshoot while the linearisation is poor (every lr of the
        # grid diverged), and the example's own backtracking stalled half the runs on a plateau.
        sven_backends=("functional",), sven={"k": 320, "rtol": 1e-6, "safeguard": "backtracking"},
        budget_seconds=8.0, full_batch_seconds=8.0,
        grids={"sven": (0.25, 0.5, 0.75, 1.0), "adam": (1e-3, 3e-3, 1e-2, 3e-2), "sgd": (1e-4, 3e-4, 1e-3, 3e-3),
               "rmsprop": (1e-4, 3e-4, 1e-3, 3e-3), "polyak": (1e-3, 1e-2, 1e-1, 1.0),
               "lbfgs": (0.1, 0.3, 1.0, 3.0)},
        builder=_build_poisson),
}

# --quick: the same tasks at toy sizes (a few minutes for everything).
_QUICK_CHANGES = {
    "regression_1d": {"epochs": 3, "seeds": (0, 1), "settings": {"n_train": 1024, "n_val": 1024},
                      "full_batch_seconds": 1.0},
    "polynomial": {"epochs": 3, "seeds": (0, 1), "full_batch_seconds": 1.0,
                   "settings": {"n_train": 1024, "n_val": 512, "n_test": 512, "inputs": 6, "degree": 4}},
    "digits_regression": {"epochs": 3, "seeds": (0, 1), "full_batch_seconds": 1.0,
                          "settings": {"loss": "mse", "val_fraction": 0.2, "test_fraction": 0.2, "n_train": 512}},
    "digits_ce": {"epochs": 3, "seeds": (0, 1), "full_batch_seconds": 1.0,
                  "settings": {"loss": "ce", "val_fraction": 0.2, "test_fraction": 0.2, "n_train": 512}},
    "poisson": {"seeds": (0,), "budget_seconds": 1.0, "full_batch_seconds": 1.0,
                "settings": {"interior": 64, "boundary": 32, "boundary_weight": 1.0, "grid": 41, "width": 8,
                             "depth": 2, "steps_per_epoch": 5},
                "sven": {"k": 96, "rtol": 1e-6, "safeguard": "backtracking"}},
}

TASK_NAMES = tuple(_FULL)


def get_tasks(names: list[str] | None = None, quick: bool = False) -> list[Task]:
    """The tasks called ``names`` (default: all), full size or ``quick``.

    Raises:
        ValueError: for an unknown name.
    """
    unknown = sorted(set(names or ()) - set(_FULL))
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; choose from {TASK_NAMES}")
    tasks = [_FULL[n] for n in (TASK_NAMES if names is None else names)]
    if quick:
        tasks = [dataclasses.replace(t, **_QUICK_CHANGES[t.name]) for t in tasks]
    return tasks


def parameter_count(model: nn.Module) -> int:
    """Trainable parameters of ``model``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
