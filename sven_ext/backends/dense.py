"""The dense backend: the paper's reference algorithm, and the oracle of the others.

It builds the full ``(R, P)`` Jacobian (chunked over rows) and takes its SVD, so it
needs ``O(R * P)`` memory: use it for small problems and for checking.
"""

from __future__ import annotations

import torch

from .. import costs
from ..capture import GradModeWatch, refuse_no_grad_only
from ..factor_check import graph_fingerprint
from ..linalg import solve_jacobian
from ..residuals import rows_from_closure_output
from .base import Backend, StepDirection, StepSettings, effective_column_scale, split_like


def jacobian(residual: torch.Tensor, params: list[torch.Tensor], chunk_rows: int, dtype: torch.dtype) -> torch.Tensor:
    """Rows of ``d residual / d params`` as an ``(R, P)`` matrix, ``chunk_rows`` backward passes at a time.

    Args:
        residual: ``(R,)`` tensor with autograd history.
        params: tensors ``residual`` depends on (or not: unused ones give zero columns).
        chunk_rows: rows per batched backward pass (vmap over ``grad_outputs``).
        dtype: dtype of the returned matrix.
    """
    rows = residual.numel()
    total = sum(p.numel() for p in params)
    jac = torch.empty(rows, total, dtype=dtype, device=residual.device)
    eye = torch.eye(rows, dtype=residual.dtype, device=residual.device)
    for start in range(0, rows, chunk_rows):
        stop = min(start + chunk_rows, rows)
        grads = torch.autograd.grad(
            residual,
            params,
            grad_outputs=eye[start:stop],
            is_grads_batched=True,
            retain_graph=stop < rows,
            allow_unused=True,
        )
        # An unused parameter has no gradient (batched or not): its columns are zero.
        at = 0
        for p, g in zip(params, grads):
            block = jac[start:stop, at:at + p.numel()]
            if g is None:
                block.zero_()
            else:
                block.copy_(g.reshape(stop - start, -1))
            at += p.numel()
    return jac


class DenseBackend(Backend):
    """Explicit Jacobian and ``torch.linalg.svd``, as the paper's reference implementation."""

    name = "dense"

    def compute(self, closure, settings: StepSettings) -> StepDirection:
        if settings.process_group is not None:
            raise NotImplementedError("the dense backend does not run data-parallel (process_group): use 'gram' or "
                                      "'sketch'")
        return self.solve(self.rows(closure, settings), settings)

    def rows(self, closure, settings: StepSettings):
        """Runs the closure (gradients on) and returns its rows, refusing moving modules run without gradients."""
        with torch.enable_grad(), GradModeWatch(self.model, self.params) as watch:
            rows = rows_from_closure_output(closure(), settings.kappa, settings.microbatch_size)
        refuse_no_grad_only(watch.no_grad_calls, watch.grad_calls)
        return rows

    def solve(self, rows, settings: StepSettings) -> StepDirection:
        """The step from the rows of a closure that has run (their autograd graph is used once).

        Microbatched rows are differentiated through the group means; a column scale ``S``
        solves for ``J S`` and maps back: ``direction = S (J S)^+ r``.
        """
        scale = effective_column_scale(settings, self.params)
        estimate = costs.estimate_dense(rows.residual.numel(), sum(p.numel() for p in self.params))
        costs.require_fit(estimate, 0, settings.max_memory, self.params[0].device)
        graph_fingerprint(rows.residual)  # raises for graphs autograd.grad cannot differentiate
        jac = jacobian(rows.residual, self.params, settings.chunk_rows, settings.solve_dtype)
        residual = rows.residual.detach().to(settings.solve_dtype)
        truncation = settings.truncation.for_rows(residual.numel(), rows.scale)
        if scale is not None:
            columns = torch.cat([s.reshape(-1) for s in scale]).to(jac.dtype)
            jac.mul_(columns)
        direction, solution = solve_jacobian(jac, residual, truncation)

        def contract(c: torch.Tensor) -> list[torch.Tensor]:
            out = jac.T @ c
            return split_like(out if scale is None else out.mul_(columns), self.params)

        if scale is not None:
            direction.mul_(columns)
        return StepDirection(rows, solution, {"jacobian_bytes": jac.nbytes}, contract=contract,
                             formed=split_like(direction, self.params), contract_reproduces=False)
