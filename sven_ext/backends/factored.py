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
from ..guards import restore_buffers, snapshot_buffers
from ..host_memory import release_freed_memory, releases
from ..layers import EmbeddingUse, LinearUse, ModuleUse, factor_bytes
from ..layers.common import combine_rows, first_axis, items_within
from ..residuals import Rows, rows_from_closure_output
from ..routes import components
from .base import Backend, ElementSubset, StepSettings, effective_column_scale

# The factor check's live transients (a block of J^T w, autograd's block, a pull's products, a
# block of absolute factors), each at most this fraction of the transient budget.
CHECK_TRANSIENTS = 8
# Most elements of a temporary while an element subset's direction is written into its weight.
SUBSET_CHUNK_ELEMENTS = 1 << 18


@dataclasses.dataclass
class _Captured:
    """One capture of a step (:meth:`FactoredBackend._capture`); ``sketches`` is ``None`` unless
    its signature is new and the factors are to be checked."""

    rows: Rows
    uses: list
    weights: torch.Tensor | None
    sketches: factor_check.GradientSketches | None
    verdict: factor_check.Verdict
    per_param: dict
    per_module: dict
    shared: set
    calls: list  # (id(module), recorded whole, ids of its moving parameters) per call


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
        self.releases = releases(params)  # whether its steps hand freed host memory back
        self._names = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            self._names.setdefault(id(p), name)

    def compute(self, closure, settings: StepSettings):
        """The step: the factors of the closure's batch, then the subclass's ``estimate(rows, uses,
        settings)`` against the budget (a step that does not fit raises here, before anything large
        is allocated), then its ``solve(rows, uses, checked, settings, shard)``."""
        self._require_last_fit(settings)
        rows, uses, checked, shard = self.batch_factors(closure, settings)
        self._require_fit(self.estimate(rows, uses, settings), uses, settings)
        result = self.solve(rows, uses, checked, settings, shard)
        if shard.data_parallel:
            # The directions' all-reduce is part of the step's traffic report: formed here (a
            # data-parallel contraction keeps its factors anyway).
            result.formed = result.directions
            result.info.update(shard.info(self.params))
        return result

    def _require_fit(self, estimate, uses: list, settings: StepSettings) -> None:
        """:func:`sven_ext.costs.require_fit` after the forward pass; remembers the step's need."""
        held = self._held(uses, settings)
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

    def factors(self, closure, settings: StepSettings, suspects: frozenset = frozenset()):
        """Runs the closure under capture: ``(rows, uses, checked)`` (checked: the factor check ran).

        ``suspects``: ids of modules to record whole, as shared by every sample: a module's output
        is taken per sample when its first axis has the batch's size, so ``pos(arange(T))`` with
        ``T == B`` is misread. Where the check fails on such a module's parameters, the closure runs
        again (its buffers restored) with them recorded whole, and their factors must pass.
        """
        if self.releases:
            release_freed_memory()  # what the last step freed, before this forward pass
        buffers = snapshot_buffers(self.model) if self.checks.enabled and not suspects else None
        step = self._capture(closure, settings, suspects)
        if step.sketches is None:
            return step.rows, step.uses, False
        costs.require_fit(costs.estimate_check(step.uses, self.params, self.name),
                          self._held(step.uses, settings), settings.max_memory, self.params[0].device)
        try:
            self._check_factors(step.uses, step.weights, step.sketches)
        except FactorMismatch as mismatch:
            retry = frozenset(module for module, whole, params in step.calls
                              if not whole and params & mismatch.params and module not in step.shared)
            if buffers is None or not retry:
                raise
            del step
            restore_buffers(buffers)
            try:
                return self.factors(closure, settings, retry)
            except FactorMismatch:
                raise mismatch from None
        step.verdict.params.update((id(p), step.per_param.get(id(p))) for p in self.params)
        step.verdict.shared.update((key, step.per_module[key]) for key in suspects)
        return step.rows, step.uses, True

    def _capture(self, closure, settings: StepSettings, suspects: frozenset) -> _Captured:
        """The closure under capture, the check's sketches where its signature is new, then the
        capture's backward pass (which frees the graph) and the uses."""
        # Recorded whole, a suspect's output is not expanded to the batch as a position table's is.
        broadcasts = self.checks.broadcasts if not suspects else dataclasses.replace(
            self.checks.broadcasts, tables=self.checks.broadcasts.tables - suspects)
        with torch.enable_grad():
            with capture(self.model, self.params, broadcasts) as cap:
                output = closure()
            rows = rows_from_closure_output(output, settings.kappa, settings.microbatch_size)
            # The factors describe the captured rows; the row map is applied to their products.
            signature, per_param, per_module = cap.signature(rows.per_sample)
            verdict = self.checks.verdict(signature)
            shared = {key for key, calls in per_module.items() if (key, calls) in verdict.shared} | suspects
            checked = self.checks.enabled and any(
                (id(p), per_param.get(id(p))) not in verdict.params for p in self.params)
            # The check's backward pass runs first and keeps sketches of autograd's gradients only,
            # so it never holds the capture's output gradients beside the forward pass's graph.
            weights, sketches = (factor_check.probe_weights(rows.captured) if checked else None), None
            if checked:
                sketches = factor_check.sketch_gradients(rows.captured, self.params, weights, self._names,
                                                         self.releases)
            # The capture's backward pass frees the graph as it goes, unless a parameter no module
            # call covers needs it (_check_uncovered measures its effect on the rows).
            covered = {id(p) for call in cap.calls for _, p in call.params}
            uses = cap.uses(rows.per_sample, settings.chunk_rows, shared,
                            keep_graph=any(id(p) not in covered for p in self.params), release=self.releases)
            if self.releases:
                release_freed_memory()  # the forward pass's saved activations
            by_param = {id(p): [] for p in self.params}
            for use in uses:
                for p in use.params:
                    by_param[id(p)].append(use)
            self._check_uncovered(rows.captured, by_param)
            # Modules whose rows came from one backward pass per row (slow, still exact).
            self.recorded_whole = sorted({call.name for call in cap.calls if call.whole})
            calls = [(id(call.module), call.whole, {id(p) for _, p in call.params}) for call in cap.calls]
        # Nothing differentiates the rows again.
        return _Captured(_detached(rows), uses, weights, sketches, verdict, per_param, per_module, shared, calls)

    def _held(self, uses: list, settings: StepSettings) -> int:
        """What the step holds before its solve: the factors (with ``max_memory``, each storage
        once: :func:`sven_ext.costs.held_bytes`)."""
        if settings.max_memory is None:
            return factor_bytes(uses)
        return costs.held_bytes(uses, self.model)

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

    def _check_factors(self, uses: list, weights: torch.Tensor, sketches: factor_check.GradientSketches) -> None:
        """The factors' ``J^T w`` must match autograd's, parameter by parameter (``w``: ``weights``).

        Compared through each parameter's sketch (:class:`sven_ext.factor_check.GradientSketches`,
        autograd's side taken by the check's backward pass), in float64 over blocks of its first
        axis (every use's ``pull`` of the block, for ``J^T w`` and ``|J|^T |w|``), blocks of at
        most ``row_budget_bytes``: the check holds one block, not the model's gradient or float64
        copies of it. Parameters of fallback modules (no ``pull``, no absolute bound) are compared whole.

        Raises:
            FactorMismatch: naming the first parameter that fails; ``params`` holds every one.
        """
        w = weights.to(torch.float64).reshape(-1, 1)
        # id(p) -> (its uses, or its component's where whole; the component's absolute copies, or
        # its J^T w where whole; whole: the component has a fallback module)
        component = {}
        left = {}  # per component, its parameters not compared yet: its copies go with the last one
        for params, group in components(uses):
            whole = any(not hasattr(use, "pull") for use in group)  # the fallback's ModuleUse
            held = {}
            left[id(held)] = len(params)
            for p in params:
                own = group if whole else [use for use in group if any(q is p for q in use.params)]
                component[id(p)] = (own, held, whole)
        found = []
        for p in self.params:
            if id(p) not in component:  # not captured: _check_uncovered showed it does not move the rows
                found.append((0.0, 0.0))
                continue
            own, held, whole = component.pop(id(p))
            compared = self._compare_whole if whole else self._compare_blocks
            found.append(compared(p, own, held, w, sketches.of(p), sketches))
            left[id(held)] -= 1
            if not left[id(held)]:
                held.clear()
        dtypes = {id(p): {p.dtype} for p in self.params}
        for use in uses:
            for p in use.params:
                dtypes[id(p)].update(_factor_dtypes(use))
        factor_check.judge(self.params, found, [dtypes[id(p)] for p in self.params], self._names)

    def _compare_blocks(self, p: torch.Tensor, uses: list, absolute: dict, w: torch.Tensor, true,
                        sketches: factor_check.GradientSketches) -> tuple:
        """``(||(J_p^T w - g) V||, |||J_p|^T |w| V||)`` over blocks of ``p``'s first axis (``g V``:
        ``true``, autograd's sketched gradient; ``V``: ``p``'s sketch matrix).

        ``absolute``: the absolute copies of the uses made so far; a linear map's weight takes the
        absolute values of its block of ``d`` alone (an output head's ``d`` is vocabulary-wide).
        """
        first, rest = first_axis(p)
        # A block, its sketch and each pull's transients share the budget.
        budget = self.row_budget_bytes // CHECK_TRANSIENTS
        block = items_within(first, rest * 8, budget)
        error, scale = 0.0, 0.0
        for lo in range(0, first, block):
            hi = min(lo + block, first)
            mine = sketches.sketch(p, sum(use.pull(p, lo, hi, w, budget) for use in uses).reshape(hi - lo, rest))
            if true is not None:
                mine -= true[lo:hi]
            error += float(mine.square().sum())
            del mine
            magnitude = sum(_absolute_pull(use, p, lo, hi, w.abs(), budget, absolute) for use in uses)
            scale += float(sketches.sketch(p, magnitude.reshape(hi - lo, rest)).square().sum())
        return error ** 0.5, scale ** 0.5

    def _compare_whole(self, p: torch.Tensor, uses: list, directions: dict, w: torch.Tensor, true,
                       sketches: factor_check.GradientSketches) -> tuple:
        """``(||(J_p^T w - g) V||, ||g V|| + ||J_p^T w V||)`` for a parameter of a component with a
        fallback module: whole float64 ``J^T w`` (there is no absolute bound). ``directions``: the
        uses' ``J^T w`` per parameter, formed once per component and handed out here."""
        if not directions:
            for use in uses:
                for q, part in zip(use.params, use.direction(w[:, 0])):
                    directions[id(q)] = part if id(q) not in directions else directions[id(q)].add_(part)
        mine = directions.pop(id(p), None)
        mine = torch.zeros_like(p, dtype=w.dtype) if mine is None else mine
        mine = sketches.sketch(p, mine.reshape(first_axis(p)[0], -1))
        true = torch.zeros_like(mine) if true is None else true
        return float((mine - true).norm()), float(true.norm() + mine.norm())

    def _contraction(self, uses: list, rows: Rows, scales: dict, shard, restricted: dict) -> Contraction:
        """``c -> S^2 J^T T^T c`` for coefficients ``c`` ``(R,)`` over the step's rows (:class:`Contraction`).

        ``uses`` are the (restricted) uses of the whole batch, this process's in one process.
        """
        local = restrict(shard.local_uses, restricted) if shard.data_parallel else uses
        return Contraction(self.params, local, shard.local_rows, scales, shard if shard.data_parallel else None,
                           self.releases)


class Contraction:
    """``c -> S^2 J^T T^T c``, one tensor per parameter, from the step's factors.

    Data-parallel (``shard``), each rank contracts its own rows and one all-reduce sums the ranks'
    parts (the communication of a gradient all-reduce), so the per-row work is split. In one
    process :meth:`stream` hands the directions over one at a time and drops each component's
    factors as soon as its directions are formed, so what the step holds shrinks from the factors
    to the directions (or the new values) instead of holding both.
    """

    def __init__(self, params: list[torch.Tensor], uses: list, rows: Rows, scales: dict, shard=None,
                 releases: bool = False):
        self.params, self.rows, self.scales, self.shard, self.releases = params, rows, scales, shard, releases
        self._uses = uses

    @property
    def spent(self) -> bool:
        """Whether :meth:`stream` released the factors (no further contraction)."""
        return self._uses is None

    def __call__(self, c: torch.Tensor) -> list[torch.Tensor]:
        if self.spent:
            raise RuntimeError("this step's factors were released after its direction was formed")
        if self.shard is not None:
            return self.shard.reduce(lambda: list(self._directions(self._uses, self.shard.local(c))))
        return list(self._directions(self._uses, c))

    def stream(self, c: torch.Tensor):
        """The directions of ``c`` in parameter order, each formed when it is asked for; the factors
        are released as they go (in one process), and the contraction is spent afterwards."""
        if self.shard is not None:
            yield from self(c)
            return
        uses, self._uses = self._uses, None
        if self.releases:
            release_freed_memory()  # the solve's transients, before the directions take their place
        yield from self._directions(uses, c, release=True)

    def _directions(self, uses: list, c: torch.Tensor, release: bool = False):
        """``S^2 J^T T^T c`` per parameter, a component of connected parameters at a time, in the
        parameters' dtypes. ``release``: ``uses`` is the last reference to the factors, and each
        component's uses are dropped once its directions are formed."""
        c = self.rows.to_captured(c)
        groups = [group for _, group in components(uses)]
        owner = {id(p): index for index, group in enumerate(groups) for use in group for p in use.params}
        if release:
            uses.clear()
        formed = {}
        for p in self.params:
            index = owner.get(id(p))
            if id(p) not in formed and index is not None:
                group = groups[index]
                if release:
                    groups[index] = None
                formed.update(_component_directions(group, c))
                del group
            d = formed.pop(id(p), None)
            if d is None:
                d = torch.zeros_like(p)
            elif id(p) in self.scales:
                d.mul_(self.scales[id(p)].to(d.dtype).square())
            yield d


def _component_directions(uses: list, c: torch.Tensor) -> dict:
    """``{id(p): J_p^T c}`` for the parameters of one component, in the parameters' dtypes.

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
    return total


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
