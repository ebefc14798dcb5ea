"""Cost model of the backends: bytes and flops of one step for a captured model and batch.

``backend="auto"`` captures the factors first (one forward, one batched backward, shared by
gram and sketch), then asks :func:`choose` which backend to finish the step with. Estimates
are in bytes beyond the model and the captured factors, and in GEMM-equivalent flops (LAPACK's
``eigh``, the random-number generator and each op's fixed cost are charged at their cost relative
to a float64 GEMM on the factors' device: :mod:`sven_ext.device_rates`).

The rule (:func:`choose`): the exact gram backend while its ``K`` and transients fit the
budget and its flops are within ``GRAM_PREFERENCE`` times the sketch's (it is exact, the
sketch is not); otherwise the sketch when it fits; otherwise gram if it fits; otherwise an
error, raised before the backend allocates anything. Dense is not a candidate: it is the
oracle (``R x P`` bytes); ``auto`` uses it only for models whose layers couple the samples
(batch statistics), where there are no factors, and only within the budget.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .device_rates import DeviceRates, rates_for
from .layers import DirectUse, EmbeddingUse, LinearUse
from .layers.linear import linear_costs
from .routes import (
    components,
    route,
    sequence_costs,
    sequence_route,
    tied_cross_cost,
    tied_route,
)

GRAM_PREFERENCE = 4.0
# Per-row gradients of a fallback module through torch.func.vmap(grad): a few forward costs.
MODULE_ROW_FLOPS = 10.0
# Ops issued per use: the sketch about OPS_PER_PASS per pass, gram about OPS_PER_USE; with each op's
# fixed cost (DeviceRates.op_overhead_flops) this keeps small problems, where launch overhead
# dominates, on the exact backend.
OPS_PER_PASS = 15
OPS_PER_USE = 10
# Peak transients of the sketch backend, in units of its transient budget.
TRANSIENTS = 4
MIN_TRANSIENT_BYTES = 1 << 20
# Bytes of one transient of a backend (a chunk of per-row gradients, a sketch tile) by default.
TRANSIENT_BUDGET_BYTES = 1 << 27


# Bytes of one float64 number: K, the sketch's R x s blocks and the cost model's worst-case transients are
# float64 (the solve dtype by default).
F64 = 8


def _rates(uses: list) -> DeviceRates:
    """The cost rates of the device the factors are on (the CPU's when there are none)."""
    return rates_for(uses[0].params[0].device if uses else torch.device("cpu"))


def mib(nbytes: float) -> str:
    """``1536.0`` -> ``"1.5 KiB"``: a byte count for messages."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(nbytes) >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{int(nbytes)} B"


@dataclass
class Estimate:
    """Cost of finishing a step with one backend.

    Attributes:
        backend: its name.
        bytes: peak bytes beyond the model and the captured factors.
        flops: GEMM-equivalent floating-point operations.
        what: the dominant memory item, for messages.
        min_bytes: the least it can run in (the sketch shrinks its transients to fit a budget).
    """

    backend: str
    bytes: int
    flops: float
    what: str
    min_bytes: int | None = None

    def __post_init__(self):
        if self.min_bytes is None:
            self.min_bytes = self.bytes


def _shape(use) -> tuple:
    """``(S, T, G, din, dout)`` of a Linear use."""
    samples, steps, groups, din = use.a.shape
    return samples, steps, groups, din, use.d.shape[3]


def _params(use) -> int:
    return sum(p.numel() for p in use.params)


def update_bytes(uses: list) -> int:
    """Bytes of a step's update: the checked new values of the captured parameters, in their dtype, and
    one parameter's direction: ``Sven._updates`` releases each direction as its new value is formed,
    and the safeguard's shorter trials contract again, holding one trial's values at a time."""
    sizes = [p.numel() * p.element_size() for p in {id(p): p for use in uses for p in use.params}.values()]
    return sum(sizes) + max(sizes, default=0)


def sketch_fixed_bytes(rows: int, columns: int, components=()) -> int:
    """Bytes the sketch backend holds besides its tile transients.

    ``Y``, ``Q``, the next ``Y`` and QR's workspace (``~5 R s`` float64), the core, and for
    fallback modules their whole ``Z`` and ``Omega`` blocks.
    """
    fixed = 5 * rows * columns * F64 + 2 * columns * columns * F64
    for comp in components:
        if getattr(comp, "rows", False):
            fixed += 2 * comp.width * columns * F64
    return fixed


def estimate_gram(uses: list, rows: int, solve_rows: int | None = None, scaled: bool = False) -> Estimate:
    """Cost of the gram backend.

    Args:
        uses: the captured factors.
        rows: captured rows (``K`` is accumulated over them).
        solve_rows: rows of the step (``eigh``); fewer than ``rows`` with microbatching (``None``: ``rows``).
        scaled: a column scale is set: every parameter but the materialised small ones takes the
            per-row-gradient route.

    Each component of parameters is priced by the route the backend will take
    (:func:`sven_ext.routes.route`).
    """
    solve_rows = rows if solve_rows is None else solve_rows
    rates = _rates(uses)
    flops = rates.eigh_flops_per_n3 * solve_rows**3 + rates.op_overhead_flops * OPS_PER_USE * (len(uses) + 2)
    transient = 0
    for params, group in components(uses):
        kind = route(params, group, scaled)
        if kind == "rows":
            # Per-row gradients formed (~R T P for a Linear layer, a few forwards for the rest), then G G^T.
            for use in group:
                form = 2.0 * rows * use.a.shape[1] if isinstance(use, LinearUse) else MODULE_ROW_FLOPS * rows
                flops += form * _params(use)
            flops += 2.0 * rows**2 * sum(p.numel() for p in params)
            transient = TRANSIENT_BUDGET_BYTES
            continue
        if kind == "tied":
            linear = [u for u in group if isinstance(u, LinearUse)]
            table = [u for u in group if isinstance(u, EmbeddingUse)]
            if tied_route(linear[0], table[0], rows) == "rows":
                # Both uses' per-row gradients formed together, in blocks of table rows.
                flops += 2.0 * sequence_costs(linear[0], rows)[1] * len(linear)
                transient = TRANSIENT_BUDGET_BYTES
                continue
            flops += 2.0 * sum(tied_cross_cost(u, t, rows) for u in linear for t in table)
        for use in group:
            if isinstance(use, LinearUse):
                samples, steps, groups, din, dout = _shape(use)
                if steps == 1:
                    flops += 2 * groups * (samples**2 * din + rows**2 * dout)
                elif sequence_route(use, rows) == "seq_gram":
                    flops += 2.0 * groups * rows**2 * steps**2 * (din + dout) / 2
                else:  # per-row gradients in blocks of output units
                    flops += 2.0 * sequence_costs(use, rows)[1]
                    transient = TRANSIENT_BUDGET_BYTES
            elif isinstance(use, EmbeddingUse):
                flops += 2.0 * rows**2 * use.d.shape[1] ** 2 * use.d.shape[2]
            else:
                flops += 2.0 * rows**2 * use.g.shape[1]
    k_bytes = rows * rows * F64
    # K, eigh's eigenvectors and workspace, one more R x R product in the T = 1 route; the update.
    return Estimate("gram", 4 * k_bytes + transient + update_bytes(uses), flops, f"K needs {mib(k_bytes)}")


def estimate_sketch(uses: list, rows: int, columns: int, power_iterations: int, test_matrix: str,
                    transient_budget: int = TRANSIENT_BUDGET_BYTES, solve_rows: int | None = None) -> Estimate:
    """Cost of the sketch backend with ``columns = s`` (``s >= R``: the exact identity basis).

    ``rows`` are the captured rows (the products with ``J`` run over them), ``solve_rows`` the
    step's (fewer with microbatching; ``None``: ``rows``).
    """
    solve_rows = rows if solve_rows is None else solve_rows
    exact = columns >= solve_rows
    columns = min(columns, solve_rows)
    passes = 2 if exact else 2 + 2 * power_iterations
    rates = _rates(uses)
    flops, generated, biggest_tile, module_bytes = 0.0, 0, 0, 0
    for use in uses:
        size = _params(use)
        if isinstance(use, LinearUse):
            samples, steps, groups, din, dout = _shape(use)
            through_factors, through_gradients = linear_costs(samples, rows, steps, din, dout, columns)
            per_pass = 2.0 * groups * min(through_factors, through_gradients)
            # The products run in chunks of up to ``transient_budget`` bytes (layers.linear).
            m = max(1, rows // max(samples, 1))
            chunked = samples * steps * (dout * columns + m * dout + din) if through_factors <= through_gradients \
                else rows * (dout * din + steps * (din + dout))
            biggest_tile = max(biggest_tile, F64 * chunked)
            if use.bias is not None:
                per_pass += 2.0 * rows * groups * dout * columns
            dense = test_matrix != "khatri_rao"
            generated += size * columns if dense else (groups * dout + din) * columns
        elif isinstance(use, EmbeddingUse):
            per_pass = 2.0 * rows * use.d.shape[1] * use.d.shape[2] * columns
            generated += min(rows * use.d.shape[1], use.param.shape[0]) * use.d.shape[2] * columns
            biggest_tile = max(biggest_tile, 2 * rows * use.d.shape[1] * use.d.shape[2] * columns * F64)
        elif isinstance(use, DirectUse):
            per_pass = 2.0 * rows * use.g.shape[1] * columns
            generated += size * columns
        else:
            per_pass = 2.0 * rows * size * columns + MODULE_ROW_FLOPS * rows * size
            generated += size * columns
            module_bytes += 2 * size * columns * F64
        flops += passes * per_pass + 2.0 * (passes // 2) * size * columns**2
        for p in use.params:
            biggest_tile = max(biggest_tile, 3 * p.numel() * columns * F64)
    if not exact:
        flops += rates.rng_flops[test_matrix] * generated + (power_iterations + 1) * 4.0 * rows * columns**2
    flops += rates.eigh_flops_per_n3 * columns**3 \
        + rates.op_overhead_flops * OPS_PER_PASS * (passes + 1) * (len(uses) + 2)
    fixed = sketch_fixed_bytes(rows, columns) + module_bytes + update_bytes(uses)
    transient = TRANSIENTS * min(transient_budget, max(biggest_tile, MIN_TRANSIENT_BYTES))
    return Estimate("sketch", fixed + transient, flops, f"R x s blocks need {mib(fixed)} (s={columns})",
                    fixed + TRANSIENTS * MIN_TRANSIENT_BYTES)


def held_bytes(uses: list, model: torch.nn.Module) -> int:
    """Bytes a step holds when its solve starts, beyond the model: the captured factors, each
    storage once (the capture's backward pass has freed the forward pass's saved activations)."""
    skip = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    seen: set = set()

    def size(t) -> int:
        if not isinstance(t, torch.Tensor):
            return 0
        storage = t.untyped_storage()
        if storage.data_ptr() in seen or storage.data_ptr() in skip:
            return 0
        seen.add(storage.data_ptr())
        return storage.nbytes()

    return sum(size(getattr(use, name, None)) for use in uses for name in ("a", "d", "g", "indices"))


def estimate_check(uses: list, params: list, backend: str) -> Estimate:
    """Memory of the factor check (:mod:`sven_ext.factor_check`), which runs before the solve.

    Autograd's ``J^T w`` in the parameters' dtype: each parameter's is compared and dropped once
    complete, so those of parameters with several uses build up over the pass, plus the largest
    other. Then the largest component's share: its uses' absolute factors (an ungrouped,
    untransposed linear map's come a block at a time, within the transients) and float64 blocks of
    its parameters within ``TRANSIENT_BUDGET_BYTES``; a component with a fallback module is compared
    whole in float64 (its ``J^T w``, autograd's copy, the module's transients).
    """
    counts: dict = {}
    for use in uses:
        for p in use.params:
            counts[id(p)] = counts.get(id(p), 0) + 1
    sizes = [(p.numel() * p.element_size(), counts.get(id(p), 0) > 1) for p in params]
    autograd = sum(size for size, shared in sizes if shared) + max((size for size, shared in sizes if not shared),
                                                                   default=0)
    worst = 0
    for members, group in components(uses):
        if any(not hasattr(use, "pull") for use in group):
            share = 16 * sum(p.numel() for p in members) + 2 * sum(factor_bytes_of(use) for use in group)
        else:
            blocked = [isinstance(use, LinearUse) and use.a.shape[2] == 1 and not use.transposed for use in group]
            # About four float64 blocks live at once (J^T w, autograd's, |J|^T |w|, a pull's products).
            blocks = min(TRANSIENT_BUDGET_BYTES, 4 * F64 * max(p.numel() for p in members))
            share = blocks + sum(factor_bytes_of(use) for use, b in zip(group, blocked) if not b)
        worst = max(worst, share)
    need = autograd + worst
    return Estimate(backend, need, 0.0, f"the factor check needs {mib(need)}")


def factor_bytes_of(use) -> int:
    """Bytes of one use's factors that have an absolute copy in the factor check."""
    return sum(t.numel() * t.element_size() for t in (getattr(use, name, None) for name in ("a", "d", "g"))
               if isinstance(t, torch.Tensor))


def estimate_dense(rows: int, params: int) -> Estimate:
    j_bytes = rows * params * F64
    # J, the SVD's copy and V^T, R backward passes and the SVD; the update (directions and new values).
    return Estimate("dense", 3 * j_bytes + rows * rows * F64 + 2 * params * F64,
                    6.0 * rows * params + 4.0 * rows**2 * params, f"J needs {mib(j_bytes)}")


def available_bytes(device: torch.device) -> int:
    """Free memory of ``device``: CUDA's free bytes, or the Linux ``MemAvailable`` (else unbounded)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        return int(re.search(r"MemAvailable:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1)) * 1024
    except (OSError, AttributeError):
        return 1 << 62


def choose(gram: Estimate, sketch: Estimate, held: int, budget: int, budget_given: bool):
    """``(backend name, reason)`` by the rule of the module docstring; ``held``: what the step
    already holds (:func:`require_fit`).

    Raises:
        ValueError: when neither fits ``budget`` (before anything big is allocated).
    """
    room = budget - held
    what = "max_memory" if budget_given else "free memory"
    fits = {e.backend: e.min_bytes <= room for e in (gram, sketch)}
    cost = f"~{gram.flops / 1e9:.3g} GFLOP vs sketch ~{sketch.flops / 1e9:.3g} GFLOP"
    if fits["gram"] and gram.flops <= GRAM_PREFERENCE * sketch.flops:
        return "gram", f"gram: {gram.what}, fits {what} ({mib(budget)}); {cost}"
    if fits["sketch"]:
        if not fits["gram"]:
            why = f"{gram.what} (+ transients {mib(gram.bytes)}), over {what} ({mib(budget)})"
        else:
            why = f"{cost} (more than {GRAM_PREFERENCE:g}x)"
        return "sketch", f"sketch: {why}; {sketch.what}, {mib(min(sketch.bytes, room))} in all"
    if fits["gram"]:
        return "gram", f"gram: the sketch does not fit {what} ({mib(budget)}); {gram.what}"
    raise ValueError(
        f"{what}={budget} bytes is too small for any backend: the step holds {mib(held)} before its solve "
        "(factors, saved activations), "
        f"gram needs {mib(gram.bytes)} more ({gram.what}), sketch at least {mib(sketch.min_bytes)} more "
        f"({sketch.what}); raise max_memory, lower k or the batch size"
    )


# Steps that need less are not checked against the free memory (0.5 ms per step to read on Linux).
UNCHECKED_BYTES = 64 << 20


def require_fit(estimate: Estimate, held: int, max_memory: int | None, device: torch.device) -> None:
    """Raises before a backend chosen by name allocates more than ``max_memory`` (or, for steps
    needing ``UNCHECKED_BYTES`` or more, the free memory).

    ``held``: bytes the step already holds (:func:`held_bytes`, or the factors' alone).

    Raises:
        ValueError: naming the backend, its estimate and the budget.
    """
    need = held + estimate.min_bytes
    if max_memory is None and need < UNCHECKED_BYTES:
        return  # reading the free memory costs more than such a step's solve
    budget = max_memory if max_memory is not None else available_bytes(device)
    what = "max_memory" if max_memory is not None else "free memory"
    if need > budget:
        raise ValueError(
            f"backend={estimate.backend!r} needs about {mib(need)} for this step "
            f"({estimate.what}; held before it {mib(held)}), more than the {what} ({mib(budget)}). The "
            "forward pass and the capture have run; nothing of the solve was allocated and nothing changed. "
            "Use backend='auto' (it picks a backend that fits), raise max_memory, or lower the batch size"
        )


def dense_fits(rows: int, params: int, budget: int, budget_given: bool) -> tuple[bool, str]:
    """Whether the dense backend fits ``budget``, and a reason for ``last_info``."""
    dense = estimate_dense(rows, params)
    what = "max_memory" if budget_given else "free memory"
    return dense.bytes <= budget, f"dense: {dense.what}, {mib(dense.bytes)} in all within {what} ({mib(budget)})"


__all__ = ["Estimate", "choose", "require_fit", "estimate_gram", "estimate_sketch", "estimate_dense", "available_bytes",
           "mib", "update_bytes"]
