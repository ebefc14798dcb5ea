"""What the gram and sketch backends share (DESIGN.md sections 2.1, 3 and 3.5): the capture of
per-layer factors, the factor check, the element subsets and the contraction ``J^T c``.

One forward pass (the closure) with hooks and one batched backward pass give per-layer factors
(:mod:`sven_ext.capture`). A step whose signature is new first checks them against autograd
(:mod:`sven_ext.factor_check`). The direction ``J^T c`` is one weighted contraction per layer; with
element subsets an ungrouped Linear/conv weight contracts its smaller restricted factors and writes
the result back with :func:`sven_ext.ops.block_put_`.

Data-parallel steps (``StepSettings.process_group``): :meth:`FactoredBackend.batch_factors` gathers
every rank's rows and factors (:mod:`sven_ext.distributed`), and each rank contracts its own rows,
summed by one all-reduce.
"""

from __future__ import annotations

import dataclasses

import torch

from .. import costs, distributed, factor_check, ops
from ..capture import capture
from ..factor_check import FactorChecks, FactorMismatch
from ..layers import EmbeddingUse, LinearUse, ModuleUse, factor_bytes
from ..layers.common import combine_rows, first_axis, items_within
from ..linalg import check_finite
from ..residuals import Rows, rows_from_closure_output
from ..routes import components
from .base import Backend, ElementSubset, StepSettings, effective_column_scale

# The factor check's live transients (a block of J^T w, autograd's block, a pull's products, a
# block of absolute factors), each at most this fraction of the transient budget.
CHECK_TRANSIENTS = 8
# Most elements of a temporary while an element subset's direction is written into its weight.
SUBSET_CHUNK_ELEMENTS = 1 << 18


class FactoredBackend(Backend):
    """A backend that works on captured per-layer factors: the capture, the factor check, the
    contraction. Subclasses implement ``estimate`` and ``solve``, which :meth:`compute` runs.

    Every step whose signature (rows, autograd graph, hooks, layer shapes) was not checked
    before also checks the factors (:mod:`sven_ext.factor_check`): the direction they give
    for random row weights ``w`` must equal ``J^T w`` from autograd, parameter by parameter.
    This catches a parameter read outside its module's forward, a layer or loss that mixes
    samples, or a batch that is not on axis 0, with an error naming the parameter.

    Attributes:
        row_budget_bytes: most bytes of per-row gradients held at once (float64).
    """

    row_budget_bytes = costs.TRANSIENT_BUDGET_BYTES

    def __init__(self, model: torch.nn.Module, params: list[torch.Tensor], checks: FactorChecks | None = None):
        super().__init__(model, params, checks)
        self.recorded_whole: list[str] = []
        self.last_need: int | None = None  # bytes the last step needed (held + solve), for max_memory
        self._names = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            self._names.setdefault(id(p), name)

    def compute(self, closure, settings: StepSettings):
        """The step: the factors of the closure's batch, then the subclass's ``estimate(rows, uses,
        settings)`` against the budget (a step that does not fit raises here, before anything large
        is allocated), then its ``solve(rows, uses, checked, settings, shard)``."""
        self._require_last_fit(settings)
        rows, uses, checked, shard = self.batch_factors(closure, settings)
        self._require_fit(self.estimate(rows, uses, settings), rows, uses, settings)
        return self.solve(rows, uses, checked, settings, shard)

    def _require_fit(self, estimate, rows: Rows, uses: list, settings: StepSettings) -> None:
        """:func:`sven_ext.costs.require_fit` after the forward pass; remembers the step's need."""
        held = self._held(rows, uses, settings)
        self.last_need = held + estimate.min_bytes
        costs.require_fit(estimate, held, settings.max_memory, self.params[0].device)

    def _require_last_fit(self, settings: StepSettings) -> None:
        """Raises before the forward pass when the previous step's shapes needed more than
        ``max_memory`` (it was lowered since). Checked once: a retry runs the forward pass and is
        checked on its own shapes (a smaller batch may fit)."""
        need, self.last_need = self.last_need, None
        if settings.max_memory is not None and need is not None and need > settings.max_memory:
            raise ValueError(
                f"backend={self.name!r}: the previous step's shapes needed about {costs.mib(need)}, more than "
                f"the max_memory ({costs.mib(settings.max_memory)}); this step was refused before its forward "
                "pass and nothing changed. Raise max_memory or lower the batch size (a retry runs the forward "
                "pass and is checked on its own shapes)"
            )

    def _subsets_and_scales(self, uses: list, settings: StepSettings) -> tuple[dict, dict]:
        """``({id(p): subset}, {id(p): S_p})``: the element subsets that become smaller factors,
        and the column scales (RMSProp's, the other subsets' 0/1 masks) of the parameters that have one."""
        scaled = settings.column_scale is not None  # checked by effective_column_scale
        subsets = settings.element_subsets
        restricted = {} if subsets is None or scaled else restrictable(uses, self.params, subsets)
        full = effective_column_scale(settings, self.params, skip=set(restricted))
        if full is None:
            return restricted, {}
        subsets = subsets or [None] * len(self.params)
        return restricted, {
            id(p): s for p, s, subset in zip(self.params, full, subsets)
            if scaled or (subset is not None and id(p) not in restricted)
        }

    def batch_factors(self, closure, settings: StepSettings):
        """:meth:`factors` of the step's whole batch: ``(rows, uses, checked, shard)``.

        ``shard`` is the step's reducer (:func:`sven_ext.distributed.batch_of`): with
        ``settings.process_group`` the rows and uses are every rank's, concatenated in rank order,
        and the shard holds this rank's own and sums over the ranks; else the batch is this
        process's and every reduction is the local value.
        """
        shard, checked = distributed.batch_of(settings.process_group, lambda: self.factors(closure, settings),
                                              self._names)
        return shard.rows, shard.uses, checked, shard

    def factors(self, closure, settings: StepSettings):
        """Runs the closure under capture: ``(rows, uses, checked)`` (checked: the factor check ran)."""
        with torch.enable_grad():
            with capture(self.model, self.params, self.checks.broadcasts) as cap:
                output = closure()
            rows = rows_from_closure_output(output, settings.kappa, settings.microbatch_size)
            # The factors describe the captured rows; the row map is applied to their products.
            step, per_param, per_module = cap.signature(rows.per_sample)
            verdict = self.checks.verdict(step)
            shared = {key for key, calls in per_module.items() if (key, calls) in verdict.shared}
            checked = self.checks.enabled and any(
                (id(p), per_param.get(id(p))) not in verdict.params for p in self.params)
            uses = cap.uses(rows.per_sample, settings.chunk_rows, shared)
            by_param = {id(p): [] for p in self.params}
            for use in uses:
                for p in use.params:
                    by_param[id(p)].append(use)
            self._check_uncovered(rows.captured, by_param)
            if checked:
                costs.require_fit(costs.estimate_check(uses, self.params, self.name), self._held(rows, uses, settings),
                                  settings.max_memory, self.params[0].device)
                uses, found = self._check_or_share(cap, rows, uses, shared, settings.chunk_rows)
                verdict.params.update((id(p), per_param.get(id(p))) for p in self.params)
                verdict.shared.update((key, per_module[key]) for key in found)
            # Modules whose rows came from one backward pass per row (slow, still exact).
            self.recorded_whole = sorted({call.name for call in cap.calls if call.whole})
        # Nothing differentiates the rows again: without their graph, the forward pass's saved
        # activations are freed before the solve.
        return _detached(rows), uses, checked

    def _check_or_share(self, cap, rows: Rows, uses: list, shared: set, chunk_rows: int):
        """Checks the factors; where a parameter fails, tries its modules as shared by every sample.

        A module's output is taken per sample when its first axis has the batch's size, so
        ``pos(arange(T))`` with ``T == B`` is misread; recorded whole, its factors pass the check.

        Returns:
            ``(uses, modules)``: the checked uses and the ids of the modules found shared.
        """
        weights = factor_check.probe_weights(rows.captured)
        try:
            self._check_factors(uses, rows.captured, weights)
            return uses, set()
        except FactorMismatch as mismatch:
            suspects = {id(call.module) for call in cap.calls
                        if not call.whole and any(id(p) in mismatch.params for _, p in call.params)}
            if not suspects:
                raise
            retried = cap.uses(rows.per_sample, chunk_rows, shared | suspects)
            try:
                self._check_factors(retried, rows.captured, weights)
            except FactorMismatch:
                raise mismatch from None
        return retried, suspects

    def _held(self, rows: Rows, uses: list, settings: StepSettings) -> int:
        """What the step holds before its solve: the factors, and with ``max_memory`` the forward
        pass's saved activations too (:func:`sven_ext.costs.held_bytes`)."""
        if settings.max_memory is None:
            return factor_bytes(uses)
        return costs.held_bytes(rows.per_sample, uses, self.model)

    def _check_uncovered(self, residual: torch.Tensor, by_param: dict) -> None:
        """A moving parameter with no use must not affect the rows (one cheap backward if any)."""
        missing = [p for p in self.params if not by_param[id(p)]]
        if not missing:
            return
        grads = torch.autograd.grad(residual.sum(), missing, retain_graph=True, allow_unused=True)
        uncovered = [self._names.get(id(p), "?") for p, g in zip(missing, grads) if g is not None]
        if uncovered:
            raise RuntimeError(
                f"the gram backend captured no per-sample factors for parameter(s) {uncovered}, yet the "
                "residuals depend on them: they are used outside the forward of the module that owns "
                "them (e.g. `x @ layer.weight.T`). Call the module instead, or use backend='dense'"
            )

    def _check_factors(self, uses: list, residual: torch.Tensor, weights: torch.Tensor) -> None:
        """The factors' ``J^T w`` must match autograd's, parameter by parameter (``w``: ``weights``).

        Each parameter is compared as soon as autograd's backward pass has its gradient
        (:func:`sven_ext.factor_check.probe`), in float64 over blocks of its first axis (every use's
        ``pull`` of the block, for ``J^T w`` and ``|J|^T |w|``), blocks of at most
        ``row_budget_bytes``: the check holds one parameter's gradient and one block, not the
        model's gradient or float64 copies of it. Parameters of fallback modules (no ``pull``, no
        absolute bound) are compared whole.

        Raises:
            FactorMismatch: naming the first parameter that fails; ``params`` holds every one.
        """
        w = weights.to(torch.float64).reshape(-1, 1)
        # id(p) -> (its uses, or its component's where whole; the component's absolute copies, or its
        # J^T w where whole; whole: the component has a fallback module)
        component = {}
        left = {}  # per component, its parameters not compared yet: its copies go with the last one
        for params, group in components(uses):
            whole = any(not hasattr(use, "pull") for use in group)  # the fallback's ModuleUse
            absolute = {}  # id(use) -> its absolute copy, made when first needed; whole: its J^T w
            left[id(absolute)] = len(params)
            for p in params:
                own = group if whole else [use for use in group if any(q is p for q in use.params)]
                component[id(p)] = (own, absolute, whole)
        found = {}  # id(p) -> (error, scale)

        def compare(p: torch.Tensor, true: torch.Tensor | None) -> None:
            if id(p) not in component:  # not captured: _check_uncovered showed it does not move the rows
                found[id(p)] = (0.0, 0.0)
                return
            own, absolute, whole = component.pop(id(p))
            compared = self._compare_whole if whole else self._compare_blocks
            found[id(p)] = compared(p, own, absolute, w, true)
            left[id(absolute)] -= 1
            if not left[id(absolute)]:
                absolute.clear()

        factor_check.probe(residual, self.params, weights, compare)
        dtypes = {id(p): {p.dtype} for p in self.params}
        for use in uses:
            for p in use.params:
                dtypes[id(p)].update(_factor_dtypes(use))
        factor_check.judge(self.params, [found[id(p)] for p in self.params], [dtypes[id(p)] for p in self.params],
                           self._names)

    def _compare_blocks(self, p: torch.Tensor, uses: list, absolute: dict, w: torch.Tensor, true) -> tuple:
        """``(||J_p^T w - g||, |||J_p|^T |w|||)`` over blocks of ``p``'s first axis (``g``: autograd's).

        ``absolute``: the absolute copies of the component's uses made so far (shared by its
        parameters); a linear map's weight takes the absolute values of its block of ``d`` alone
        (an output head's ``d`` is vocabulary-wide).
        """
        first, rest = first_axis(p)
        true = None if true is None else true.reshape(first, rest)
        name = f"the gradient of parameter {self._names.get(id(p), '?')!r}"
        # A block, autograd's part of it in float64 and each pull's transients share the budget.
        budget = self.row_budget_bytes // CHECK_TRANSIENTS
        block = items_within(first, rest * 8, budget)
        error, scale = 0.0, 0.0
        for lo in range(0, first, block):
            hi = min(lo + block, first)
            mine = sum(use.pull(p, lo, hi, w, budget) for use in uses).reshape(hi - lo, rest)
            if true is not None:
                part = true[lo:hi].to(w.dtype)
                check_finite(part, name)
                mine -= part
            error += float(mine.square().sum())
            del mine
            magnitude = sum(_absolute_pull(use, p, lo, hi, w.abs(), budget, absolute) for use in uses)
            scale += float(magnitude.square().sum())
        return error ** 0.5, scale ** 0.5

    def _compare_whole(self, p: torch.Tensor, uses: list, directions: dict, w: torch.Tensor, true) -> tuple:
        """``(||J_p^T w - g||, ||g|| + ||J_p^T w||)`` for a parameter of a component with a fallback
        module: whole float64 ``J^T w`` (there is no absolute bound). ``directions``: the uses'
        ``J^T w`` per parameter, formed once for the component and handed out here."""
        if not directions:
            for use in uses:
                for q, part in zip(use.params, use.direction(w[:, 0])):
                    directions[id(q)] = part if id(q) not in directions else directions[id(q)].add_(part)
        mine = directions.pop(id(p), None)
        mine = torch.zeros_like(p, dtype=w.dtype) if mine is None else mine
        true = torch.zeros_like(mine) if true is None else true.to(mine.dtype)
        check_finite(true, f"the gradient of parameter {self._names.get(id(p), '?')!r}")
        return float((mine - true).norm()), float(true.norm() + mine.norm())

    def _contraction(self, uses: list, rows: Rows, scales: dict, shard, restricted: dict):
        """``c -> S^2 J^T T^T c`` for coefficients ``c`` ``(R,)`` over the step's rows.

        Data-parallel, each rank contracts its own rows and one all-reduce sums the ranks' parts
        (the communication of a gradient all-reduce), so the per-row work is split. ``uses`` are
        the (restricted) uses of the whole batch, this process's in one process.
        """
        local = restrict(shard.local_uses, restricted) if shard.data_parallel else uses
        return lambda c: shard.reduce(
            lambda: self._step_directions(local, shard.local_rows, shard.local(c), scales))

    def _step_directions(self, uses: list, rows: Rows, c: torch.Tensor, scales: dict) -> list[torch.Tensor]:
        """``S^2 J^T T^T c``: the direction of the step's coefficients ``c`` ``(R,)``, per parameter."""
        directions = self._directions(uses, rows.to_captured(c))
        return [d.mul_(scales[id(p)].to(d.dtype).square()) if id(p) in scales else d
                for p, d in zip(self.params, directions)]

    def _directions(self, uses: list, c: torch.Tensor) -> list[torch.Tensor]:
        """``J^T c`` per parameter, in the parameters' dtypes.

        Each use contracts in its factors' precision (float32 for float32 models: the factors' own
        rounding already bounds the accuracy, and the float32 GEMM is twice as fast), so no float64
        copy of the parameters is ever held. An embedding table tied to a linear map scatters into
        the map's direction (linear uses go first), so no table-sized zeros are filled.
        """
        total = {}
        for use in sorted(uses, key=lambda u: isinstance(u, EmbeddingUse)):
            weights = c.to(gemm_dtype(use.params[0].dtype))
            if isinstance(use, EmbeddingUse) and id(use.param) in total:
                use.direction(weights, into=total[id(use.param)])
                continue
            parts = _linear_direction(use, weights) if type(use) is LinearUse else use.direction(weights)
            for p, part in zip(use.params, parts):
                part = part.to(p.dtype)
                total[id(p)] = part if id(p) not in total else total[id(p)].add_(part)
        return [total[id(p)] if id(p) in total else torch.zeros_like(p) for p in self.params]


@dataclasses.dataclass
class SubsetLinearUse(LinearUse):
    """A Linear/conv use restricted to an element subset of its weight: ``a`` keeps the input
    features ``features``, ``d`` the output units ``units`` (the bias moves on those units).

    ``K`` routes read only ``a``, ``d`` and ``bias``, so they run unchanged on the smaller
    factors; directions and per-row gradients are written into the full shapes, zero elsewhere
    (on CPU this costs less than masking the whole layer's contraction from 4 samples up, and
    about 0.1 ms more on a 512 x 784 weight at 1 or 2).
    """

    units: torch.Tensor | None = None
    features: torch.Tensor | None = None

    def direction(self, c: torch.Tensor) -> list[torch.Tensor]:
        dc = combine_rows(self.d, c, self.a.shape[0])[:, :, 0]  # (S, T, units): one group
        a = self.a[:, :, 0].to(c.dtype).expand(dc.shape[0], -1, -1)
        a = a.reshape(-1, a.shape[-1])  # (sample, position) pairs x features
        weight = torch.zeros(self.param.shape[0], self.param[0].numel(), dtype=c.dtype, device=c.device)
        # A few units at a time, so that no temporary approaches the weight's size.
        chunk = max(1, SUBSET_CHUNK_ELEMENTS // self.features.numel())
        for lo in range(0, self.units.numel(), chunk):
            hi = min(lo + chunk, self.units.numel())
            ops.block_put_(weight, self.units[lo:hi], self.features, dc[:, :, lo:hi].reshape(-1, hi - lo).T @ a)
        if self.bias is None:
            return [weight.view(self.param.shape)]
        bias = torch.zeros(self.bias.shape, dtype=c.dtype, device=c.device)
        bias.index_copy_(0, self.units, dc.sum((0, 1)))
        return [weight.view(self.param.shape), bias]

    def rows(self, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
        part = super().rows(start, stop, dtype)
        weight = torch.zeros(stop - start, self.param.shape[0], self.param[0].numel(), dtype=dtype, device=part.device)
        units = self.units.numel()
        ops.block_put_(weight, self.units, self.features, part[:, :units * self.features.numel()].view(
            stop - start, units, -1))
        if self.bias is None:
            return weight.reshape(stop - start, -1)
        bias = torch.zeros(stop - start, self.bias.numel(), dtype=dtype, device=part.device)
        bias[:, self.units] = part[:, units * self.features.numel():]
        return torch.cat([weight.reshape(stop - start, -1), bias], dim=1)


def restrictable(uses: list, params: list[torch.Tensor], subsets: list) -> dict:
    """``{id(p): subset}`` of the parameters whose element subset can restrict their factors:
    weights whose every use is an ungrouped Linear/conv, with their biases when a bias's subset
    is the weight's units."""
    chosen = {id(p): s for p, s in zip(params, subsets) if s is not None}

    def fits(use) -> bool:
        if not isinstance(use, LinearUse) or use.a.shape[2] != 1 or use.transposed:
            return False
        weight = chosen.get(id(use.param))
        if weight is None or weight.cols is None:
            return False
        if use.bias is None:
            return True
        bias = chosen.get(id(use.bias))
        return bias is not None and bias.cols is None and torch.equal(bias.rows, weight.rows)

    while True:  # a parameter that misfits in one use falls back everywhere, with its partners
        misfits = {id(p) for use in uses if not fits(use) for p in use.params} & chosen.keys()
        if not misfits:
            return chosen
        chosen = {key: s for key, s in chosen.items() if key not in misfits}


def restrict(uses: list, restricted: dict) -> list:
    """``uses`` with every use of a restricted weight on its subset's factors."""
    if not restricted:
        return uses
    out = []
    for use in uses:
        subset: ElementSubset | None = restricted.get(id(use.params[0])) if isinstance(use, LinearUse) else None
        if subset is None:
            out.append(use)
            continue
        a = use.a.index_select(3, subset.cols.to(use.a.device))
        d = use.d.index_select(3, subset.rows.to(use.d.device))
        out.append(SubsetLinearUse(use.param, a, d, use.bias, units=subset.rows, features=subset.cols))
    return out


def _detached(rows: Rows) -> Rows:
    """``rows`` without autograd history."""
    return dataclasses.replace(rows, residual=rows.residual.detach(), per_sample=rows.per_sample.detach())


def _linear_direction(use: LinearUse, c: torch.Tensor) -> list[torch.Tensor]:
    """``use.direction(c)``, for an ungrouped layer with one row per sample without a factor-sized
    temporary: ``sum_r c_r d_r^T a_r`` scales the smaller of ``a`` and ``d`` (an output head's ``d``
    is vocabulary-wide), and the GEMM writes the weight in its stored layout."""
    samples, steps, groups, din = use.a.shape
    rows, dout = use.d.shape[0], use.d.shape[3]
    if groups != 1 or rows != samples:
        return use.direction(c)
    a = use.a.reshape(-1, din).to(c.dtype)
    d = use.d.reshape(-1, dout).to(c.dtype)
    scale = c.repeat_interleave(steps).unsqueeze(1)
    if din <= dout:
        a = a * scale
    else:
        d = d * scale
    weight = a.T @ d if use.transposed else d.T @ a
    if use.bias is None:
        return [weight.view(use.param.shape)]
    return [weight.view(use.param.shape), (c @ use.d.sum(1).reshape(rows, -1).to(c.dtype)).view(use.bias.shape)]


def _absolute_pull(use, p: torch.Tensor, lo: int, hi: int, q: torch.Tensor, budget: int, absolute: dict):
    """``|J_p[:, lo:hi]|^T q`` (``q >= 0``) from ``use``'s absolute factors: for an ungrouped linear
    map from those of the block alone (its ``d`` restricted to the block's output units, or a
    transposed weight's ``a`` to its input features); else from ``use``'s absolute copy, made once
    into ``absolute``."""
    if isinstance(use, LinearUse) and use.a.shape[2] == 1:
        if p is use.bias:
            part = dataclasses.replace(use, d=use.d[..., lo:hi].abs())
        elif use.transposed:
            part = dataclasses.replace(use, a=use.a[..., lo:hi].abs(), d=use.d.abs())
        else:
            part = dataclasses.replace(use, a=use.a.abs(), d=use.d[..., lo:hi].abs())
        return part.pull(p, 0, hi - lo, q, budget)
    if id(use) not in absolute:
        absolute[id(use)] = _absolute(use)
    return absolute[id(use)].pull(p, lo, hi, q, budget)


def _absolute(use):
    """``use`` with its factors replaced by their absolute values: its ``J^T |w|`` bounds every term."""
    if isinstance(use, LinearUse):
        return dataclasses.replace(use, a=use.a.abs(), d=use.d.abs())
    if isinstance(use, EmbeddingUse):
        return dataclasses.replace(use, d=use.d.abs())
    return dataclasses.replace(use, g=use.g.abs())


def _factor_dtypes(use) -> set:
    """The dtypes a use's factors were captured in (autocast may lower them below the model's)."""
    tensors = [getattr(use, name, None) for name in ("a", "d", "g")]
    if isinstance(use, ModuleUse):
        tensors = [d for d in use.d if d is not None]
    return {t.dtype for t in tensors if isinstance(t, torch.Tensor) and t.is_floating_point()}


def gemm_dtype(factor_dtype: torch.dtype) -> torch.dtype:
    """Float32 or float64 as the factors are (half precision factors are promoted)."""
    return torch.float64 if factor_dtype == torch.float64 else torch.float32
