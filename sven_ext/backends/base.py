"""What every backend shares: the settings of a step and the direction it returns."""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..factor_check import FactorChecks
from ..layers.common import first_axis
from ..linalg import Solution, Truncation
from ..residuals import Rows


@dataclass(frozen=True)
class SketchSettings:
    """Hyper-parameters of the randomized (sketch) backend.

    Attributes:
        oversampling: extra sketch columns beyond the rank cap: ``s = k + oversampling`` (at most R).
        power_iterations: ``q``, products ``J J^T`` applied to the sketch before the core.
        test_matrix: ``"gaussian"``, ``"rademacher"`` or ``"khatri_rao"``.
        seed: generator key of the test matrices.
        step: step counter; with ``seed`` it fixes this step's test matrices.
        basis: previous step's ``U_k`` ``(R, k)`` to join to the sketch (warm start), or ``None``.
    """

    oversampling: int = 10
    power_iterations: int = 1
    test_matrix: str = "gaussian"
    seed: int = 0
    step: int = 0
    basis: torch.Tensor | None = None


@dataclass(frozen=True)
class ElementSubset:
    """The elements of one parameter that a step moves (``param_fraction`` with ``mask_by_block=False``).

    A product set, so that the factors of a layer can be restricted to it: the entries ``cols``
    of the rows ``rows`` of the parameter seen as ``(shape[0], numel / shape[0])`` (for a
    Linear/conv weight: output units by input features; a 1-D parameter has ``cols=None``).

    Attributes:
        rows: sorted int64 indices into the first axis, on the parameter's device.
        cols: sorted int64 indices into the rest flattened, or ``None``: all of it.
    """

    rows: torch.Tensor
    cols: torch.Tensor | None = None

    def mask(self, p: torch.Tensor) -> torch.Tensor:
        """``1`` on the subset and ``0`` elsewhere, in ``p``'s shape and dtype."""
        out = torch.zeros(first_axis(p), dtype=p.dtype, device=p.device)
        if self.cols is None:
            out[self.rows] = 1
        else:
            out[self.rows.unsqueeze(1), self.cols] = 1
        return out.view(p.shape)

    def numel(self, p: torch.Tensor) -> int:
        cols = first_axis(p)[1] if self.cols is None else self.cols.numel()
        return self.rows.numel() * cols


@dataclass(frozen=True)
class StepSettings:
    """Hyper-parameters a backend needs for one step.

    Attributes:
        truncation: rank cap and cut-offs (``k=None``: half the rows, resolved by ``Truncation.for_rows``).
        kappa: loss exponent; residuals are ``loss ** (kappa / 2)``.
        solve_dtype: dtype of the Gram matrix / Jacobian and of the solve.
        chunk_rows: rows processed at once where a backend chunks over rows.
        sketch: settings of the sketch backend.
        max_memory: byte budget of a step beyond the model (``None``: what the machine has);
            ``"auto"`` chooses within it and the sketch backend sizes its transients by it.
        functional_mode: functional backend: ``"exact"`` (chunked Gram) or ``"randomized"``
            (a sketch with the settings of ``sketch``).
        microbatch_size: ``m``: the rows are the means of the losses of consecutive groups of
            ``m`` samples (``B / m`` rows; ``None``: one row per sample).
        column_scale: one positive tensor per parameter (its shape), ``S``: the step is solved for
            the column-scaled Jacobian ``J S`` and mapped back, so the direction is
            ``S (J S)^+ r`` (RMSProp before the pseudo-inverse); ``None``: ``S = I``.
        element_subsets: one :class:`ElementSubset` (or ``None``: all of it) per parameter: the
            step is that of ``J`` restricted to those columns, zero elsewhere: a 0/1 column
            scale on top of ``column_scale``, which the gram backend turns into smaller factors
            where it can (:func:`effective_column_scale`); ``None``: every element moves.
        process_group: ``torch.distributed`` process group whose ranks each hold a shard of the
            batch: the step is that of the concatenated batch, identical on every rank
            (:mod:`sven_ext.distributed`); ``None``: this process's batch only.
    """

    truncation: Truncation
    kappa: float
    solve_dtype: torch.dtype = torch.float64
    chunk_rows: int = 64
    sketch: SketchSettings = field(default_factory=SketchSettings)
    max_memory: int | None = None
    functional_mode: str = "exact"
    microbatch_size: int | None = None
    column_scale: list[torch.Tensor] | None = None
    element_subsets: list[ElementSubset | None] | None = None
    process_group: torch.distributed.ProcessGroup | None = None


@dataclass
class StepDirection:
    """A backend's answer: the update is ``param -= lr * direction``.

    Attributes:
        rows: the rows of this step (losses, residuals).
        solution: coefficients and singular values.
        info: backend-specific diagnostics merged into ``Sven.last_info``.
        state: what the optimizer keeps for the next step (e.g. the sketch's warm-start basis).
        contract: ``c -> directions`` for other coefficient vectors ``c`` (``(R,)``, in the
            space of ``solution.coefficients``) while this step's factors are alive, so that
            ``directions == contract(solution.coefficients)``; ``None`` where not offered.
        formed: the directions where the backend formed them itself (dense, functional); else
            they are formed from ``contract`` when asked for (:attr:`directions`, :meth:`stream`).
        contract_reproduces: whether ``contract(solution.coefficients)`` gives ``directions`` bitwise
            (so ``contract(t c)`` is exactly ``t`` times them for a power of two ``t``); the dense
            backend's directions come from ``V_k`` instead.
    """

    rows: Rows
    solution: Solution
    info: dict = field(default_factory=dict)
    state: dict = field(default_factory=dict)
    contract: Callable[[torch.Tensor], list[torch.Tensor]] | None = None
    formed: list[torch.Tensor] | None = None
    contract_reproduces: bool = True

    @property
    def directions(self) -> list[torch.Tensor]:
        """One tensor per parameter, in the parameter's shape (``V_k S_k^-1 U_k^T r``)."""
        if self.formed is None:
            self.formed = self.contract(self.solution.coefficients)
        return self.formed

    def stream(self):
        """The directions one at a time, in parameter order. From a contraction that can release
        its factors (:meth:`sven_ext.backends.factored.Contraction.stream`) each is formed when asked
        for while the factors are dropped, and ``contract`` is spent afterwards."""
        if self.formed is None and hasattr(self.contract, "stream"):
            return self.contract.stream(self.solution.coefficients)
        return iter(self.directions)


class Backend(abc.ABC):
    """Computes the Sven direction for the trainable parameters of a model.

    Args:
        model: the module whose forward pass the closure runs.
        params: the parameters that move, in a fixed order.
        checks: the factor checks' verdicts (:class:`sven_ext.factor_check.FactorChecks`), shared by
            the backends of one optimizer (built for different subsets of its parameters), so a
            step signature is checked once; ``None``: a fresh store.
    """

    name: str = ""

    def __init__(self, model: torch.nn.Module, params: list[torch.Tensor], checks: FactorChecks | None = None):
        compiled = [name or "<root>" for name, module in model.named_modules()
                    if type(module).__name__ == "OptimizedModule" and hasattr(module, "_orig_mod")]
        if compiled:
            raise ValueError(
                f"module(s) {compiled} are torch.compile'd: compiled graphs run no module hooks and their "
                "backward does not batch over rows, so Sven cannot differentiate them row by row. Give Sven "
                "the uncompiled module (a compiled module's `_orig_mod`) and call that in the closure"
            )
        self.model = model
        self.params = params
        self.checks = FactorChecks() if checks is None else checks

    @abc.abstractmethod
    def compute(self, closure, settings: StepSettings) -> StepDirection:
        """Runs ``closure`` once and returns the direction.

        Args:
            closure: returns per-sample losses ``(B,)`` or :class:`sven_ext.Residuals`.
            settings: the step's hyper-parameters.
        """


def check_column_scale(scale, params: list[torch.Tensor]) -> list[torch.Tensor] | None:
    """``StepSettings.column_scale`` after checking it against ``params``.

    Args:
        scale: ``None`` or one tensor per parameter: its shape and device, floating point, finite, > 0.
        params: the moving parameters, in order.

    Raises:
        ValueError: naming the offending entry and what was expected.
    """
    if scale is None:
        return None
    if not isinstance(scale, (list, tuple)) or len(scale) != len(params):
        got = f"{len(scale)} entries" if isinstance(scale, (list, tuple)) else type(scale).__name__
        raise ValueError(f"column_scale must be a list of one tensor per moving parameter ({len(params)}), got {got}")
    for i, (s, p) in enumerate(zip(scale, params)):
        if not isinstance(s, torch.Tensor) or not s.is_floating_point():
            what = s.dtype if isinstance(s, torch.Tensor) else type(s).__name__
            raise ValueError(f"column_scale[{i}] must be a floating-point tensor, got {what}")
        if s.shape != p.shape or s.device != p.device:
            raise ValueError(
                f"column_scale[{i}] has shape {tuple(s.shape)} on {s.device}; its parameter has shape "
                f"{tuple(p.shape)} on {p.device}"
            )
        if not bool(torch.isfinite(s).all()) or not bool((s > 0).all()):
            raise ValueError(f"column_scale[{i}] must be finite and > 0 everywhere (min {float(s.min()):.3g})")
    return list(scale)


def effective_column_scale(settings: StepSettings, params: list[torch.Tensor],
                           skip: set | None = None) -> list[torch.Tensor] | None:
    """``S M``: the checked ``settings.column_scale`` times the 0/1 masks of ``settings.element_subsets``.

    ``skip``: ids of parameters whose subset the caller applies itself (their mask is left out).
    ``None`` when neither is set.
    """
    scale = check_column_scale(settings.column_scale, params)
    subsets = settings.element_subsets
    if subsets is None:
        return scale
    if len(subsets) != len(params):
        raise ValueError(f"element_subsets must have one entry per moving parameter ({len(params)}), "
                         f"got {len(subsets)}")
    skip = set() if skip is None else skip
    masks = [None if subset is None or id(p) in skip else subset.mask(p) for p, subset in zip(params, subsets)]
    if scale is None and all(m is None for m in masks):
        return None
    out = []
    for i, p in enumerate(params):
        s = torch.ones_like(p) if scale is None else scale[i]
        out.append(s if masks[i] is None else s * masks[i].to(s.dtype))
    return out


def split_like(flat: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor]:
    """Splits a flat ``(P,)`` vector into tensors shaped like ``params``."""
    return [chunk.view_as(p) for chunk, p in zip(flat.split([p.numel() for p in params]), params)]
