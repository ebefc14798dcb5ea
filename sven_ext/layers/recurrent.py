"""Recurrent layers ``nn.RNN``, ``nn.GRU`` and ``nn.LSTM`` (DESIGN.md section 3.8).

Every layer and direction applies ``gi[t] = x[t] W_ih^T + b_ih`` and ``gh[t] = h[t-1] W_hh^T + b_hh``
at each time step, so their per-row gradients are those of two sequence linear maps,
``sum_t d_r[t]^T a_s(r)[t]``, with ``a`` the layer's input (or the hidden state it starts the step
from) and ``d`` the gradient of row ``r`` with respect to ``gi[t]`` (or ``gh[t]``).

Obtaining ``d``: the state every step starts from is read off the call's own output sequence (the
top layer's; unless it changed in place after the call) and, for the layers below, off a rerun of
each layer from its input and initial states by the fused kernel the module's own forward uses.
With those states known, the gate activations of all steps come from one GEMM per map, and only the LSTM's cell
state, an elementwise recurrence, is carried step by step. Then the recurrence's backward pass,
written out per cell type, carries the rows' gradients with respect to the outputs (sequence,
``h_n`` and ``c_n``; ``m`` of them at once for ``m`` rows per sample, broadcast against the
samples' activations) down through the steps and layers, giving ``d gi`` at every step. The gates
add ``gi`` and ``gh``, so ``d gh = d gi``, except GRU's new gate, ``n = tanh(gi_n + r * gh_n)``,
where ``d gh_n = r * d gi_n``. Samples never mix in a recurrence, so each row's gradient lies in
its own sample's slice. The backward pass is written out rather than run through autograd, whose
graph of a few small operations per step costs more to build and run than the operations
themselves. Cost: two GEMMs over all steps (and the fused forward pass of the layers below the
top), and one backward pass step by step in Python (one GEMM and a few elementwise products per
step), not one per sample.

Calls this does not cover take the fallback (:func:`sven_ext.layers.fallback.module_rule`):
packed sequences, unbatched inputs, ``proj_size`` and dropout between layers in training mode.
"""

from __future__ import annotations

import inspect

import torch
from torch import _VF, nn
from torch.utils._pytree import tree_unflatten

from .direct import DirectUse
from .fallback import module_rule
from .linear import LinearUse

# The fused kernels of nn.RNN / nn.GRU / nn.LSTM's forward: (input, hx, weights, has_biases,
# num_layers, dropout, train, bidirectional, batch_first) -> (output, h_n[, c_n]).
_FUSED = {"RNN_TANH": _VF.rnn_tanh, "RNN_RELU": _VF.rnn_relu, "GRU": _VF.gru, "LSTM": _VF.lstm}


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


def _previous(states: torch.Tensor, first: torch.Tensor, reverse: bool) -> torch.Tensor:
    """``(B, T, H)`` states after each step -> the state each step starts from."""
    if reverse:
        return torch.cat([states[:, 1:], first.unsqueeze(1)], dim=1)
    return torch.cat([first.unsqueeze(1), states[:, :-1]], dim=1)


def _tanh(x: torch.Tensor) -> torch.Tensor:
    """``tanh(x)`` as ``2 sigmoid(2x) - 1``: torch's CPU tanh takes about ten times as long as its
    sigmoid, and the identity's rounding is that of values of magnitude 1."""
    return torch.mul(x, 2).sigmoid_().mul_(2).sub_(1)


def _steps(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``(B, T, ...)`` -> per step ``(B, 1, ...)``, to broadcast against ``m`` rows per sample."""
    return x.unsqueeze(1).unbind(2)


class _Direction:
    """One direction of one layer: what its backward pass needs at every step, batch-major.

    Per step ``t`` the factors the backward pass multiplies by, each ``(B, 1, gates, H)`` (one
    entry per sample, broadcast against its ``m`` rows).

    Args:
        mode: the module's ``mode``.
        x: ``(B, T, features)`` the layer's input.
        out: ``(B, T, H)`` the direction's output sequence.
        h0, c0: ``(B, H)`` its initial states (``c0``: LSTM only).
        weights: ``w_ih``, ``w_hh``, ``b_ih``, ``b_hh`` (biases may be ``None``).
        reverse: the steps run from the last.
    """

    def __init__(self, mode: str, x: torch.Tensor, out: torch.Tensor, h0: torch.Tensor, c0, weights: tuple,
                 reverse: bool):
        w_ih, w_hh, b_ih, b_hh = weights
        self.mode, self.w_hh, self.reverse = mode, w_hh, reverse
        batch, steps, hidden = out.shape
        self.h_prev = _previous(out, h0, reverse)
        if mode in ("RNN_TANH", "RNN_RELU"):
            slope = 1 - out.square() if mode == "RNN_TANH" else (out > 0).to(out.dtype)
            self.slope = _steps(slope.unsqueeze(2))
            return
        flat_x, flat_h = x.reshape(batch * steps, -1), self.h_prev.view(batch * steps, hidden)
        if mode == "GRU":  # b_hn sits inside r * gh_n, so the biases stay apart
            gi = flat_x @ w_ih.T if b_ih is None else torch.addmm(b_ih, flat_x, w_ih.T)
            gh = flat_h @ w_hh.T if b_hh is None else torch.addmm(b_hh, flat_h, w_hh.T)
            gi, gh = gi.view(batch, steps, 3, hidden), gh.view(batch, steps, 3, hidden)
            # In place where possible: every fresh (B, T, H) tensor costs about as much as the operation.
            rz = torch.add(gi[:, :, :2], gh[:, :, :2]).sigmoid_()
            r, z = rz[:, :, :1], rz[:, :, 1:]
            gh_n = gh[:, :, 2:]
            n = torch.addcmul(gi[:, :, 2:], r, gh_n).mul_(2).sigmoid_().mul_(2).sub_(1)  # as in _tanh
            one_minus_z = torch.rsub(z, 1)
            self.r, self.z = _steps(r), _steps(z)
            self.to_n = _steps(torch.mul(n, n).neg_().add_(1).mul_(one_minus_z))  # d pre_n / d h_t
            self.to_z = _steps(torch.sub(self.h_prev.unsqueeze(2), n).mul_(z).mul_(one_minus_z))  # d pre_z / d h_t
            self.to_r = _steps(torch.addcmul(r, r, r, value=-1).mul_(gh_n))  # d pre_r / d pre_n
            return
        bias = None if b_ih is None else b_ih + b_hh
        pre = flat_x @ w_ih.T if bias is None else torch.addmm(bias, flat_x, w_ih.T)
        pre = pre.addmm_(flat_h, w_hh.T).view(batch, steps, 4, hidden)
        pre[:, :, 2] *= 2  # the cell gate's tanh, as in _tanh
        act = pre.sigmoid_()
        act[:, :, 2].mul_(2).sub_(1)
        i, f, g, o = act.unbind(2)
        # The cell states c_t at [t + 1] (reverse: [t]) and the state each step starts from beside them.
        states = out.new_empty(batch, steps + 1, hidden)
        cells, c_prev = (states[:, :-1], states[:, 1:]) if reverse else (states[:, 1:], states[:, :-1])
        c_prev[:, -1 if reverse else 0] = c0
        ig, f_steps, c_steps, c_prev_steps = (i * g).unbind(1), f.unbind(1), cells.unbind(1), c_prev.unbind(1)
        for t in self.order(steps):
            torch.addcmul(ig[t], f_steps[t], c_prev_steps[t], out=c_steps[t])
        tanh_c = _tanh(cells)
        # d pre / d c for i, f, g, then d pre_o / d h; in place, as GRU's
        gates = out.new_empty(batch, steps, 4, hidden)
        torch.addcmul(i, i, i, value=-1, out=gates[:, :, 0]).mul_(g)
        torch.addcmul(f, f, f, value=-1, out=gates[:, :, 1]).mul_(c_prev)
        torch.mul(g, g, out=gates[:, :, 2])
        torch.addcmul(i, i, gates[:, :, 2], value=-1, out=gates[:, :, 2])
        torch.addcmul(o, o, o, value=-1, out=gates[:, :, 3]).mul_(tanh_c)
        self.gates_c, self.gate_o = _steps(gates[:, :, :3]), _steps(gates[:, :, 3:])
        self.f = _steps(f.unsqueeze(2))
        through_c = tanh_c.square_()  # d c / d h = o (1 - tanh(c)^2)
        self.through_c = _steps(torch.addcmul(o, o, through_c, value=-1, out=through_c).unsqueeze(2))

    def order(self, steps: int) -> range:
        """The forward pass's order of the steps."""
        return range(steps - 1, -1, -1) if self.reverse else range(steps)

    # 64 lines: one time loop of the three cell types' backward passes, which share its carries;
    # split per cell type it would repeat the loop and its state three times.
    def backward(self, d_out, d_h, d_c, m: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(d gi, d gh)``, each ``(B, m, T, G*H)``, from the gradients of ``m`` rows per sample with
        respect to the outputs, ``d_out`` ``(B, m, T, H)``, and to ``h_n``/``c_n``, ``(B, m, H)``
        (``None``: zero).

        The state gradients ``dh`` (and ``dc``) are carried as ``(B, m, 1, H)``; per step the gate
        gradients are written into ``d gi`` (and ``d gh``), and ``dh`` of the step before is
        ``d gh[t] W_hh`` plus that step's output gradient, one GEMM over all rows.
        """
        batch, steps, hidden = self.h_prev.shape
        rows, width = batch * m, self.w_hh.shape[0]
        d_gi = self.h_prev.new_empty(batch, m, steps, width)
        d_gh = torch.empty_like(d_gi) if self.mode == "GRU" else d_gi
        by_gate_i = d_gi.view(batch, m, steps, -1, hidden)
        by_gate_h = d_gh.view(batch, m, steps, -1, hidden)

        def per_step(gates: torch.Tensor, lo: int, hi: int) -> tuple[torch.Tensor, ...]:
            """Gates ``lo:hi`` of every step, ``(B, m, hi - lo, H)`` each."""
            return gates[:, :, :, lo:hi].unbind(2)

        flat_h = d_gh.view(rows, steps, width).unbind(1)
        out_steps = None if d_out is None else d_out.reshape(rows, steps, hidden).unbind(1)
        order = self.order(steps)[::-1]
        dh = self.h_prev.new_zeros(batch, m, 1, hidden) if d_h is None else d_h.unsqueeze(2)
        if out_steps is not None:
            dh = dh + out_steps[order[0]].view(batch, m, 1, hidden)

        def before(k: int, t: int, base: torch.Tensor | None) -> torch.Tensor:
            """``dh`` of the step before ``t``: ``d gh[t] W_hh`` plus ``base`` and that step's output gradient."""
            if out_steps is not None:
                step = out_steps[order[k + 1]]
                base = step if base is None else base.view(rows, hidden).add_(step)
            flat = flat_h[t] @ self.w_hh if base is None else torch.addmm(base.view(rows, hidden), flat_h[t], self.w_hh)
            return flat.view(batch, m, 1, hidden)

        last = steps - 1
        if self.mode == "LSTM":
            dc = self.h_prev.new_zeros(batch, m, 1, hidden) if d_c is None else d_c.unsqueeze(2)
            ifg, o = per_step(by_gate_i, 0, 3), per_step(by_gate_i, 3, 4)
            for k, t in enumerate(order):
                dc = torch.addcmul(dc, dh, self.through_c[t])  # dc arrives scaled by the next step's f
                torch.mul(dc, self.gates_c[t], out=ifg[t])
                torch.mul(dh, self.gate_o[t], out=o[t])
                if k < last:
                    dc = dc * self.f[t]
                    dh = before(k, t, None)
        elif self.mode == "GRU":  # gh's r and z parts are gi's, copied below for all steps at once
            n_i, r_h, z_h, n_h = (per_step(by_gate_i, 2, 3), per_step(by_gate_h, 0, 1), per_step(by_gate_h, 1, 2),
                                  per_step(by_gate_h, 2, 3))
            for k, t in enumerate(order):
                d_n = torch.mul(dh, self.to_n[t], out=n_i[t])
                torch.mul(dh, self.to_z[t], out=z_h[t])
                torch.mul(d_n, self.to_r[t], out=r_h[t])
                torch.mul(d_n, self.r[t], out=n_h[t])
                if k < last:
                    dh = before(k, t, dh * self.z[t])
            by_gate_i[:, :, :, :2] = by_gate_h[:, :, :, :2]
        else:
            gates = per_step(by_gate_i, 0, 1)
            for k, t in enumerate(order):
                torch.mul(dh, self.slope[t], out=gates[t])
                if k < last:
                    dh = before(k, t, None)
        return d_gi, d_gh


def _layers(module, seq: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor | None, top: torch.Tensor | None) -> list:
    """The recurrence layer by layer from ``seq`` ``(B, T, features)`` and the initial states
    ``(layers * directions, B, H)``: each layer's output sequence from the fused kernel, the top
    layer's ``top`` ``(B, T, directions * H)`` where the call's own output is known. Per layer, per
    direction, ``(parameter name suffix, the layer's input, w_ih, its _Direction)``."""
    mode, hidden = module.mode, module.hidden_size
    dirs = 2 if module.bidirectional else 1
    layers = []
    layer_input = seq
    for layer in range(module.num_layers):
        suffixes = [f"_l{layer}" + ("_reverse" if direction else "") for direction in range(dirs)]
        kinds = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
        weights = [tuple(getattr(module, f"{kind}{suffix}").detach() if module.bias or kind.startswith("weight")
                         else None for kind in kinds) for suffix in suffixes]
        states = slice(layer * dirs, (layer + 1) * dirs)
        hx = (h0[states], c0[states]) if mode == "LSTM" else h0[states]
        out = top if top is not None and layer == module.num_layers - 1 else _FUSED[mode](
            layer_input, hx, [w for ws in weights for w in ws if w is not None], module.bias, 1, 0.0, False, dirs == 2,
            True)[0]
        runs = []
        for direction, suffix in enumerate(suffixes):
            k = layer * dirs + direction
            cells = _Direction(mode, layer_input, out[..., direction * hidden:(direction + 1) * hidden], h0[k],
                               None if c0 is None else c0[k], weights[direction], reverse=direction == 1)
            runs.append((suffix, layer_input, weights[direction][0], cells))
        layers.append(runs)
        layer_input = out
    return layers


def recurrent_rule(call, samples: int) -> list:
    """``nn.RNN`` / ``nn.GRU`` / ``nn.LSTM``: per-step input and hidden maps, their gates from the
    call's output sequence (and the fused kernel's rerun of the layers below)."""
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
    seq = x if call.batch_first else x.transpose(0, 1)  # (B, T, features)
    batch, steps = seq.shape[0], seq.shape[1]
    if hx is None:
        h0 = c0 = seq.new_zeros(module.num_layers * dirs, batch, hidden)
    else:
        h0, c0 = hx if mode == "LSTM" else (hx, None)
    rows = next(d for d in call.d if d is not None).shape[0]
    m = rows // samples

    def per_sample(d):  # (R, ...) with the samples removed -> (B, m, ...)
        return None if d is None else d.to(dtype).reshape(samples, m, *d.shape[1:])

    by_output = dict(zip(call.outputs, call.d))  # outputs: the sequence, h_n, c_n
    d_above, d_h, d_c = (per_sample(by_output.get(k)) for k in range(3))
    recorded = dict(zip(call.outputs, call.values)).get(0)  # the output sequence, unless modified since
    top = None if recorded is None or recorded[0]._version != recorded[1] else recorded[0].to(dtype)
    layers = _layers(module, seq, h0, c0, top if top is None or call.batch_first else top.transpose(0, 1))
    uses = []
    for layer in range(module.num_layers - 1, -1, -1):
        d_below = None
        for direction, (suffix, inp, w_ih, cells) in enumerate(layers[layer]):
            k = layer * dirs + direction
            d_gi, d_gh = cells.backward(
                None if d_above is None else d_above[..., direction * hidden:(direction + 1) * hidden],
                None if d_h is None else d_h[:, :, k], None if d_c is None else d_c[:, :, k], m)
            if layer:
                part = d_gi @ w_ih
                d_below = part if d_below is None else d_below.add_(part)
            for kind, a, d in (("ih", inp, d_gi), ("hh", cells.h_prev, d_gh)):
                w, b = owned.get(f"weight_{kind}{suffix}"), owned.get(f"bias_{kind}{suffix}")
                a = a.unsqueeze(2)  # (B, T, 1, features)
                d = d.view(rows, steps, 1, -1)  # row i * m + j
                if w is not None:
                    uses.append(LinearUse(w, a, d, b))
                elif b is not None:
                    uses.append(DirectUse(b, d.sum(1).reshape(rows, -1)))
        d_above = d_below
    return uses


recurrent_rule.batch_axes = _batch_axes
recurrent_rule.reads_outputs = True
RECURRENT = (nn.RNN, nn.GRU, nn.LSTM)
