"""What a Sven closure returns, and how it becomes the rows of the Jacobian."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# Rows are divided by a power of two when their largest magnitude leaves [2^-32, 2^32) (see row_scale).
ROW_EXPONENT_RANGE = 32


class Residuals:
    """Signed residuals returned by a closure instead of per-sample losses.

    Each element is one row of the Jacobian (one condition to satisfy); the
    loss is their sum of squares. Shape ``(B,)`` or ``(B, m)``: with ``m``
    outputs per sample, row ``i * m + j`` is output ``j`` of sample ``i``.

    Args:
        values: floating tensor of shape ``(B,)`` or ``(B, m)`` with autograd history.
    """

    def __init__(self, values: torch.Tensor):
        if not isinstance(values, torch.Tensor):
            raise TypeError(f"Residuals expects a tensor, got {type(values).__name__}")
        if values.dim() not in (1, 2):
            raise ValueError(f"Residuals must have shape (B,) or (B, m), got {tuple(values.shape)}")
        self.values = values

    def __repr__(self) -> str:
        return f"Residuals(shape={tuple(self.values.shape)})"


@dataclass
class RowMap:
    """The step's Jacobian as a linear map ``T`` of the captured rows' Jacobian: ``J_rows = T J_captured``.

    With ``microbatch_size = m`` the step's rows are ``r'_g = (mean_{i in g} l_i) ** (kappa / 2)``
    over consecutive groups ``g`` of ``m`` samples. The capture keeps one row per sample (the
    losses ``l``, so every layer keeps its batch on axis 0), and by the chain rule the step's
    Jacobian is ``T J_l`` with ``T = diag(w) M``: ``M`` the ``(B / m, B)`` group-averaging matrix
    and ``w_g = kappa / 2 * mean_g ** (kappa / 2 - 1)``. ``T`` is never formed.

    Attributes:
        weights: ``(B / m,)`` detached ``w``.
        size: ``m``.
    """

    weights: torch.Tensor
    size: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``T x``: ``(B, ...)`` over captured rows -> ``(B / m, ...)`` over the step's rows, in ``x.dtype``."""
        means = x.reshape(-1, self.size, *x.shape[1:]).mean(1)
        return self.weights.to(x.dtype).view(-1, *[1] * (x.dim() - 1)) * means

    def transpose(self, y: torch.Tensor) -> torch.Tensor:
        """``T^T y``: ``(B / m, ...)`` over the step's rows -> ``(B, ...)`` over captured rows, in ``y.dtype``."""
        scaled = y * (self.weights.to(y.dtype) / self.size).view(-1, *[1] * (y.dim() - 1))
        return scaled.repeat_interleave(self.size, dim=0)


@dataclass
class Rows:
    """The rows of one Sven step.

    Attributes:
        residual: ``(R,)`` residual vector of the step divided by ``scale``, with autograd history.
        per_sample: ``(B, m)`` rows the per-layer capture differentiates, with autograd history:
            a view of ``residual`` (``m`` outputs per sample; ``m = 1`` for per-sample losses),
            or with ``row_map`` the per-sample losses ``(B, 1)`` divided by a power of two.
        losses: ``(B,)`` detached per-sample losses (what ``step`` returns), not scaled.
        row_map: ``residual`` as a map of ``per_sample`` (``None``: ``residual`` is ``per_sample``
            flattened).
        scale: the power of two ``sigma`` the step's residuals were divided by. The Sven step
            ``pinv(J / sigma) (r / sigma) = pinv(J) r`` does not change, but the products of
            the Jacobian's factors stay inside their dtype's range; singular values come out
            divided by ``sigma`` (:meth:`sven_ext.linalg.Truncation.for_rows`).
    """

    residual: torch.Tensor
    per_sample: torch.Tensor
    losses: torch.Tensor
    row_map: RowMap | None = None
    scale: float = 1.0

    @property
    def batch_size(self) -> int:
        return self.per_sample.shape[0]

    @property
    def outputs_per_sample(self) -> int:
        return self.per_sample.shape[1]

    @property
    def captured(self) -> torch.Tensor:
        """``(B * m,)`` captured rows (``per_sample`` flattened), with autograd history."""
        return self.per_sample.reshape(-1)

    def to_rows(self, x: torch.Tensor) -> torch.Tensor:
        """``T x``: a ``(B * m, ...)`` tensor over captured rows as ``(R, ...)`` over the step's rows."""
        return x if self.row_map is None else self.row_map.forward(x)

    def to_captured(self, y: torch.Tensor) -> torch.Tensor:
        """``T^T y``: a ``(R, ...)`` tensor over the step's rows as ``(B * m, ...)`` over captured rows."""
        return y if self.row_map is None else self.row_map.transpose(y)


def rows_from_closure_output(output, kappa: float, microbatch_size: int | None = None) -> Rows:
    """Turns a closure's return value into Jacobian rows.

    Per-sample losses ``l`` of shape ``(B,)`` give residuals ``r = l ** (kappa / 2)``
    (``kappa = 2``: ``r = l``); with ``microbatch_size = m`` the losses of consecutive groups
    of ``m`` samples are averaged first (``B / m`` rows, see :class:`RowMap`).
    :class:`Residuals` are used as they are.

    Raises:
        TypeError, ValueError: on anything else, with what was expected; ``ValueError`` when
            ``m`` does not divide ``B`` or the closure returned :class:`Residuals` with ``m``.
    """
    if microbatch_size is not None and (
        isinstance(microbatch_size, bool) or not isinstance(microbatch_size, int) or microbatch_size < 1
    ):
        raise ValueError(f"microbatch_size must be a positive integer or None, got {microbatch_size!r}")
    if isinstance(output, Residuals):
        if microbatch_size is not None:
            # Averaging signed residuals would let opposite errors cancel: the groups are of losses.
            raise ValueError(
                "microbatch_size averages per-sample losses, but the closure returned sven_ext.Residuals: "
                "return per-sample losses of shape (B,), or average the residuals in the closure"
            )
        return _residual_rows(output.values)
    if not isinstance(output, torch.Tensor):
        raise TypeError(
            "the closure must return per-sample losses (a tensor of shape (B,)) or sven_ext.Residuals, "
            f"got {type(output).__name__}"
        )
    if output.dim() != 1:
        hint = " (did the closure reduce the batch? return per-sample losses, e.g. reduction='none')"
        raise ValueError(
            f"the closure must return per-sample losses of shape (B,), got shape {tuple(output.shape)}"
            + (hint if output.dim() == 0 else "")
        )
    _check_rows(output, "per-sample losses")
    if (output.detach() < 0).any():
        raise ValueError("per-sample losses must be >= 0 (return signed residuals as sven_ext.Residuals)")
    if microbatch_size is None or microbatch_size == 1:
        residual = _power(output, kappa)
        scale = row_scale(residual)
        residual = residual if scale == 1 else residual * (1 / scale)
        return Rows(residual, residual.unsqueeze(1), output.detach(), scale=scale)
    return _microbatch_rows(output, kappa, microbatch_size)


def _residual_rows(values: torch.Tensor) -> Rows:
    """Rows of :class:`Residuals` values ``(B,)`` or ``(B, m)``: used as they are, scaled."""
    _check_rows(values, "Residuals")
    losses = values.detach().square().reshape(values.shape[0], -1).sum(dim=1)
    scale = row_scale(values)
    per_sample = values if values.dim() == 2 else values.unsqueeze(1)
    per_sample = per_sample if scale == 1 else per_sample * (1 / scale)
    return Rows(per_sample.reshape(-1), per_sample, losses, scale=scale)


def _microbatch_rows(output: torch.Tensor, kappa: float, microbatch_size: int) -> Rows:
    """Rows of per-sample losses averaged over consecutive groups of ``microbatch_size`` samples."""
    batch = output.shape[0]
    if batch % microbatch_size:
        raise ValueError(f"microbatch_size={microbatch_size} does not divide the batch size {batch}")
    means = output.view(-1, microbatch_size).mean(1)
    residual = _power(means, kappa)
    fitted = means.detach() < torch.finfo(means.dtype).tiny
    slope = torch.where(fitted, 0.0, means.detach().clamp_min(torch.finfo(means.dtype).tiny).pow(kappa / 2.0 - 1.0)
                        * (kappa / 2.0))
    # The captured losses l and the rows r are scaled apart: r / sigma = (w sigma_l / sigma) M (l / sigma_l).
    scale, captured_scale = row_scale(residual), row_scale(output)
    if scale != 1:
        residual = residual * (1 / scale)
    captured = output if captured_scale == 1 else output * (1 / captured_scale)
    slope = slope if scale == captured_scale else slope * (captured_scale / scale)
    return Rows(residual, captured.unsqueeze(1), output.detach(), RowMap(slope, microbatch_size), scale)


def row_scale(values: torch.Tensor) -> float:
    """The power of two ``sigma`` that brings the largest ``|value|`` into ``[2^-32, 2^32)`` (1 if it is there).

    The products of the Jacobian's factors (``K = J J^T`` in float32 for float32 models) scale
    with the square of the rows when the losses are scaled, and leave float32's range near
    ``|r| ~ 1e19`` or ``1e-19``; rows inside the window are left exactly as they are. A power of
    two divides every value exactly.
    """
    largest = float(values.detach().abs().max())
    if largest == 0:
        return 1.0
    exponent = math.frexp(largest)[1]  # largest in [2^(exponent - 1), 2^exponent)
    inside = min(max(exponent, 1 - ROW_EXPONENT_RANGE), ROW_EXPONENT_RANGE)
    return math.ldexp(1.0, exponent - inside)


def _power(losses: torch.Tensor, kappa: float) -> torch.Tensor:
    """``losses ** (kappa / 2)``. For ``kappa < 2`` its derivative is infinite at a zero loss (a float32
    cross-entropy rounds to 0): such a loss is clamped to the dtype's smallest normal number, whose
    zero gradient leaves the fitted sample a zero row rather than NaN."""
    if kappa == 2.0:
        return losses
    if kappa < 2.0:
        losses = losses.clamp_min(torch.finfo(losses.dtype).tiny)
    return losses.pow(kappa / 2.0)


def _check_rows(values: torch.Tensor, what: str) -> None:
    if values.shape[0] == 0 or values.numel() == 0:
        raise ValueError(f"the closure returned empty {what} (batch of size 0)")
    if not values.is_floating_point():
        raise TypeError(f"{what} must be floating point, got {values.dtype}")
    if not values.requires_grad:
        raise ValueError(
            f"{what} do not depend on any trainable parameter (no autograd history): "
            "run the forward pass inside the closure, outside torch.no_grad()"
        )
    if not torch.isfinite(values.detach()).all():
        raise ValueError(f"{what} contain NaN or Inf")
