"""Recording a step: the calls of every module that owns a moving parameter, and the gradient of
every residual row with respect to each call's output (DESIGN.md section 3).

While the closure runs, forward hooks record the input of every such module and the gradient
edge of its output. Afterwards one batched backward pass gives ``D``, the gradient of each row
with respect to each recorded output, and the layer family's rule (:mod:`sven_ext.layers`)
turns each call into *uses*: factorisations of its parameters' per-row gradients.

Where the batch is. A step has ``R = B * m`` rows. A call's output normally has the batch on
axis 0 (``S = B`` samples); on axis 1 for sequence-first layouts (``(T, B, d)``) of the families
that act on the last axis (linear maps, embeddings, layer and RMS norms), which are moved to
axis 0. Two kinds of tensors broadcast against the batch and are expanded to it, so that their
per-sample gradients come from the same backward pass, once a step has shown (through their
consumers in the autograd graph) that the expansion changes no value: the output of a position
table looked up with ``arange(T)`` or ``position_ids`` of shape ``(1, T)`` that is only added to
an earlier call's output of exactly the batched shape (:meth:`Capture._broadcasts`), and a
parameter a module uses directly in an elementwise expression (:meth:`Capture._tap`). Any other
call whose output has no batch axis is recorded *whole*:
``S = 1``, its input is the one "sample" every row shares, and its ``D`` rows come from one
backward pass per row (slower, still exact). A module whose output's first axis merely has the
batch's size (``pos(arange(T))`` with ``T == B``) or that mixes samples is recorded whole too
once the factor check finds its per-sample factors wrong (``Capture.uses(shared=...)``).

BatchNorm using batch statistics couples the samples: there is no per-sample gradient, and
:func:`capture` raises an error naming the module.

A model wrapped in ``DistributedDataParallel`` is recorded through the modules it wraps, with
DDP's gradient synchronisation off while recording: data-parallel Sven reduces its step itself
(:mod:`sven_ext.distributed`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.autograd.graph import get_gradient_edge
from torch.utils._pytree import tree_flatten, tree_unflatten

from . import distributed
from .factor_check import Broadcasts, graph_fingerprint, hooks_fingerprint
from .layers import DirectUse, Use, rule_for
from .layers.embedding import embedding_rule
from .layers.fallback import module_rule
from .layers.linear import linear_rule, transposed_linear_rule
from .layers.norm import hf_rms_norm_rule, layer_norm_rule, rms_norm_rule
from .output_gradients import output_gradients

# Modules that read their children's parameters without calling the children: planned as one
# module owning every parameter under it (their own rule, or the fallback, factors them all).
WHOLE_MODULES = (nn.MultiheadAttention,)
# Rules of layers that act on the last axis only, so any leading axis may hold the batch.
_LAST_AXIS_RULES = (linear_rule, transposed_linear_rule, embedding_rule, layer_norm_rule, rms_norm_rule,
                    hf_rms_norm_rule)
# Position and segment tables: a lookup without a batch axis that is only ever added to a
# batched tensor may be expanded to the batch (the sum is the same) once a step has shown it so.
_EXPANDABLE_RULES = (embedding_rule,)
_TABLE_CONSUMERS = {"AddBackward0"}


def _batch_statistics(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.batchnorm._BatchNorm) and (
        module.training or module.running_mean is None
    )


@dataclass
class Call:
    """One recorded call of a hooked module: what a layer rule (:mod:`sven_ext.layers`) reads."""

    name: str
    module: nn.Module
    rule: object
    params: list[tuple[str, torch.Tensor]]  # moving parameters, names relative to the module
    leaves: list  # flattened (args, kwargs), tensors detached
    spec: object
    versions: list[int | None]
    outputs: list[int]  # indices of differentiable output leaves
    edges: list
    shapes: list[torch.Size]
    batch_first: bool = True
    # Its output broadcast against the batch and was expanded to it: from a leading axis of 1
    # ("leading") or a new axis 0 ("new"); None: not expanded.
    expanded: str | None = None
    broadcast: bool = False  # its output looked like a table that broadcasts against the batch
    # Per output, the axis that holds the samples; None: recorded whole (S = 1).
    batch_axes: list[int] | None = None
    d: list = field(default_factory=list)  # per output: (R, ...) with the samples' axis removed
    # Per output, the output itself (detached) and its version counter at the call, kept for
    # rules that read their module's outputs (``rule.reads_outputs``); None for the others.
    values: list | None = None
    # Its uses, where its rule formed them during the backward pass (``rule.eager``).
    early_uses: list | None = None

    @property
    def whole(self) -> bool:
        return self.batch_axes is None

    @property
    def input(self) -> torch.Tensor:
        args, kwargs = tree_unflatten(self.leaves, self.spec)
        return args[0] if args else next(iter(kwargs.values()))

    def sample_input(self) -> torch.Tensor:
        """The call's first input with the samples on axis 0 (a whole call's gains an axis of 1)."""
        x = self.input
        if self.whole:
            return x.unsqueeze(0)
        if self.expanded == "leading":
            return x.expand(self.shapes[0][0], *x.shape[1:])
        if self.expanded == "new":
            return x.expand(self.shapes[0][0], *x.shape)
        return x.movedim(self.batch_axes[0], 0) if self.batch_axes[0] else x


class Capture:
    """Records hooked module calls during the closure, then turns them into uses.

    Args:
        model: the module the closure runs.
        params: the moving parameters.
    """

    def __init__(self, model: nn.Module, params: list[torch.Tensor], broadcasts: Broadcasts | None = None):
        self.model = model
        self.params = params
        self.broadcasts = Broadcasts() if broadcasts is None else broadcasts
        self.calls: list[Call] = []
        self.no_grad_calls: set[str] = set()  # modules called with gradients disabled
        self._handles: list = []
        self._no_sync = None
        for name, module in model.named_modules():
            if _batch_statistics(module):
                raise ValueError(
                    f"the gram backend needs per-sample gradients, but module {name or '<root>'!r} "
                    f"({type(module).__name__}) normalises with batch statistics, which couples the "
                    "samples: call model.eval() (running statistics) or use backend='dense'"
                )
        self.plan = _plan(model, params, self.broadcasts.params)

    def signature(self, residual_rows: torch.Tensor) -> tuple[tuple, dict, dict]:
        """What the factor check's verdict depends on, after the closure ran (:mod:`sven_ext.factor_check`).

        The same walk over the autograd graph notes which broadcast tables and parameters only
        ever combine elementwise with the batch (so later steps expand them).

        Returns:
            ``(step, per_param, per_module)``: the step's rows, graph and hooks; per moving
            parameter (by id) and per recorded module (by id), the shapes of its calls.

        Raises:
            ValueError: a reentrant checkpoint in the graph, or a tensor expanded on this step
                that this step uses where the expansion may change a value.
        """
        batch = residual_rows.shape[0]
        tables = {call.edges[0].node: call for call in self.calls if call.broadcast}
        candidates = self._tap_candidates(batch)
        taps = {call.edges[0].node: call for call in self.calls if call.expanded == "tap"}
        graph, consumers = graph_fingerprint(residual_rows, {**tables, **candidates, **taps})
        for node, call in tables.items():
            added = {type(n).__name__ for n in consumers.get(node, [])} <= _TABLE_CONSUMERS
            if call.expanded is None and added:
                self.broadcasts.tables.add(id(call.module))
            elif call.expanded is not None and not added:
                self.broadcasts.tables.discard(id(call.module))
                raise _expansion_changed(f"module {call.name!r}'s output")
        for node, p in candidates.items():
            rank = _expanded_rank(consumers.get(node, []), p.shape, p.shape, batch)
            if rank is not None:
                self.broadcasts.params[id(p)] = rank
        for node, call in taps.items():
            p = call.params[0][1]
            if _expanded_rank(consumers.get(node, []), call.shapes[0], p.shape, batch) != len(call.shapes[0]):
                del self.broadcasts.params[id(p)]
                raise _expansion_changed(f"parameter {call.name!r}")
        step = (tuple(residual_rows.shape), graph, hooks_fingerprint(self.model))
        per_module: dict = {}
        per_param: dict = {}
        for call in self.calls:
            key = (call.name, tuple(map(tuple, call.shapes)), call.batch_first,
                   tuple(tuple(x.shape) if isinstance(x, torch.Tensor) else None for x in call.leaves))
            per_module[id(call.module)] = per_module.get(id(call.module), ()) + (key,)
            for _, p in call.params:
                per_param[id(p)] = per_param.get(id(p), ()) + (key,)
        return step, per_param, per_module

    def _tap_candidates(self, batch: int) -> dict:
        """``{graph node: parameter}`` of the parameters the fallback differentiates that might be
        expanded to the batch instead: not inside a whole-differentiated module, and owned by a
        module whose every call this step took the batch on axis 0 of its first input."""
        first_axes: dict = {}
        for call in self.calls:
            x = next((t for t in call.leaves if isinstance(t, torch.Tensor) and t.dim() > 0), None)
            first_axes.setdefault(id(call.module), set()).add(None if x is None else x.shape[0])
        return {get_gradient_edge(p).node: p for _, module, rule, owned, _ in self.plan
                if rule is module_rule and not isinstance(module, WHOLE_MODULES)
                and first_axes.get(id(module)) == {batch} for _, p in owned}

    def __enter__(self) -> Capture:
        for name, module, rule, owned, taps in self.plan:
            if owned:
                hook = self._hook(name, rule, owned)
                # First among the module's hooks: the factors describe the module's own output; a user's
                # hook that rewrites it is then part of the graph above, like any other layer.
                self._handles.append(module.register_forward_hook(hook, with_kwargs=True, prepend=True))
            if taps:
                self._tap(name, module, taps)
        self._no_sync = distributed.without_gradient_sync(self.model)
        self._no_sync.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for _, module, _, _, taps in self.plan:
            for n, p in taps:  # a forward that raised may have left its expanded views in place
                module._parameters[n] = p
        if self._no_sync is not None:
            no_sync, self._no_sync = self._no_sync, None
            no_sync.__exit__(*exc)

    def _tap(self, name: str, module: nn.Module, taps: list[tuple[str, torch.Tensor]]) -> None:
        """Expands parameters ``module`` uses directly in an expression to the batch while it runs.

        The batch is the leading axis of the module's first tensor input. The expanded views are
        recorded as calls of their own, so their per-sample gradients come from the same backward
        pass as every layer's (:func:`tap_rule`).
        """
        def expand(module, args, kwargs):
            first = next((x for x in (*args, *kwargs.values()) if isinstance(x, torch.Tensor) and x.dim() > 0), None)
            if first is None or not torch.is_grad_enabled():
                return None
            batch = first.shape[0]
            for n, p in taps:
                rank = self.broadcasts.params[id(p)]
                view = p.expand(batch, *p.shape[1:]) if rank == p.dim() else \
                    p.view(1, *[1] * (rank - 1 - p.dim()), *p.shape).expand(batch, *[-1] * (rank - 1))
                module._parameters[n] = view
                self.calls.append(Call(
                    name=f"{name}.{n}" if name else n, module=module, rule=tap_rule, params=[(n, p)], leaves=[],
                    spec=None, versions=[], outputs=[0], edges=[get_gradient_edge(view)], shapes=[view.shape],
                    expanded="tap",
                ))
            return None

        def restore(module, args, kwargs, output):
            for n, p in taps:
                module._parameters[n] = p

        self._handles.append(module.register_forward_pre_hook(expand, with_kwargs=True))
        self._handles.append(module.register_forward_hook(restore, with_kwargs=True, always_call=True))

    def _hook(self, name: str, rule, owned: list[tuple[str, torch.Tensor]]):
        def hook(module, args, kwargs, output):
            flat_out = [output] if isinstance(output, torch.Tensor) else tree_flatten(output)[0]
            outputs = [k for k, t in enumerate(flat_out) if isinstance(t, torch.Tensor) and t.grad_fn is not None]
            if not outputs:
                if not torch.is_grad_enabled():
                    self.no_grad_calls.add(name)
                return None  # it does not move the residual
            broadcast = self._broadcasts(module, output, rule)
            how, expanded = (None, None) if broadcast is None or id(module) not in self.broadcasts.tables \
                else broadcast
            if expanded is not None:
                flat_out, output = [expanded], expanded
            leaves, spec = _flatten_inputs(args, kwargs)
            leaves = [x.detach() if isinstance(x, torch.Tensor) else x for x in leaves]
            self.calls.append(
                Call(
                    name=name,
                    module=module,
                    rule=rule,
                    params=owned,
                    leaves=leaves,
                    spec=spec,
                    versions=[x._version if isinstance(x, torch.Tensor) else None for x in leaves],
                    outputs=outputs,
                    edges=[get_gradient_edge(flat_out[k]) for k in outputs],
                    shapes=[flat_out[k].shape for k in outputs],
                    batch_first=getattr(module, "batch_first", True) is not False,
                    expanded=how,
                    broadcast=broadcast is not None,
                    values=[(flat_out[k].detach(), flat_out[k]._version) for k in outputs]
                    if getattr(rule, "reads_outputs", False) else None,
                )
            )
            return None if expanded is None else output

        return hook

    def _broadcasts(self, module, output, rule):
        """``(how, output expanded to the batch)`` when ``output`` looks like a table that broadcasts
        against the batch, else ``None``.

        A ``(1, *rest)`` or ``rest`` lookup where an earlier call of this step produced exactly
        ``(B, *rest)`` (token embeddings): a position table about to be added to them. Expanded
        only once a step has shown that it is only added (:meth:`signature`), so that a view of it
        per sample changes no value.
        """
        if rule not in _EXPANDABLE_RULES or not isinstance(output, torch.Tensor) or output.dim() == 0:
            return None
        how = "leading" if output.shape[0] == 1 else "new"
        rest = output.shape[1:] if how == "leading" else output.shape
        for call in self.calls:
            shape = call.shapes[0]
            if len(shape) == len(rest) + 1 and shape[1:] == rest and shape[0] > 1:
                return how, output.expand(shape[0], *rest)
        return None

    def uses(self, residual_rows: torch.Tensor, chunk_rows: int, shared: set | frozenset = frozenset(),
             keep_graph: bool = True, release: bool = False) -> list[Use]:
        """The uses of every moving parameter, after the closure ran (once: an eager rule drops its
        call's input).

        Args:
            residual_rows: ``(B, m)`` residuals (``Rows.per_sample``) with autograd history.
            chunk_rows: rows per batched backward pass for whole-recorded calls.
            shared: ids of modules to record whole even where their output's first axis has the
                batch's size (e.g. ``pos(arange(T))`` with ``T == B``).
            keep_graph: keep the rows' autograd graph; else the backward pass frees the forward
                pass's saved activations as it goes, as an ordinary backward pass does.
            release: hand the freed host memory back during that pass (:mod:`sven_ext.host_memory`).

        Returns:
            A list of uses (each names the parameters it covers).
        """
        batch, m = residual_rows.shape
        refuse_no_grad_only(self.no_grad_calls, {call.name for call in self.calls})
        for call in self.calls:
            for x, version in zip(call.leaves, call.versions):
                if isinstance(x, torch.Tensor) and x._version != version:
                    raise RuntimeError(
                        f"the input of module {call.name!r} was modified in place after the call; the gram "
                        "backend reads it after the closure (avoid in-place ops on layer inputs)"
                    )
        for call in self.calls:
            call.batch_axes = None if id(call.module) in shared else _batch_axes(call, batch)
        output_gradients(residual_rows, [c for c in self.calls if not c.whole], [c for c in self.calls if c.whole],
                         chunk_rows, keep_graph, release)
        uses = []
        for call in self.calls:
            early = call.early_uses
            uses.extend(early if early is not None else call.rule(call, 1 if call.whole else batch))
            call.d = []  # the uses hold what they need
        return uses


_TENSOR_ARGS_SPECS: dict[int, object] = {}


def _flatten_inputs(args: tuple, kwargs: dict) -> tuple[list, object]:
    """``tree_flatten((list(args), kwargs))``, with the common call (tensor arguments only) on a
    cached spec: pytree's walk cost ~0.1 ms per hooked call, a third of a small model's forward."""
    if not kwargs and all(isinstance(x, torch.Tensor) for x in args):
        if len(args) not in _TENSOR_ARGS_SPECS:
            _TENSOR_ARGS_SPECS[len(args)] = tree_flatten((list(args), {}))[1]
        return list(args), _TENSOR_ARGS_SPECS[len(args)]
    return tree_flatten((list(args), kwargs))


def capture(model: nn.Module, params: list[torch.Tensor], broadcasts: Broadcasts | None = None) -> Capture:
    """Context manager recording the calls of the modules that own ``params``.

    Example::

        with capture(model, params) as cap:
            residual = closure()
        uses = cap.uses(rows.per_sample, chunk_rows=64)
    """
    return Capture(model, params, broadcasts)


class GradModeWatch:
    """Notes which modules owning moving parameters the closure ran with gradients disabled
    (for the dense backend, which records nothing else; :class:`Capture` notes it itself)."""

    def __init__(self, model: nn.Module, params: list[torch.Tensor]):
        self.plan = _plan(model, params)
        self.no_grad_calls: set[str] = set()
        self.grad_calls: set[str] = set()
        self._handles: list = []

    def __enter__(self) -> GradModeWatch:
        for name, module, _, _, _ in self.plan:
            def hook(module, args, output, name=name):
                (self.grad_calls if torch.is_grad_enabled() else self.no_grad_calls).add(name)
            self._handles.append(module.register_forward_hook(hook))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def refuse_no_grad_only(no_grad: set, with_grad: set) -> None:
    """Raises when a module owning moving parameters ran only with gradients disabled: the step
    would leave its parameters where they are, which is never what moving them asks for."""
    only = sorted(no_grad - with_grad)
    if only:
        raise ValueError(
            f"module(s) {only} own parameters this step moves, but the closure ran them only with gradients "
            "disabled (torch.no_grad(), or torch.utils.checkpoint(..., use_reentrant=True) whose inputs do not "
            "require grad), so the residuals do not depend on those parameters. Use use_reentrant=False, or "
            "leave the parameters out (requires_grad_(False) or Sven(params=...))"
        )


def _batch_axes(call: Call, batch: int) -> list[int] | None:
    """Per output of ``call``, the axis that holds the samples, or ``None``: record it whole.

    A rule with a ``batch_axes`` attribute decides for its module (attention, recurrent layers).
    Otherwise axis 0, or axis 1 for a sequence-first layer acting on the last axis, for the extra
    outputs of a module whose first output is batch-first, and for the sequence-first outputs of
    a fallback module that says ``batch_first=False``.
    """
    known = getattr(call.rule, "batch_axes", None)
    if known is not None:
        return known(call, batch)
    # Axis 1 only with a feature axis after it: a 2-D output's axis 1 is its features.
    first, second = (0, 1) if call.batch_first else (1, 0)
    axes = [first if _holds(s, first, batch) else second if _holds(s, second, batch) else None for s in call.shapes]
    if None in axes:
        return None
    if not call.batch_first:
        return axes if call.rule is module_rule and axes[0] == 1 else None
    if call.rule in _LAST_AXIS_RULES:
        return axes if len(set(axes)) == 1 else None
    return axes if axes[0] == 0 else None


def _expansion_changed(what: str) -> ValueError:
    """The error of a step that used a tensor expanded to the batch where that may change a value
    (the tensor is no longer expanded, so the step can be run again)."""
    return ValueError(
        f"{what} broadcasts against the batch and was expanded to it because earlier steps only combined "
        "it elementwise with batched tensors, but this step used it otherwise, where the expansion may change "
        "the result. Nothing was changed; it is no longer expanded, so the step can be run again"
    )


def _holds(shape: torch.Size, axis: int, batch: int) -> bool:
    """Whether ``shape`` may hold the samples on ``axis`` (axis 1 needs a feature axis after it)."""
    return len(shape) > 2 * axis and shape[axis] == batch


def _expanded_rank(consumers: list, consumed: torch.Size, param: torch.Size, batch: int) -> int | None:
    """The rank of a batch-expanded view of a parameter that gives every one of its uses the same
    values, or ``None`` where no such view is known.

    A parameter with a leading axis of 1 keeps its rank (``(B, ...)``), so sums, differences,
    products and ``expand`` that broadcast it against a batch give the same values. Any other
    parameter gains a batch axis and singleton axes up to the rank of the batched tensor it
    multiplies (``(B, 1, d)`` for a ``(d,)`` scale of ``(B, T, d)``); a sum saves no operand to
    check, so only products qualify.

    Args:
        consumers: the graph nodes that use the tensor.
        consumed: the shape of the tensor they use (the parameter's, or its expanded view's).
        param: the parameter's shape.
        batch: the step's batch size.
    """
    leading = len(param) >= 2 and param[0] == 1
    ranks = set()
    for node in consumers:
        name = type(node).__name__
        if leading and name in ("AddBackward0", "SubBackward0", "ExpandBackward0"):
            ranks.add(len(param))
            continue
        if name == "MulBackward0":
            saved = [getattr(node, attr, None) for attr in ("_saved_self", "_saved_other")]
            others = [t for t in saved if isinstance(t, torch.Tensor) and t.shape != consumed]
            rank = others[0].dim() if len(others) == 1 else 0
            if (rank == len(param) if leading else rank > len(param)) and others[0].shape[0] == batch:
                ranks.add(rank)
                continue
        return None
    return ranks.pop() if len(ranks) == 1 else None


def tap_rule(call: Call, samples: int) -> list:
    """A parameter expanded to the batch (:meth:`Capture._tap`): its per-row gradient is ``d``."""
    (d,) = call.d
    if d is None:
        return []
    p = call.params[0][1]
    rows = d.shape[0]
    return [DirectUse(p, (d.sum(1) if call.whole else d).reshape(rows, -1))]


def _plan(model: nn.Module, params: list[torch.Tensor], tapped: set = frozenset()):
    """``(name, module, rule, owned, taps)`` for every module to hook: ``owned`` and ``taps`` are
    ``[(param name, param)]``, the parameters its rule factors and those expanded to the batch
    (``tapped``: ids of parameters a past step showed may be)."""
    moving = {id(p) for p in params}
    plan, inside = [], set()
    for name, module in model.named_modules():
        if id(module) in inside:
            continue
        whole = isinstance(module, WHOLE_MODULES)
        owned = [(n, p) for n, p in module.named_parameters(recurse=whole) if id(p) in moving]
        if whole:
            inside.update(id(sub) for sub in module.modules())
        rule = rule_for(module)
        taps = [(n, p) for n, p in owned if rule is module_rule and id(p) in tapped]
        owned = [(n, p) for n, p in owned if (n, p) not in taps]
        if owned or taps:
            plan.append((name, module, rule, owned, taps))
    return plan
