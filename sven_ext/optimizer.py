"""The Sven optimizer (Singular Value dEsceNt, arXiv 2604.01279).

Each step runs the closure once, forms the residual rows ``r`` of the batch, and
moves the parameters by the minimum-norm step that best satisfies every row of
the linearised model: ``delta = -lr * V_k S_k^-1 U_k^T r`` (DESIGN.md section 1).
"""

from __future__ import annotations

import math
import warnings

import torch

from .backends import SketchSettings, StepSettings, check_backend_name, make_backend
from .backends.sketch import DEFAULT_POWER_ITERATIONS, TEST_MATRICES
from .linalg import DEFAULT_ATOL, Truncation

FUNCTIONAL_MODES = ("exact", "randomized")
# Settings of the whole step (one solve covers every param group): only lr may differ between groups.
_STEP_KEYS = ("k", "rtol", "kappa", "backend", "atol", "solve_dtype", "chunk_rows", "oversampling",
              "power_iterations", "test_matrix", "warm_start", "seed", "max_memory", "functional_mode")


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
    ):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        _check_positive("lr", lr)
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ValueError(f"k must be a positive integer or None, got {k!r}")
        if not (isinstance(rtol, (int, float)) and 0 <= rtol < 1):
            raise ValueError(f"rtol must be in [0, 1), got {rtol!r}")
        _check_positive("kappa", kappa)
        if not (isinstance(atol, (int, float)) and atol >= 0):
            raise ValueError(f"atol must be >= 0, got {atol!r}")
        if solve_dtype not in (torch.float32, torch.float64):
            raise ValueError(f"solve_dtype must be torch.float32 or torch.float64, got {solve_dtype}")
        if not isinstance(chunk_rows, int) or chunk_rows < 1:
            raise ValueError(f"chunk_rows must be a positive integer, got {chunk_rows!r}")
        _check_count("oversampling", oversampling, minimum=0)
        _check_count("power_iterations", power_iterations, minimum=0)
        if test_matrix not in TEST_MATRICES:
            raise ValueError(f"test_matrix must be one of {TEST_MATRICES}, got {test_matrix!r}")
        if not isinstance(warm_start, bool):
            raise ValueError(f"warm_start must be True or False, got {warm_start!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        if max_memory is not None:
            _check_count("max_memory", max_memory, minimum=1)
        if functional_mode not in FUNCTIONAL_MODES:
            raise ValueError(f"functional_mode must be one of {FUNCTIONAL_MODES}, got {functional_mode!r}")
        check_backend_name(backend)

        model_params = {id(p) for p in model.parameters()}
        params = [p for p in model.parameters() if p.requires_grad] if params is None else list(params)
        if not params:
            raise ValueError("no trainable parameters: every parameter has requires_grad=False (or params is empty)")
        defaults = dict(
            lr=lr, k=k, rtol=rtol, kappa=kappa, backend=backend, atol=atol, solve_dtype=solve_dtype,
            chunk_rows=chunk_rows, oversampling=oversampling, power_iterations=power_iterations,
            test_matrix=test_matrix, warm_start=warm_start, seed=seed, max_memory=max_memory,
            functional_mode=functional_mode,
        )
        super().__init__(params, defaults)
        trainable = self._trainable()
        if not trainable:
            raise ValueError("no trainable parameters: every parameter has requires_grad=False (or params is empty)")
        strangers = [p for p in trainable if id(p) not in model_params]
        if strangers:
            raise ValueError(f"params must belong to model: {len(strangers)} tensor(s) are not parameters of it")
        devices = {p.device for p in trainable}
        if len(devices) > 1:
            raise ValueError(f"all parameters must be on one device, got {sorted(map(str, devices))}")
        dtypes = {p.dtype for p in trainable}
        if len(dtypes) > 1:
            raise ValueError(f"all parameters must have one dtype, got {sorted(map(str, dtypes))}")
        if not trainable[0].is_floating_point():
            raise ValueError(f"parameters must be floating point, got {trainable[0].dtype}")
        self.model = model
        self.last_info: dict = {}
        self._backends: dict = {}

    def _trainable(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"] if p.requires_grad]

    def _backend(self, name: str, params: list[torch.Tensor]):
        key = (name, tuple(id(p) for p in params))
        if key not in self._backends:
            self._backends = {key: make_backend(name, self.model, params)}
        return self._backends[key]

    @torch.no_grad()
    def step(self, closure=None):
        """One Sven step.

        The step is atomic: if anything raises (the closure, the capture, a kernel, the solve,
        running out of memory, or a direction that is not finite), every parameter, buffer and
        optimizer-state tensor is left exactly as it was, and the exception propagates.

        Args:
            closure: callable with no arguments that runs the forward pass and returns
                per-sample losses of shape ``(B,)`` or :class:`sven_ext.Residuals`. It must
                not call ``backward``: the step does its own differentiation.

        Returns:
            The ``(B,)`` per-sample losses before the update (detached).
        """
        if closure is None or not callable(closure):
            raise ValueError("Sven.step needs a closure that returns per-sample losses (it runs the forward pass)")
        first = self._step_settings()
        params = self._trainable()
        state = self.state.get("sven", {})  # read only: the state changes once the step has succeeded
        settings = StepSettings(
            truncation=Truncation(first["k"], first["rtol"], first["atol"]),
            kappa=first["kappa"],
            solve_dtype=first["solve_dtype"],
            chunk_rows=first["chunk_rows"],
            sketch=SketchSettings(
                oversampling=first["oversampling"], power_iterations=first["power_iterations"],
                test_matrix=first["test_matrix"], seed=first["seed"], step=state.get("step", 0),
                basis=state.get("basis") if first["warm_start"] else None,
            ),
            max_memory=first["max_memory"],
            functional_mode=first["functional_mode"],
        )
        buffers = _snapshot_buffers(self.model)
        try:
            backend = self._backend(first["backend"], params)
            result = backend.compute(closure, settings, self._resolve_k)
            updates = self._updates(params, result.directions)
        except BaseException:
            # The closure may have moved buffers (e.g. running statistics) before the failure.
            _restore_buffers(buffers)
            raise
        # Nothing has changed so far; from here on nothing can fail.
        for p, direction, lr in updates:
            p.sub_(direction, alpha=lr)
        new_state = {"step": state.get("step", 0) + 1, "seed": first["seed"]}
        if first["warm_start"] and result.state.get("basis") is not None:
            new_state["basis"] = result.state["basis"].detach()
        self.state["sven"] = new_state
        self.last_info = {
            "backend": backend.name,
            "singular_values": result.solution.singular_values.detach().cpu(),
            "rank": result.solution.rank,
            "rows": result.rows.residual.numel(),
            "loss": float(result.rows.losses.sum()),
            **result.info,
        }
        if result.solution.rank == 0:
            largest = result.solution.all_singular_values
            largest = float(largest[0]) if largest.numel() else 0.0
            self.last_info["warning"] = (
                f"zero update: every singular value is below the cut-off (largest {largest:.3e}; "
                f"rtol={first['rtol']}, atol={first['atol']})"
            )
            warnings.warn(self.last_info["warning"], RuntimeWarning, stacklevel=2)
        return result.rows.losses

    def _step_settings(self) -> dict:
        """The first param group's settings, after checking that every group agrees and that
        values changed since construction (e.g. by a scheduler) are still valid."""
        first = self.param_groups[0]
        check_backend_name(first["backend"])
        for index, group in enumerate(self.param_groups):
            lr = group["lr"]
            if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (lr >= 0 and math.isfinite(lr)):
                raise ValueError(f"param group {index}: lr must be a finite number >= 0, got {lr!r}")
            for key in _STEP_KEYS:
                if group[key] != first[key]:
                    raise ValueError(
                        f"param group {index} sets {key}={group[key]!r} but group 0 has {first[key]!r}: "
                        "one Sven step solves for every group at once, so only lr may differ between groups"
                    )
        return first

    def _updates(self, params: list[torch.Tensor], directions: list[torch.Tensor]):
        """``(param, direction in its dtype, lr)`` for every moving parameter; raises before any
        change if a direction is not finite."""
        by_id = {id(p): d for p, d in zip(params, directions)}
        updates = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.requires_grad:
                    direction = by_id[id(p)].to(p.dtype)
                    if not torch.isfinite(direction).all():
                        raise FloatingPointError(
                            "the Sven direction is not finite (NaN or Inf); the parameters were not changed. "
                            "The residuals or the model's scale may overflow solve_dtype"
                        )
                    updates.append((p, direction, group["lr"]))
        return updates

    def _resolve_k(self, rows: int) -> int:
        k = self.param_groups[0]["k"]
        return max(1, rows // 2) if k is None else k


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


def _check_positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
