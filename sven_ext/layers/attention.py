"""``nn.MultiheadAttention``: its input and output projections as linear maps over the sequence
(DESIGN.md section 3.7).

The module projects ``q = query W_q^T + b_q`` (``k`` and ``v`` likewise from ``key`` and
``value``; one packed ``in_proj_weight`` when they share the embedding size, else
``q/k/v_proj_weight``), attends, and applies ``out_proj`` functionally (its hooks never fire).
Each projection is a linear map at every position, so its per-row gradient is
``sum_t d_r[t]^T a_s(r)[t]`` once the gradients ``d`` with respect to ``q``, ``k``, ``v`` and the
attention output before ``out_proj`` are known.

Obtaining them: the recorded call is run again from its inputs with the projections applied
beforehand and ``F.multi_head_attention_forward`` given identity projections, so ``q``, ``k``,
``v`` are leaves and its output is the attention before ``out_proj``; one backward pass of the
rows' output gradients (``m`` of them batched, for ``m`` rows per sample) gives ``d`` for every
row. Samples never mix in attention, so each row's gradient lies in its own sample's slice. The
input identities are :class:`_Identity` tensors, whose ``F.linear`` returns its input: the
function looks for overrides only among its other tensor arguments, so it runs as usual and
only its input projections see them (were it to dispatch on them, the identities would be
multiplied, still exactly). ``out_proj``'s identity is among those arguments: a plain product,
exact.
Cost: about one forward and backward of the layer, not one per sample.

Calls this does not cover take the fallback (:func:`sven_ext.layers.fallback.module_rule`):
unbatched inputs, ``add_bias_kv``, and attention dropout in training mode (a rerun draws
another mask).
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_unflatten

from .direct import DirectUse
from .fallback import module_rule
from .linear import LinearUse

_FORWARD = inspect.signature(torch.nn.MultiheadAttention.forward)


class _Identity(torch.Tensor):
    """An identity matrix whose ``F.linear(x, identity, b)`` is ``x (+ b)`` without a product."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch._C._nn.linear or func is F.linear:
            x, bias = args[0], args[2] if len(args) > 2 else kwargs.get("bias")
            return x if bias is None else x + bias
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)


def _arguments(call) -> dict:
    args, kwargs = tree_unflatten(call.leaves, call.spec)
    bound = _FORWARD.bind(call.module, *args, **kwargs)
    bound.apply_defaults()
    return bound.arguments


def _covered(call, arguments: dict) -> bool:
    module = call.module
    query = arguments["query"]
    return (not call.whole and isinstance(query, torch.Tensor) and query.dim() == 3 and module.bias_k is None
            and not (module.training and module.dropout > 0.0))


def _batch_axes(call, batch: int) -> list[int] | None:
    """The output's samples are on axis 0 (``batch_first``) or 1; averaged or per-head weights on 0."""
    axis = 0 if call.batch_first else 1
    first = call.shapes[0]
    if len(first) != 3 or first[axis] != batch or any(s[0] != batch for s in call.shapes[1:]):
        return None
    return [axis] + [0] * (len(call.shapes) - 1)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two recorded (detached) inputs are views of the same values."""
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()


def _rows_to_batch(d: torch.Tensor, samples: int, axis: int) -> torch.Tensor:
    """``(R, ...)`` rows -> ``(m, ...)`` cotangents with the samples on ``axis`` (``m`` rows per sample)."""
    m = d.shape[0] // samples
    return d.reshape(samples, m, *d.shape[1:]).movedim(0, axis + 1)


def _batch_to_rows(g: torch.Tensor, axis: int) -> torch.Tensor:
    """``(m, ...)`` gradients with the samples on ``axis`` -> ``(R, ...)`` rows (row ``i * m + j``)."""
    g = g.movedim(axis + 1, 0)
    return g.reshape(g.shape[0] * g.shape[1], *g.shape[2:])


def _pad(x: torch.Tensor, steps: int) -> torch.Tensor:
    """Zero positions appended along axis 1 (zero input and zero gradient add nothing to a sum)."""
    return F.pad(x, (0, 0, 0, steps - x.shape[1])) if x.shape[1] < steps else x


def _projection(owned: dict, weight: str, bias: str | None, a: torch.Tensor, d: torch.Tensor) -> list:
    """The uses of one projection ``a @ w^T (+ b)``: ``a (S, T, groups, din)``, ``d (R, T, groups, dout)``."""
    w, b = owned.get(weight), owned.get(bias) if bias else None
    if w is not None:
        return [LinearUse(w, a, d, b)]
    if b is not None:
        return [DirectUse(b, d.sum(1).reshape(d.shape[0], -1))]
    return []


def _rerun(module, arguments: dict, qkv: tuple, d_out, d_weights, samples: int) -> tuple:
    """``(pre, grads, m)``: the attention before ``out_proj`` and the gradients of the rows with respect
    to the projected ``q``, ``k``, ``v`` (``(m, L, B, E)`` each, ``None`` where unused), from one rerun
    of torch's own attention with identity projections; ``m`` rows per sample."""
    query, key, value = qkv
    embed, dtype = module.embed_dim, module.out_proj.weight.dtype
    if module._qkv_same_embed_dim:
        weights = module.in_proj_weight.detach().chunk(3)
    else:
        weights = [module.q_proj_weight.detach(), module.k_proj_weight.detach(), module.v_proj_weight.detach()]
    biases = module.in_proj_bias.detach().chunk(3) if module.in_proj_bias is not None else [None] * 3
    eye = torch.eye(embed, dtype=dtype, device=query.device)
    identity = eye.as_subclass(_Identity)
    with torch.enable_grad():
        q, k, v = (F.linear(x, w, b).detach().requires_grad_() for x, w, b in zip((query, key, value), weights, biases))
        pre, attn = F.multi_head_attention_forward(
            q, k, v, embed, module.num_heads, None, None, None, None, module.add_zero_attn, module.dropout,
            eye, None, training=module.training, key_padding_mask=arguments["key_padding_mask"],
            need_weights=arguments["need_weights"], attn_mask=arguments["attn_mask"], use_separate_proj_weight=True,
            q_proj_weight=identity, k_proj_weight=identity, v_proj_weight=identity,
            average_attn_weights=arguments["average_attn_weights"], is_causal=arguments["is_causal"],
        )
        outputs, cotangents = [], []
        if d_out is not None:
            outputs.append(pre)
            cotangents.append(_rows_to_batch(d_out.to(dtype) @ module.out_proj.weight.detach(), samples, 1))
        if d_weights is not None:
            outputs.append(attn)
            cotangents.append(_rows_to_batch(d_weights.to(dtype), samples, 0))
        m = cotangents[0].shape[0]
        if m == 1:
            grads = torch.autograd.grad(outputs, (q, k, v), [c[0] for c in cotangents], allow_unused=True)
            grads = [None if g is None else g.unsqueeze(0) for g in grads]
        else:
            grads = torch.autograd.grad(outputs, (q, k, v), cotangents, allow_unused=True, is_grads_batched=True)
    return pre, grads, m


def attention_rule(call, samples: int) -> list:
    """``nn.MultiheadAttention``: packed or separate input projections and ``out_proj``, from one rerun."""
    if all(d is None for d in call.d):
        return []
    arguments = _arguments(call)
    if not _covered(call, arguments):
        return module_rule(call, samples)
    module = call.module
    owned = dict(call.params)
    query, key, value = (arguments[n] for n in ("query", "key", "value"))
    if call.batch_first:
        query, key, value = (x.transpose(0, 1) for x in (query, key, value))  # (L, B, E) like the functional form
    embed, dtype = module.embed_dim, module.out_proj.weight.dtype
    by_output = dict(zip(call.outputs, call.d))  # outputs: the attention, its weights
    d_out = by_output.get(0)
    pre, grads, m = _rerun(module, arguments, (query, key, value), d_out, by_output.get(1), samples)
    rows = m * samples
    dq, dk, dv = (torch.zeros(rows, x.shape[0], embed, dtype=dtype, device=x.device) if g is None
                  else _batch_to_rows(g, 1) for g, x in zip(grads, (query, key, value)))
    inputs = [x.transpose(0, 1) for x in (query, key, value)]  # (B, T, features) per sample
    uses = []
    if d_out is not None:
        uses += _projection(owned, "out_proj.weight", "out_proj.bias", pre.detach().transpose(0, 1).unsqueeze(2),
                            d_out.unsqueeze(2))
    if not module._qkv_same_embed_dim:
        for name, x, d in zip("qkv", inputs, (dq, dk, dv)):
            uses += _projection(owned, f"{name}_proj_weight", None, x.unsqueeze(2), d.unsqueeze(2))
        if "in_proj_bias" in owned:
            uses.append(DirectUse(owned["in_proj_bias"], torch.cat([d.sum(1) for d in (dq, dk, dv)], dim=1)))
    elif _same(query, key) and _same(key, value):  # self-attention: one map to 3E features
        uses += _projection(owned, "in_proj_weight", "in_proj_bias", inputs[0].unsqueeze(2),
                            torch.cat([dq, dk, dv], dim=2).unsqueeze(2))
    else:  # three groups over the longer of the two sequences
        steps = max(x.shape[1] for x in inputs)
        uses += _projection(owned, "in_proj_weight", "in_proj_bias",
                            torch.stack([_pad(x, steps) for x in inputs], dim=2),
                            torch.stack([_pad(d, steps) for d in (dq, dk, dv)], dim=2))
    return uses


attention_rule.batch_axes = _batch_axes
