"""Recurrent layers ``nn.RNN``, ``nn.GRU`` and ``nn.LSTM`` (DESIGN.md section 3.8).

Every layer and direction applies ``gi[t] = x[t] W_ih^T + b_ih`` and ``gh[t] = h[t-1] W_hh^T + b_hh``
at each time step, so their per-row gradients are those of two sequence linear maps,
``sum_t d_r[t]^T a_s(r)[t]``, with ``a`` the layer's input (or the hidden state it starts the step
from) and ``d`` the gradient of row ``r`` with respect to ``gi[t]`` (or ``gh[t]``).

Obtaining ``d``: the recorded call is run again from its inputs and initial states, cell by cell
in plain tensor operations, keeping the gate activations; then the recurrence's backward pass,
written out per cell type, carries the rows' gradients with respect to the outputs (sequence,
``h_n`` and ``c_n``; ``m`` of them at once for ``m`` rows per sample, broadcast against the
samples' activations) down through the steps and layers, giving ``d gi`` at every step. The gates
add ``gi`` and ``gh``, so ``d gh = d gi``, except GRU's new gate, ``n = tanh(gi_n + r * gh_n)``,
where ``d gh_n = r * d gi_n``. Samples never mix in a recurrence, so each row's gradient lies in
its own sample's slice. Written out rather than through autograd, whose graph of a few small
operations per step costs more to build and run than the operations themselves. Cost: one forward
and one backward pass of the layer, step by step in Python (a few times the fused kernel's time),
not one per sample.

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


class _Cells:
    """One direction of one layer run step by step, keeping what its backward pass needs.

    ``gi`` ``(T, B, G*H)`` is the input map's output (for LSTM and RNN with ``b_hh`` folded in:
    those add ``gh``); ``reverse`` runs the steps from the last.
    """

    def __init__(self, mode: str, gi: torch.Tensor, h: torch.Tensor, c, w_hh: torch.Tensor, b_hh, reverse: bool):
        self.mode, self.w_hh, self.reverse = mode, w_hh, reverse
        steps, batch, width = gi.shape
        hidden = w_hh.shape[1]
        order = range(steps - 1, -1, -1) if reverse else range(steps)
        self.out = gi.new_empty(steps, batch, hidden)
        if mode == "LSTM":
            self.act, cells, self.tanh_c = gi.new_empty(steps, batch, width), torch.empty_like(self.out), \
                torch.empty_like(self.out)
        elif mode == "GRU":
            self.rz, self.n, self.gh_n = gi.new_empty(steps, batch, 2 * hidden), torch.empty_like(self.out), \
                torch.empty_like(self.out)
        h0, c0 = h, c
        for t in order:
            if mode == "LSTM":
                gates = torch.addmm(gi[t], h, w_hh.T)
                act = self.act[t]
                torch.sigmoid(gates, out=act)
                torch.tanh(gates[:, 2 * hidden:3 * hidden], out=act[:, 2 * hidden:3 * hidden])
                c = torch.addcmul(act[:, hidden:2 * hidden] * c, act[:, :hidden], act[:, 2 * hidden:3 * hidden],
                                  out=cells[t])
                torch.tanh(c, out=self.tanh_c[t])
                torch.mul(act[:, 3 * hidden:], self.tanh_c[t], out=self.out[t])
            elif mode == "GRU":
                gh = h @ w_hh.T if b_hh is None else torch.addmm(b_hh, h, w_hh.T)
                rz = self.rz[t]
                torch.sigmoid(gi[t, :, :2 * hidden] + gh[:, :2 * hidden], out=rz)
                self.gh_n[t] = gh[:, 2 * hidden:]
                torch.tanh(torch.addcmul(gi[t, :, 2 * hidden:], rz[:, :hidden], self.gh_n[t]), out=self.n[t])
                n = self.n[t]
                torch.addcmul(n, rz[:, hidden:], h - n, out=self.out[t])
            else:
                gates = torch.addmm(gi[t], h, w_hh.T)
                self.out[t] = torch.tanh(gates) if mode == "RNN_TANH" else torch.relu(gates)
            h = self.out[t]
        self.h_prev = self._previous(self.out, h0)  # the state each step starts from
        if mode == "LSTM":
            self.c_prev = self._previous(cells, c0)

    def _previous(self, states: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
        """``(T, B, H)`` states after each step -> the state before each step."""
        if self.reverse:
            return torch.cat([states[1:], first.unsqueeze(0)])
        return torch.cat([first.unsqueeze(0), states[:-1]])

    def backward(self, d_out: torch.Tensor, d_h, d_c) -> tuple[torch.Tensor, torch.Tensor]:
        """``(d gi, d gh)``, ``(m, T, B, G*H)``, from the gradients of ``m`` rows per sample with respect
        to the outputs ``(m, T, B, H)`` and to ``h_n``/``c_n`` ``(m, B, H)`` (``None``: zero)."""
        mode, hidden = self.mode, self.w_hh.shape[1]
        m, steps = d_out.shape[0], d_out.shape[1]
        d_gi = d_out.new_empty(m, *self.out.shape[:2], self.w_hh.shape[0])
        dh = d_out.new_zeros(m, *self.out.shape[1:]) if d_h is None else d_h.clone()
        order = range(steps) if self.reverse else range(steps - 1, -1, -1)
        if mode == "LSTM":
            i, f, g, o = self.act.chunk(4, 2)
            through_c = o * (1 - self.tanh_c.square())  # d c / d h at each step
            gates_c = torch.stack([g * i * (1 - i), self.c_prev * f * (1 - f), i * (1 - g.square())], dim=2)
            gate_o = self.tanh_c * o * (1 - o)
            dc = d_out.new_zeros(dh.shape) if d_c is None else d_c.clone()
            for t in order:
                dh += d_out[:, t]
                dc.addcmul_(dh, through_c[t])
                step = d_gi[:, t].view(m, -1, 4, hidden)
                torch.mul(dc.unsqueeze(2), gates_c[t], out=step[:, :, :3])
                torch.mul(dh, gate_o[t], out=step[:, :, 3])
                dc *= f[t]
                dh = d_gi[:, t] @ self.w_hh
            return d_gi, d_gi
        if mode == "GRU":
            r, z = self.rz.chunk(2, 2)
            to_n = (1 - z) * (1 - self.n.square())  # d pre_n / d h_t
            to_z = (self.h_prev - self.n) * z * (1 - z)  # d pre_z / d h_t
            to_r = self.gh_n * r * (1 - r)  # d pre_r / d pre_n
            d_gh = torch.empty_like(d_gi)
            for t in order:
                dh += d_out[:, t]
                step = d_gi[:, t].view(m, -1, 3, hidden)
                torch.mul(dh, to_n[t], out=step[:, :, 2])
                torch.mul(dh, to_z[t], out=step[:, :, 1])
                torch.mul(step[:, :, 2], to_r[t], out=step[:, :, 0])
                d_gh[:, t, :, :2 * hidden] = d_gi[:, t, :, :2 * hidden]
                torch.mul(step[:, :, 2], r[t], out=d_gh[:, t, :, 2 * hidden:])
                dh = dh * z[t] + d_gh[:, t] @ self.w_hh
            return d_gi, d_gh
        slope = 1 - self.out.square() if mode == "RNN_TANH" else (self.out > 0).to(self.out.dtype)
        for t in order:
            dh += d_out[:, t]
            torch.mul(dh, slope[t], out=d_gi[:, t])
            dh = d_gi[:, t] @ self.w_hh
        return d_gi, d_gi


def _forward(module, seq: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor | None) -> list:
    """The recurrence rerun layer by layer from ``seq`` ``(T, B, features)`` and the initial states: per
    layer, per direction, ``(parameter name suffix, the layer's input, w_ih, its _Cells)``."""
    mode = module.mode
    dirs = 2 if module.bidirectional else 1
    steps, batch = seq.shape[0], seq.shape[1]
    layers = []
    layer_input = seq
    for layer in range(module.num_layers):
        runs = []
        for direction in range(dirs):
            suffix = f"_l{layer}" + ("_reverse" if direction else "")
            w_ih, w_hh = (getattr(module, f"weight_{n}{suffix}").detach() for n in ("ih", "hh"))
            b_ih = getattr(module, f"bias_ih{suffix}").detach() if module.bias else None
            b_hh = getattr(module, f"bias_hh{suffix}").detach() if module.bias else None
            bias = b_ih if mode == "GRU" or b_hh is None else b_ih + b_hh  # GRU's b_hn sits inside r * gh_n
            flat = layer_input.reshape(-1, layer_input.shape[-1])
            gi = (flat @ w_ih.T if bias is None else torch.addmm(bias, flat, w_ih.T)).view(steps, batch, -1)
            k = layer * dirs + direction
            cells = _Cells(mode, gi, h0[k], c0[k] if c0 is not None else None, w_hh,
                           b_hh if mode == "GRU" else None, reverse=direction == 1)
            runs.append((suffix, layer_input, w_ih, cells))
        layers.append(runs)
        layer_input = runs[0][3].out if dirs == 1 else torch.cat([run[3].out for run in runs], dim=2)
    return layers


def recurrent_rule(call, samples: int) -> list:
    """``nn.RNN`` / ``nn.GRU`` / ``nn.LSTM``: per-step input and hidden maps, from one rerun step by step."""
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
    rows = next(d for d in call.d if d is not None).shape[0]
    m = rows // samples

    def cotangent(d):  # (R, ...) with the samples removed -> (m, ..., B, ...) with them on axis 1
        return None if d is None else d.to(dtype).reshape(samples, m, *d.shape[1:]).movedim(0, 2)

    by_output = dict(zip(call.outputs, call.d))  # outputs: the sequence, h_n, c_n
    d_seq, d_h, d_c = (cotangent(by_output.get(k)) for k in range(3))
    layers = _forward(module, seq, h0, c0)
    uses = []
    d_above = d_seq if d_seq is not None else seq.new_zeros(m, steps, batch, dirs * hidden)
    for layer in range(module.num_layers - 1, -1, -1):
        d_below = None
        for direction, (suffix, inp, w_ih, cells) in enumerate(layers[layer]):
            k = layer * dirs + direction
            d_gi, d_gh = cells.backward(d_above[..., direction * hidden:(direction + 1) * hidden],
                                        None if d_h is None else d_h[:, k], None if d_c is None else d_c[:, k])
            if layer:
                part = d_gi @ w_ih
                d_below = part if d_below is None else d_below.add_(part)
            for kind, a, d in (("ih", inp, d_gi), ("hh", cells.h_prev, d_gh)):
                w, b = owned.get(f"weight_{kind}{suffix}"), owned.get(f"bias_{kind}{suffix}")
                a = a.transpose(0, 1).unsqueeze(2)  # (B, T, 1, features)
                d = d.permute(2, 0, 1, 3).reshape(rows, steps, 1, -1)  # row i * m + j
                if w is not None:
                    uses.append(LinearUse(w, a, d, b))
                elif b is not None:
                    uses.append(DirectUse(b, d.sum(1).reshape(rows, -1)))
        d_above = d_below
    return uses


recurrent_rule.batch_axes = _batch_axes
RECURRENT = (nn.RNN, nn.GRU, nn.LSTM)
