"""The truncated pseudo-inverse at the heart of Sven, in one place for every backend.

Notation (DESIGN.md section 1): ``J`` is the ``(R, P)`` Jacobian of the residuals
``r``; the update direction is ``V_k S_k^-1 U_k^T r``, equivalently ``J^T c`` with
``c = U_k diag(1 / s_k^2) U_k^T r`` where ``U, s^2`` are eigenpairs of ``K = J J^T``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

DEFAULT_ATOL = 1e-10  # absolute singular-value floor of the reference implementation


@dataclass(frozen=True)
class Truncation:
    """Which singular values a step keeps.

    Attributes:
        k: rank cap (``None``: half the rows of the step, see :meth:`cap`).
        rtol: keep ``s_j > rtol * s_0``.
        atol: keep ``s_j > atol``.
        damping: Tikhonov term ``lambda`` of the kept values: ``1 / s_j^2`` becomes
            ``1 / (s_j^2 + lambda)`` (the step of ``min ||J d - r||^2 + lambda ||d||^2``
            restricted to the kept subspace).
    """

    k: int | None
    rtol: float
    atol: float = DEFAULT_ATOL
    damping: float = 0.0

    def cap(self, rows: int) -> int:
        """The rank cap of a step with ``rows`` rows: ``k``, or half the rows (at least 1) when ``k`` is ``None``."""
        return max(1, rows // 2) if self.k is None else self.k

    def rank(self, singular_values: torch.Tensor) -> int:
        """Number of leading values kept from ``singular_values`` sorted in descending order
        (of a truncation resolved by :meth:`for_rows`)."""
        if self.k is None:
            raise ValueError("the rank cap is unresolved: use Truncation.for_rows(rows, scale) first")
        if singular_values.numel() == 0:
            return 0
        s0 = singular_values[0]
        keep = (singular_values > self.rtol * s0) & (singular_values > self.atol)
        # Descending order makes the kept set a prefix; count up to the first rejected value.
        return min(int(keep.cumprod(0).sum()), self.k)

    def for_rows(self, rows: int, scale: float) -> Truncation:
        """The cut-offs of one step with ``rows`` rows divided by ``scale``: the rank cap resolved
        (:meth:`cap`), ``atol`` and ``damping`` in the units of the scaled rows.

        Rows ``r / scale`` have the Jacobian ``J / scale``, so its singular values are ``s / scale``:
        ``atol`` becomes ``atol / scale`` and ``damping`` ``damping / scale^2``, and the step is the
        same (``rtol`` and ``k`` are relative).
        """
        return dataclasses.replace(self, k=self.cap(rows), atol=self.atol / scale, damping=self.damping / scale ** 2)


@dataclass
class Solution:
    """Coefficients of one Sven step.

    Attributes:
        coefficients: ``(R,)`` vector ``c``; the update direction is ``J^T c``.
        singular_values: ``(rank,)`` kept singular values of ``J``, descending.
        all_singular_values: every singular value computed, descending.
        left_vectors: ``(R, rank)`` kept left singular vectors ``U_k`` (``None`` where not formed).
        weights: ``(rank,)`` weight of each kept component, ``u_j^T r / (s_j^2 + damping)``, so that
            ``coefficients = U_k @ weights`` (``None`` where ``U_k`` is not formed).
    """

    coefficients: torch.Tensor
    singular_values: torch.Tensor
    all_singular_values: torch.Tensor
    left_vectors: torch.Tensor | None = None
    weights: torch.Tensor | None = None

    def linearised_residual(self, residual: torch.Tensor, lr: float) -> torch.Tensor:
        """``r + J delta`` for the step ``delta = -lr J^T c``: the residuals the linearised model predicts
        after the step, ``r - lr U_k diag(s_k^2 / (s_k^2 + damping)) U_k^T r`` (in ``residual``'s units)."""
        u = self.left_vectors.to(residual.dtype)
        gain = self.singular_values.to(residual.dtype).square() * self.weights.to(residual.dtype)
        return residual - lr * (u @ gain)

    @property
    def rank(self) -> int:
        return self.singular_values.numel()


def solve_gram(gram: torch.Tensor, residual: torch.Tensor, truncation: Truncation) -> Solution:
    """Coefficients ``c = U_k diag(1/(s_k^2 + damping)) U_k^T r`` from the Gram matrix ``K = J J^T``.

    Args:
        gram: ``(R, R)`` symmetric positive semi-definite matrix (float64 recommended:
            ``cond(K) = cond(J)^2``).
        residual: ``(R,)`` residual vector, same dtype and device as ``gram``.
        truncation: the cut-offs.

    Returns:
        The :class:`Solution` in the dtype of ``gram``.

    Raises:
        FloatingPointError: ``gram`` has a NaN or infinite entry.
    """
    check_finite(gram, "the Gram matrix of the Jacobian (J J^T, J^T J or a projection)")
    eigenvalues, eigenvectors = _descending_eigh(gram)
    singular_values = eigenvalues.clamp_min(0).sqrt()
    rank = truncation.rank(singular_values)
    u_k = eigenvectors[:, :rank]
    weights = (u_k.T @ residual) / (eigenvalues[:rank] + truncation.damping)
    return Solution(u_k @ weights, singular_values[:rank], singular_values, u_k, weights)


def solve_projected(basis: torch.Tensor, core: torch.Tensor, residual: torch.Tensor,
                    truncation: Truncation) -> Solution:
    """Coefficients from ``K ~ Q M Q^T`` (Rayleigh-Ritz): :func:`solve_gram` on the core.

    With ``M = Q^T K Q = W L W^T``, the approximate eigenpairs of ``K`` are ``U = Q W`` and
    ``L``, so ``c = Q W_k diag(1/L_k) W_k^T Q^T r``: the same cut-offs as the exact solve,
    applied to the ``s x s`` core. Exact when the columns of ``Q`` span the range of ``J``.

    Args:
        basis: ``(R, s)`` matrix ``Q`` with orthonormal columns.
        core: ``(s, s)`` symmetric positive semi-definite ``M = Q^T J J^T Q``, dtype of ``basis``.
        residual: ``(R,)`` residuals.
        truncation: the cut-offs.

    Returns:
        The :class:`Solution` (``left_vectors`` is ``U_k = Q W_k``).
    """
    small = solve_gram(core, basis.T @ residual, truncation)
    return Solution(basis @ small.coefficients, small.singular_values, small.all_singular_values,
                    basis @ small.left_vectors, small.weights)


def solve_jacobian(jacobian: torch.Tensor, residual: torch.Tensor, truncation: Truncation):
    """The reference's direct route: ``V_k diag(s_k / (s_k^2 + damping)) U_k^T r`` from an explicit Jacobian.

    Args:
        jacobian: ``(R, P)`` Jacobian.
        residual: ``(R,)`` residuals.
        truncation: the cut-offs.

    Returns:
        ``(direction, solution)``: the ``(P,)`` direction and the :class:`Solution` (its
        coefficients ``c`` give the same direction as ``J^T c``).

    Raises:
        FloatingPointError: ``jacobian`` has a NaN or infinite entry.
    """
    check_finite(jacobian, "the Jacobian J")
    u, s, vh = torch.linalg.svd(jacobian, full_matrices=False)
    rank = truncation.rank(s)
    kept, u_k = s[:rank], u[:, :rank]
    projected = u_k.T @ residual
    direction = vh[:rank].T @ (projected * (kept / (kept.square() + truncation.damping)))
    weights = projected / (kept.square() + truncation.damping)
    return direction, Solution(u_k @ weights, kept, s, u_k, weights)


def check_finite(matrix: torch.Tensor, what: str) -> None:
    """Raises ``FloatingPointError`` unless every entry of ``matrix`` is finite.

    A finite residual can still have an infinite derivative (``sqrt`` at 0), and products of the
    factors can overflow their dtype; the decompositions would fail or return NaN on such input.
    """
    if not bool(torch.isfinite(matrix).all()):
        raise FloatingPointError(
            f"{what} of this step is not finite (NaN or Inf): the residuals have an infinite derivative, "
            "or products of their derivatives overflow; the parameters were not changed"
        )


def _descending_eigh(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (descending) and eigenvectors of a finite symmetric ``gram``, in its dtype.

    LAPACK's ``eigh`` can fail to converge on a finite matrix with clustered eigenvalues; the
    retry is in float64, then by an SVD (``K`` is positive semi-definite, so its singular values
    are its eigenvalues, up to rounding of the tiny ones, which no cut-off keeps).
    """
    try:
        eigenvalues, eigenvectors = torch.linalg.eigh(gram)
    except torch.linalg.LinAlgError:
        wide = gram.to(torch.float64)
        try:
            eigenvalues, eigenvectors = torch.linalg.eigh(wide)
        except torch.linalg.LinAlgError:
            eigenvectors, eigenvalues, _ = torch.linalg.svd(wide)
            return eigenvalues.to(gram.dtype), eigenvectors.to(gram.dtype)
        eigenvalues, eigenvectors = eigenvalues.to(gram.dtype), eigenvectors.to(gram.dtype)
    # eigh sorts ascending; Sven thinks in descending singular values of J.
    return eigenvalues.flip(0), eigenvectors.flip(1)


def orthonormal_basis(y: torch.Tensor) -> torch.Tensor:
    """``Q`` with orthonormal columns spanning those of ``y`` ``(R, s)``, ``R >= s`` (reduced QR)."""
    return torch.linalg.qr(y).Q
