"""The Sven optimizer (Singular Value dEsceNt, arXiv 2604.01279).

Each step runs the closure once, forms the residual rows ``r`` of the batch, and
moves the parameters by the minimum-norm step that best satisfies every row of
the linearised model: ``delta = -lr * V_k S_k^-1 U_k^T r`` (DESIGN.md section 1).
A step is four stages (DESIGN.md sections 4 and 5): prepare (settings, parameters, the
backend's settings), compute (the closure, the backend, the new values: nothing is
written), commit (plain copies) and report (``last_info``, ``track_svd_info``, the
callback).
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass

import torch

from . import distributed, safeguard
from .backends import SketchSettings, StepDirection, StepSettings, make_backend
from .backends.base import ElementSubset
from .backends.sketch import step_key
from .factor_check import FactorChecks
from .guards import (ClosureWatch, check_step_state, draw_element_subsets, names_of, overlaps_itself,
                     restore_buffers, snapshot_buffers)
from .host_memory import release_freed_memory, releases
from .residuals import Residuals
from .settings import DEFAULTS, NAMES, STEP_KEYS, Settings, check_positive
from .update import PARAMETER_STATE, UpdateRule, all_finite, decayed, draining, require_finite, sven_update

_BACKEND_CACHE = 16
_NO_PARAMETERS = "no trainable parameters: every parameter has requires_grad=False (or params is empty)"


@dataclass
class _Prepared:
    """What a step fixed before running anything: its settings and the parameters it moves."""

    settings: Settings
    step: int
    trainable: list[torch.Tensor]
    params: list[torch.Tensor]
    subsets: list[ElementSubset] | None
    backend_settings: StepSettings


@dataclass
class _Computed:
    """A step computed and checked, not yet written."""

    result: StepDirection
    values: list[torch.Tensor]
    states: list[dict]
    optimizer_state: dict
    info: dict
    residual_rows: bool


class Sven(torch.optim.Optimizer):
    """Sven: truncated-SVD pseudo-inverse steps on per-sample residuals.

    Args:
        model: the module the closure runs. Its trainable parameters move, in place.
        lr, k, rtol, kappa, backend, and every other keyword of :class:`sven_ext.settings.Settings`
            (``damping``, ``weight_decay``, ``momentum``, ...): the step's settings, defined, defaulted
            and checked there (the README's table lists them). ``lr`` and ``weight_decay`` may differ
            between param groups; every other setting is the same in all groups.
        params: parameters that move (default: every trainable parameter of ``model``);
            an iterable of tensors or of param-group dicts (groups may set their own ``lr``).
        track_svd_info: keep ``svd_history``: per step the singular values, rank, residual norm,
            and the loss change the linearised model predicts next to the actual one (one extra
            forward pass of the closure per step, once the step is applied: an exception there
            propagates and the step stays).
        variable_k: apply the kept rank-1 components in descending singular-value order while the
            batch loss keeps falling (one closure evaluation and one contraction per component;
            ``last_info["variable_k_rank"]`` says how many were applied). Not with ``rmsprop`` or
            ``momentum``.
        callback: called with ``last_info`` after every successful step (logging), once the step is
            applied: an exception from it propagates and the step stays.
        process_group: a ``torch.distributed`` process group (e.g. ``torch.distributed.group.WORLD``)
            for data parallelism: each rank's closure returns the rows of its own shard of the batch
            (shards may differ in size), and every rank takes the same step, the one for the
            concatenated batch in rank order (:mod:`sven_ext.distributed`). ``step`` then returns
            the losses of the whole batch. Parameters must start equal on every rank, and ``seed``
            must be the same everywhere. Backends ``"auto"``, ``"gram"`` and ``"sketch"``;
            ``last_info["communicated_bytes"]`` says what the step sent, next to
            ``last_info["gradient_allreduce_bytes"]``. ``None``: a single process.

    Example::

        opt = sven_ext.Sven(model, lr=0.1, k=32)
        def closure():
            return loss_fn(model(x), y, reduction="none")   # per-sample losses, shape (B,)
        losses = opt.step(closure)
    """

    def __init__(self, model: torch.nn.Module, lr: float = DEFAULTS.lr, k: int | None = DEFAULTS.k,
                 rtol: float = DEFAULTS.rtol, kappa: float = DEFAULTS.kappa, backend: str = DEFAULTS.backend, *,
                 params=None, track_svd_info: bool = False, callback=None, process_group=None, **settings):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        unknown = sorted(set(settings) - set(NAMES))
        if unknown:
            raise TypeError(f"Sven() got unexpected keyword argument(s) {unknown}; its settings are {list(NAMES)}")
        check_positive("lr", lr)
        chosen = Settings(lr=lr, k=k, rtol=rtol, kappa=kappa, backend=backend, **settings)
        if not isinstance(track_svd_info, bool):
            raise ValueError(f"track_svd_info must be True or False, got {track_svd_info!r}")
        if callback is not None and not callable(callback):
            raise ValueError(f"callback must be callable or None, got {type(callback).__name__}")
        distributed.check_group(process_group)
        if process_group is not None:
            distributed.check_options(backend, chosen.variable_k, track_svd_info)

        params = [p for p in model.parameters() if p.requires_grad] if params is None else list(params)
        if not params:
            raise ValueError(_NO_PARAMETERS)
        self.model = model  # add_param_group checks that every parameter belongs to it
        super().__init__(params, chosen.group())
        if not self._trainable():
            raise ValueError(_NO_PARAMETERS)
        self.track_svd_info = track_svd_info
        self.callback = callback
        self.process_group = process_group
        self.last_info: dict = {}
        self.svd_history: list[dict] = []
        self._backends: dict = {}
        self._checks = FactorChecks()  # what the factor checks found, shared by the backends

    def _trainable(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"] if p.requires_grad]

    def _backend(self, name: str, params: list[torch.Tensor]):
        key = (name, tuple(id(p) for p in params))
        if key not in self._backends:
            if len(self._backends) >= _BACKEND_CACHE:  # param_fraction draws many subsets
                self._backends.pop(next(iter(self._backends)))
            self._backends[key] = make_backend(name, self.model, params, self._checks)
        return self._backends[key]

    def add_param_group(self, param_group: dict) -> None:
        """Adds a param group, checked as the constructor checks its arguments.

        Raises:
            ValueError: a setting out of range, a tensor that is not a parameter of ``model``, a
                dtype or device other than the other parameters', or a parameter whose elements
                share memory (an expanded tensor: no update can write it).
        """
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        Settings.from_group({**self.defaults, **param_group}, len(self.param_groups))
        params = param_group.get("params", [])
        self._check_params([params] if isinstance(params, torch.Tensor) else list(params))
        super().add_param_group(param_group)

    def _check_params(self, new: list) -> None:
        known = {id(p) for p in self.model.parameters()}
        strangers = [p for p in new if not isinstance(p, torch.Tensor) or id(p) not in known]
        if strangers:
            raise ValueError(f"params must belong to model: {len(strangers)} tensor(s) are not parameters of it")
        trainable = self._trainable() + [p for p in new if p.requires_grad]
        if not trainable:
            return
        devices = {p.device for p in trainable}
        if len(devices) > 1:
            raise ValueError(f"all parameters must be on one device, got {sorted(map(str, devices))}")
        dtypes = {p.dtype for p in trainable}
        if len(dtypes) > 1:
            raise ValueError(f"all parameters must have one dtype, got {sorted(map(str, dtypes))}")
        if not trainable[0].is_floating_point():
            raise ValueError(f"parameters must be floating point, got {trainable[0].dtype}")
        self._check_writable([p for p in new if p.requires_grad])

    def _check_writable(self, params: list[torch.Tensor]) -> None:
        """Every parameter that moves must own the memory of each of its elements (the commit writes it)."""
        for p in params:
            if overlaps_itself(p):
                raise ValueError(
                    f"parameter {names_of(self.model).get(id(p), '?')!r} (shape {tuple(p.shape)}, strides "
                    f"{p.stride()}) has elements that share memory, e.g. an expanded tensor, so no update can "
                    "write it: give it memory of its own (nn.Parameter(tensor.clone())) or set requires_grad=False"
                )

    def load_state_dict(self, state_dict: dict) -> None:
        """Loads a state saved by :meth:`state_dict`, checked before it is used.

        Every param group is checked as the constructor checks its arguments, and every state
        tensor against its parameter; if anything fails, the optimizer keeps its current state.

        Raises:
            ValueError: a setting out of range, a state saved with another backend, state tensors
                of other shapes (another model), not finite, or of keys Sven does not keep (another
                optimizer), a step counter that is not an integer ``>= 0``.
        """
        backends = [group["backend"] for group in self.param_groups]
        state, groups = self.state, self.param_groups
        super().load_state_dict(state_dict)
        try:
            for index, (group, backend) in enumerate(zip(self.param_groups, backends)):
                if group.get("backend", backend) != backend:
                    raise ValueError(
                        f"param group {index}: the state was saved with backend={group['backend']!r} but this "
                        f"optimizer has backend={backend!r}: construct Sven with the backend the state was saved with"
                    )
                Settings.from_group(group, index)
            self._check_state()
        except BaseException:
            self.state, self.param_groups = state, groups
            raise

    def _check_state(self) -> None:
        """Every entry of ``self.state`` must be one Sven keeps: finite, of its parameter's shape."""
        names = names_of(self.model)
        params = {id(p) for group in self.param_groups for p in group["params"]}
        for key, entry in self.state.items():
            if isinstance(key, str) and key == "sven":
                check_step_state(entry)
                continue
            if not isinstance(key, torch.Tensor) or id(key) not in params or not isinstance(entry, dict):
                raise ValueError(f"the optimizer state has an entry {key!r} that is neither 'sven' nor a parameter's")
            name = names.get(id(key), "?")
            unknown = sorted(set(entry) - set(PARAMETER_STATE))
            if unknown:
                raise ValueError(f"parameter {name!r}: state {unknown} is not Sven's (it keeps {PARAMETER_STATE}): "
                                 "was the state saved by another optimizer?")
            for what, value in entry.items():
                if not isinstance(value, torch.Tensor) or value.shape != key.shape:
                    shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                    raise ValueError(f"parameter {name!r}: state {what!r} has shape {shape} where the parameter has "
                                     f"{tuple(key.shape)}: the state belongs to another model")
                if not all_finite([value]):
                    raise ValueError(f"parameter {name!r}: state {what!r} is not finite (NaN or Inf)")
                if what == "square_avg" and bool((value < 0).any()):
                    raise ValueError(f"parameter {name!r}: state 'square_avg' has negative entries "
                                     "(a running mean of squares is >= 0)")

    def __getstate__(self) -> dict:
        """What ``copy.deepcopy`` and ``pickle`` keep: everything but the backends (rebuilt on the next
        step, whose factors are then checked again). The copy moves the copied model.

        Raises:
            TypeError: with a ``process_group``, which belongs to its process.
        """
        if self.process_group is not None:
            raise TypeError("a Sven optimizer with a process_group cannot be copied or pickled (the group belongs "
                            "to its process): save state_dict() and load it into a new optimizer instead")
        state = dict(self.__dict__)
        state["_backends"], state["_checks"] = {}, FactorChecks()
        return state

    @torch.no_grad()
    def step(self, closure=None):
        """One Sven step.

        The step is atomic: everything that can fail (the closure, the capture, a kernel, the
        solve, running out of memory, a direction, momentum, RMSProp average or new parameter value
        that is not finite in the parameters' dtype) runs before the first parameter or state tensor
        is written; if anything raises, every parameter, buffer and optimizer-state tensor is left
        exactly as it was, and the exception propagates. ``track_svd_info``'s extra forward pass and
        ``callback`` run after the step is applied: an exception there propagates, and the step stays.

        Args:
            closure: callable with no arguments that runs the forward pass and returns
                per-sample losses of shape ``(B,)`` or :class:`sven_ext.Residuals`. It must
                not call ``backward`` nor modify the parameters: the step does its own
                differentiation and update (both are detected: ``ValueError``).

        Returns:
            The ``(B,)`` per-sample losses before the update (detached).
        """
        if closure is None or not callable(closure):
            raise ValueError("Sven.step needs a closure that returns per-sample losses (it runs the forward pass)")
        prepared = self._prepare()
        watch = ClosureWatch(self.model, prepared.trainable)
        buffers = snapshot_buffers(self.model)
        # Data-parallel: nothing is applied unless every rank got this far (a no-op for one process).
        agreement = distributed.Agreement(self.process_group)
        try:
            with agreement:
                computed = self._compute(closure, prepared, watch)
        except BaseException as error:
            # The closure may have moved buffers (e.g. running statistics) before the failure.
            restore_buffers(buffers)
            watch.after_failure(error)
            raise
        self._commit(prepared.params, computed)
        self._report(closure, prepared.settings, computed, agreement)
        return computed.result.rows.losses

    def _prepare(self) -> _Prepared:
        """The step's settings (every group checked), the parameters it moves and the backend's settings."""
        s = self._step_settings()
        state = self.state.get("sven", {})  # read only: the state changes once the step has succeeded
        step = state.get("step", 0)
        trainable = self._trainable()
        if not trainable:
            raise ValueError(_NO_PARAMETERS)
        self._check_writable(trainable)  # strides only; catches a parameter unfrozen or given new data since added
        params, subsets = self._subset(trainable, s, step)
        backend_settings = StepSettings(
            truncation=s.truncation,
            kappa=s.kappa,
            solve_dtype=s.solve_dtype,
            chunk_rows=s.chunk_rows,
            sketch=SketchSettings(
                oversampling=s.oversampling, power_iterations=s.power_iterations,
                test_matrix=s.test_matrix, seed=s.seed, step=step,
                basis=state.get("basis") if s.warm_start else None,
            ),
            max_memory=s.max_memory,
            functional_mode=s.functional_mode,
            microbatch_size=s.microbatch_size,
            column_scale=self._column_scale(params, s),
            element_subsets=subsets,
            process_group=self.process_group,
        )
        return _Prepared(s, step, trainable, params, subsets, backend_settings)

    def _compute(self, closure, prepared: _Prepared, watch: ClosureWatch) -> _Computed:
        """Runs the closure and the backend and forms the new values and state; writes nothing."""
        s, params = prepared.settings, prepared.params
        residual_rows = []  # whether the closure returned Residuals (not the output: its graph would stay alive)

        def recorded():
            output = closure()
            watch.check()
            residual_rows.append(isinstance(output, Residuals))
            return output

        backend = self._backend(s.backend, params)
        result = backend.compute(recorded, prepared.backend_settings)
        guarded = s.safeguard is not None and not s.variable_k and result.solution.rank > 0
        # The update consumes the directions as they are formed, and the factors behind them are
        # released on the way (DESIGN.md section 5, memory): one model's worth of memory, not two. The
        # safeguard's shorter trials need the factors or the directions, whichever is smaller.
        kept_directions = None
        if s.variable_k or (guarded and safeguard.contracts_again(result, params)):
            directions = draining(result.directions)
        elif guarded:
            kept_directions = list(result.stream())
            directions = iter(kept_directions)
        else:
            directions = result.stream()
        # Held in a list only: the safeguard drops the whole step's values once it tries a shorter one.
        full = [self._updates(params, directions, s, prepared.subsets)]
        kept, guard = None, None
        scale = self.state.get("sven", {}).get("scale", 1.0)
        if guarded:
            guard = self._guard(closure, prepared, result, full, kept_directions, scale, residual_rows[-1])
            values, states = guard.candidate
        else:
            values, states = full.pop()
        if s.variable_k:
            kept, values = self._variable_k(closure, params, result, s, prepared.subsets)
            require_finite(self._names_of(params), [[v] for v in values], [[("update", v)] for v in values])
        optimizer_state = {"step": prepared.step + 1, "seed": s.seed}
        if s.warm_start and result.state.get("basis") is not None:
            optimizer_state["basis"] = result.state["basis"].detach()
        if s.safeguard is not None:
            optimizer_state["scale"] = scale if guard is None else guard.scale
        info = self._info(backend, result, params, prepared.subsets, s, kept)
        if guard is not None:
            info["safeguard"] = guard.info
        if "warning" in info:  # before the commit: a warning turned into an error changes nothing
            warnings.warn(info["warning"], RuntimeWarning, stacklevel=3)
        return _Computed(result, values, states, optimizer_state, info, residual_rows[-1])

    def _commit(self, params: list[torch.Tensor], computed: _Computed) -> None:
        """Plain copies of checked values into tensors that each own their memory: cannot fail."""
        for p, value in zip(params, computed.values):
            p.copy_(value)
        for p, new in zip(params, computed.states):
            if new:
                self.state[p] = {**self.state.get(p, {}), **new}
        self.state["sven"] = computed.optimizer_state
        self.last_info = computed.info

    def _report(self, closure, s: Settings, computed: _Computed, agreement: distributed.Agreement) -> None:
        """After the commit: the data-parallel report, ``track_svd_info`` and the callback."""
        if self.process_group is not None:
            agreement.report(self.last_info)
        if self.track_svd_info:
            self._track(closure, computed.result, s, computed.residual_rows)
        if self.callback is not None:
            self.callback(self.last_info)

    def _info(self, backend, result, params: list[torch.Tensor], subsets, s: Settings, kept: int | None) -> dict:
        """``last_info`` of a step (singular values in the units of the residuals the closure returned)."""
        scale = result.rows.scale
        info = {
            "backend": backend.name,
            "singular_values": result.solution.singular_values.detach().cpu() * scale,
            "rank": result.solution.rank,
            "rows": result.rows.residual.numel(),
            "loss": float(result.rows.losses.sum()),
            "moved_parameters": len(params),
            "moved_elements": sum(p.numel() if subset is None else subset.numel(p)
                                  for p, subset in zip(params, subsets or [None] * len(params))),
            **result.info,
        }
        if kept is not None:
            info["variable_k_rank"] = kept
        if result.solution.rank == 0:
            largest = result.solution.all_singular_values
            largest = float(largest[0]) * scale if largest.numel() else 0.0
            info["warning"] = (
                f"zero update: every singular value is below the cut-off (largest {largest:.3e}; "
                f"rtol={s.rtol}, atol={s.atol})"
            )
        return info

    def _step_settings(self) -> Settings:
        """The first param group's settings, after checking every group as the constructor checks its
        arguments (a scheduler may have changed them) and that every group agrees on the step's settings."""
        groups = [Settings.from_group(group, index) for index, group in enumerate(self.param_groups)]
        first = groups[0]
        if self.process_group is not None:
            distributed.check_options(first.backend, first.variable_k, self.track_svd_info)
        for index, group in enumerate(self.param_groups):
            for key in STEP_KEYS:
                if group[key] != getattr(first, key):
                    raise ValueError(
                        f"param group {index} sets {key}={group[key]!r} but group 0 has {getattr(first, key)!r}: "
                        "one Sven step solves for every group at once, so only lr may differ between groups"
                    )
        return first

    def _subset(self, params: list[torch.Tensor], s: Settings, step: int):
        """``(params, subsets)``: the parameters this step moves (all, or a random subset of
        tensors) and, with ``mask_by_block=False``, the elements of each (else ``None``)."""
        if s.param_fraction >= 1:
            return params, None
        generator = torch.Generator().manual_seed(step_key(s.seed, step))
        if not s.mask_by_block:
            return params, draw_element_subsets(self.model, params, s.param_fraction, generator)
        target = s.param_fraction * sum(p.numel() for p in params)
        order = torch.randperm(len(params), generator=generator).tolist()
        chosen, total = set(), 0
        for index in order:
            # Take a tensor when it brings the count closer to the target (tensors differ a lot in size).
            if abs(total + params[index].numel() - target) < abs(total - target):
                chosen.add(index)
                total += params[index].numel()
        chosen = chosen or {order[0]}
        return [p for i, p in enumerate(params) if i in chosen], None  # keep the optimizer's order

    def _column_scale(self, params: list[torch.Tensor], s: Settings):
        """RMSProp before the pseudo-inverse: ``S = (sqrt(v) + eps)^(-1/2)`` (``None`` before any ``v``)."""
        if s.rmsprop != "before" or not any("square_avg" in self.state.get(p, {}) for p in params):
            return None
        # A tensor without history yet (param_fraction) is left unscaled.
        return [
            self.state[p]["square_avg"].sqrt().add_(s.rmsprop_eps).rsqrt_() if "square_avg" in self.state.get(p, {})
            else torch.ones_like(p)
            for p in params
        ]

    def _group_of(self) -> dict:
        return {id(p): group for group in self.param_groups for p in group["params"]}

    def _names_of(self, params: list[torch.Tensor]) -> list[str]:
        names = names_of(self.model)
        return [names.get(id(p), "?") for p in params]

    def _decay_masks(self, params: list[torch.Tensor], subsets) -> list:
        """Per parameter: ``None`` (weight decay on every element) or the 0/1 mask of its moved elements."""
        group_of = self._group_of()
        return [None if subset is None or not group_of[id(p)]["weight_decay"] else subset.mask(p)
                for p, subset in zip(params, subsets or [None] * len(params))]

    def _updates(self, params: list[torch.Tensor], directions, s: Settings,
                 subsets) -> tuple[list[torch.Tensor], list[dict]]:
        """``(values, states)``: :func:`sven_ext.update.sven_update` with each parameter's group and state.

        One parameter at a time from the iterable ``directions`` (in parameter order), each dropped
        once its new value is formed and checked: the directions and the new values together hold
        about one model's worth of memory (plus one parameter), not two, unless the caller keeps its
        own references. Any failure still comes before the commit, so nothing has been written.
        """
        group_of = self._group_of()
        rule = UpdateRule(s.rmsprop, s.rmsprop_beta, s.rmsprop_eps, s.momentum)
        masks, names = self._decay_masks(params, subsets), self._names_of(params)
        values, states = [], []
        for i, (p, direction) in enumerate(zip(params, directions, strict=True)):
            group = group_of[id(p)]
            value, state = sven_update(p, direction, self.state.get(p, {}), group["lr"],
                                       group["lr"] * group["weight_decay"], masks[i], rule, names[i])
            del direction
            values.append(value)
            states.append(state)
        return values, states

    def _variable_k(self, closure, params: list[torch.Tensor], result, s: Settings,
                    subsets) -> tuple[int, list[torch.Tensor]]:
        """``(kept, values)``: how many leading components ``J^T u_j w_j`` (the solution's weights) lower
        the batch loss one after the other, and the parameters' values with them. The parameters move
        for the trial evaluations and are always put back."""
        solution = result.solution
        if result.contract is None or solution.left_vectors is None:
            raise ValueError(f"variable_k needs U_k and a contraction from the backend; backend "
                             f"{result.info.get('backend', s.backend)!r} does not offer them")
        u, weights = solution.left_vectors, solution.weights
        group_of = self._group_of()
        start = [p.detach().clone() for p in params]
        decays = self._decay_masks(params, subsets)

        def values(count: int) -> list[torch.Tensor]:
            # Always from the start: the final parameters are one update, not a sum of trial moves.
            directions = result.contract(u[:, :count] @ weights[:count]) if count else [None] * len(params)
            out = []
            for i, p in enumerate(params):
                group = group_of[id(p)]
                value = decayed(start[i], group["lr"] * group["weight_decay"], decays[i])
                out.append(value if directions[i] is None else value.sub(directions[i].to(p.dtype), alpha=group["lr"]))
            return out

        best, kept, chosen = float(result.rows.losses.sum()), 0, None
        try:
            for count in range(1, solution.rank + 1):
                trial = values(count)
                for p, value in zip(params, trial):
                    p.copy_(value)
                loss = _batch_loss(closure())
                if not loss < best:  # NaN counts as no improvement
                    break
                best, kept, chosen = loss, count, trial
        finally:
            for p, saved in zip(params, start):
                p.copy_(saved)
        return kept, values(0) if chosen is None else chosen

    def _guard(self, closure, prepared: _Prepared, result, full: list, kept_directions: list | None,
               scale: float, residual_rows: bool) -> safeguard.Decision:
        """The safeguard's search along this step (:func:`sven_ext.safeguard.search`). A trial is the step
        whose Sven direction is ``scale`` times this one's; RMSProp and momentum then see that direction.
        ``full``: a list holding the values and states of the whole step, emptied once they are not
        needed; ``kept_directions``: the directions where the backend offers no contraction."""
        s, params = prepared.settings, prepared.params
        # The linearised model predicts the bare step at one lr; otherwise the loss alone decides.
        predicts = len({group["lr"] for group in self.param_groups}) == 1 and s.rmsprop is None and not s.momentum
        model = safeguard.linearisation(result, lr=s.lr if predicts else None,
                                        kappa=None if residual_rows else s.kappa, group=s.microbatch_size or 1)

        def candidate(trial_scale: float) -> tuple[list[torch.Tensor], list[dict]]:
            if trial_scale == 1.0 and full:
                return full.pop()
            full.clear()  # one model's worth of values at a time
            if kept_directions is None:  # for a power of two t, J^T (t c) is exactly t J^T c
                directions = draining(result.contract(result.solution.coefficients * trial_scale))
            else:
                directions = (d * trial_scale for d in kept_directions)
            return self._updates(params, directions, s, prepared.subsets)

        release = releases(params)

        def batch_loss() -> float:
            if release:
                release_freed_memory()  # the factors, or a rejected trial's values
            # The closure ran under grad mode for the step (its rows may take derivatives, e.g. a PDE's).
            with distributed.Agreement(self.process_group), torch.enable_grad():
                loss = _batch_loss(closure())
            return distributed.sum_over_ranks(self.process_group, loss)

        buffers = snapshot_buffers(self.model)
        return safeguard.search(params, float(result.rows.losses.sum()), model, scale, candidate, batch_loss,
                                lambda: restore_buffers(buffers))

    def _track(self, closure, result, s: Settings, residual_rows: bool) -> None:
        """Appends this step's spectrum and predicted vs actual loss change to ``svd_history``."""
        rows, solution = result.rows, result.solution
        # In the units of the residuals the closure returned (the backend saw them divided by rows.scale).
        residual = rows.residual.detach().to(torch.float64)  # the rows the backend solved for
        before = float(rows.losses.sum())
        entry = {
            "step": self.state["sven"]["step"],
            "singular_values": solution.all_singular_values.detach().cpu() * rows.scale,
            "rank": solution.rank,
            "residual_norm": float((residual * rows.scale).norm()),
            "loss": before,
            "predicted_loss_change": None,
        }
        # The linearised model predicts the plain Sven step only.
        plain = s.plain and len({g["lr"] for g in self.param_groups}) == 1
        if plain and solution.left_vectors is not None:
            applied = s.lr * self.last_info.get("safeguard", {}).get("scale", 1.0)  # the safeguard's scale
            linear = solution.linearised_residual(residual, applied) * rows.scale
            predicted = safeguard.loss_of_rows(linear, None if residual_rows else s.kappa, s.microbatch_size or 1)
            entry["predicted_loss_change"] = predicted - before
        entry["actual_loss_change"] = _batch_loss(closure()) - before
        self.svd_history.append(entry)
        self.last_info.update(predicted_loss_change=entry["predicted_loss_change"],
                              actual_loss_change=entry["actual_loss_change"])


def _batch_loss(output) -> float:
    """The batch loss of a closure's output: the sum of the losses, or of the squared residuals."""
    if isinstance(output, Residuals):
        return float(output.values.detach().square().sum())
    return float(output.detach().sum())


# help(Sven) and inspect.signature show every setting, from its one definition.
Sven.__init__.__signature__ = inspect.signature(Sven.__init__).replace(parameters=[
    *[q for q in inspect.signature(Sven.__init__).parameters.values() if q.kind != inspect.Parameter.VAR_KEYWORD],
    *[inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=getattr(DEFAULTS, name))
      for name in NAMES if name not in ("lr", "k", "rtol", "kappa", "backend")],
])
