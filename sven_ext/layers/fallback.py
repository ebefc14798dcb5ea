"""The fallback for any other module that owns moving parameters (DESIGN.md section 3.4).

Subclasses with their own ``forward``, custom modules, the calls the attention and recurrent rules
leave to it (unbatched inputs, ``add_bias_kv``, ``proj_size``, dropout in training mode) and
parameters a module uses directly in an expression until a step shows they may be expanded to
the batch: per-row gradients of that module alone with ``torch.func``, computed in row chunks
when asked for. Exact, and dearer than a dedicated rule: the module runs again under ``vmap``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from .common import combine_rows, sample_index


# Module types whose per-sample replay under vmap raised: they take the per-row route at once.
_WITHOUT_BATCHING_RULE: set = set()


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
        leaf_axes: per leaf, the axis that holds the samples where it is batched (1 for the
            sequence-first inputs of a module with ``batch_first=False``).
        outputs: indices of the differentiable output leaves.
        d: per differentiable output, ``(R, ...)`` gradients (``None``: the rows do not depend on it).
        samples: ``S``.
        whole: recorded whole (``S = 1``, ``d`` rows are full output-shaped tensors).
        axes: per differentiable output, the axis that holds the samples (``d`` has it removed).
    """

    module: nn.Module
    names: list[str]
    params: tuple[torch.Tensor, ...]
    leaves: list
    spec: object
    batched: list[bool]
    leaf_axes: list[int]
    outputs: list[int]
    d: list[torch.Tensor | None]
    samples: int
    whole: bool
    axes: list[int]

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
        for x, batched, axis in zip(leaves, self.batched, self.leaf_axes):
            if isinstance(x, torch.Tensor):
                x = x.unsqueeze(axis) if unsqueeze and batched else x
                x = x.to(dtype) if x.is_floating_point() else x
            ready.append(x)
        args, kwargs = tree_unflatten(ready, self.spec)
        # oneDNN's float32 RNN kernels keep a workspace that torch.func's transforms do not carry.
        with torch.backends.mkldnn.flags(enabled=False, deterministic=None, allow_tf32=None,
                                         fp32_precision=None):
            out = torch.func.functional_call(self.module, {**state, **moving}, tuple(args), kwargs)
        flat = tree_flatten(out)[0]
        return [flat[k] for k in self.outputs]

    def _whole_call(self, state, dtype, live: list):
        """``p -> the live outputs`` of the recorded call on its whole inputs, for ``torch.func.vjp``."""
        def whole(p):
            outs = self._call(state, p, self.leaves, dtype, unsqueeze=False)
            return tuple(outs[k] for k in live)

        return whole

    def rows(self, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
        state, moving = self._state(dtype)
        live = [k for k, d in enumerate(self.d) if d is not None]
        d_rows = [self.d[k][start:stop].to(dtype) for k in live]
        whole = self._whole_call(state, dtype, live)
        if self.whole:
            _, vjp_fn = torch.func.vjp(whole, moving)
            grads = torch.vmap(vjp_fn)(tuple(d_rows))[0]
        else:
            index = sample_index(start, stop, self.d[live[0]].shape[0], self.samples, d_rows[0].device)
            leaves = [x.index_select(a, index) if b else x
                      for x, b, a in zip(self.leaves, self.batched, self.leaf_axes)]
            in_dims = [a if b else None for b, a in zip(self.batched, self.leaf_axes)]

            def one(leaves_i, d_i):
                def scalar(p):
                    outs = self._call(state, p, leaves_i, dtype, unsqueeze=True)
                    return sum((outs[k] * d.unsqueeze(self.axes[k])).sum() for k, d in zip(live, d_i))

                return torch.func.grad(scalar)(moving)

            grads = None
            if type(self.module) not in _WITHOUT_BATCHING_RULE:
                try:
                    grads = torch.vmap(one, in_dims=(in_dims, 0))(leaves, d_rows)
                except RuntimeError:
                    _WITHOUT_BATCHING_RULE.add(type(self.module))
            if grads is None:
                # Some kernels have no batching rule for batched inputs (torch.gru and torch.lstm
                # write into per-sample buffers): one backward of the whole call per row instead,
                # batched over the rows, each row's gradient placed at its own sample's slice.
                outs, vjp_fn = torch.func.vjp(whole, moving)
                cotangents = []
                for k, d, out in zip(live, d_rows, outs):
                    full = d.new_zeros(stop - start, *out.shape)
                    full.movedim(self.axes[k] + 1, 1)[torch.arange(stop - start, device=d.device), index] = d
                    cotangents.append(full)
                grads = torch.vmap(vjp_fn)(tuple(cotangents))[0]
        return torch.cat([grads[name].reshape(stop - start, -1) for name in self.names], dim=1)

    def direction(self, c: torch.Tensor) -> list[torch.Tensor]:
        state, moving = self._state(c.dtype)
        live = [k for k, d in enumerate(self.d) if d is not None]
        outs, vjp_fn = torch.func.vjp(self._whole_call(state, c.dtype, live), moving)
        cotangents = tuple(
            combine_rows(self.d[k], c, self.samples).movedim(0, self.axes[k]).reshape(out.shape)
            for k, out in zip(live, outs)
        )
        grads = vjp_fn(cotangents)[0]
        return [grads[name] for name in self.names]


def module_rule(call, samples: int) -> list:
    """Any module: its call replayed with ``torch.func``."""
    if all(d is None for d in call.d):
        return []
    axes = [_leaf_axis(x, samples, call.batch_first) if not call.whole else None for x in call.leaves]
    return [
        ModuleUse(
            module=call.module,
            names=[n for n, _ in call.params],
            params=tuple(p for _, p in call.params),
            leaves=call.leaves,
            spec=call.spec,
            batched=[axis is not None for axis in axes],
            leaf_axes=[axis or 0 for axis in axes],
            outputs=call.outputs,
            d=call.d,
            samples=samples,
            whole=call.whole,
            axes=[0] * len(call.outputs) if call.whole else call.batch_axes,
        )
    ]


def _leaf_axis(x, samples: int, batch_first: bool) -> int | None:
    """The axis of a call argument that holds the samples (``None``: shared by every sample)."""
    if not isinstance(x, torch.Tensor) or x.dim() == 0:
        return None
    if not batch_first and x.dim() > 2 and x.shape[1] == samples:
        return 1
    return 0 if x.shape[0] == samples else None
