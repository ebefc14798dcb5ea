"""Per-layer factors of the per-sample gradients, from one forward and one backward pass.

DESIGN.md section 3. While the closure runs, forward hooks record the input of every
module that owns a moving parameter and the gradient edge of its output. Afterwards
one batched backward pass gives ``D``, the gradient of each residual row with respect
to each recorded output, and every parameter receives *uses*: factorisations of its
per-row gradients ``g_r = d r_r / d theta`` that never form the ``(R, P)`` Jacobian.

Rows and samples. A step has ``R = B * m`` rows (``m`` outputs per sample, row
``i * m + j`` is output ``j`` of sample ``i``). A layer input is kept per sample
(``S = B`` leading entries) and ``D`` per row; ``row // m`` is the row's sample.
A module whose output has no batch axis 0 (a position embedding called with
``arange(T)``, ``batch_first=False`` attention) is recorded *whole*: ``S = 1``, its
whole input is the one "sample" every row shares, and its ``D`` rows are full
output-shaped tensors from a backward pass per row (slower, still exact).

Layers and their uses:

- ``nn.Linear`` (extra leading axes folded into a sequence axis ``T``) and
  ``nn.Conv1d/2d/3d`` (input unfolded into patches; groups kept as an axis):
  :class:`LinearUse` for the weight and bias (a frozen weight leaves a :class:`DirectUse`,
  ``D`` summed over ``T``, for the bias).
- ``nn.Embedding``: :class:`EmbeddingUse`.
- ``nn.LayerNorm``, ``nn.GroupNorm``, ``nn.RMSNorm`` and ``nn.BatchNorm*d`` in eval mode:
  :class:`DirectUse` (``sum D * xhat``, ``xhat`` recomputed from the recorded input).
- ``nn.MultiheadAttention`` (it reads ``out_proj.weight`` without calling ``out_proj``) and
  any other module that owns moving parameters: :class:`ModuleUse`, per-row gradients of
  that module alone with ``torch.func``, computed in row chunks when asked for.

BatchNorm using batch statistics couples the samples: there is no per-sample
gradient, and :func:`capture` raises an error naming the module.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.graph import get_gradient_edge
from torch.utils._pytree import tree_flatten, tree_unflatten

# Modules that read their children's parameters without calling the children: all the
# parameters under them are differentiated as one module.
WHOLE_MODULES = (nn.MultiheadAttention,)


def _kind(module: nn.Module) -> str:
    """Which factorisation a module's parameters get (``"module"``: the torch.func fallback)."""
    families = (
        ("linear", nn.Linear),
        ("conv", nn.modules.conv._ConvNd),
        ("embedding", nn.Embedding),
        ("layer_norm", nn.LayerNorm),
        ("group_norm", nn.GroupNorm),
        ("rms_norm", nn.RMSNorm),
        ("batch_norm", nn.modules.batchnorm._BatchNorm),
    )
    for kind, base in families:
        # A subclass that overrides forward computes something else: differentiate it as a module.
        if isinstance(module, base) and type(module).forward is _base_forward(module, base):
            if kind == "conv" and isinstance(module, nn.modules.conv._ConvTransposeNd):
                return "module"
            return kind
    return "module"


def _base_forward(module: nn.Module, base: type) -> object:
    # _ConvNd and _BatchNorm leave forward to their concrete subclasses (Conv2d, BatchNorm1d, ...).
    for cls in type(module).__mro__:
        if issubclass(cls, base) and "forward" in vars(cls):
            return vars(cls)["forward"]
    return None


def _batch_statistics(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.batchnorm._BatchNorm) and (
        module.training or module.running_mean is None
    )


# --------------------------------------------------------------------------- uses


def _combine(d: torch.Tensor, c: torch.Tensor, samples: int) -> torch.Tensor:
    """``sum_j c[i*m+j] * d[i*m+j]`` for every sample ``i``: ``(R, ...)`` -> ``(S, ...)`` in ``c.dtype``."""
    rows = d.shape[0]
    m = rows // samples
    flat = torch.einsum("smx,sm->sx", d.reshape(samples, m, -1).to(c.dtype), c.view(samples, m))
    return flat.view(samples, *d.shape[1:])


def _sample_index(start: int, stop: int, rows: int, samples: int, device) -> torch.Tensor:
    return torch.arange(start, stop, device=device) // (rows // samples)


@dataclass
class LinearUse:
    """A weight used as ``out = a @ w^T (+ b)`` per group: per-row gradient ``sum_t d_r[t]^T a_s[t]``.

    Attributes:
        param: the weight, of shape ``(groups * dout, din, ...)`` (Linear: ``(dout, din)``;
            conv: ``(c_out, c_in / groups, *kernel)``, ``din = c_in / groups * prod(kernel)``).
        a: ``(S, T, groups, din)`` layer input per sample (patches for a conv; may be an
            expanded view), model dtype.
        d: ``(R, T, groups, dout)`` gradient of each row with respect to the layer output.
        bias: the layer's bias when it moves too (per-row gradient ``sum_t d_r[t]``): the
            pair is one augmented weight ``[w b]`` acting on ``[a 1]``.
    """

    param: torch.Tensor
    a: torch.Tensor
    d: torch.Tensor
    bias: torch.Tensor | None = None

    @property
    def params(self) -> tuple[torch.Tensor, ...]:
        return (self.param,) if self.bias is None else (self.param, self.bias)

    def rows(self, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
        """Per-row gradients of rows ``start:stop``, ``(stop - start, numel)`` (weight, then bias)."""
        index = _sample_index(start, stop, self.d.shape[0], self.a.shape[0], self.a.device)
        d = self.d[start:stop].to(dtype)
        weight = torch.einsum("rtgi,rtgo->rgoi", self.a[index].to(dtype), d).reshape(stop - start, -1)
        return weight if self.bias is None else torch.cat([weight, d.sum(1).reshape(stop - start, -1)], dim=1)

    def direction(self, c: torch.Tensor) -> list[torch.Tensor]:
        """``sum_r c_r g_r`` in the parameters' shapes and ``c.dtype``: one weighted GEMM per group."""
        dc = _combine(self.d, c, self.a.shape[0])
        weight = torch.einsum("stgo,stgi->goi", dc, self.a.to(c.dtype)).reshape(self.param.shape)
        return [weight] if self.bias is None else [weight, dc.sum((0, 1)).reshape(self.bias.shape)]


@dataclass
class EmbeddingUse:
    """An embedding table: per-row gradient scatters ``d_r[t]`` into row ``indices_s[t]``.

    Attributes:
        param: ``(num_embeddings, dim)`` table.
        indices: ``(S, T)`` int64 indices per sample.
        d: ``(R, T, dim)`` gradient of each row with respect to the looked-up vectors
            (zero where the index is the padding index).
    """

    param: torch.Tensor
    indices: torch.Tensor
    d: torch.Tensor

    @property
    def params(self) -> tuple[torch.Tensor, ...]:
        return (self.param,)

    def rows(self, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
        count, steps = stop - start, self.indices.shape[1]
        index = _sample_index(start, stop, self.d.shape[0], self.indices.shape[0], self.d.device)
        out = torch.zeros(count, *self.param.shape, dtype=dtype, device=self.d.device)
        row = torch.arange(count, device=self.d.device).unsqueeze(1).expand(count, steps)
        out.index_put_((row, self.indices[index]), self.d[start:stop].to(dtype), accumulate=True)
        return out.reshape(count, -1)

    def direction(self, c: torch.Tensor) -> list[torch.Tensor]:
        dc = _combine(self.d, c, self.indices.shape[0])
        out = torch.zeros(self.param.shape, dtype=c.dtype, device=c.device)
        return [out.index_add_(0, self.indices.reshape(-1), dc.reshape(-1, dc.shape[-1]))]


@dataclass
class DirectUse:
    """Per-row gradients of a small parameter, materialised.

    Attributes:
        param: the parameter.
        g: ``(R, numel)`` per-row gradients, model dtype.
    """

    param: torch.Tensor
    g: torch.Tensor

    @property
    def params(self) -> tuple[torch.Tensor, ...]:
        return (self.param,)

    def rows(self, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
        return self.g[start:stop].to(dtype)

    def direction(self, c: torch.Tensor) -> list[torch.Tensor]:
        return [(self.g.T.to(c.dtype) @ c).view(self.param.shape)]


@dataclass
class ModuleUse:
    """One call of a module differentiated on its own with ``torch.func`` (the fallback).

    Per-sample calls (``S = B``) give per-row gradients by ``vmap(grad)`` over the rows,
    each row seeing its own sample's slice of the batched inputs; whole calls (``S = 1``)
    by ``vmap`` of one ``vjp`` over full output-shaped ``d`` rows. Computed in the
    requested dtype (the solve dtype), chunk by chunk, when asked for.

    Attributes:
        module: the module.
        names: names of the moving parameters, relative to ``module``.
        params: those parameters.
        leaves: flattened call arguments (detached tensors and other values).
        spec: pytree spec of ``(args, kwargs)``.
        batched: per leaf, whether it is indexed by sample (a batched tensor of a per-sample call).
        outputs: indices of the differentiable output leaves.
        d: per differentiable output, ``(R, ...)`` gradients (``None``: the rows do not depend on it).
        samples: ``S``.
    """

    module: nn.Module
    names: list[str]
    params: tuple[torch.Tensor, ...]
    leaves: list
    spec: object
    batched: list[bool]
    outputs: list[int]
    d: list[torch.Tensor | None]
    samples: int
    whole: bool

    def _state(self, dtype):
        state = {
            name: t.detach().to(dtype) if t.is_floating_point() else t
            for name, t in (*self.module.named_parameters(), *self.module.named_buffers())
        }
        moving = {name: state.pop(name) for name in self.names}
        return state, moving

    def _call(self, state, moving, leaves, dtype, unsqueeze: bool):
        """The module's differentiable outputs; ``unsqueeze``: give one sample's slices a batch axis back."""
        ready = []
        for x, batched in zip(leaves, self.batched):
            if isinstance(x, torch.Tensor):
                x = x.unsqueeze(0) if unsqueeze and batched else x
                x = x.to(dtype) if x.is_floating_point() else x
            ready.append(x)
        args, kwargs = tree_unflatten(ready, self.spec)
        out = torch.func.functional_call(self.module, {**state, **moving}, tuple(args), kwargs)
        flat = tree_flatten(out)[0]
        return [flat[k] for k in self.outputs]

    def rows(self, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
        state, moving = self._state(dtype)
        live = [k for k, d in enumerate(self.d) if d is not None]
        d_rows = [self.d[k][start:stop].to(dtype) for k in live]
        if self.whole:
            def whole(p):
                outs = self._call(state, p, self.leaves, dtype, unsqueeze=False)
                return tuple(outs[k] for k in live)

            _, vjp_fn = torch.func.vjp(whole, moving)
            grads = torch.vmap(vjp_fn)(tuple(d_rows))[0]
        else:
            index = _sample_index(start, stop, self.d[live[0]].shape[0], self.samples, d_rows[0].device)
            leaves = [x[index] if b else x for x, b in zip(self.leaves, self.batched)]
            in_dims = [0 if b else None for b in self.batched]

            def one(leaves_i, d_i):
                def scalar(p):
                    outs = self._call(state, p, leaves_i, dtype, unsqueeze=True)
                    return sum((outs[k] * d.unsqueeze(0)).sum() for k, d in zip(live, d_i))

                return torch.func.grad(scalar)(moving)

            grads = torch.vmap(one, in_dims=(in_dims, 0))(leaves, d_rows)
        return torch.cat([grads[name].reshape(stop - start, -1) for name in self.names], dim=1)

    def direction(self, c: torch.Tensor) -> list[torch.Tensor]:
        state, moving = self._state(c.dtype)
        live = [k for k, d in enumerate(self.d) if d is not None]

        def whole(p):
            outs = self._call(state, p, self.leaves, c.dtype, unsqueeze=False)
            return tuple(outs[k] for k in live)

        outs, vjp_fn = torch.func.vjp(whole, moving)
        cotangents = tuple(
            _combine(self.d[k], c, self.samples).view(out.shape) for k, out in zip(live, outs)
        )
        grads = vjp_fn(cotangents)[0]
        return [grads[name] for name in self.names]


# One factorisation of (part of) some parameters' per-row gradients.
Use = LinearUse | EmbeddingUse | DirectUse | ModuleUse


# --------------------------------------------------------------------------- recording


@dataclass
class _Call:
    """One recorded call of a hooked module."""

    name: str
    module: nn.Module
    kind: str
    params: list[tuple[str, torch.Tensor]]  # moving parameters, names relative to the module
    leaves: list  # flattened (args, kwargs), tensors detached
    spec: object
    versions: list[int | None]
    outputs: list[int]  # indices of differentiable output leaves
    edges: list
    shapes: list[torch.Size]
    batch_first: bool = True
    whole: bool = False  # recorded whole (S = 1): its output has no batch axis 0
    d: list = field(default_factory=list)

    @property
    def input(self) -> torch.Tensor:
        args, kwargs = tree_unflatten(self.leaves, self.spec)
        return args[0] if args else next(iter(kwargs.values()))


class Capture:
    """Records hooked module calls during the closure, then turns them into uses.

    Args:
        model: the module the closure runs.
        params: the moving parameters.
    """

    def __init__(self, model: nn.Module, params: list[torch.Tensor]):
        self.model = model
        self.params = params
        self.calls: list[_Call] = []
        self._handles: list = []
        for name, module in model.named_modules():
            if _batch_statistics(module):
                raise ValueError(
                    f"the gram backend needs per-sample gradients, but module {name or '<root>'!r} "
                    f"({type(module).__name__}) normalises with batch statistics, which couples the "
                    "samples: call model.eval() (running statistics) or use backend='dense'"
                )
        self.plan = _plan(model, params)

    def __enter__(self) -> Capture:
        for name, module, kind, owned in self.plan:
            hook = self._hook(name, kind, owned)
            self._handles.append(module.register_forward_hook(hook, with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, name: str, kind: str, owned: list[tuple[str, torch.Tensor]]):
        def hook(module, args, kwargs, output):
            flat_out = tree_flatten(output)[0]
            outputs = [k for k, t in enumerate(flat_out) if isinstance(t, torch.Tensor) and t.grad_fn is not None]
            if not outputs:
                return None  # e.g. a call under torch.no_grad(): it does not move the residual
            leaves, spec = tree_flatten((list(args), kwargs))
            leaves = [x.detach() if isinstance(x, torch.Tensor) else x for x in leaves]
            self.calls.append(
                _Call(
                    name=name,
                    module=module,
                    kind=kind,
                    params=owned,
                    leaves=leaves,
                    spec=spec,
                    versions=[x._version if isinstance(x, torch.Tensor) else None for x in leaves],
                    outputs=outputs,
                    edges=[get_gradient_edge(flat_out[k]) for k in outputs],
                    shapes=[flat_out[k].shape for k in outputs],
                    batch_first=getattr(module, "batch_first", True) is not False,
                )
            )
            return None

        return hook

    def uses(self, residual_rows: torch.Tensor, chunk_rows: int) -> list[Use]:
        """The uses of every moving parameter, after the closure ran.

        Args:
            residual_rows: ``(B, m)`` residuals (``Rows.per_sample``) with autograd history.
            chunk_rows: rows per batched backward pass for whole-recorded calls.

        Returns:
            A list of uses (each names the parameters it covers).
        """
        batch, m = residual_rows.shape
        for call in self.calls:
            for x, version in zip(call.leaves, call.versions):
                if isinstance(x, torch.Tensor) and x._version != version:
                    raise RuntimeError(
                        f"the input of module {call.name!r} was modified in place after the call; the gram "
                        "backend reads it after the closure (avoid in-place ops on layer inputs)"
                    )
        for call in self.calls:
            call.whole = not (call.batch_first and all(len(s) > 0 and s[0] == batch for s in call.shapes))
        _output_gradients(
            residual_rows, [c for c in self.calls if not c.whole], [c for c in self.calls if c.whole], chunk_rows
        )
        uses = []
        for call in self.calls:
            uses.extend(_FACTORS[call.kind](call, 1 if call.whole else batch))
            call.d = []  # the uses hold what they need
        return uses


def capture(model: nn.Module, params: list[torch.Tensor]) -> Capture:
    """Context manager recording the calls of the modules that own ``params``.

    Example::

        with capture(model, params) as cap:
            residual = closure()
        uses = cap.uses(rows.per_sample, chunk_rows=64)
    """
    return Capture(model, params)


def _plan(model: nn.Module, params: list[torch.Tensor]):
    """``(name, module, kind, [(param name, param)])`` for every module to hook."""
    moving = {id(p) for p in params}
    plan, inside = [], set()
    for name, module in model.named_modules():
        if id(module) in inside:
            continue
        if isinstance(module, WHOLE_MODULES):
            owned = [(n, p) for n, p in module.named_parameters() if id(p) in moving]
            inside.update(id(sub) for sub in module.modules())
            kind = "module"
        else:
            owned = [(n, p) for n, p in module.named_parameters(recurse=False) if id(p) in moving]
            kind = _kind(module)
        if owned:
            plan.append((name, module, kind, owned))
    return plan


def _output_gradients(residual_rows, per_sample: list[_Call], whole: list[_Call], chunk_rows: int) -> None:
    """Fills ``call.d``: ``(R, *out.shape[1:])`` for per-sample calls, ``(R, *out.shape)`` for whole ones."""
    batch, m = residual_rows.shape
    rows = batch * m
    edges = [e for c in per_sample for e in c.edges]
    if edges:
        if m == 1:
            grads = torch.autograd.grad(
                residual_rows[:, 0], edges, grad_outputs=torch.ones_like(residual_rows[:, 0]),
                retain_graph=True, allow_unused=True,
            )
        else:
            # One backward pass per output column, batched: (m, B, ...) -> rows i*m+j.
            eye = torch.eye(m, dtype=residual_rows.dtype, device=residual_rows.device)
            grads = torch.autograd.grad(
                residual_rows, edges, grad_outputs=eye.unsqueeze(1).expand(m, batch, m).contiguous(),
                is_grads_batched=True, retain_graph=True, allow_unused=True,
            )
            grads = [None if g is None else g.movedim(0, 1).reshape(rows, *g.shape[2:]) for g in grads]
        it = iter(grads)
        for call in per_sample:
            call.d = [next(it) for _ in call.edges]
    edges = [e for c in whole for e in c.edges]
    if edges:
        flat = residual_rows.reshape(-1)
        eye = torch.eye(rows, dtype=flat.dtype, device=flat.device)
        parts = []
        for start in range(0, rows, chunk_rows):
            stop = min(start + chunk_rows, rows)
            parts.append(torch.autograd.grad(
                flat, edges, grad_outputs=eye[start:stop], is_grads_batched=True,
                retain_graph=True, allow_unused=True,
            ))
        grads = [None if part[0] is None else torch.cat(part) for part in zip(*parts)]
        it = iter(grads)
        for call in whole:
            call.d = [next(it) for _ in call.edges]


# --------------------------------------------------------------------------- factors per layer kind
#
# Each takes a call whose ``d`` is set and the number of samples ``S`` of its input
# (``B``, or 1 for a whole-recorded call, whose input gains a leading axis of 1) and
# returns the uses of the call's moving parameters.


def _linear(call: _Call, samples: int) -> list[Use]:
    (d,) = call.d
    if d is None:
        return []
    x = _in(call)
    module = call.module
    rows = d.shape[0]
    a = x.reshape(samples, -1, 1, module.in_features)
    d = d.reshape(rows, -1, 1, module.out_features)
    return _weight_and_bias(call, a, d)


def _conv(call: _Call, samples: int) -> list[Use]:
    (d,) = call.d
    if d is None:
        return []
    module = call.module
    x = _in(call)
    nd = len(module.kernel_size)
    groups = module.groups
    rows = d.shape[0]
    patches = _patches(x.reshape(-1, *x.shape[-nd - 1:]), module)  # (N, L, C_in * prod(kernel))
    a = patches.reshape(samples, -1, groups, patches.shape[-1] // groups)
    out = d.reshape(-1, *d.shape[-nd - 1:]).flatten(2).transpose(1, 2)  # (rows * n, L, C_out)
    d = out.reshape(rows, -1, groups, module.out_channels // groups)
    return _weight_and_bias(call, a, d)


def _weight_and_bias(call: _Call, a: torch.Tensor, d: torch.Tensor) -> list[Use]:
    owned = dict(call.params)
    if "weight" in owned:
        return [LinearUse(owned["weight"], a, d, owned.get("bias"))]
    return [DirectUse(owned["bias"], d.sum(1).reshape(d.shape[0], -1))]


def _patches(x: torch.Tensor, conv: nn.Module) -> torch.Tensor:
    """Unfolded conv input: ``(N, C, *spatial)`` -> ``(N, L, C * prod(kernel))``, ordered like the weight."""
    nd = len(conv.kernel_size)
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    x = F.pad(x, conv._reversed_padding_repeated_twice, mode=mode)
    for axis, (k, s, dil) in enumerate(zip(conv.kernel_size, conv.stride, conv.dilation)):
        x = x.unfold(2 + axis, dil * (k - 1) + 1, s)
        if dil > 1:
            x = x[..., ::dil]
    # (N, C, *out, *kernel) -> (N, *out, C, *kernel)
    order = (0, *range(2, 2 + nd), 1, *range(2 + nd, 2 + 2 * nd))
    x = x.permute(order)
    n, locations = x.shape[0], x.shape[1:1 + nd].numel()
    return x.reshape(n, locations, -1)


def _embedding(call: _Call, samples: int) -> list[Use]:
    (d,) = call.d
    if d is None:
        return []
    module = call.module
    if module.scale_grad_by_freq:
        raise ValueError(
            f"module {call.name!r}: scale_grad_by_freq=True scales gradients by batch counts, which couples "
            "the samples; the gram backend cannot factor it (use backend='dense')"
        )
    indices = _in(call).reshape(samples, -1)
    d = d.reshape(d.shape[0], -1, module.embedding_dim)
    if module.padding_idx is not None:
        pad = (indices == module.padding_idx).repeat_interleave(d.shape[0] // samples, 0)
        d = d.masked_fill(pad.unsqueeze(-1), 0)
    return [EmbeddingUse(call.params[0][1], indices, d)]


def _norm(call: _Call, samples: int) -> list[Use]:
    """LayerNorm / RMSNorm / GroupNorm / eval BatchNorm: ``g_w = sum D * xhat``, ``g_b = sum D``."""
    (d,) = call.d
    if d is None:
        return []
    module = call.module
    x = _in(call)
    inner = x.reshape(-1, *x.shape[2:]) if call.whole and call.kind in ("group_norm", "batch_norm") else x
    with torch.no_grad():
        if call.kind == "layer_norm":
            xhat = F.layer_norm(inner, module.normalized_shape, None, None, module.eps)
        elif call.kind == "rms_norm":
            xhat = F.rms_norm(inner, module.normalized_shape, None, module.eps)
        elif call.kind == "group_norm":
            xhat = F.group_norm(inner, module.num_groups, None, None, module.eps)
        else:
            xhat = F.batch_norm(inner, module.running_mean, module.running_var, None, None, False, 0.0, module.eps)
    xhat = xhat.reshape(x.shape)
    rows = d.shape[0]
    m = rows // samples
    rest = d.shape[1:]
    if call.kind in ("layer_norm", "rms_norm"):
        keep = len(module.normalized_shape)
        summed = tuple(range(2, 2 + len(rest) - keep))
    else:  # channels: axis 1 of the module's own input
        channel = 3 if call.whole else 2
        summed = tuple(k for k in range(2, 2 + len(rest)) if k != channel)
    owned = dict(call.params)
    uses = []
    view = d.reshape(samples, m, *rest)
    for name in ("weight", "bias"):
        if name in owned:
            g = view * xhat.reshape(samples, 1, *rest) if name == "weight" else view
            uses.append(DirectUse(owned[name], (g.sum(summed) if summed else g).reshape(rows, -1)))
    return uses


def _module(call: _Call, samples: int) -> list[Use]:
    if all(d is None for d in call.d):
        return []
    batched = [
        not call.whole and isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == samples for x in call.leaves
    ]
    return [
        ModuleUse(
            module=call.module,
            names=[n for n, _ in call.params],
            params=tuple(p for _, p in call.params),
            leaves=call.leaves,
            spec=call.spec,
            batched=batched,
            outputs=call.outputs,
            d=call.d,
            samples=samples,
            whole=call.whole,
        )
    ]


def _in(call: _Call) -> torch.Tensor:
    """The call's first input with a leading sample axis (a whole call's input gains one of size 1)."""
    x = call.input
    return x.unsqueeze(0) if call.whole else x


_FACTORS = {
    "linear": _linear,
    "conv": _conv,
    "embedding": _embedding,
    "layer_norm": _norm,
    "rms_norm": _norm,
    "group_norm": _norm,
    "batch_norm": _norm,
    "module": _module,
}


def factor_bytes(uses: list) -> int:
    """Bytes held by the factors (inputs shared with the autograd graph are counted too)."""
    total = 0
    for use in uses:
        for t in (getattr(use, "a", None), getattr(use, "d", None), getattr(use, "g", None)):
            if isinstance(t, torch.Tensor):
                total += t.untyped_storage().nbytes()
    return total

