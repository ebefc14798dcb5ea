"""Recurrent layers ``nn.RNN``, ``nn.GRU`` and ``nn.LSTM`` (DESIGN.md section 3.8).

Every layer and direction applies ``gi[t] = x[t] W_ih^T + b_ih`` and ``gh[t] = h[t-1] W_hh^T + b_hh``
at each time step, so their per-row gradients are those of two sequence linear maps,
``sum_t d_r[t]^T a_s(r)[t]``, with ``a`` the layer's input (or the hidden state it starts the step
from) and ``d`` the gradient of row ``r`` with respect to ``gi[t]`` (or ``gh[t]``).

Obtaining ``d``: the recorded call is run again from its inputs and initial states with the cells
unrolled in plain tensor operations, every layer's ``gi`` kept in the graph; one backward pass of
the rows' gradients with respect to the outputs (sequence, ``h_n`` and ``c_n``; ``m`` of them
batched for ``m`` rows per sample) gives the gradient with respect to every ``gi``. The gates add
``gi`` and ``gh``, so ``d gh = d gi``, except GRU's new gate, ``n = tanh(gi_n + r * gh_n)``, where
``d gh_n = r * d gi_n``. Samples never mix in a recurrence, so each row's gradient lies in its own
sample's slice. Cost: one forward and one backward of the layer, step by step in Python (a few
times the fused kernel's time), not one per sample.

Calls this does not cover take the fallback (:func:`sven_ext.layers.fallback.module_rule`):
packed sequences, unbatched inputs, ``proj_size`` and dropout between layers in training mode.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn
from torch.utils._pytree import tree_unflatten

from .direct import DirectUse
from .fallback import module_rule
from .linear import LinearUse

_GATES = {"RNN_TANH": 1, "RNN_RELU": 1, "LSTM": 4, "GRU": 3}


def _covered(call, x) -> bool:
    module = call.module
    return (not call.whole and isinstance(x, torch.Tensor) and x.dim() == 3 and not getattr(module, "proj_size", 0)
            and not (module.training and module.dropout > 0.0 and module.num_layers > 1))


def _batch_axes(call, batch: int) -> list[int] | None:
    """The output sequence's samples are on axis 0 (``batch_first``) or 1; ``h_n`` and ``c_n``'s on 1."""
    axes = [0 if call.batch_first else 1] + [1] * (len(call.shapes) - 1)
    if len(call.shapes[0]) != 3 or any(len(s) != 3 or s[a] != batch for s, a in zip(call.shapes, axes)):
        return None
    return axes


def _step(mode: str, gi: torch.Tensor, h: torch.Tensor, c, w_hh: torch.Tensor, b_hh):
    """One cell step: ``(h, c, r)`` (``r``: GRU's reset gate, detached, else ``None``)."""
    if mode == "GRU":
        gh = h @ w_hh.T if b_hh is None else torch.addmm(b_hh, h, w_hh.T)
        i_r, i_z, i_n = gi.chunk(3, 1)
        h_r, h_z, h_n = gh.chunk(3, 1)
        r = torch.sigmoid(i_r + h_r)
        z = torch.sigmoid(i_z + h_z)
        n = torch.tanh(i_n + r * h_n)
        return n + z * (h - n), None, r.detach()
    gates = torch.addmm(gi, h, w_hh.T)  # b_hh is folded into gi
    if mode == "LSTM":
        i, f, g, o = gates.chunk(4, 1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c, None
    return (torch.tanh(gates) if mode == "RNN_TANH" else torch.relu(gates)), None, None


def recurrent_rule(call, samples: int) -> list:
    """``nn.RNN`` / ``nn.GRU`` / ``nn.LSTM``: per-step input and hidden maps, from one unrolled rerun."""
    if all(d is None for d in call.d):
        return []
    module = call.module
    args, kwargs = tree_unflatten(call.leaves, call.spec)
    bound = inspect.signature(type(module).forward).bind(module, *args, **kwargs).arguments
    x, hx = bound.get("input"), bound.get("hx")
    if not _covered(call, x):
        return module_rule(call, samples)
    mode, hidden = module.mode, module.hidden_size
    dirs = 2 if module.bidirectional else 1
    owned = dict(call.params)
    dtype = x.dtype
    seq = x.transpose(0, 1) if call.batch_first else x  # (T, B, features)
    steps, batch = seq.shape[0], seq.shape[1]
    if hx is None:
        h0 = c0 = seq.new_zeros(module.num_layers * dirs, batch, hidden)
    else:
        h0, c0 = hx if mode == "LSTM" else (hx, None)
    d_rows = [None if d is None else d.to(dtype) for d in call.d]
    rows = next(d for d in d_rows if d is not None).shape[0]
    m = rows // samples
    with torch.enable_grad():
        layer_input = seq
        record = []  # per (layer, direction): (names suffix, input, gi, h_prev, r)
        h_n, c_n = [], []
        for layer in range(module.num_layers):
            outs = []
            for direction in range(dirs):
                suffix = f"_l{layer}" + ("_reverse" if direction else "")
                w_ih, w_hh = (getattr(module, f"weight_{n}{suffix}").detach() for n in ("ih", "hh"))
                b_ih = getattr(module, f"bias_ih{suffix}").detach() if module.bias else None
                b_hh = getattr(module, f"bias_hh{suffix}").detach() if module.bias else None
                fold = b_hh if mode != "GRU" else None
                bias = b_ih if fold is None else fold if b_ih is None else b_ih + fold
                flat = layer_input.reshape(-1, layer_input.shape[-1])
                gi = (flat @ w_ih.T if bias is None else torch.addmm(bias, flat, w_ih.T)).view(steps, batch, -1)
                if not gi.requires_grad:
                    gi.requires_grad_()
                k = layer * dirs + direction
                h, c = h0[k], (c0[k] if c0 is not None else None)
                h_prev, resets, out = [None] * steps, [None] * steps, [None] * steps
                for t in (range(steps - 1, -1, -1) if direction else range(steps)):
                    h_prev[t] = h.detach()
                    h, c, resets[t] = _step(mode, gi[t], h, c, w_hh, b_hh if mode == "GRU" else None)
                    out[t] = h
                outs.append(torch.stack(out))
                h_n.append(h)
                c_n.append(c)
                record.append((suffix, layer_input.detach(), gi, torch.stack(h_prev),
                               torch.stack(resets) if mode == "GRU" else None))
            layer_input = outs[0] if dirs == 1 else torch.cat(outs, dim=2)
        produced = [layer_input, torch.stack(h_n)] + ([torch.stack(c_n)] if mode == "LSTM" else [])
        axes = [1, 1, 1]
        outputs = [produced[k] for k, d in enumerate(d_rows) if d is not None]
        cotangents = [d.reshape(samples, m, *d.shape[1:]).movedim(0, axes[k] + 1)
                      for k, d in enumerate(d_rows) if d is not None]
        gis = [entry[2] for entry in record]
        if m == 1:
            grads = torch.autograd.grad(outputs, gis, [c[0] for c in cotangents], allow_unused=True)
            grads = [None if g is None else g.unsqueeze(0) for g in grads]
        else:
            grads = torch.autograd.grad(outputs, gis, cotangents, allow_unused=True, is_grads_batched=True)
    uses = []
    for (suffix, inp, gi, h_prev, resets), g in zip(record, grads):
        # (m, T, B, G*H) -> (R, T, 1, G*H), row i * m + j
        d_gi = (torch.zeros_like(gi).unsqueeze(0) if g is None else g).permute(2, 0, 1, 3).reshape(rows, steps, 1, -1)
        d_gh = d_gi
        if mode == "GRU":
            d_n = d_gi[..., 2 * hidden:] * resets.transpose(0, 1).repeat_interleave(m, dim=0).unsqueeze(2)
            d_gh = torch.cat([d_gi[..., :2 * hidden], d_n], dim=3)
        for kind, a, d in (("ih", inp, d_gi), ("hh", h_prev, d_gh)):
            w, b = owned.get(f"weight_{kind}{suffix}"), owned.get(f"bias_{kind}{suffix}")
            a = a.transpose(0, 1).unsqueeze(2)  # (B, T, 1, features)
            if w is not None:
                uses.append(LinearUse(w, a, d, b))
            elif b is not None:
                uses.append(DirectUse(b, d.sum(1).reshape(rows, -1)))
    return uses


recurrent_rule.batch_axes = _batch_axes
RECURRENT = (nn.RNN, nn.GRU, nn.LSTM)
