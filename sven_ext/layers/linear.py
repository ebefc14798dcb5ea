"""Linear maps applied at every position: ``nn.Linear``, ``nn.Conv1d/2d/3d`` and ``x @ W + b``
modules such as Hugging Face's ``Conv1D`` (DESIGN.md section 3.1).

A weight used as ``out = a @ w^T (+ b)`` at every position ``t`` of a sample has the per-row
gradient ``g_r = sum_t d_r[t]^T a_s(r)[t]``: the factors are the layer's input ``a`` per sample
and its output gradient ``d`` per row. Linear layers fold extra leading axes into ``T``;
convolutions unfold their input into patches (``T`` = output locations) and keep groups as an
axis. A frozen weight leaves its bias a :class:`~sven_ext.layers.direct.DirectUse`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from .common import combine_rows, items_within, rows_of
from .direct import DirectUse


def linear_costs(samples: int, rows: int, steps: int, din: int, dout: int, cols: int) -> tuple[float, float]:
    """Multiply-adds of the two routes of a Linear pull/push: through the factors, through per-row gradients."""
    through_factors = samples * steps * din * dout * cols + rows * steps * dout * cols
    through_gradients = rows * steps * din * dout + rows * din * dout * cols
    return through_factors, through_gradients


def linear_pull(a: torch.Tensor, d: torch.Tensor, q: torch.Tensor, budget: int) -> torch.Tensor:
    """``sum_r q[r, j] d_r^T a_s(r)``: ``a (S, T, din)``, ``d (R, T, dout)``, ``q (R, s)`` -> ``(dout, din, s)``.

    Through the factors (``X = d (x) q`` summed over each sample's rows, then ``X^T a``,
    ``~S T din dout s``) or through per-row gradients in row chunks (``~R T din dout + R din dout s``):
    whichever costs fewer multiply-adds (the first for ``T = 1``, the second for long sequences).
    """
    dtype = q.dtype
    samples, steps, din = a.shape
    rows, _, dout = d.shape
    m, cols = rows // samples, q.shape[1]
    size = torch.finfo(dtype).bits // 8
    factors, gradients = linear_costs(samples, rows, steps, din, dout, cols)
    if factors <= gradients:
        acc = torch.zeros(dout * cols, din, dtype=dtype, device=q.device)
        chunk = items_within(samples, steps * (dout * cols + m * dout + din) * size, budget)
        for s0 in range(0, samples, chunk):
            s1 = min(s0 + chunk, samples)
            dc = d[s0 * m:s1 * m].to(dtype).view(s1 - s0, m, steps, dout)
            qc = q[s0 * m:s1 * m].view(s1 - s0, m, cols)
            if m == 1:
                x = dc[:, 0, :, :, None] * qc[:, 0, None, None, :]
            else:
                x = torch.einsum("cmto,cmj->ctoj", dc, qc)
            acc.addmm_(x.reshape(-1, dout * cols).T, a[s0:s1].to(dtype).reshape(-1, din))
        return acc.view(dout, cols, din).transpose(1, 2).contiguous()
    z = torch.zeros(dout * din, cols, dtype=dtype, device=q.device)
    chunk = items_within(rows, (dout * din + steps * (din + dout)) * size, budget)
    for r0 in range(0, rows, chunk):
        r1 = min(r0 + chunk, rows)
        g = torch.einsum("rto,rti->roi", d[r0:r1].to(dtype), rows_of(a, r0, r1, rows).to(dtype))
        z.addmm_(g.reshape(r1 - r0, -1).T, q[r0:r1])
    return z.view(dout, din, cols)


def linear_push(a: torch.Tensor, d: torch.Tensor, z: torch.Tensor, budget: int, fused: bool) -> torch.Tensor:
    """``Y[r, j] = sum_{o,i} (d_r^T a_s(r))[o, i] z[o, i, j]``: ``z (dout, din, s)`` -> ``(R, s)``.

    ``fused``: :func:`sven_ext.ops.linear_project` in row chunks (float64 result); else the
    cheaper of the two routes of :func:`linear_pull`, in ``z.dtype``.
    """
    dtype = z.dtype
    samples, steps, din = a.shape
    rows, _, dout = d.shape
    m, cols = rows // samples, z.shape[2]
    size = torch.finfo(dtype).bits // 8
    if fused:
        y = torch.empty(rows, cols, dtype=torch.float64, device=z.device)
        chunk = items_within(rows, steps * (din + dout) * size, budget)
        for r0 in range(0, rows, chunk):
            r1 = min(r0 + chunk, rows)
            y[r0:r1] = ops.linear_project(
                rows_of(a, r0, r1, rows).to(dtype).contiguous(), d[r0:r1].to(dtype).contiguous(), z
            )
        return y
    y = torch.empty(rows, cols, dtype=dtype, device=z.device)
    factors, gradients = linear_costs(samples, rows, steps, din, dout, cols)
    if factors <= gradients:
        zt = z.permute(1, 0, 2).reshape(din, dout * cols)
        chunk = items_within(samples, steps * (dout * cols + m * dout + din) * size, budget)
        for s0 in range(0, samples, chunk):
            s1 = min(s0 + chunk, samples)
            w = (a[s0:s1].to(dtype).reshape(-1, din) @ zt).view(s1 - s0, steps * dout, cols)
            dc = d[s0 * m:s1 * m].to(dtype).reshape(s1 - s0, m, steps * dout)
            y[s0 * m:s1 * m] = torch.bmm(dc, w).reshape(-1, cols)
        return y
    flat = z.reshape(dout * din, cols)
    chunk = items_within(rows, (dout * din + steps * (din + dout)) * size, budget)
    for r0 in range(0, rows, chunk):
        r1 = min(r0 + chunk, rows)
        g = torch.einsum("rto,rti->roi", d[r0:r1].to(dtype), rows_of(a, r0, r1, rows).to(dtype))
        y[r0:r1] = g.reshape(r1 - r0, -1) @ flat
    return y


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
        transposed: the weight is stored ``(din, dout)`` and used as ``out = a @ w (+ b)``
            (Hugging Face's ``Conv1D``; one group). The factors are the same; only the layout of
            the weight's gradient differs.
    """

    param: torch.Tensor
    a: torch.Tensor
    d: torch.Tensor
    bias: torch.Tensor | None = None
    transposed: bool = False

    @property
    def params(self) -> tuple[torch.Tensor, ...]:
        return (self.param,) if self.bias is None else (self.param, self.bias)

    def rows(self, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
        """Per-row gradients of rows ``start:stop``, ``(stop - start, numel)`` (weight, then bias)."""
        d = self.d[start:stop].to(dtype)
        layout = "rtgi,rtgo->rgio" if self.transposed else "rtgi,rtgo->rgoi"
        a = rows_of(self.a, start, stop, self.d.shape[0])
        weight = torch.einsum(layout, a.to(dtype), d).reshape(stop - start, -1)
        return weight if self.bias is None else torch.cat([weight, d.sum(1).reshape(stop - start, -1)], dim=1)

    def direction(self, c: torch.Tensor) -> list[torch.Tensor]:
        """``sum_r c_r g_r`` in the parameters' shapes and ``c.dtype``: one weighted GEMM per group."""
        dc = combine_rows(self.d, c, self.a.shape[0])
        if self.a.shape[2] == 1:  # ungrouped: one GEMM over (sample, position) pairs
            a = self.a.to(c.dtype).expand(dc.shape[0], -1, -1, -1)
            weight = dc.reshape(-1, dc.shape[-1]).T @ a.reshape(-1, a.shape[-1])
        else:
            weight = torch.einsum("stgo,stgi->goi", dc, self.a.to(c.dtype))
        weight = weight.T.contiguous() if self.transposed else weight.reshape(self.param.shape)
        return [weight] if self.bias is None else [weight, dc.sum((0, 1)).reshape(self.bias.shape)]

    # Sketch products (see :mod:`sven_ext.layers`). The weight's first axis is ``group * dout + o``,
    # its rest ``din`` (transposed: first axis ``din``, rest ``dout``); the bias's rest is 1.

    def _pieces(self, lo: int, hi: int):
        """``(group, o_lo, o_hi, at)``: rows ``lo:hi`` of the first axis cut at group boundaries."""
        dout = self.d.shape[3]
        for g in range(lo // dout, (hi - 1) // dout + 1):
            o0, o1 = max(lo, g * dout) - g * dout, min(hi, (g + 1) * dout) - g * dout
            yield g, o0, o1, g * dout + o0 - lo

    def _bias_rows(self, dtype: torch.dtype) -> torch.Tensor:
        return self.d.sum(1).reshape(self.d.shape[0], -1).to(dtype)

    def pull(self, p: torch.Tensor, lo: int, hi: int, q: torch.Tensor, budget: int) -> torch.Tensor:
        """``J_p[:, lo:hi]^T q`` as ``(hi - lo, rest, s)`` for ``p`` the weight or the bias."""
        if p is self.bias:
            return (self._bias_rows(q.dtype)[:, lo:hi].T @ q).unsqueeze(1)
        if self.transposed:  # input features lo:hi of the one group
            return linear_pull(self.a[:, :, 0, lo:hi], self.d[:, :, 0], q, budget).transpose(0, 1).contiguous()
        out = torch.empty(hi - lo, self.a.shape[3], q.shape[1], dtype=q.dtype, device=q.device)
        for g, o0, o1, at in self._pieces(lo, hi):
            out[at:at + o1 - o0] = linear_pull(self.a[:, :, g], self.d[:, :, g, o0:o1], q, budget)
        return out

    def push(self, p: torch.Tensor, lo: int, hi: int, z: torch.Tensor, budget: int, fused: bool = False):
        """``J_p[:, lo:hi] z`` as ``(R, s)`` for ``z`` of shape ``(hi - lo, rest, s)``."""
        if p is self.bias:
            return self._bias_rows(z.dtype)[:, lo:hi] @ z.reshape(hi - lo, -1)
        if self.transposed:
            return linear_push(self.a[:, :, 0, lo:hi], self.d[:, :, 0], z.transpose(0, 1), budget, fused)
        y = None
        for g, o0, o1, at in self._pieces(lo, hi):
            part = linear_push(self.a[:, :, g], self.d[:, :, g, o0:o1], z[at:at + o1 - o0], budget, fused)
            y = part if y is None else y.add_(part)
        return y

    def sketch(self, p: torch.Tensor, omega, dtype: torch.dtype, budget: int, fused: bool = False):
        """``J_p Omega_p`` for the weight: Khatri-Rao columns by GEMMs, dense ones by ``ops.linear_sketch``.

        A Khatri-Rao column ``u_j (x) v_j`` projects row ``r`` as ``sum_t (d_r[t] . u_j)(a_r[t] . v_j)``.
        Returns ``None`` where the caller should push generated tiles instead (the bias; dense
        columns without ``fused``).
        """
        if p is not self.param or self.transposed:
            return None
        samples, steps, groups, din = self.a.shape
        rows, dout = self.d.shape[0], self.d.shape[3]
        m, size = rows // samples, torch.finfo(dtype).bits // 8
        if not omega.dense(p):
            u, v = omega.factors(p, dtype)
            y = torch.zeros(rows, omega.columns, dtype=dtype, device=self.d.device)
            chunk = items_within(samples, steps * m * (omega.columns * 2 + din + dout) * size, budget)
            for g in range(groups):
                ug = u[g * dout:(g + 1) * dout]
                for s0 in range(0, samples, chunk):
                    s1 = min(s0 + chunk, samples)
                    av = self.a[s0:s1, :, g].to(dtype) @ v  # (c, T, s)
                    du = (self.d[s0 * m:s1 * m, :, g].to(dtype) @ ug).view(s1 - s0, m, steps, -1)
                    y[s0 * m:s1 * m] += (du * av.unsqueeze(1)).sum(2).reshape(-1, omega.columns)
            return y
        if not fused:
            return None
        y = torch.zeros(rows, omega.columns, dtype=torch.float64, device=self.d.device)
        chunk = items_within(rows, steps * (din + dout) * size, budget)
        for g in range(groups):
            for r0 in range(0, rows, chunk):
                r1 = min(r0 + chunk, rows)
                y[r0:r1] += ops.linear_sketch(
                    rows_of(self.a, r0, r1, rows)[:, :, g].to(dtype).contiguous(),
                    self.d[r0:r1, :, g].to(dtype).contiguous(),
                    seed=omega.seed, stream=omega.stream(p), row_offset=g * dout * din,
                    cols=omega.columns, distribution=omega.distribution,
                )
        return y

    def frobenius_sq(self, dtype: torch.dtype, budget: int) -> float:
        """``||J_use||_F^2`` (weight and bias): the sum of the per-row gradients' squared norms."""
        samples, steps, groups, din = self.a.shape
        rows, dout = self.d.shape[0], self.d.shape[3]
        m, size = rows // samples, torch.finfo(dtype).bits // 8
        total = 0.0
        if self.bias is not None:
            total += float(self._bias_rows(dtype).square().sum())
        for g in range(groups):
            if steps == 1:
                aa = self.a[:, 0, g].to(dtype).square().sum(-1)
                dd = self.d[:, 0, g].to(dtype).square().sum(-1)
                total += float((dd.view(samples, m) * aa[:, None]).sum())
                continue
            through_tt = steps * steps * (din + dout) <= steps * din * dout
            width = steps * steps if through_tt else din * dout
            chunk = items_within(rows, (width + steps * (din + dout)) * size, budget)
            for r0 in range(0, rows, chunk):
                r1 = min(r0 + chunk, rows)
                a = rows_of(self.a, r0, r1, rows)[:, :, g].to(dtype)
                d = self.d[r0:r1, :, g].to(dtype)
                if through_tt:
                    total += float((a @ a.transpose(1, 2) * (d @ d.transpose(1, 2))).sum())
                else:
                    total += float(torch.einsum("rto,rti->roi", d, a).square().sum())
        return total


@dataclass
class FormedLinearUse(LinearUse):
    """A :class:`LinearUse` whose per-row weight gradients were formed for ``K`` and kept: its
    direction ``sum_r c_r g_r`` is one product with them (``~R din dout``) instead of a contraction
    of the factors over every position (``~S T din dout``).

    Attributes:
        gradients: ``(R, groups * dout * din)`` the weight's per-row gradients, laid out
            ``(group, out, in)`` (the stored layout of an untransposed weight).
    """

    gradients: torch.Tensor | None = None

    def direction(self, c: torch.Tensor) -> list[torch.Tensor]:
        weight = (c.to(self.gradients.dtype) @ self.gradients).to(c.dtype)
        weight = weight.view(self.d.shape[3], -1).T.contiguous() if self.transposed else weight.view(self.param.shape)
        if self.bias is None:
            return [weight]
        return [weight, (c @ self._bias_rows(c.dtype)).view(self.bias.shape)]


def linear_rule(call, samples: int) -> list:
    """``nn.Linear``: extra leading axes of the input are positions."""
    (d,) = call.d
    if d is None:
        return []
    x = call.sample_input()
    module = call.module
    rows = d.shape[0]
    a = x.reshape(samples, -1, 1, module.in_features)
    d = d.reshape(rows, -1, 1, module.out_features)
    return _weight_and_bias(call, a, d)


def conv_rule(call, samples: int) -> list:
    """``nn.Conv1d/2d/3d``: the input unfolded into patches, one position per output location."""
    (d,) = call.d
    if d is None:
        return []
    module = call.module
    x = call.sample_input()
    nd = len(module.kernel_size)
    groups = module.groups
    rows = d.shape[0]
    patches = _patches(x.reshape(-1, *x.shape[-nd - 1:]), module)  # (N, L, C_in * prod(kernel))
    a = patches.reshape(samples, -1, groups, patches.shape[-1] // groups)
    out = d.reshape(-1, *d.shape[-nd - 1:]).flatten(2).transpose(1, 2)  # (rows * n, L, C_out)
    d = out.reshape(rows, -1, groups, module.out_channels // groups)
    return _weight_and_bias(call, a, d)


def transposed_linear_rule(call, samples: int) -> list:
    """``out = x @ W + b`` with ``W`` stored ``(din, dout)``: Hugging Face's ``Conv1D``."""
    (d,) = call.d
    if d is None:
        return []
    din, dout = call.module.weight.shape
    a = call.sample_input().reshape(samples, -1, 1, din)
    return _weight_and_bias(call, a, d.reshape(d.shape[0], -1, 1, dout), transposed=True)


def _weight_and_bias(call, a: torch.Tensor, d: torch.Tensor, transposed: bool = False) -> list:
    owned = dict(call.params)
    if "weight" in owned:
        return [LinearUse(owned["weight"], a, d, owned.get("bias"), transposed)]
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
