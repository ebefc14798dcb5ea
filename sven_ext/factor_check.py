"""The check that the captured per-sample factors describe the model (DESIGN.md section 3.5).

The gram and sketch backends never see per-sample gradients from autograd: they rebuild them
from per-layer factors (:mod:`sven_ext.capture`). That rebuild rests on assumptions about the
model that no type can promise (each layer's batch is on axis 0, no layer mixes samples, a
parameter is read only by its own module, no hook rewrites an output), so the factors are
checked against autograd: for random row weights ``w``, the direction ``J^T w`` they give must
match the gradient of ``w . r`` from one ordinary backward pass, parameter by parameter.

What a check found holds only for steps like the one it ran on. A step is described by its
*signature*: the shape of its rows, the structure of its autograd graph (every node type from
the residuals down to the parameters, so a new loss, a new hook function or a different
dropout setting changes it), the model's hooks, and per parameter the shapes of every recorded
call of its module. A step whose signature was checked before reuses the verdict; any other
step (a smaller last batch, a new sequence length, a hook added later, a closure that now mixes
samples) is checked again before its update is computed.

Tolerance: the factors and autograd sum the same terms in different orders and precisions, so
their difference is bounded by a multiple of the unit roundoff times the sum of the *absolute*
terms, ``|J|^T |w|`` (computed from the absolute factors), not times the result, which can
cancel to zero (a key bias under softmax has an exactly zero gradient).
"""

from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict

import torch
from torch import nn

from .host_memory import release_freed_memory
from .linalg import check_finite

# The check's tolerance relative to |J|^T |w|: sqrt(float32 eps). Float32 steps sit in the graphs
# of float64 models too (norms that upcast, rotary tables), so float64 models get the float32 bar;
# a wrong factorisation is off by O(1) of the terms it misplaces.
FULL_PRECISION_TOLERANCE = math.sqrt(torch.finfo(torch.float32).eps)
# Half-precision factors (autocast, float16/bfloat16 models) carry about eps of their dtype.
HALF_PRECISION_ROUNDOFFS = 4
# Signatures remembered per optimizer (variable sequence lengths give one each).
REMEMBERED_SIGNATURES = 256
# Seed of the check's random row weights and sketches: the check itself must be reproducible.
CHECK_SEED = 0x5EED
# Columns of the random sketch through which a parameter's gradient is compared: its float64
# ``(first axis, columns)`` image is all the check keeps of autograd's gradient, so the check's
# backward pass can run before the capture's and hold no gradient of the model's size.
SKETCH_COLUMNS = 8
# Most bytes of a float64 block of a gradient while it is sketched.
SKETCH_BLOCK_BYTES = 1 << 23


class FactorMismatch(RuntimeError):
    """The captured factors do not reproduce autograd's gradient; ``params``: ids of the failing parameters."""

    def __init__(self, message: str, params: set):
        super().__init__(message)
        self.params = params


@dataclasses.dataclass
class Verdict:
    """What the check found for one step signature.

    Attributes:
        params: ``(id(p), shapes of its calls)`` of the parameters whose factors passed.
        shared: ``(id(module), shapes of its calls)`` of modules whose output every sample shares
            although its first axis has the batch's size (recorded whole for such steps).
    """

    params: set = dataclasses.field(default_factory=set)
    shared: set = dataclasses.field(default_factory=set)


@dataclasses.dataclass
class Broadcasts:
    """What past steps showed broadcasts against the batch (kept by the optimizer across steps).

    Attributes:
        tables: ids of position-table modules whose output was only added to a batched tensor.
        params: ids of parameters a module uses directly in an expression (``cls_token``,
            ``layer_scale``) that were only combined elementwise with batched tensors, with the
            rank of their batch-expanded view.
    """

    tables: set = dataclasses.field(default_factory=set)
    params: dict = dataclasses.field(default_factory=dict)


class FactorChecks:
    """The verdicts of one optimizer's factor checks, by step signature (shared by its backends).

    Args:
        enabled: ``False`` trusts the factors without checking (``gram_matrix(check=False)``).
    """

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self._verdicts: OrderedDict = OrderedDict()
        self.broadcasts = Broadcasts()  # read and extended by :class:`sven_ext.capture.Capture`

    def verdict(self, signature) -> Verdict:
        """The verdict of ``signature`` (an empty one if it was never checked)."""
        verdict = self._verdicts.get(signature)
        if verdict is None:
            verdict = self._verdicts[signature] = Verdict()
            while len(self._verdicts) > REMEMBERED_SIGNATURES:
                self._verdicts.popitem(last=False)
        else:
            self._verdicts.move_to_end(signature)
        return verdict

    def __len__(self) -> int:
        return len(self._verdicts)


def graph_fingerprint(root: torch.Tensor, watched=()) -> tuple[tuple, dict]:
    """The node types of ``root``'s autograd graph in a fixed walk order (about 1 us a node).

    Args:
        root: the residual rows.
        watched: graph nodes whose consumers to report.

    Returns:
        ``(names, consumers)``: the node type names, and for each watched node reached the
        list of the nodes that use it.

    Raises:
        ValueError: the graph holds a reentrant checkpoint, which ``torch.autograd.grad`` cannot
            differentiate (every backend differentiates with it).
    """
    start = root.grad_fn
    if start is None:
        return (), {}
    seen, names, stack, consumers = {start}, [], [start], {}
    while stack:
        node = stack.pop()
        name = type(node).__name__
        names.append(name)
        for child, _ in node.next_functions:
            if child is None:
                continue
            if child in watched:
                consumers.setdefault(child, []).append(node)
            if child not in seen:
                seen.add(child)
                stack.append(child)
    if "CheckpointFunctionBackward" in names:
        raise ValueError(
            "the closure runs torch.utils.checkpoint with use_reentrant=True, which torch.autograd.grad "
            "cannot differentiate; pass use_reentrant=False (e.g. HF models: "
            "model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False}))"
        )
    return tuple(names), consumers


def hooks_fingerprint(model: nn.Module) -> tuple:
    """The handles of every hook on ``model``'s modules and the global module hooks (unique per registration)."""
    from torch.nn.modules import module as module_globals

    kinds = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    per_module = tuple(tuple(key for kind in kinds for key in getattr(m, kind, {})) for m in model.modules())
    global_hooks = tuple(tuple(getattr(module_globals, name, {})) for name in (
        "_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
        "_global_backward_pre_hooks"))
    return per_module, global_hooks


def probe_weights(residual: torch.Tensor) -> torch.Tensor:
    """The check's random row weights ``w`` (the same every check: reproducible)."""
    generator = torch.Generator(device=residual.device).manual_seed(CHECK_SEED)
    return torch.randn(residual.shape, generator=generator, device=residual.device).to(residual.dtype)


def probe(residual: torch.Tensor, params: list[torch.Tensor], weights: torch.Tensor, each) -> None:
    """Autograd's ``J^T w`` by one ordinary backward pass (the graph is kept), handed to
    ``each(p, gradient)`` as soon as each parameter's gradient is complete and then dropped, so
    the pass never holds the whole model's gradient; ``each(p, None)`` for a parameter the rows
    do not depend on. An exception from ``each`` is raised once the pass is over."""
    reached, failures = set(), []

    def hook(p):
        def seen(gradient):
            reached.add(id(p))
            if not failures:
                try:
                    each(p, gradient)
                except Exception as error:  # raised below, outside the autograd engine
                    failures.append(error)
            return gradient.new_zeros(()).expand_as(gradient)  # nothing of the size of p is returned

        return seen

    handles = [p.register_hook(hook(p)) for p in params]
    try:
        torch.autograd.grad(residual, params, grad_outputs=weights, retain_graph=True, allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()
    if failures:
        raise failures[0]
    for p in params:
        if id(p) not in reached:
            each(p, None)


class GradientSketches:
    """Autograd's ``J^T w`` per parameter, kept as its sketch ``G V_p`` (DESIGN.md section 3.5).

    ``G`` is the gradient seen as a matrix over its first axis, ``(first, rest)``, and ``V_p`` a
    fixed Gaussian ``(rest, SKETCH_COLUMNS)`` matrix (none where ``rest`` is at most that: ``G``
    is kept whole). Norms through a Gaussian sketch are those of the matrix times
    ``sqrt(columns)`` up to a spread of a few tens of percent, far inside the check's margins: a
    correct factorisation's error is rounding (``1e-7`` of the terms), a wrong one's ``O(1)``.

    Args:
        params: the moving parameters, in a fixed order (it seeds each ``V_p``).
    """

    def __init__(self, params: list[torch.Tensor]):
        self._index = {id(p): i for i, p in enumerate(params)}
        self._sketches: dict = {}
        self._matrices: dict = {}

    def matrix(self, p: torch.Tensor) -> torch.Tensor | None:
        """``V_p``, float64 on ``p``'s device (``None``: compared whole), drawn once."""
        rest = p.numel() // max(p.shape[0] if p.dim() else 1, 1)
        if rest <= SKETCH_COLUMNS:
            return None
        if id(p) not in self._matrices:
            generator = torch.Generator(device=p.device).manual_seed(CHECK_SEED + 1 + self._index[id(p)])
            self._matrices[id(p)] = torch.randn(rest, SKETCH_COLUMNS, generator=generator, dtype=torch.float64,
                                                device=p.device)
        return self._matrices[id(p)]

    def sketch(self, p: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
        """``matrix`` (a ``(first, rest)`` float64 view of a tensor like ``p``'s gradient) through ``V_p``."""
        v = self.matrix(p)
        return matrix if v is None else matrix @ v

    def take(self, p: torch.Tensor, gradient: torch.Tensor | None, name: str) -> None:
        """Keeps the sketch of autograd's gradient of ``p`` (``None``: the rows do not depend on it),
        formed a block of rows at a time (no float64 copy of the whole gradient), each block checked
        finite (``FloatingPointError`` naming ``name``, the parameter)."""
        if gradient is None:
            self._sketches[id(p)] = None
            return
        first = p.shape[0] if p.dim() else 1
        rows = gradient.reshape(first, -1)
        block = max(1, SKETCH_BLOCK_BYTES // (8 * rows.shape[1]))
        parts = []
        for lo in range(0, first, block):
            part = rows[lo:lo + block].to(torch.float64)
            check_finite(part, f"the gradient of parameter {name!r}")
            parts.append(self.sketch(p, part))
        self._sketches[id(p)] = torch.cat(parts)

    def of(self, p: torch.Tensor) -> torch.Tensor | None:
        """The sketch of autograd's gradient of ``p`` (``None``: the rows do not depend on it)."""
        return self._sketches[id(p)]


def sketch_gradients(residual: torch.Tensor, params: list[torch.Tensor], weights: torch.Tensor,
                     names: dict, release: bool = False) -> GradientSketches:
    """:class:`GradientSketches` of autograd's ``J^T w`` by one backward pass (:func:`probe`, the graph
    is kept); with ``release``, freed host memory is handed back as the pass goes (:mod:`sven_ext.host_memory`)."""
    sketches = GradientSketches(params)

    def take(p, gradient):
        sketches.take(p, gradient, names.get(id(p), "?"))
        if release and gradient is not None and gradient.numel() >= 1 << 20:  # a layer's transients freed
            release_freed_memory()

    probe(residual, params, weights, take)
    return sketches


def tolerance(dtypes) -> float:
    """Relative tolerance of the check for factors and parameters of these dtypes."""
    low = max(torch.finfo(dtype).eps for dtype in dtypes)
    if low <= torch.finfo(torch.float32).eps:
        return FULL_PRECISION_TOLERANCE
    return HALF_PRECISION_ROUNDOFFS * low


def judge(params: list[torch.Tensor], found: list[tuple[float, float]], dtypes: list, names: dict) -> None:
    """Raises :class:`FactorMismatch` where the factors' ``J^T w`` is not autograd's.

    Args:
        params: the moving parameters.
        found: per parameter, ``(error, scale)``: the norm of the difference between the factors'
            ``J^T w`` and autograd's, and the norm of ``|J|^T |w|`` (or, where no absolute bound
            is available, the sum of the two results' norms).
        dtypes: per parameter, the dtypes its factors and gradient were computed in.
        names: ``id(p) -> name`` for the message.

    Raises:
        FactorMismatch: naming the first parameter whose factors fail; ``params`` holds every one.
    """
    failed, message = set(), None
    for p, (error, scale), kinds in zip(params, found, dtypes):
        bar = tolerance(kinds)
        if not error <= bar * scale:
            failed.add(id(p))
            relative = error / scale if scale > 0 else math.inf
            message = message or (
                f"the per-sample factors for parameter {names.get(id(p), '?')!r} do not reproduce its "
                f"gradient (error {relative:.2e} of the summed terms, tolerance {bar:.1e}): a module reads it "
                "outside its own forward, a layer or the loss mixes samples (batch statistics, a loss "
                "normalised over the batch), or a layer's batch is not on axis 0. Use backend='dense' for "
                "this model"
            )
    if failed:
        raise FactorMismatch(message, failed)
