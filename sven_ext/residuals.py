"""What a Sven closure returns, and how it becomes the rows of the Jacobian."""

from __future__ import annotations

from dataclasses import dataclass

import torch


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
class Rows:
    """The rows of one Sven step.

    Attributes:
        residual: ``(R,)`` residual vector with autograd history (``R = B * m``).
        per_sample: ``(B, m)`` view of ``residual`` (``m = 1`` for per-sample losses).
        losses: ``(B,)`` detached per-sample losses (what ``step`` returns).
    """

    residual: torch.Tensor
    per_sample: torch.Tensor
    losses: torch.Tensor

    @property
    def batch_size(self) -> int:
        return self.per_sample.shape[0]

    @property
    def outputs_per_sample(self) -> int:
        return self.per_sample.shape[1]


def rows_from_closure_output(output, kappa: float) -> Rows:
    """Turns a closure's return value into Jacobian rows.

    Per-sample losses ``l`` of shape ``(B,)`` give residuals ``r = l ** (kappa / 2)``
    (``kappa = 2``: ``r = l``); :class:`Residuals` are used as they are.

    Raises:
        TypeError, ValueError: on anything else, with what was expected.
    """
    if isinstance(output, Residuals):
        values = output.values
        _check_rows(values, "Residuals")
        per_sample = values if values.dim() == 2 else values.unsqueeze(1)
        return Rows(per_sample.reshape(-1), per_sample, per_sample.detach().square().sum(dim=1))
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
    residual = output if kappa == 2.0 else output.pow(kappa / 2.0)
    return Rows(residual, residual.unsqueeze(1), output.detach())


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
