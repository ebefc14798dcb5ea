"""The safeguard that keeps a Sven step from blowing up (``Sven(safeguard="backtracking")``).

A Sven step ``delta = -lr V_k diag(s_j / (s_j^2 + damping)) U_k^T r`` minimises the linearised
model of the rows, ``r + J delta``. Where that model is poor (random initial weights, a small
``rtol`` that keeps tiny singular values, whose directions are long) the step can raise the batch
loss by orders of magnitude. The safeguard checks each step on the batch before it is committed
(DESIGN.md, "The safeguard"):

1. The trial is the Sven step whose direction is ``t`` times this one's, ``t`` a power of two in
   ``(0, 1]``; with ``t = 1`` it is the bare step, bitwise. A shorter trial contracts ``t c``
   again (exactly ``t`` times the direction; no new solve): a trial costs one evaluation of the
   closure, and a shorter one also a contraction.
2. The batch loss after the trial is compared with the decrease the linearised model predicts
   for it (from the same ``U_k``, ``s`` and ``r``), ``rho = (f - f_trial) / (m(0) - m(t))``.
3. The trial is accepted when ``rho >= ETA``: the loss fell by at least :data:`ETA` of the
   predicted decrease. Otherwise ``t`` halves and the next trial is evaluated, up to
   :data:`MAX_TRIALS`; when none is accepted the step moves nothing.
4. The next step starts from ``min(1, 2 t)`` (the optimizer state keeps ``t``), so a step that
   needed a short scale does not cost a search from 1 again, and the bare step returns once the
   model is good.

Before any trial, a direction along which the model predicts no decrease at all (possible for
rows that are losses, whose linearisation is not a sum of squares) is not searched: the step
moves nothing, at no cost. Where the model's prediction is not available (a backend without
``U_k``, ``functional``; param groups with different ``lr``; ``momentum`` and ``rmsprop``, which
move along other directions) a trial is accepted when the batch loss falls. With ``variable_k``
the safeguard does not run: that option applies components only while the batch loss falls.

Cost: one closure evaluation per step, plus one evaluation and one contraction per rejected trial.
A trial's values replace the parameters' storage for its evaluation (no copy of the model), and
the storage is put back after it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch

SAFEGUARDS = (None, "backtracking")
ETA = 1e-2  # a trial must achieve this fraction of the decrease its linear model predicts
MAX_TRIALS = 30  # scales down to 2^-29 of the starting one before the step moves nothing
SMALLEST_SCALE = 2.0 ** -60  # where the carried scale stops shrinking


def check_safeguard(safeguard) -> None:
    """Raises ``ValueError`` for an unknown safeguard."""
    if safeguard not in SAFEGUARDS:
        raise ValueError(f"safeguard must be one of {SAFEGUARDS}, got {safeguard!r}")


@contextlib.contextmanager
def trial_values(params: list[torch.Tensor], values: list[torch.Tensor]):
    """The parameters hold ``values`` (their storage swapped in, nothing copied) inside the block, and
    their own storage again after it, however it ends. Inside, they do not require grad: a trial's
    forward pass keeps no activations for a backward pass that does not come (rows that take
    derivatives with respect to the inputs still can)."""
    saved = [(p.data, p.requires_grad) for p in params]
    try:
        for p, value in zip(params, values):
            p.data = value
            p.requires_grad_(False)
        yield
    finally:
        for p, (data, requires_grad) in zip(params, saved):
            p.data = data
            p.requires_grad_(requires_grad)


def check_scale(scale) -> None:
    """Raises ``ValueError`` unless ``scale`` (the state's step scale) is a float in ``(0, 1]``."""
    if isinstance(scale, bool) or not isinstance(scale, float) or not 0 < scale <= 1:
        raise ValueError(f"the optimizer state's safeguard step scale must be a float in (0, 1], got {scale!r}")


def loss_of_rows(rows: torch.Tensor, kappa: float | None, group: int) -> float:
    """The batch loss that rows (in the closure's units) stand for: their sum of squares for residual
    rows (``kappa=None``), else the sum of ``group * max(row, 0) ** (2 / kappa)`` (rows are
    ``loss ** (kappa / 2)``, of the means of ``group`` losses)."""
    if kappa is None:
        return float(rows.square().sum())
    return group * float(rows.clamp_min(0).pow(2.0 / kappa).sum())


@dataclass(frozen=True)
class Linearisation:
    """The linearised model of one step: the rows ``r + t J delta`` after the step scaled by ``t``.

    Attributes:
        residual: ``(R,)`` rows ``r`` in the closure's units, float64.
        change: ``(R,)`` ``J delta`` of the unscaled step in the same units (``None``: not available).
        kappa: rows are ``loss ** (kappa / 2)``; ``None`` for residual rows (loss = sum of squares).
        group: ``m`` losses per row (``microbatch_size``), 1 otherwise.
    """

    residual: torch.Tensor
    change: torch.Tensor | None
    kappa: float | None
    group: int

    def decrease(self, scale: float) -> float | None:
        """The loss decrease the model predicts for the step scaled by ``scale`` (``None``: no model)."""
        if self.change is None:
            return None
        before = loss_of_rows(self.residual, self.kappa, self.group)
        return before - loss_of_rows(self.residual + scale * self.change, self.kappa, self.group)

    def slope(self) -> float | None:
        """The model's loss change per unit scale at scale 0 (``None``: no model): negative along a
        direction that descends. A row at 0 whose loss is its value (``kappa = 2``) rises along a
        positive change."""
        if self.change is None:
            return None
        r, c = self.residual, self.change
        if self.kappa is None:
            return 2 * float(r @ c)
        power = 2.0 / self.kappa
        positive = r > 0
        slope = power * float((r[positive].pow(power - 1) * c[positive]).sum())
        if power == 1:
            slope += float(c[~positive].clamp_min(0).sum())
        return self.group * slope


def linearisation(result, lr: float | None, kappa: float | None, group: int) -> Linearisation:
    """The linearised model of a backend's answer ``result`` (a ``StepDirection``): ``J delta =
    -lr U_k diag(s^2 / (s^2 + damping)) U_k^T r`` needs ``U_k`` and one ``lr`` for every parameter."""
    solution, rows = result.solution, result.rows
    residual = rows.residual.detach().to(torch.float64)  # the rows the backend solved for
    change = None
    if lr is not None and solution.left_vectors is not None:
        change = (solution.linearised_residual(residual, lr) - residual) * rows.scale
    return Linearisation(residual * rows.scale, change, kappa, group)


@dataclass
class Decision:
    """The outcome of one step's search.

    Attributes:
        candidate: ``(values, states)``: the new value and state entries of every moved parameter (their
            current values and no state change when nothing was accepted).
        scale: the step scale the next step starts from.
        info: ``last_info["safeguard"]``: ``trials`` (closure evaluations), ``scale`` (of the applied step,
            0 when nothing moved), ``rho`` (``None`` without a model), ``loss`` (the batch loss after the
            step).
    """

    candidate: tuple[list[torch.Tensor], list[dict]]
    scale: float
    info: dict


def search(params: list[torch.Tensor], before: float, model: Linearisation, scale: float,
           candidate_for: Callable[[float], tuple[list[torch.Tensor], list[dict]]], batch_loss: Callable[[], float],
           restore: Callable[[], None]) -> Decision:
    """Finds the first scale of the step, from ``scale`` down, that lowers the batch loss enough
    (module docstring).

    The parameters hold each trial's values for its evaluation (:func:`trial_values`) and their own
    afterwards, and the buffers are put back (``restore``); nothing else changes.

    Args:
        params: the moved parameters.
        before: the batch loss before the step.
        model: the step's :class:`Linearisation`.
        scale: the step scale carried over from the previous step, in ``(0, 1]``.
        candidate_for: ``scale -> (values, states)``: the parameters' new values and state entries for
            the step scaled by ``scale``; raises ``FloatingPointError`` if one is not finite.
        batch_loss: runs the closure at the current parameters and returns its batch loss (the sum
            over every rank of a process group, so that every rank decides alike).
        restore: puts the model's buffers back as they were before the first trial.
    """
    initial = scale
    unchanged = ([p.detach() for p in params], [{} for _ in params])
    info = {"trials": 0, "scale": 0.0, "rho": None, "loss": before}
    slope = model.slope()
    if slope is not None and not slope < 0:
        return Decision(unchanged, scale, info)  # the model expects no decrease at any scale
    for trial in range(1, MAX_TRIALS + 1):
        candidate = candidate_for(scale)
        try:
            with trial_values(params, candidate[0]):
                loss = batch_loss()
        finally:
            restore()
        predicted = model.decrease(scale)
        # A decrease lost to rounding (a tiny scale) leaves the plain test of the loss.
        rho = (before - loss) / predicted if predicted is not None and predicted > 0 else None
        if (loss < before) if rho is None else rho >= ETA:  # NaN is never accepted
            info.update(trials=trial, scale=scale, rho=rho, loss=loss)
            return Decision(candidate, min(1.0, 2 * scale), info)
        candidate = None  # freed before the next trial's values are formed
        info["trials"] = trial
        scale = max(scale / 2, SMALLEST_SCALE)
    # No scale lowered the loss (rounding at a minimum, or a direction the model misjudges): the next step,
    # on other rows or from a solve that is not this one, starts where this one did.
    return Decision(unchanged, initial, info)


def contracts_again(result, params: list[torch.Tensor]) -> bool:
    """Whether the safeguard's shorter trials contract again (keeping the step's factors) rather than
    scale kept directions: only where that reproduces the directions and the factors are smaller."""
    if result.contract is None or not result.contract_reproduces:
        return False
    factors = result.info.get("factor_bytes")
    return factors is not None and factors <= sum(p.numel() * p.element_size() for p in params)
