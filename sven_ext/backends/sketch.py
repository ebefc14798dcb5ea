"""The sketch backend: a matrix-free randomized SVD of ``J`` over the captured factors (DESIGN.md section 2.2).

Halko-Martinsson-Tropp range finder and Rayleigh-Ritz core, with ``J`` available only
through per-parameter products of the per-layer factors (:mod:`sven_ext.capture`):

1. ``Y = J Omega`` (``R x s``, ``s = min(k + oversampling, R)``), summed over parameters.
   ``Omega`` is never stored: each parameter's block is regenerated tile by tile from the
   counter-based generator of :func:`sven_ext.ops.random_block` (or, for Khatri-Rao test
   matrices, from two small factors ``U (rows x s)``, ``V (rest x s)``: column ``j`` of a
   parameter's block is ``u_j (x) v_j``, so a Linear layer sketches with two GEMMs).
2. ``q`` power iterations: ``Q = orth(Y)``, ``Z_p = J_p^T Q``, ``Y = sum_p J_p Z_p``.
3. Core: ``Q = orth(Y)``, ``M = sum_p Z_p^T Z_p`` (float64) with ``Z_p = J_p^T Q`` formed a
   tile of the parameter's first axis at a time and dropped; then
   :func:`sven_ext.linalg.solve_projected` (``eigh(M) = W L W^T``, ``U_k = Q W_k``, the usual
   cut-offs on ``sqrt(L)``, ``c = U_k diag(1/L_k) U_k^T r``); the direction is ``J^T c``.

Memory: ``O(R s)`` plus the factors plus transients near ``transient_budget_bytes`` (a tile
``(rows, rest, s)`` of one parameter's ``Z``, chunks of per-row products). Modules handled by
the ``torch.func`` fallback (:class:`sven_ext.layers.ModuleUse`) hold their whole ``Z``
``(P_module, s)`` and ``Omega`` block. When ``s + warm-start columns >= R`` the basis is the
identity (``Q = I``): the solve is exact and no sketch is drawn.

Microbatched rows (``StepSettings.microbatch_size``) and a column scale ``S``
(``StepSettings.column_scale``, times the 0/1 masks of ``element_subsets``) are exact maps of
the same products: the factors describe the captured per-sample rows, and the step's Jacobian
is ``T J S`` (:class:`sven_ext.residuals.RowMap`),
so ``Y = T (J (S Omega))``, ``Z = S J^T (T^T Q)`` and the push ``T (J (S Z))``. ``S`` multiplies
the generated tiles and the ``Z`` tiles, so a scaled step draws dense tiles (no Khatri-Rao GEMM
route or fused sketch op). With either map ``sketch_residual`` is ``None`` (the factors give
``||J||_F`` of the captured, unscaled rows only). The identity basis applies once ``s`` reaches
the step's rows (``B / m``), not the captured ones.

Randomness. Step ``t`` uses the 63-bit key ``splitmix64(seed ^ splitmix64(t))`` for every
parameter, and parameter number ``i`` (its position in the optimizer's list) draws from
streams ``3 i`` (dense block), ``3 i + 1`` (Khatri-Rao ``U``) and ``3 i + 2`` (Khatri-Rao
``V``). Every entry is a pure function of (key, stream, row, column), so a step is
reproducible bitwise from ``(seed, step)`` on a given machine and thread count, and the
sequence continues across a ``state_dict`` round trip (the optimizer keeps the step counter).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import costs, distributed, ops
from ..layers import DirectUse, EmbeddingUse, LinearUse, factor_bytes
from ..layers.common import first_axis, items_within
from ..linalg import orthonormal_basis, solve_projected
from ..residuals import Rows
from ..routes import component_rows, components
from .base import StepDirection, StepSettings, effective_column_scale
from .factored import FactoredBackend, gemm_dtype, restrict

TEST_MATRICES = ("gaussian", "rademacher", "khatri_rao")
# Power iterations by default (bench/results/sketch_accuracy.json, decaying-spectrum MLP regression,
# s = k + 10): q = 1 cut the update's error against the exact rank-k update 3x below q = 0 and
# brought the linearised residual ||r + J delta|| within 0.3% of the exact step's; q = 2 gains
# another 3x in the update for two more passes over the factors.
DEFAULT_POWER_ITERATIONS = 1
_STRUCTURED = (LinearUse, EmbeddingUse, DirectUse)
_MASK64 = (1 << 64) - 1
# Each parameter's test matrix draws from its own streams: the i.i.d. block, or the Khatri-Rao U and V.
DENSE_STREAM, KR_U_STREAM, KR_V_STREAM = 0, 1, 2
STREAMS_PER_PARAMETER = 3


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def step_key(seed: int, step: int) -> int:
    """The generator key of step ``step``: 63 bits, so it is a non-negative int64 for the ops."""
    return _splitmix64((seed & _MASK64) ^ _splitmix64(step)) >> 1


class Omega:
    """The test matrix of one step, one virtual block per parameter, generated where it is used.

    Args:
        kind: ``"gaussian"``, ``"rademacher"`` or ``"khatri_rao"``.
        columns: ``s``.
        seed, step: fix the generator key (:func:`step_key`).
        params: the optimizer's parameters; a parameter's position picks its streams.
        device: where tiles are generated.
    """

    def __init__(self, kind: str, columns: int, seed: int, step: int, params, device):
        self.kind = kind
        self.columns = columns
        self.seed = step_key(seed, step)
        self.distribution = "rademacher" if kind == "rademacher" else "gaussian"
        self.device = device
        self._index = {id(p): i for i, p in enumerate(params)}

    def dense(self, p: torch.Tensor) -> bool:
        """Whether ``p``'s block is i.i.d. (Khatri-Rao applies to parameters of 2 or more axes)."""
        return self.kind != "khatri_rao" or p.dim() < 2

    def stream(self, p: torch.Tensor, part: int = DENSE_STREAM) -> int:
        """The generator stream of one part (:data:`DENSE_STREAM`, :data:`KR_U_STREAM`, :data:`KR_V_STREAM`)
        of parameter ``p``'s block: parameters are numbered by their position in the optimizer."""
        return STREAMS_PER_PARAMETER * self._index[id(p)] + part

    def _block(self, rows: int, row_offset: int, stream: int, dtype, distribution: str) -> torch.Tensor:
        return ops.random_block(rows, self.columns, seed=self.seed, stream=stream, row_offset=row_offset,
                                distribution=distribution, dtype=dtype, device=self.device)

    def tile(self, p: torch.Tensor, lo: int, hi: int, dtype: torch.dtype) -> torch.Tensor:
        """Rows of ``p``'s block for first-axis rows ``lo:hi``: ``(hi - lo, rest, s)``."""
        rest = first_axis(p)[1]
        if self.dense(p):
            block = self._block((hi - lo) * rest, lo * rest, self.stream(p), dtype, self.distribution)
            return block.view(hi - lo, rest, self.columns)
        u = self._block(hi - lo, lo, self.stream(p, KR_U_STREAM), dtype, "gaussian")
        v = self._block(rest, 0, self.stream(p, KR_V_STREAM), dtype, "gaussian")
        return u[:, None, :] * v[None, :, :]

    def factors(self, p: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Khatri-Rao factors of ``p``'s block: ``U (rows, s)``, ``V (rest, s)``."""
        rows, rest = first_axis(p)
        return (self._block(rows, 0, self.stream(p, KR_U_STREAM), dtype, "gaussian"),
                self._block(rest, 0, self.stream(p, KR_V_STREAM), dtype, "gaussian"))


@dataclass
class _Component:
    """Parameters joined by their uses. ``rows``: products through per-row gradients (fallback modules)."""

    params: list
    uses: list
    by_param: dict
    rows: bool
    width: int


@dataclass
class _Plan:
    components: list
    rows: int  # captured rows
    work: torch.dtype  # dtype of the products (the factors' precision)
    budget: int  # bytes of one transient
    fused: bool
    scales: dict | None = None  # {id(p): S_p as (first, rest)} in ``work``; None: S = I

    def scale(self, p: torch.Tensor, lo: int, hi: int, x: torch.Tensor) -> torch.Tensor:
        """``S_p x`` for a tile ``x`` ``(hi - lo, rest, s)`` of ``p``'s first-axis rows ``lo:hi``."""
        return x if self.scales is None else x * self.scales[id(p)][lo:hi, :, None].to(x.dtype)

    def scale_rows(self, comp: _Component, x: torch.Tensor) -> torch.Tensor:
        """``S x`` for ``x`` ``(width, s)`` over a component's parameters, laid out as its per-row gradients."""
        if self.scales is None:
            return x
        return x * torch.cat([self.scales[id(p)].reshape(-1) for p in comp.params]).to(x.dtype)[:, None]

    def tiles(self, p: torch.Tensor, columns: int):
        """First-axis ranges of ``p`` whose ``Z`` tile (and its float64 copy) fit the budget."""
        first, rest = first_axis(p)
        step = items_within(first, 3 * rest * columns * 8, self.budget)
        return [(lo, min(lo + step, first)) for lo in range(0, first, step)]


def _summed(shard, compute) -> torch.Tensor:
    """``compute()``, summed over the ranks of a data-parallel step (in one process: as it is)."""
    return shard.reduce(lambda: [compute()], "sketch")[0]


class SketchBackend(FactoredBackend):
    """Randomized range finder and Rayleigh-Ritz core over the factors; ``c`` and ``J^T c`` as in gram.

    Shares the gram backend's capture, factor check and contraction (:class:`FactoredBackend`).

    Attributes:
        transient_budget_bytes: bytes of one transient (a ``Z`` tile, a chunk of products);
            lowered to fit ``max_memory``.
        fused: use the fused ops :func:`sven_ext.ops.linear_sketch` / ``linear_project`` for
            Linear layers (``None``: on CUDA only; on CPU the GEMM routes measured faster).

    Args:
        model, params, checks: as for :class:`sven_ext.backends.base.Backend`.
        fused: the ``fused`` attribute.
    """

    name = "sketch"
    transient_budget_bytes = costs.TRANSIENT_BUDGET_BYTES

    def __init__(self, model: torch.nn.Module, params: list[torch.Tensor], checks=None, *,
                 fused: bool | None = None):
        super().__init__(model, params, checks)
        self.fused = fused

    def estimate(self, rows: Rows, uses: list, settings: StepSettings) -> costs.Estimate:
        """The step's cost (:func:`sven_ext.costs.estimate_sketch`) from its captured factors."""
        count, sk = rows.residual.numel(), settings.sketch
        columns = min(settings.truncation.cap(count) + sk.oversampling, count)
        return costs.estimate_sketch(uses, rows.captured.numel(), columns, sk.power_iterations, sk.test_matrix,
                                     self.transient_budget_bytes, count)

    def solve(self, rows: Rows, uses: list, checked: bool, settings: StepSettings,
              shard: distributed.SingleProcess | distributed.Shard) -> StepDirection:
        """The step from captured factors (the closure has run).

        Data-parallel (``shard`` a :class:`sven_ext.distributed.Shard`), ``rows`` and ``uses`` are the
        whole batch's and every rank draws the same test matrices from the shared seed. The passes over
        the factors are split by parameter: each rank forms ``Y`` and ``M``'s terms for its share of the
        components, and an all-reduce sums them (``R x s`` and ``s x s`` numbers, where all-reducing
        ``Z_p`` would move ``P x s``); the final contraction is split by row
        (:meth:`FactoredBackend._contraction`). ``sketch_residual`` is then not computed.
        """
        scale = effective_column_scale(settings, self.params)
        sk = settings.sketch
        dtype = settings.solve_dtype
        residual = rows.residual.detach().to(dtype)
        count = residual.numel()
        truncation = settings.truncation.for_rows(count, rows.scale)
        columns = min(truncation.k + sk.oversampling, count)
        basis = sk.basis if sk.basis is not None and sk.basis.shape[0] == count else None
        width = columns + (0 if basis is None else basis.shape[1])
        plan = self._plan(uses, rows.captured.numel(), width, settings, residual.device, scale)
        plan.components = shard.share(plan.components, [c.width for c in plan.components])
        exact = width >= count
        if exact:
            q = torch.eye(count, dtype=dtype, device=residual.device)
        else:
            q = self._range(plan, rows, sk, columns, basis, dtype, shard)
        # ||J||_F from the factors is that of the captured, unscaled Jacobian: only then comparable.
        norms = rows.row_map is None and scale is None and not shard.data_parallel
        core, norm_sq = self._core(plan, rows.to_captured(q), norms)
        core = _summed(shard, lambda: core)
        solution = solve_projected(q, core, residual, truncation)
        # J^T c on the subsets' smaller factors, where the gram backend would restrict them.
        restricted, scales = self._subsets_and_scales(uses, settings)
        contract = self._contraction(restrict(uses, restricted), rows, scales, shard, restricted)
        captured = float(core.diagonal().sum())
        info = {
            "sketch_size": q.shape[1],
            "power_iterations": 0 if exact else sk.power_iterations,
            "test_matrix": "identity" if exact else sk.test_matrix,
            "warm_start_columns": 0 if basis is None else basis.shape[1],
            # ||(I - Q Q^T) J||_F / ||J||_F: the part of J the basis misses (None: not cheap here).
            "sketch_residual": None if norm_sq is None or norm_sq <= 0
            else max(norm_sq - captured, 0.0) ** 0.5 / norm_sq ** 0.5,
            "factor_bytes": factor_bytes(uses),
            "transient_budget": plan.budget,
            "fused": plan.fused,
            "checked": checked,
            "recorded_whole": self.recorded_whole,
            **shard.info(self.params),
        }
        return StepDirection(rows, solution, info, {"basis": solution.left_vectors}, contract=contract)

    def _range(self, plan: _Plan, rows: Rows, sk, columns: int, basis, dtype: torch.dtype, shard) -> torch.Tensor:
        """``Q``: an orthonormal basis of ``J Omega`` (with the warm-start ``basis`` joined) after
        ``sk.power_iterations`` products with ``J J^T``, over the step's rows."""
        omega = Omega(sk.test_matrix, columns, sk.seed, sk.step, self.params, rows.residual.device)
        y = rows.to_rows(_summed(shard, lambda: self._sketch(plan, omega, dtype)))
        if basis is not None:
            y = torch.cat([y, basis.to(dtype)], dim=1)
        for _ in range(sk.power_iterations):
            basis_rows = rows.to_captured(orthonormal_basis(y))
            y = rows.to_rows(_summed(shard, lambda: self._power_step(plan, basis_rows)))
        return orthonormal_basis(y)

    # ----------------------------------------------------------------- planning

    def _plan(self, uses: list, count: int, columns: int, settings: StepSettings, device, scale) -> _Plan:
        planned = []
        for params, group in components(uses):
            by_param = {id(p): [u for u in group if any(q is p for q in u.params)] for p in params}
            rows = not all(isinstance(u, _STRUCTURED) for u in group)
            planned.append(_Component(params, group, by_param, rows, sum(p.numel() for p in params)))
        budget = self.transient_budget_bytes
        if settings.max_memory is not None:
            fixed = factor_bytes(uses) + costs.sketch_fixed_bytes(count, columns, planned)
            budget = min(budget, (settings.max_memory - fixed) // costs.TRANSIENTS)
            if budget < costs.MIN_TRANSIENT_BYTES:
                raise ValueError(
                    f"max_memory={settings.max_memory} bytes is too small for the sketch backend: the factors and "
                    f"the R x s blocks (R={count}, s={columns}) already need {costs.mib(fixed)}, plus at least "
                    f"{costs.mib(costs.TRANSIENTS * costs.MIN_TRANSIENT_BYTES)} of transients"
                )
        work = gemm_dtype(uses[0].params[0].dtype) if uses else settings.solve_dtype
        fused = self.fused if self.fused is not None else device.type == "cuda"
        scales = None
        if scale is not None:
            scales = {id(p): s.reshape(first_axis(p)).to(work) for p, s in zip(self.params, scale)}
        return _Plan(planned, count, work, int(budget), fused, scales)

    # ----------------------------------------------------------------- products with J

    def _row_blocks(self, comp: _Component, plan: _Plan):
        """``(r0, r1, G)``: per-row gradients of the component, ``(r1 - r0, width)``, in row chunks."""
        size = torch.finfo(plan.work).bits // 8
        chunk = items_within(plan.rows, comp.width * size, plan.budget)
        for r0 in range(0, plan.rows, chunk):
            r1 = min(r0 + chunk, plan.rows)
            yield r0, r1, component_rows(comp.params, comp.uses, r0, r1, plan.work)

    def _sketch(self, plan: _Plan, omega: Omega, dtype: torch.dtype) -> torch.Tensor:
        """``Y = J Omega``, ``(R, s)`` in ``dtype``."""
        y = torch.zeros(plan.rows, omega.columns, dtype=dtype, device=omega.device)
        for comp in plan.components:
            if comp.rows:
                block = torch.cat([
                    plan.scale(p, 0, first_axis(p)[0], omega.tile(p, 0, first_axis(p)[0], plan.work))
                    .reshape(-1, omega.columns) for p in comp.params
                ])
                for r0, r1, g in self._row_blocks(comp, plan):
                    y[r0:r1] += g @ block
                continue
            for p in comp.params:
                generic = []
                for use in comp.by_param[id(p)]:
                    # A use's own route draws Omega inside it, where S cannot reach: scaled tiles go generic.
                    part = None if plan.scales is not None else use.sketch(p, omega, plan.work, plan.budget, plan.fused)
                    if part is None:
                        generic.append(use)
                    else:
                        y += part
                if generic:
                    for lo, hi in plan.tiles(p, omega.columns):
                        tile = plan.scale(p, lo, hi, omega.tile(p, lo, hi, plan.work))
                        for use in generic:
                            y += use.push(p, lo, hi, tile, plan.budget, plan.fused)
        return y

    def _core(self, plan: _Plan, q: torch.Tensor, norms: bool) -> tuple[torch.Tensor, float | None]:
        """``(M, ||J||_F^2 or None)``: the core ``M = sum_p Z_p^T Z_p`` with ``Z_p = S_p J_p^T q``.

        ``q`` ``(rows, s)`` is over the captured rows. The norm is computed with ``norms`` where every
        component allows it cheaply (one use per component, or per-row gradients at hand).
        """
        columns = q.shape[1]
        work = q.to(plan.work)
        core = torch.zeros(columns, columns, dtype=q.dtype, device=q.device)
        norm_sq = 0.0 if norms else None
        for comp in plan.components:
            if comp.rows:
                z, g_sq = self._pull_rows(comp, plan, work, norm_sq is not None)
                wide = plan.scale_rows(comp, z).to(q.dtype)
                core.addmm_(wide.T, wide)
                norm_sq = None if norm_sq is None else norm_sq + g_sq
                continue
            for p in comp.params:
                uses = comp.by_param[id(p)]
                for lo, hi in plan.tiles(p, columns):
                    z = plan.scale(p, lo, hi, self._pull(uses, p, lo, hi, work, plan))
                    wide = z.reshape(-1, columns).to(q.dtype)
                    core.addmm_(wide.T, wide)
            if norm_sq is not None:
                norm_sq = norm_sq + comp.uses[0].frobenius_sq(q.dtype, plan.budget) if len(comp.uses) == 1 else None
        return core, norm_sq

    def _power_step(self, plan: _Plan, q: torch.Tensor) -> torch.Tensor:
        """``Y = (J S)(J S)^T q = J S (S J^T q)``, so ``S`` is applied twice; ``q`` and ``Y`` are over the
        captured rows."""
        y = torch.zeros(plan.rows, q.shape[1], dtype=q.dtype, device=q.device)
        work = q.to(plan.work)
        for comp in plan.components:
            if comp.rows:
                z = self._pull_rows(comp, plan, work, False)[0]
                z = plan.scale_rows(comp, plan.scale_rows(comp, z))
                for r0, r1, g in self._row_blocks(comp, plan):
                    y[r0:r1] += g @ z
                continue
            for p in comp.params:
                uses = comp.by_param[id(p)]
                for lo, hi in plan.tiles(p, q.shape[1]):
                    z = plan.scale(p, lo, hi, plan.scale(p, lo, hi, self._pull(uses, p, lo, hi, work, plan)))
                    for use in uses:
                        y += use.push(p, lo, hi, z, plan.budget, plan.fused)
        return y

    def _pull_rows(self, comp: _Component, plan: _Plan, work: torch.Tensor, norms: bool) -> tuple[torch.Tensor, float]:
        """``(J_c^T q, ||J_c||_F^2 or 0)`` of a per-row-gradient component, ``(width, s)``."""
        z = torch.zeros(comp.width, work.shape[1], dtype=plan.work, device=work.device)
        norm_sq = 0.0
        for r0, r1, g in self._row_blocks(comp, plan):
            z.addmm_(g.T, work[r0:r1])
            if norms:
                norm_sq += float(g.to(torch.float64).square().sum())
        return z, norm_sq

    @staticmethod
    def _pull(uses: list, p: torch.Tensor, lo: int, hi: int, work: torch.Tensor, plan: _Plan) -> torch.Tensor:
        """``J_p^T q`` for ``p``'s first-axis rows ``lo:hi``, summed over its uses."""
        z = uses[0].pull(p, lo, hi, work, plan.budget)
        for use in uses[1:]:
            z += use.pull(p, lo, hi, work, plan.budget)
        return z
