"""The functional backend: Sven for residual functions, through Jacobian-vector products only.

For residuals that are not per-sample losses of a module's forward pass (DESIGN.md section 2.5):
PDE residuals built from derivatives of the network with respect to its inputs
(``torch.autograd.grad(..., create_graph=True)`` inside the closure), boundary conditions with
their own weights, any rows coupling samples. No hook, no per-layer factor: ``J`` (``R x P``)
is reached only through two products on the autograd graph the closure built:

- ``J^T U`` (reverse mode): one backward pass of the rows, batched over the columns of ``U``
  with ``is_grads_batched``.
- ``J V`` (forward mode): the derivative of the linear map ``u -> J^T u`` applied to ``V``
  (the "double backward" form of a forward-mode product). The map's graph is built once per
  step by a backward pass with ``create_graph=True``, on the graph the closure already built,
  so the closure runs once per step and its operations need no forward-mode formulas (input
  derivatives already are backward graphs; forward mode over them is not what torch covers
  best).

Exact mode (``functional_mode="exact"``) builds one Gram matrix in row chunks of
``chunk_rows``, on the smaller side of ``J``:

- ``P < R`` (more conditions than parameters, the usual PDE fit): ``N = J^T J =
  sum_c G_c^T G_c`` and ``J^T r = sum_c G_c^T r_c`` with ``G_c = E_c^T J`` (``c x P``, one
  batched backward per chunk). ``eigh(N) = V S^2 V^T`` has the nonzero eigenvalues of
  ``K = J J^T``, so the same cut-offs keep the same ``s_j`` and the direction
  ``V_k S_k^-2 V_k^T J^T r = V_k S_k^-1 U_k^T r`` is the Sven step exactly. Only backward
  passes; ``O(P^2 + c P)`` memory; ``~R P^2`` flops for ``N`` and an ``eigh`` of ``P x P``.
- ``R <= P``: ``K[:, chunk] = J G_c^T`` (one batched backward and one batched double-backward
  product per chunk); :func:`sven_ext.linalg.solve_gram` gives ``c``; the direction is
  ``J^T c`` (one backward). ``O(R^2 + c P)`` memory; an ``eigh`` of ``R x R``.

Either way both products cost ``~R`` passes over the graph; the side is picked so the
``eigh`` and the Gram accumulation are on ``min(R, P)``, and ``J`` is never formed.

Randomized mode (``functional_mode="randomized"``): Halko-Martinsson-Tropp with
``s = min(k + oversampling, R)`` columns. ``Y = J Omega`` (``Omega``, ``P x s``, Gaussian from
the counter-based generator of :func:`sven_ext.ops.random_block`, keyed by
:func:`sven_ext.backends.sketch.step_key` of ``(seed, step)``), ``q`` power iterations
``Y <- J J^T orth(Y)``, ``Q = orth(Y)``, ``Z = Q^T J`` (``s x P``), core ``M = Z Z^T``, then
:func:`sven_ext.linalg.solve_projected` and the direction ``J^T c``. ``s (2 q + 2)``
products, ``O(R s + s P)`` memory. When ``s = R`` the sketch would be the identity: the exact
mode runs instead. A step is reproducible bitwise from ``(seed, step)`` on a given machine
and thread count.
"""

from __future__ import annotations

import math

import torch

from .. import ops
from ..linalg import Solution, orthonormal_basis, solve_gram, solve_projected
from ..residuals import rows_from_closure_output
from .base import Backend, StepDirection, StepSettings, effective_column_scale, split_like
from .sketch import step_key


class JacobianProducts:
    """Products with the Jacobian ``J = d residual / d params`` on an existing autograd graph.

    Args:
        residual: ``(R,)`` tensor whose graph reaches ``params``; kept alive by this object.
        params: the ``P`` parameters (in total) that form the columns of ``J``, in order.
        scale: ``None`` or one non-negative tensor per parameter, ``S``: the products are those of
            the column-scaled ``J S`` (RMSProp before the pseudo-inverse).

    Raises:
        ValueError: if ``residual`` depends on none of ``params``.
    """

    def __init__(self, residual: torch.Tensor, params: list[torch.Tensor], scale=None):
        self.residual = residual
        self.params = params
        self.scale = None if scale is None else [s.to(residual.dtype) for s in scale]
        self._columns = None if scale is None else torch.cat([s.reshape(-1) for s in self.scale])
        self.rows = residual.numel()
        self.width = sum(p.numel() for p in params)
        self._dual = None
        self._reached = _reached(residual, params)
        if not any(self._reached):
            raise ValueError(
                "the residuals do not depend on any trainable parameter: the closure's graph reaches none "
                "of the optimizer's parameters (were they used through .detach() or a copy?)"
            )

    def transpose_times(self, u: torch.Tensor) -> torch.Tensor:
        """Rows ``J^T u_i``: ``u`` is ``(c, R)`` in the residual's dtype; returns ``(c, P)``."""
        reached = [p for p, hit in zip(self.params, self._reached) if hit]
        grads = iter(torch.autograd.grad(self.residual, reached, grad_outputs=u, is_grads_batched=True,
                                         retain_graph=True))
        out = torch.cat([next(grads).reshape(u.shape[0], -1) if hit else u.new_zeros(u.shape[0], p.numel())
                         for p, hit in zip(self.params, self._reached)], dim=1)
        return out if self._columns is None else out.mul_(self._columns)

    def transpose_vector(self, u: torch.Tensor) -> list[torch.Tensor]:
        """``J^T u`` for one ``(R,)`` vector, one tensor per parameter (a plain backward pass)."""
        reached = [p for p, hit in zip(self.params, self._reached) if hit]
        grads = iter(torch.autograd.grad(self.residual, reached, grad_outputs=u, retain_graph=True))
        out = [next(grads) if hit else torch.zeros_like(p, dtype=u.dtype) for p, hit in zip(self.params, self._reached)]
        return out if self.scale is None else [g * s for g, s in zip(out, self.scale)]

    def times(self, v: torch.Tensor) -> torch.Tensor:
        """Rows ``J v_i``: ``v`` is ``(c, P)`` in the residual's dtype; returns ``(c, R)``."""
        dummy, linear = self._linear_map()
        if not linear:
            return v.new_zeros(v.shape[0], self.rows)
        if self._columns is not None:
            v = v * self._columns
        # J v is linear in v: divided by a power of two, v's largest entry is about 1, so that the tangents
        # along the closure's graph keep the size of its values (v of J's size would add J's scale to them).
        largest = float(v.abs().max()) if v.numel() else 0.0
        unit = math.ldexp(1.0, math.frexp(largest)[1]) if largest > 0 and math.isfinite(largest) else 1.0
        parts = list((v if unit == 1 else v / unit).split([p.numel() for p in self.params], dim=1))
        tangents = [parts[i].reshape(v.shape[0], *self.params[i].shape) for i, _ in linear]
        (out,) = torch.autograd.grad([g for _, g in linear], dummy, grad_outputs=tangents, is_grads_batched=True,
                                     retain_graph=True)
        return out if unit == 1 else out * unit

    def _linear_map(self):
        """``(u, [(i, J_i^T u)])``: the graph of ``u -> J^T u``, built once, for forward products."""
        if self._dual is None:
            dummy = torch.zeros_like(self.residual, requires_grad=True)
            reached = [p for p, hit in zip(self.params, self._reached) if hit]
            grads = torch.autograd.grad(self.residual, reached, grad_outputs=dummy, create_graph=True)
            index = [i for i, hit in enumerate(self._reached) if hit]
            # A parameter that enters the rows linearly with a constant coefficient still has a
            # graph through ``dummy``; one whose gradient has no graph contributes nothing.
            self._dual = dummy, [(i, g) for i, g in zip(index, grads) if g.requires_grad]
        return self._dual


def _reached(residual: torch.Tensor, params: list[torch.Tensor]) -> list[bool]:
    """Which of ``params`` the graph of ``residual`` reaches (a walk over the graph, no arithmetic)."""
    wanted = {id(p): i for i, p in enumerate(params)}
    hit = [False] * len(params)
    seen, stack = set(), [residual.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)
        if variable is not None and id(variable) in wanted:
            hit[wanted[id(variable)]] = True
        stack.extend(next_node for next_node, _ in node.next_functions)
    return hit


def _unit_rows(start: int, stop: int, count: int, like: torch.Tensor) -> torch.Tensor:
    """Rows ``start:stop`` of the ``count x count`` identity, ``(stop - start, count)``."""
    rows = like.new_zeros(stop - start, count)
    rows[torch.arange(stop - start), torch.arange(start, stop)] = 1
    return rows


class FunctionalBackend(Backend):
    """Sven steps from ``J v`` and ``J^T u`` products only: exact (chunked Gram) or randomized."""

    name = "functional"

    def compute(self, closure, settings: StepSettings) -> StepDirection:
        scale = effective_column_scale(settings, self.params)
        with torch.enable_grad():
            # Microbatched rows are the group means themselves: the products differentiate through them.
            rows = rows_from_closure_output(closure(), settings.kappa, settings.microbatch_size)
            jac = JacobianProducts(rows.residual, self.params, scale)
            residual = rows.residual.detach().to(settings.solve_dtype)
            truncation = settings.truncation.for_rows(residual.numel(), rows.scale)
            columns = min(truncation.k + settings.sketch.oversampling, jac.rows)
            try:
                if settings.functional_mode == "randomized" and columns < jac.rows:
                    direction, solution, info = self._randomized(jac, residual, truncation, columns, settings)
                elif jac.width < jac.rows:
                    direction, solution, info = self._exact_params(jac, residual, truncation, settings)
                else:
                    direction, solution, info = self._exact_rows(jac, residual, truncation, settings)
            except RuntimeError as error:
                if "derivative for" not in str(error):
                    raise
                raise RuntimeError(
                    "the functional backend forms J v by differentiating the closure's backward pass, and torch "
                    f"cannot differentiate one of its operations twice ({error}). With more rows than parameters "
                    "functional_mode='exact' needs backward passes only; otherwise use another backend"
                ) from error
        info["functional_mode"] = settings.functional_mode
        # The solve was for J S; the step in the parameters is S times it.
        unscale = (lambda d: d) if scale is None else (lambda d: [x * s.to(x.dtype) for x, s in zip(d, scale)])
        # No ``contract``: J^T c runs on the closure's graph, which the parameters' next change invalidates.
        return StepDirection(rows, solution, info, formed=unscale(direction))

    def _exact_params(self, jac: JacobianProducts, residual: torch.Tensor, truncation, settings: StepSettings):
        """Through ``N = J^T J`` (``P x P``): backward passes only."""
        dtype = residual.dtype
        normal = residual.new_zeros(jac.width, jac.width)
        pulled = residual.new_zeros(jac.width)
        for start in range(0, jac.rows, settings.chunk_rows):
            stop = min(start + settings.chunk_rows, jac.rows)
            g = jac.transpose_times(_unit_rows(start, stop, jac.rows, jac.residual.detach())).to(dtype)
            normal.addmm_(g.T, g)
            pulled.addmv_(g.T, residual[start:stop])
        small = solve_gram(normal, pulled, truncation)
        # The coefficients of the parameter-side solve are the direction itself; c is not formed.
        solution = Solution(residual.new_empty(0), small.singular_values, small.all_singular_values)
        info = {"side": "parameters", "gram_bytes": normal.nbytes}
        return split_like(small.coefficients, self.params), solution, info

    def _exact_rows(self, jac: JacobianProducts, residual: torch.Tensor, truncation, settings: StepSettings):
        """Through ``K = J J^T`` (``R x R``), column chunks ``J (J^T E_c)``."""
        dtype = residual.dtype
        gram = residual.new_zeros(jac.rows, jac.rows)
        for start in range(0, jac.rows, settings.chunk_rows):
            stop = min(start + settings.chunk_rows, jac.rows)
            g = jac.transpose_times(_unit_rows(start, stop, jac.rows, jac.residual.detach()))
            gram[:, start:stop] = jac.times(g).to(dtype).T
        # Each entry K_ij came from one product; the two rounded copies of it are averaged so
        # eigh sees a symmetric matrix whichever triangle it reads.
        gram = (gram + gram.T) / 2
        solution = solve_gram(gram, residual, truncation)
        info = {"side": "rows", "gram_bytes": gram.nbytes}
        return self._pull(jac, solution.coefficients), solution, info

    def _randomized(self, jac: JacobianProducts, residual: torch.Tensor, truncation, columns: int,
                    settings: StepSettings):
        """Randomized range finder with ``columns`` test vectors, Rayleigh-Ritz core."""
        sk = settings.sketch
        dtype, work = residual.dtype, jac.residual.dtype
        omega = ops.random_block(jac.width, columns, seed=step_key(sk.seed, sk.step), dtype=work,
                                 device=residual.device)
        y = self._forward(jac, omega.T, settings.chunk_rows).to(dtype)
        for _ in range(sk.power_iterations):
            z = self._backward(jac, orthonormal_basis(y).T.to(work), settings.chunk_rows)
            y = self._forward(jac, z, settings.chunk_rows).to(dtype)
        q = orthonormal_basis(y)
        z = self._backward(jac, q.T.to(work), settings.chunk_rows).to(dtype)
        core = z @ z.T
        solution = solve_projected(q, core, residual, truncation)
        info = {"side": "sketch", "sketch_size": columns, "power_iterations": sk.power_iterations,
                "sketch_bytes": z.nbytes + q.nbytes}
        return self._pull(jac, solution.coefficients), solution, info

    @staticmethod
    def _forward(jac: JacobianProducts, v: torch.Tensor, chunk: int) -> torch.Tensor:
        """``J V^T`` for ``v`` ``(s, P)``, ``chunk`` products at a time: ``(R, s)``."""
        return torch.cat([jac.times(v[i:i + chunk]) for i in range(0, v.shape[0], chunk)]).T

    @staticmethod
    def _backward(jac: JacobianProducts, u: torch.Tensor, chunk: int) -> torch.Tensor:
        """``U J`` for ``u`` ``(s, R)``, ``chunk`` products at a time: ``(s, P)``."""
        return torch.cat([jac.transpose_times(u[i:i + chunk]) for i in range(0, u.shape[0], chunk)])

    def _pull(self, jac: JacobianProducts, coefficients: torch.Tensor) -> list[torch.Tensor]:
        """The direction ``J^T c``, one tensor per parameter in the solve dtype."""
        grads = jac.transpose_vector(coefficients.to(jac.residual.dtype))
        return [g.to(coefficients.dtype) for g in grads]
