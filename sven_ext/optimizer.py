"""The Sven optimizer (Singular Value dEsceNt, arXiv 2604.01279).

Each step runs the closure once, forms the residual rows ``r`` of the batch, and
moves the parameters by the minimum-norm step that best satisfies every row of
the linearised model: ``delta = -lr * V_k S_k^-1 U_k^T r`` (DESIGN.md section 1).
"""

from __future__ import annotations

import math
import warnings

import torch

from . import distributed
from .backends import SketchSettings, StepSettings, check_backend_name, make_backend
from .backends.base import ElementSubset
from .backends.sketch import DEFAULT_POWER_ITERATIONS, TEST_MATRICES, step_key
from .factor_check import FactorChecks
from .linalg import DEFAULT_ATOL, Truncation
from .residuals import Residuals

FUNCTIONAL_MODES = ("exact", "randomized")
RMSPROP_MODES = (None, "before", "after")
_BACKEND_CACHE = 16
# Settings of the whole step (one solve covers every param group): only lr may differ between groups.
_STEP_KEYS = ("k", "rtol", "kappa", "backend", "atol", "solve_dtype", "chunk_rows", "oversampling",
              "power_iterations", "test_matrix", "warm_start", "seed", "max_memory", "functional_mode",
              "damping", "microbatch_size", "param_fraction", "mask_by_block", "rmsprop", "rmsprop_beta",
              "rmsprop_eps", "momentum", "variable_k")
_NO_PARAMETERS = "no trainable parameters: every parameter has requires_grad=False (or params is empty)"
_PARAMETER_STATE = ("momentum_buffer", "square_avg")
_STAGE_HINTS = {
    "direction": "the residuals or the model's scale may overflow solve_dtype",
    "RMSProp": "the running mean of squared directions, or the direction divided by its root, overflows",
    "momentum": "the momentum buffer overflows: lower momentum or lr, or use a wider dtype",
    "lr": "lr times the direction overflows: lower lr, or use a wider dtype",
    "weight decay": "(1 - lr * weight_decay) times the parameter overflows: lower lr or weight_decay",
    "update": "the new value overflows: lower lr, or use a wider dtype",
}


class Sven(torch.optim.Optimizer):
    """Sven: truncated-SVD pseudo-inverse steps on per-sample residuals.

    Args:
        model: the module the closure runs. Its trainable parameters move, in place.
        lr: step size, read from ``param_groups[i]["lr"]`` at every step (schedulers work).
        k: rank cap: at most ``k`` singular values are kept. ``None``: half the
            number of rows of each step (at least 1), as the paper suggests.
        rtol: keep singular values ``s_j > rtol * s_0``.
        kappa: residuals are ``loss ** (kappa / 2)`` (2: the loss itself; 1: its square root).
            Ignored for :class:`sven_ext.Residuals`, which are used as they are.
        backend: ``"auto"``, ``"dense"``, ``"gram"``, ``"sketch"`` or ``"functional"``
            (DESIGN.md section 2).
        params: parameters that move (default: every trainable parameter of ``model``);
            an iterable of tensors or of param-group dicts (groups may set their own ``lr``).
        atol: absolute singular-value floor.
        solve_dtype: dtype of the linear algebra (float64 by default: ``cond(K) = cond(J)^2``).
        chunk_rows: rows handled at once where a backend chunks over rows.
        oversampling: sketch backend: columns beyond ``k`` (``s = min(k + oversampling, R)``).
        power_iterations: sketch backend: products with ``J J^T`` before the core (more: closer
            to the exact rank-``k`` update, two passes over the factors each).
        test_matrix: sketch backend: ``"gaussian"``, ``"rademacher"`` or ``"khatri_rao"``
            (columns ``u_j (x) v_j`` per weight matrix: cheaper to apply; measured in bench/sketch_bench.py).
        warm_start: sketch backend: join the previous step's ``U_k`` to the sketch (when the
            number of rows is unchanged; meant for steps over the same rows).
        seed: sketch backend: key of the test matrices; with the step counter (kept in the
            optimizer state) it fixes every step's draw, so equal seeds give identical steps.
        functional_mode: functional backend: ``"exact"`` (Gram matrix of the residual rows, built
            from chunks of ``J^T`` products) or ``"randomized"`` (a sketch, with ``oversampling``,
            ``power_iterations`` and ``seed``).
        max_memory: bytes a step may use beyond the model (the factors included): ``"auto"``
            picks a backend within it and raises before allocating when none fits; the sketch
            backend sizes its transients by it. ``None``: the free memory.
        damping: Tikhonov damping ``lambda >= 0``: each kept ``1 / s_j^2`` becomes ``1 / (s_j^2 + lambda)``
            (Levenberg-Marquardt-like; shortens the step along small singular directions).
        weight_decay: decoupled weight decay: ``p -= lr * weight_decay * p`` besides the Sven step
            (may differ between param groups, like ``lr``).
        microbatch_size: ``m``: average the losses of consecutive groups of ``m`` samples before
            forming rows (``B / m`` rows; ``m`` must divide ``B``). Per-sample losses only.
        param_fraction: each step moves a random subset of about this fraction of the elements,
            drawn from ``seed`` and the step counter; the step is the Sven step of ``J``
            restricted to them (zero elsewhere, weight decay included).
        mask_by_block: ``True``: the subset is whole parameter tensors (at least one); the others
            are not captured, so the step costs less time and memory. ``False``: elements of
            every tensor: of a weight, ``sqrt(f)`` of its output units on ``sqrt(f)`` of its
            inputs (a product set; any tensor seen as ``(shape[0], rest)``), its layer's bias on
            the same units, ``f`` of the entries of other 1-D tensors. The gram backend turns
            these into smaller factors for ungrouped Linear/conv layers (cheaper ``K`` and
            ``J^T c``); elsewhere the subset is a 0/1 column scale at full cost.
        rmsprop: ``None``, ``"before"`` (the step is solved for ``J S`` with
            ``S = (sqrt(v) + eps)^(-1/2)`` and mapped back: RMSProp-preconditioned Sven) or
            ``"after"`` (the direction is divided by ``sqrt(v) + eps``). ``v`` is the running
            mean (``rmsprop_beta``) of the squared directions of previous steps.
        rmsprop_beta: decay of ``v``.
        rmsprop_eps: added to ``sqrt(v)``.
        momentum: heavy-ball momentum on the final direction (``0``: none).
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

    def __init__(
        self,
        model: torch.nn.Module,
        lr: float = 0.1,
        k: int | None = None,
        rtol: float = 1e-3,
        kappa: float = 2.0,
        backend: str = "auto",
        *,
        params=None,
        atol: float = DEFAULT_ATOL,
        solve_dtype: torch.dtype = torch.float64,
        chunk_rows: int = 64,
        oversampling: int = 10,
        power_iterations: int = DEFAULT_POWER_ITERATIONS,
        test_matrix: str = "gaussian",
        warm_start: bool = False,
        seed: int = 0,
        max_memory: int | None = None,
        functional_mode: str = "exact",
        damping: float = 0.0,
        weight_decay: float = 0.0,
        microbatch_size: int | None = None,
        param_fraction: float = 1.0,
        mask_by_block: bool = True,
        rmsprop: str | None = None,
        rmsprop_beta: float = 0.99,
        rmsprop_eps: float = 1e-8,
        momentum: float = 0.0,
        track_svd_info: bool = False,
        variable_k: bool = False,
        callback=None,
        process_group=None,
    ):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        _check_positive("lr", lr)
        defaults = dict(
            lr=lr, k=k, rtol=rtol, kappa=kappa, backend=backend, atol=atol, solve_dtype=solve_dtype,
            chunk_rows=chunk_rows, oversampling=oversampling, power_iterations=power_iterations,
            test_matrix=test_matrix, warm_start=warm_start, seed=seed, max_memory=max_memory,
            functional_mode=functional_mode, damping=damping, weight_decay=weight_decay,
            microbatch_size=microbatch_size, param_fraction=param_fraction, mask_by_block=mask_by_block,
            rmsprop=rmsprop, rmsprop_beta=rmsprop_beta, rmsprop_eps=rmsprop_eps, momentum=momentum,
            variable_k=variable_k,
        )
        check_settings(defaults)
        if not isinstance(track_svd_info, bool):
            raise ValueError(f"track_svd_info must be True or False, got {track_svd_info!r}")
        if callback is not None and not callable(callback):
            raise ValueError(f"callback must be callable or None, got {type(callback).__name__}")
        distributed.check_group(process_group)
        if process_group is not None:
            distributed.check_options(backend, variable_k, track_svd_info)

        params = [p for p in model.parameters() if p.requires_grad] if params is None else list(params)
        if not params:
            raise ValueError(_NO_PARAMETERS)
        self.model = model  # add_param_group checks that every parameter belongs to it
        super().__init__(params, defaults)
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
        check_group({**self.defaults, **param_group}, len(self.param_groups))
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
            if _overlaps_itself(p):
                raise ValueError(
                    f"parameter {_names(self.model).get(id(p), '?')!r} (shape {tuple(p.shape)}, strides "
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
                check_group(group, index)
            self._check_state()
        except BaseException:
            self.state, self.param_groups = state, groups
            raise

    def _check_state(self) -> None:
        """Every entry of ``self.state`` must be one Sven keeps: finite, of its parameter's shape."""
        names = _names(self.model)
        params = {id(p) for group in self.param_groups for p in group["params"]}
        for key, entry in self.state.items():
            if isinstance(key, str) and key == "sven":
                _check_step_state(entry)
                continue
            if not isinstance(key, torch.Tensor) or id(key) not in params or not isinstance(entry, dict):
                raise ValueError(f"the optimizer state has an entry {key!r} that is neither 'sven' nor a parameter's")
            name = names.get(id(key), "?")
            unknown = sorted(set(entry) - set(_PARAMETER_STATE))
            if unknown:
                raise ValueError(f"parameter {name!r}: state {unknown} is not Sven's (it keeps {_PARAMETER_STATE}): "
                                 "was the state saved by another optimizer?")
            for what, value in entry.items():
                if not isinstance(value, torch.Tensor) or value.shape != key.shape:
                    shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                    raise ValueError(f"parameter {name!r}: state {what!r} has shape {shape} where the parameter has "
                                     f"{tuple(key.shape)}: the state belongs to another model")
                if not _all_finite([value]):
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
        first = self._step_settings()
        state = self.state.get("sven", {})  # read only: the state changes once the step has succeeded
        step = state.get("step", 0)
        trainable = self._trainable()
        if not trainable:
            raise ValueError(_NO_PARAMETERS)
        self._check_writable(trainable)  # strides only; catches a parameter unfrozen or given new data since added
        params, subsets = self._subset(trainable, first, step)
        settings = StepSettings(
            truncation=Truncation(first["k"], first["rtol"], first["atol"], first["damping"]),
            kappa=first["kappa"],
            solve_dtype=first["solve_dtype"],
            chunk_rows=first["chunk_rows"],
            sketch=SketchSettings(
                oversampling=first["oversampling"], power_iterations=first["power_iterations"],
                test_matrix=first["test_matrix"], seed=first["seed"], step=step,
                basis=state.get("basis") if first["warm_start"] else None,
            ),
            max_memory=first["max_memory"],
            functional_mode=first["functional_mode"],
            microbatch_size=first["microbatch_size"],
            column_scale=self._column_scale(params, first),
            element_subsets=subsets,
            process_group=self.process_group,
        )
        outputs = []
        watch = _ClosureWatch(self.model, trainable)

        def recorded():
            output = closure()
            watch.check()
            outputs.append(output)
            return output

        buffers = _snapshot_buffers(self.model)
        # Data-parallel: nothing is applied unless every rank got this far (a no-op for one process).
        agreement = distributed.Agreement(self.process_group)
        try:
            with agreement:
                backend = self._backend(first["backend"], params)
                result = backend.compute(recorded, settings, self._resolve_k)
                values, states = self._updates(params, result.directions, first, subsets)
                kept = None
                if first["variable_k"]:
                    kept, values = self._variable_k(closure, params, result, first, subsets)
                    self._require_finite(params, [[v] for v in values], [[("update", v)] for v in values])
                new_state = {"step": step + 1, "seed": first["seed"]}
                if first["warm_start"] and result.state.get("basis") is not None:
                    new_state["basis"] = result.state["basis"].detach()
                info = self._info(backend, result, params, subsets, first, kept)
                if "warning" in info:  # before the commit: a warning turned into an error changes nothing
                    warnings.warn(info["warning"], RuntimeWarning, stacklevel=2)
        except BaseException as error:
            # The closure may have moved buffers (e.g. running statistics) before the failure.
            _restore_buffers(buffers)
            watch.after_failure(error)
            raise
        # The commit: plain copies of checked values into tensors that each own their memory.
        for p, value in zip(params, values):
            p.copy_(value)
        for p, new in zip(params, states):
            if new:
                self.state[p] = {**self.state.get(p, {}), **new}
        self.state["sven"] = new_state
        self.last_info = info
        if self.process_group is not None:
            agreement.report(self.last_info)
        if self.track_svd_info:
            self._track(closure, result, first, isinstance(outputs[-1], Residuals))
        if self.callback is not None:
            self.callback(self.last_info)
        return result.rows.losses

    def _info(self, backend, result, params: list[torch.Tensor], subsets, first: dict, kept: int | None) -> dict:
        """``last_info`` of a step (singular values in the units of the residuals the closure returned)."""
        scale = result.rows.scale
        info = {
            "backend": backend.name,
            "singular_values": result.solution.singular_values.detach().cpu() * scale,
            "rank": result.solution.rank,
            "rows": result.rows.residual.numel(),
            "loss": float(result.rows.losses.sum()),
            "moved_parameters": len(params),
            "moved_elements": sum(p.numel() if s is None else s.numel(p)
                                  for p, s in zip(params, subsets or [None] * len(params))),
            **result.info,
        }
        if kept is not None:
            info["variable_k_rank"] = kept
        if result.solution.rank == 0:
            largest = result.solution.all_singular_values
            largest = float(largest[0]) * scale if largest.numel() else 0.0
            info["warning"] = (
                f"zero update: every singular value is below the cut-off (largest {largest:.3e}; "
                f"rtol={first['rtol']}, atol={first['atol']})"
            )
        return info

    def _step_settings(self) -> dict:
        """The first param group's settings, after checking every group as the constructor checks its
        arguments (a scheduler may have changed them) and that every group agrees on the step's settings."""
        for index, group in enumerate(self.param_groups):
            check_group(group, index)
        first = self.param_groups[0]
        if self.process_group is not None:
            distributed.check_options(first["backend"], first["variable_k"], self.track_svd_info)
        for index, group in enumerate(self.param_groups):
            for key in _STEP_KEYS:
                if group[key] != first[key]:
                    raise ValueError(
                        f"param group {index} sets {key}={group[key]!r} but group 0 has {first[key]!r}: "
                        "one Sven step solves for every group at once, so only lr may differ between groups"
                    )
        return first

    def _subset(self, params: list[torch.Tensor], first: dict, step: int):
        """``(params, subsets)``: the parameters this step moves (all, or a random subset of
        tensors) and, with ``mask_by_block=False``, the elements of each (else ``None``)."""
        fraction = first["param_fraction"]
        if fraction >= 1:
            return params, None
        generator = torch.Generator().manual_seed(step_key(first["seed"], step))
        if not first["mask_by_block"]:
            return params, draw_element_subsets(self.model, params, fraction, generator)
        target = fraction * sum(p.numel() for p in params)
        order = torch.randperm(len(params), generator=generator).tolist()
        chosen, total = set(), 0
        for index in order:
            # Take a tensor when it brings the count closer to the target (tensors differ a lot in size).
            if abs(total + params[index].numel() - target) < abs(total - target):
                chosen.add(index)
                total += params[index].numel()
        chosen = chosen or {order[0]}
        return [p for i, p in enumerate(params) if i in chosen], None  # keep the optimizer's order

    def _column_scale(self, params: list[torch.Tensor], first: dict):
        """RMSProp before the pseudo-inverse: ``S = (sqrt(v) + eps)^(-1/2)`` (``None`` before any ``v``)."""
        if first["rmsprop"] != "before" or not any("square_avg" in self.state.get(p, {}) for p in params):
            return None
        eps = first["rmsprop_eps"]
        # A tensor without history yet (param_fraction) is left unscaled.
        return [
            self.state[p]["square_avg"].sqrt().add_(eps).rsqrt_() if "square_avg" in self.state.get(p, {})
            else torch.ones_like(p)
            for p in params
        ]

    def _updates(self, params: list[torch.Tensor], directions: list[torch.Tensor], first: dict,
                 subsets) -> tuple[list[torch.Tensor], list[dict]]:
        """``(values, states)``: the new value of every moved parameter and its new state, in the
        parameters' dtype, changing nothing. ``subsets``: element subsets (weight decay only on them)
        or ``None``.

        Raises:
            FloatingPointError: a value or state tensor is not finite, naming the parameter and the
                first stage (direction, RMSProp, momentum, lr, weight decay, update) where it is not.
        """
        group_of = {id(p): group for group in self.param_groups for p in group["params"]}
        beta, eps, momentum = first["rmsprop_beta"], first["rmsprop_eps"], first["momentum"]
        values, states, checked, stages = [], [], [], []
        for p, direction, subset in zip(params, directions, subsets or [None] * len(params)):
            direction = direction.to(p.dtype)
            old, new = self.state.get(p, {}), {}
            trail = [("direction", direction)]
            if first["rmsprop"] is not None:
                square = old.get("square_avg", torch.zeros_like(p)).mul(beta).addcmul_(direction, direction,
                                                                                     value=1 - beta)
                new["square_avg"] = square
                trail.append(("RMSProp", square))
                if first["rmsprop"] == "after":
                    direction = direction / square.sqrt().add_(eps)
                    trail.append(("RMSProp", direction))
            if momentum > 0:
                buffer = old["momentum_buffer"].mul(momentum).add_(direction) if "momentum_buffer" in old else direction
                new["momentum_buffer"] = buffer
                direction = buffer
                trail.append(("momentum", buffer))
            group = group_of[id(p)]
            lr, rate = group["lr"], group["lr"] * group["weight_decay"]
            for stage, factor in (("lr", lr), ("weight decay", rate)):
                if factor > torch.finfo(p.dtype).max:  # torch refuses such a factor in p's dtype
                    raise FloatingPointError(
                        f"the Sven step is not finite (NaN or Inf) at the {stage} stage for parameter "
                        f"{_names(self.model).get(id(p), '?')!r} ({p.dtype}): {factor:g} is beyond the dtype's "
                        f"largest value; the parameters were not changed"
                    )
            decay = None if subset is None or not group["weight_decay"] else subset.mask(p)
            value = _new_value(p, direction, lr, rate, decay)
            trail += [("lr", lambda d=direction, lr=lr: d * lr),
                      ("weight decay", lambda p=p, rate=rate, decay=decay: _decayed(p, rate, decay)),
                      ("update", value)]
            values.append(value)
            states.append(new)
            checked.append([value, *new.values()])
            stages.append(trail)
        self._require_finite(params, checked, stages)
        return values, states

    def _require_finite(self, params: list[torch.Tensor], checked: list[list], stages: list[list]) -> None:
        """Raises ``FloatingPointError`` unless every tensor of ``checked`` (one list per parameter) is
        finite, naming the parameter and the first of its ``stages`` (``(stage, tensor or function giving
        it)``) that is not."""
        if _all_finite([t for tensors in checked for t in tensors]):
            return
        names = _names(self.model)
        for p, tensors, trail in zip(params, checked, stages):
            if _all_finite(tensors):
                continue
            for stage, value in trail:
                if not _all_finite([value() if callable(value) else value]):
                    raise FloatingPointError(
                        f"the Sven step is not finite (NaN or Inf) at the {stage} stage for parameter "
                        f"{names.get(id(p), '?')!r} ({p.dtype}): {_STAGE_HINTS[stage]}; the parameters were not changed"
                    )

    def _variable_k(self, closure, params: list[torch.Tensor], result, first: dict,
                    subsets) -> tuple[int, list[torch.Tensor]]:
        """``(kept, values)``: how many leading components ``J^T u_j (u_j^T r) / (s_j^2 + damping)`` lower
        the batch loss one after the other, and the parameters' values with them. The parameters move
        for the trial evaluations and are always put back."""
        solution = result.solution
        if result.contract is None or solution.left_vectors is None:
            raise ValueError(f"variable_k needs U_k and a contraction from the backend; backend "
                             f"{result.info.get('backend', first['backend'])!r} does not offer them")
        u = solution.left_vectors
        residual = result.rows.residual.detach().to(u.dtype)
        damping = first["damping"] / result.rows.scale ** 2  # in the units of the scaled rows, like s_j
        weights = (u.T @ residual) / (solution.singular_values.to(u.dtype).square() + damping)
        group_of = {id(p): group for group in self.param_groups for p in group["params"]}
        start = [p.detach().clone() for p in params]
        decays = [None if s is None or not group_of[id(p)]["weight_decay"] else s.mask(p)
                  for p, s in zip(params, subsets or [None] * len(params))]

        def values(count: int) -> list[torch.Tensor]:
            # Always from the start: the final parameters are one update, not a sum of trial moves.
            directions = result.contract(u[:, :count] @ weights[:count]) if count else [None] * len(params)
            out = []
            for i, p in enumerate(params):
                group = group_of[id(p)]
                value = _decayed(start[i], group["lr"] * group["weight_decay"], decays[i])
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

    def _track(self, closure, result, first: dict, residual_rows: bool) -> None:
        """Appends this step's spectrum and predicted vs actual loss change to ``svd_history``."""
        rows, solution = result.rows, result.solution
        # In the units of the residuals the closure returned (the backend saw them divided by rows.scale).
        residual = rows.residual.detach().to(torch.float64) * rows.scale
        before = float(rows.losses.sum())
        entry = {
            "step": self.state["sven"]["step"],
            "singular_values": solution.all_singular_values.detach().cpu() * rows.scale,
            "rank": solution.rank,
            "residual_norm": float(residual.norm()),
            "loss": before,
            "predicted_loss_change": None,
        }
        # J delta = -lr U_k diag(s^2 / (s^2 + lambda)) U_k^T r when the step is the plain Sven step.
        plain = first["rmsprop"] is None and first["momentum"] == 0 and first["weight_decay"] == 0 \
            and not first["variable_k"] \
            and len({g["lr"] for g in self.param_groups}) == 1
        if plain and solution.left_vectors is not None:
            u = solution.left_vectors.to(torch.float64)
            s2 = (solution.singular_values.to(torch.float64) * rows.scale).square()
            linear = residual - first["lr"] * (u @ ((s2 / (s2 + first["damping"])) * (u.T @ residual)))
            if residual_rows:
                predicted = float(linear.square().sum())
            else:  # rows are (group means of) losses ** (kappa / 2)
                m = first["microbatch_size"] or 1
                predicted = m * float(linear.clamp_min(0).pow(2.0 / first["kappa"]).sum())
            entry["predicted_loss_change"] = predicted - before
        entry["actual_loss_change"] = _batch_loss(closure()) - before
        self.svd_history.append(entry)
        self.last_info.update(predicted_loss_change=entry["predicted_loss_change"],
                              actual_loss_change=entry["actual_loss_change"])

    def _resolve_k(self, rows: int) -> int:
        k = self.param_groups[0]["k"]
        return max(1, rows // 2) if k is None else k


def draw_element_subsets(model: torch.nn.Module, params: list[torch.Tensor], fraction: float,
                         generator: torch.Generator) -> list[ElementSubset]:
    """One random product set of about ``fraction`` of the elements per parameter
    (``param_fraction`` with ``mask_by_block=False``): ``sqrt(fraction)`` of the first axis times
    ``sqrt(fraction)`` of the rest (adjusted where one side is short), ``fraction`` of a 1-D
    tensor's entries; a layer's bias takes its weight's output units, so that the gram backend
    can restrict the layer's factors."""
    def draw(count: int, size: int) -> torch.Tensor:
        return torch.randperm(size, generator=generator)[:count].sort().values

    weight_of = {id(m.bias): m.weight for m in model.modules()
                 if isinstance(getattr(m, "weight", None), torch.Tensor)
                 and isinstance(getattr(m, "bias", None), torch.Tensor)}
    subsets = {}
    for p in params:
        first, rest = (p.shape[0], p.numel() // max(p.shape[0], 1)) if p.dim() else (1, 1)
        if p.numel() == 0:
            subsets[id(p)] = ElementSubset(torch.zeros(0, dtype=torch.long, device=p.device))
        elif p.dim() > 1:
            units = min(first, max(1, round(math.sqrt(fraction) * first)))
            features = min(rest, max(1, round(fraction * p.numel() / units)))
            units = min(first, max(1, round(fraction * p.numel() / features)))  # where rest is short
            subsets[id(p)] = ElementSubset(draw(units, first).to(p.device), draw(features, rest).to(p.device))
        else:
            subsets[id(p)] = ElementSubset(draw(max(1, round(fraction * first)), first).to(p.device))
    for p in params:
        weight = weight_of.get(id(p))
        if p.dim() == 1 and weight is not None and id(weight) in subsets and weight.shape[0] == p.shape[0]:
            subsets[id(p)] = ElementSubset(subsets[id(weight)].rows)
    return [subsets[id(p)] for p in params]


def _batch_loss(output) -> float:
    """The batch loss of a closure's output: the sum of the losses, or of the squared residuals."""
    if isinstance(output, Residuals):
        return float(output.values.detach().square().sum())
    return float(output.detach().sum())


def _decayed(p: torch.Tensor, rate: float, mask: torch.Tensor | None) -> torch.Tensor:
    """Decoupled weight decay ``p - rate * p``, only where ``mask`` is 1 (``None``: everywhere);
    ``p`` itself when ``rate`` is 0."""
    if not rate:
        return p
    return p.mul(1 - rate) if mask is None else p.sub(p * mask, alpha=rate)


def _new_value(p: torch.Tensor, direction: torch.Tensor, lr: float, rate: float,
               mask: torch.Tensor | None) -> torch.Tensor:
    """``p`` after weight decay and ``-lr * direction``, as a new tensor."""
    value = _decayed(p, rate, mask)
    return p.sub(direction, alpha=lr) if value is p else value.sub_(direction, alpha=lr)


def _all_finite(tensors: list[torch.Tensor]) -> bool:
    """One flag for all tensors (a single host sync on a GPU) from one sum per tensor, where NaN and Inf
    propagate: one vectorised pass (on CPU 20x faster than isfinite().all() on 5.8M parameters). A finite
    sum proves every entry finite; a sum that overflowed is confirmed entry by entry."""
    if not tensors:
        return True
    if bool(torch.stack([t.sum().to(torch.float64) for t in tensors]).isfinite().all()):
        return True
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def _names(model: torch.nn.Module) -> dict:
    """``{id(parameter): name}`` for messages."""
    names = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), name)
    return names


def _overlaps_itself(t: torch.Tensor) -> bool:
    """Whether two elements of ``t`` may share memory (an expanded, stride-0 or other self-overlapping view):
    with the dimensions sorted by stride, each stride must step past everything the smaller ones reach."""
    extent = 1
    for stride, size in sorted((stride, size) for size, stride in zip(t.shape, t.stride()) if size > 1):
        if stride < extent:
            return True
        extent += stride * (size - 1)
    return False


class _ClosureWatch:
    """What the closure must leave alone: the moving parameters (their version counters count in-place
    writes) and their gradients (a ``backward`` in the closure accumulates into them)."""

    def __init__(self, model: torch.nn.Module, params: list[torch.Tensor]):
        self.model, self.params = model, params
        self.versions = [p._version for p in params]
        self.grads = [(p.grad, None if p.grad is None else p.grad._version) for p in params]
        self.passed = False

    def _edited(self) -> list[str]:
        names = _names(self.model)
        return [names.get(id(p), "?") for p, version in zip(self.params, self.versions) if p._version != version]

    def _edit_error(self, edited: list[str]) -> ValueError:
        return ValueError(
            f"the closure modified parameter(s) {edited} in place: it must only run the forward pass, since "
            "Sven computes and applies the update itself (edit the parameters before or after step); the "
            "closure's own writes cannot be undone, nothing else was changed"
        )

    def check(self) -> None:
        """Raises ``ValueError`` if the closure that just returned wrote a parameter or called ``backward``."""
        edited = self._edited()
        if edited:
            raise self._edit_error(edited)
        written = [p.grad for p, (grad, version) in zip(self.params, self.grads)
                   if p.grad is not None and (p.grad is not grad or p.grad._version != version)]
        if any(bool(g.any()) for g in written):  # zero_grad(set_to_none=False) writes zeros: harmless
            raise ValueError(
                "the closure called backward(): it must only run the forward pass and return per-sample "
                "losses (or sven_ext.Residuals); Sven differentiates them itself"
            )
        self.passed = True

    def after_failure(self, error: BaseException) -> None:
        """After a failed step: a closure that raised after writing a parameter is named as the cause."""
        if not self.passed and not getattr(error, "_sven_reported", False):
            edited = self._edited()
            if edited:
                raised = self._edit_error(edited)
                raised._sven_reported = True
                raise raised from error


def _check_step_state(entry) -> None:
    """The optimizer-wide state ``state["sven"]``: the step counter, the seed, the sketch's basis."""
    if not isinstance(entry, dict) or set(entry) - {"step", "seed", "basis"}:
        raise ValueError(f"the optimizer state's 'sven' entry must be a dict of 'step', 'seed' and 'basis', got "
                         f"{sorted(entry) if isinstance(entry, dict) else type(entry).__name__}")
    step = entry.get("step", 0)
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"the optimizer state's step must be an integer >= 0, got {step!r}")
    seed = entry.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"the optimizer state's seed must be an integer, got {seed!r}")
    basis = entry.get("basis")
    if basis is not None and not (isinstance(basis, torch.Tensor) and basis.dim() == 2 and basis.is_floating_point()
                                  and _all_finite([basis])):
        raise ValueError("the optimizer state's basis (the sketch's warm start) must be a finite floating 2-D tensor")


def check_group(group: dict, index: int) -> None:
    """Checks one param group's settings as the constructor checks its arguments (when the group is
    added, loaded, or used by a step: a scheduler may have changed it).

    Raises:
        ValueError: ``param group i: `` and the constructor's message, or the settings missing.
    """
    missing = [key for key in ("lr", "weight_decay", *_STEP_KEYS) if key not in group]
    if missing:
        raise ValueError(f"param group {index} lacks the setting(s) {missing}: was it saved by another optimizer?")
    lr = group["lr"]
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (lr >= 0 and math.isfinite(lr)):
        raise ValueError(f"param group {index}: lr must be a finite number >= 0, got {lr!r}")
    try:
        check_settings(group)
    except ValueError as error:
        raise ValueError(f"param group {index}: {error}") from None


def check_settings(s: dict) -> None:
    """Checks every setting of a param group but ``lr`` (the constructor requires it > 0, a group >= 0).

    Raises:
        ValueError: naming the setting, the accepted range and the value.
    """
    k = s["k"]
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise ValueError(f"k must be a positive integer or None, got {k!r}")
    rtol = s["rtol"]
    if isinstance(rtol, bool) or not (isinstance(rtol, (int, float)) and 0 <= rtol < 1):
        raise ValueError(f"rtol must be in [0, 1), got {rtol!r}")
    _check_positive("kappa", s["kappa"])
    atol = s["atol"]
    if isinstance(atol, bool) or not (isinstance(atol, (int, float)) and atol >= 0):
        raise ValueError(f"atol must be >= 0, got {atol!r}")
    if s["solve_dtype"] not in (torch.float32, torch.float64):
        raise ValueError(f"solve_dtype must be torch.float32 or torch.float64, got {s['solve_dtype']}")
    chunk_rows = s["chunk_rows"]
    if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1:
        raise ValueError(f"chunk_rows must be a positive integer, got {chunk_rows!r}")
    _check_count("oversampling", s["oversampling"], minimum=0)
    _check_count("power_iterations", s["power_iterations"], minimum=0)
    if s["test_matrix"] not in TEST_MATRICES:
        raise ValueError(f"test_matrix must be one of {TEST_MATRICES}, got {s['test_matrix']!r}")
    for name in ("warm_start", "mask_by_block", "variable_k"):
        if not isinstance(s[name], bool):
            raise ValueError(f"{name} must be True or False, got {s[name]!r}")
    if isinstance(s["seed"], bool) or not isinstance(s["seed"], int):
        raise ValueError(f"seed must be an integer, got {s['seed']!r}")
    if s["max_memory"] is not None:
        _check_count("max_memory", s["max_memory"], minimum=1)
    if s["functional_mode"] not in FUNCTIONAL_MODES:
        raise ValueError(f"functional_mode must be one of {FUNCTIONAL_MODES}, got {s['functional_mode']!r}")
    _check_non_negative("damping", s["damping"])
    _check_non_negative("weight_decay", s["weight_decay"])
    if s["microbatch_size"] is not None:
        _check_count("microbatch_size", s["microbatch_size"], minimum=1)
    fraction = s["param_fraction"]
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise ValueError(f"param_fraction must be in (0, 1], got {fraction!r}")
    if s["rmsprop"] not in RMSPROP_MODES:
        raise ValueError(f"rmsprop must be one of {RMSPROP_MODES}, got {s['rmsprop']!r}")
    for name in ("rmsprop_beta", "momentum"):
        value = s[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
            raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    _check_positive("rmsprop_eps", s["rmsprop_eps"])
    if s["variable_k"] and (s["rmsprop"] is not None or s["momentum"]):
        raise ValueError("variable_k chooses how many components of the Sven step to apply; it does not "
                         "combine with rmsprop or momentum")
    check_backend_name(s["backend"])


def _snapshot_buffers(model: torch.nn.Module) -> list:
    """``(module, name, buffer, copy)`` of every buffer: restores both in-place updates and reassignments."""
    return [(m, name, b, b.clone()) for m in model.modules() for name, b in m._buffers.items() if b is not None]


def _restore_buffers(snapshot: list) -> None:
    for module, name, buffer, saved in snapshot:
        module._buffers[name] = buffer
        buffer.copy_(saved)


def _check_count(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_non_negative(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value >= 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def _check_positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
