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
output-shaped tensors from a backward pass per row (slower, still exact). A module whose
output's first axis merely has the batch's size (``pos(arange(T))`` with ``T == B``) or that
mixes samples is recorded whole too once the gram backend's first-step check finds its
per-sample factors wrong (``Capture.uses(shared=...)``).

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

A model wrapped in ``DistributedDataParallel`` is recorded through the modules it wraps, with
DDP's gradient synchronisation off while recording: data-parallel Sven reduces its step itself
(:mod:`sven_ext.distributed`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.graph import get_gradient_edge
from torch.utils._pytree import tree_flatten, tree_unflatten

from . import ops
from .factor_check import graph_fingerprint, hooks_fingerprint

# Modules that read their children's parameters without calling the children: all the
# parameters under them are differentiated as one module.
WHOLE_MODULES = (nn.MultiheadAttention,)


# The factorisation of each layer family, keyed by the class whose ``forward`` a module runs: a
# subclass that keeps its parent's forward (``NonDynamicallyQuantizableLinear``, ``BatchNorm2d``)
# shares its rule; one with its own forward (torchvision's ``LayerNorm2d``, which permutes
# channels first) computes something else and falls back to the torch.func rule.
_FAMILIES = {
    nn.Linear: "linear",
    nn.Conv1d: "conv",
    nn.Conv2d: "conv",
    nn.Conv3d: "conv",
    nn.Embedding: "embedding",
    nn.LayerNorm: "layer_norm",
    nn.GroupNorm: "group_norm",
    nn.RMSNorm: "rms_norm",
    nn.modules.batchnorm._BatchNorm: "batch_norm",
}


def _kind(module: nn.Module) -> str:
    """Which factorisation a module's parameters get (``"module"``: the torch.func fallback)."""
    if "forward" in vars(module):  # a forward patched onto the instance
        return "module"
    for cls in type(module).__mro__:
        if "forward" in vars(cls):
            return _FAMILIES.get(cls, "module")
    return "module"


def _batch_statistics(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.batchnorm._BatchNorm) and (
        module.training or module.running_mean is None
    )


# --------------------------------------------------------------------------- uses


def _combine(d: torch.Tensor, c: torch.Tensor, samples: int) -> torch.Tensor:
    """``sum_j c[i*m+j] * d[i*m+j]`` for every sample ``i``: ``(R, ...)`` -> ``(S, ...)`` in ``c.dtype``."""
    rows = d.shape[0]
    m = rows // samples
    if m == 1:  # one row per sample: a broadcast product (einsum's overhead dominates small steps)
        return d.to(c.dtype) * c.view(rows, *([1] * (d.dim() - 1)))
    flat = torch.einsum("smx,sm->sx", d.reshape(samples, m, -1).to(c.dtype), c.view(samples, m))
    return flat.view(samples, *d.shape[1:])


def _sample_index(start: int, stop: int, rows: int, samples: int, device) -> torch.Tensor:
    return torch.arange(start, stop, device=device) // (rows // samples)


# --------------------------------------------------------------------------- sketch products
#
# The sketch backend (sven_ext.backends.sketch) needs three products per parameter ``p`` and
# range ``lo:hi`` of its first axis (``p`` seen as a ``(p.shape[0], rest)`` matrix, flattened
# row-major like ``p``): ``pull`` = ``J_p[:, lo:hi]^T q`` of shape ``(hi - lo, rest, s)``,
# ``push`` = ``J_p[:, lo:hi] z`` of shape ``(R, s)``, and ``sketch`` = ``J_p Omega_p`` where a
# use has a cheaper route than ``push`` of generated tiles (``None`` otherwise). Products run
# in the dtype of ``q``/``z`` (``dtype`` for ``sketch``); transients stay near ``budget`` bytes.


def _chunk(count: int, item_bytes: int, budget: int) -> int:
    """How many items of ``item_bytes`` fit in ``budget`` (at least 1, at most ``count``)."""
    return max(1, min(count, budget // max(1, item_bytes)))


def _first_axis(p: torch.Tensor) -> tuple[int, int]:
    """``(rows, rest)`` of ``p`` seen as a matrix over its first axis."""
    rows = p.shape[0] if p.dim() else 1
    return rows, p.numel() // max(rows, 1)


def _per_row(x: torch.Tensor, start: int, stop: int, rows: int) -> torch.Tensor:
    """Rows ``start:stop`` of a per-sample ``(S, ...)`` tensor, one entry per row."""
    if x.shape[0] == rows:
        return x[start:stop]
    return x[_sample_index(start, stop, rows, x.shape[0], x.device)]


def _linear_costs(samples: int, rows: int, steps: int, din: int, dout: int, cols: int) -> tuple[float, float]:
    """Multiply-adds of the two routes of a Linear pull/push: through the factors, through per-row gradients."""
    through_factors = samples * steps * din * dout * cols + rows * steps * dout * cols
    through_gradients = rows * steps * din * dout + rows * din * dout * cols
    return through_factors, through_gradients


def _linear_pull(a: torch.Tensor, d: torch.Tensor, q: torch.Tensor, budget: int) -> torch.Tensor:
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
    factors, gradients = _linear_costs(samples, rows, steps, din, dout, cols)
    if factors <= gradients:
        acc = torch.zeros(dout * cols, din, dtype=dtype, device=q.device)
        chunk = _chunk(samples, steps * (dout * cols + m * dout + din) * size, budget)
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
    chunk = _chunk(rows, (dout * din + steps * (din + dout)) * size, budget)
    for r0 in range(0, rows, chunk):
        r1 = min(r0 + chunk, rows)
        g = torch.einsum("rto,rti->roi", d[r0:r1].to(dtype), _per_row(a, r0, r1, rows).to(dtype))
        z.addmm_(g.reshape(r1 - r0, -1).T, q[r0:r1])
    return z.view(dout, din, cols)


def _linear_push(a: torch.Tensor, d: torch.Tensor, z: torch.Tensor, budget: int, fused: bool) -> torch.Tensor:
    """``Y[r, j] = sum_{o,i} (d_r^T a_s(r))[o, i] z[o, i, j]``: ``z (dout, din, s)`` -> ``(R, s)``.

    ``fused``: :func:`sven_ext.ops.linear_project` in row chunks (float64 result); else the
    cheaper of the two routes of :func:`_linear_pull`, in ``z.dtype``.
    """
    dtype = z.dtype
    samples, steps, din = a.shape
    rows, _, dout = d.shape
    m, cols = rows // samples, z.shape[2]
    size = torch.finfo(dtype).bits // 8
    if fused:
        y = torch.empty(rows, cols, dtype=torch.float64, device=z.device)
        chunk = _chunk(rows, steps * (din + dout) * size, budget)
        for r0 in range(0, rows, chunk):
            r1 = min(r0 + chunk, rows)
            y[r0:r1] = ops.linear_project(
                _per_row(a, r0, r1, rows).to(dtype).contiguous(), d[r0:r1].to(dtype).contiguous(), z
            )
        return y
    y = torch.empty(rows, cols, dtype=dtype, device=z.device)
    factors, gradients = _linear_costs(samples, rows, steps, din, dout, cols)
    if factors <= gradients:
        zt = z.permute(1, 0, 2).reshape(din, dout * cols)
        chunk = _chunk(samples, steps * (dout * cols + m * dout + din) * size, budget)
        for s0 in range(0, samples, chunk):
            s1 = min(s0 + chunk, samples)
            w = (a[s0:s1].to(dtype).reshape(-1, din) @ zt).view(s1 - s0, steps * dout, cols)
            dc = d[s0 * m:s1 * m].to(dtype).reshape(s1 - s0, m, steps * dout)
            y[s0 * m:s1 * m] = torch.bmm(dc, w).reshape(-1, cols)
        return y
    flat = z.reshape(dout * din, cols)
    chunk = _chunk(rows, (dout * din + steps * (din + dout)) * size, budget)
    for r0 in range(0, rows, chunk):
        r1 = min(r0 + chunk, rows)
        g = torch.einsum("rto,rti->roi", d[r0:r1].to(dtype), _per_row(a, r0, r1, rows).to(dtype))
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
        if self.a.shape[2] == 1:  # ungrouped: one GEMM over (sample, position) pairs
            a = self.a.to(c.dtype).expand(dc.shape[0], -1, -1, -1)
            weight = dc.reshape(-1, dc.shape[-1]).T @ a.reshape(-1, a.shape[-1])
        else:
            weight = torch.einsum("stgo,stgi->goi", dc, self.a.to(c.dtype))
        weight = weight.reshape(self.param.shape)
        return [weight] if self.bias is None else [weight, dc.sum((0, 1)).reshape(self.bias.shape)]

    # Sketch products (see the section comment above :func:`_linear_pull`). The weight's first
    # axis is ``group * dout + o``, its rest ``din``; the bias's rest is 1.

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
        out = torch.empty(hi - lo, self.a.shape[3], q.shape[1], dtype=q.dtype, device=q.device)
        for g, o0, o1, at in self._pieces(lo, hi):
            out[at:at + o1 - o0] = _linear_pull(self.a[:, :, g], self.d[:, :, g, o0:o1], q, budget)
        return out

    def push(self, p: torch.Tensor, lo: int, hi: int, z: torch.Tensor, budget: int, fused: bool = False):
        """``J_p[:, lo:hi] z`` as ``(R, s)`` for ``z`` of shape ``(hi - lo, rest, s)``."""
        if p is self.bias:
            return self._bias_rows(z.dtype)[:, lo:hi] @ z.reshape(hi - lo, -1)
        y = None
        for g, o0, o1, at in self._pieces(lo, hi):
            part = _linear_push(self.a[:, :, g], self.d[:, :, g, o0:o1], z[at:at + o1 - o0], budget, fused)
            y = part if y is None else y.add_(part)
        return y

    def sketch(self, p: torch.Tensor, omega, dtype: torch.dtype, budget: int, fused: bool = False):
        """``J_p Omega_p`` for the weight: Khatri-Rao columns by GEMMs, dense ones by ``ops.linear_sketch``.

        A Khatri-Rao column ``u_j (x) v_j`` projects row ``r`` as ``sum_t (d_r[t] . u_j)(a_r[t] . v_j)``.
        Returns ``None`` where the caller should push generated tiles instead (the bias; dense
        columns without ``fused``).
        """
        if p is not self.param:
            return None
        samples, steps, groups, din = self.a.shape
        rows, dout = self.d.shape[0], self.d.shape[3]
        m, size = rows // samples, torch.finfo(dtype).bits // 8
        if not omega.dense(p):
            u, v = omega.factors(p, dtype)
            y = torch.zeros(rows, omega.columns, dtype=dtype, device=self.d.device)
            chunk = _chunk(samples, steps * m * (omega.columns * 2 + din + dout) * size, budget)
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
        chunk = _chunk(rows, steps * (din + dout) * size, budget)
        for g in range(groups):
            for r0 in range(0, rows, chunk):
                r1 = min(r0 + chunk, rows)
                y[r0:r1] += ops.linear_sketch(
                    _per_row(self.a, r0, r1, rows)[:, :, g].to(dtype).contiguous(),
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
            chunk = _chunk(rows, (width + steps * (din + dout)) * size, budget)
            for r0 in range(0, rows, chunk):
                r1 = min(r0 + chunk, rows)
                a = _per_row(self.a, r0, r1, rows)[:, :, g].to(dtype)
                d = self.d[r0:r1, :, g].to(dtype)
                if through_tt:
                    total += float((a @ a.transpose(1, 2) * (d @ d.transpose(1, 2))).sum())
                else:
                    total += float(torch.einsum("rto,rti->roi", d, a).square().sum())
        return total


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

    # Sketch products: only the looked-up positions ("pairs" (row, t)) contribute, sorted by index.

    def _pairs(self):
        """``(row, index, position)`` of every pair sorted by table index; position indexes ``d.view(-1, dim)``."""
        rows, steps = self.d.shape[0], self.d.shape[1]
        flat = _per_row(self.indices, 0, rows, rows).reshape(-1)
        order = torch.argsort(flat, stable=True)
        return order // steps, flat[order], order

    def _pair_range(self, index: torch.Tensor, lo: int, hi: int) -> tuple[int, int]:
        bounds = torch.searchsorted(index, torch.tensor([lo, hi], device=index.device))
        return int(bounds[0]), int(bounds[1])

    def pull(self, p: torch.Tensor, lo: int, hi: int, q: torch.Tensor, budget: int) -> torch.Tensor:
        """Table rows ``lo:hi`` of ``J^T q``: ``(hi - lo, dim, s)``."""
        row, index, position = self._pairs()
        dim, cols = self.d.shape[2], q.shape[1]
        z = torch.zeros(hi - lo, dim, cols, dtype=q.dtype, device=q.device)
        b0, b1 = self._pair_range(index, lo, hi)
        d = self.d.reshape(-1, dim)
        chunk = _chunk(b1 - b0, 2 * dim * cols * (torch.finfo(q.dtype).bits // 8), budget)
        flat = z.view(hi - lo, -1)
        for c0 in range(b0, b1, chunk):
            c1 = min(c0 + chunk, b1)
            values = d[position[c0:c1]].to(q.dtype)[:, :, None] * q[row[c0:c1]][:, None, :]
            # index_put_ (serial on CPU, so deterministic) is ~10x faster than index_add_ for wide slices.
            flat.index_put_((index[c0:c1] - lo,), values.reshape(c1 - c0, -1), accumulate=True)
        return z

    def push(self, p: torch.Tensor, lo: int, hi: int, z: torch.Tensor, budget: int, fused: bool = False):
        """``J[:, rows lo:hi] z``: ``(R, s)``."""
        row, index, position = self._pairs()
        b0, b1 = self._pair_range(index, lo, hi)
        return self._gather_project(row[b0:b1], index[b0:b1] - lo, position[b0:b1], z, budget)

    def _gather_project(self, row, slot, position, z, budget) -> torch.Tensor:
        """``y[row] += d[position] . z[slot]`` over pairs, in chunks."""
        rows, dim = self.d.shape[0], self.d.shape[2]
        cols = z.shape[2]
        y = torch.zeros(rows, cols, dtype=z.dtype, device=z.device)
        d = self.d.reshape(-1, dim)
        chunk = _chunk(row.numel(), dim * cols * (torch.finfo(z.dtype).bits // 8), budget)
        for c0 in range(0, row.numel(), chunk):
            c1 = min(c0 + chunk, row.numel())
            values = torch.einsum("nc,ncj->nj", d[position[c0:c1]].to(z.dtype), z[slot[c0:c1]])
            y.index_add_(0, row[c0:c1], values)
        return y

    def sketch(self, p: torch.Tensor, omega, dtype: torch.dtype, budget: int, fused: bool = False):
        """``J Omega``: only the table rows looked up are generated (Khatri-Rao: ``u[idx] * (d . v)``)."""
        row, index, position = self._pairs()
        rows, dim = self.d.shape[0], self.d.shape[2]
        cols = omega.columns
        if not omega.dense(p):
            u, v = omega.factors(p, dtype)
            y = torch.zeros(rows, cols, dtype=dtype, device=self.d.device)
            d = self.d.reshape(-1, dim)
            chunk = _chunk(row.numel(), (dim + 2 * cols) * (torch.finfo(dtype).bits // 8), budget)
            for c0 in range(0, row.numel(), chunk):
                c1 = min(c0 + chunk, row.numel())
                values = u[index[c0:c1]] * (d[position[c0:c1]].to(dtype) @ v)
                y.index_add_(0, row[c0:c1], values)
            return y
        tokens, counts = torch.unique_consecutive(index, return_counts=True)
        offsets = [0, *torch.cumsum(counts, 0).tolist()]
        per_token = dim * cols * (torch.finfo(dtype).bits // 8)
        step = _chunk(tokens.numel(), per_token, budget)
        y = torch.zeros(rows, cols, dtype=dtype, device=self.d.device)
        for u0 in range(0, tokens.numel(), step):
            u1 = min(u0 + step, tokens.numel())
            # Omega's rows for these tokens, one generation per run of consecutive table rows.
            chunk_tokens = tokens[u0:u1].tolist()
            blocks, start = [], 0
            for i in range(1, len(chunk_tokens) + 1):
                if i == len(chunk_tokens) or chunk_tokens[i] != chunk_tokens[i - 1] + 1:
                    blocks.append(omega.tile(p, chunk_tokens[start], chunk_tokens[i - 1] + 1, dtype))
                    start = i
            tile = torch.cat(blocks)
            b0, b1 = offsets[u0], offsets[u1]
            slot = torch.repeat_interleave(torch.arange(u1 - u0, device=counts.device), counts[u0:u1])
            y += self._gather_project(row[b0:b1], slot, position[b0:b1], tile, budget)
        return y

    def frobenius_sq(self, dtype: torch.dtype, budget: int) -> float:
        """``sum_r ||g_r||^2`` with ``g_r`` the table gradient: positions of one row and index add first."""
        row, index, position = self._pairs()
        key = row * self.param.shape[0] + index
        _, inverse = torch.unique(key, return_inverse=True)
        d = self.d.reshape(-1, self.d.shape[2])[position].to(dtype)
        summed = torch.zeros(int(inverse.max()) + 1 if inverse.numel() else 0, d.shape[1], dtype=dtype,
                             device=d.device)
        return float(summed.index_put_((inverse,), d, accumulate=True).square().sum())


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

    def _columns(self, p: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        rest = _first_axis(p)[1]
        return self.g[:, lo * rest:hi * rest]

    def pull(self, p: torch.Tensor, lo: int, hi: int, q: torch.Tensor, budget: int) -> torch.Tensor:
        return (self._columns(p, lo, hi).to(q.dtype).T @ q).view(hi - lo, -1, q.shape[1])

    def push(self, p: torch.Tensor, lo: int, hi: int, z: torch.Tensor, budget: int, fused: bool = False):
        return self._columns(p, lo, hi).to(z.dtype) @ z.reshape(-1, z.shape[-1])

    def sketch(self, p, omega, dtype, budget, fused=False):
        return None

    def frobenius_sq(self, dtype: torch.dtype, budget: int) -> float:
        return float(self.g.to(dtype).square().sum())


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
        # oneDNN's float32 RNN kernels keep a workspace that torch.func's transforms do not carry.
        with torch.backends.mkldnn.flags(enabled=False, deterministic=None, allow_tf32=None,
                                         fp32_precision=None):
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
        self._no_sync = None
        for name, module in model.named_modules():
            if _batch_statistics(module):
                raise ValueError(
                    f"the gram backend needs per-sample gradients, but module {name or '<root>'!r} "
                    f"({type(module).__name__}) normalises with batch statistics, which couples the "
                    "samples: call model.eval() (running statistics) or use backend='dense'"
                )
        self.plan = _plan(model, params)

    def signature(self, residual_rows: torch.Tensor) -> tuple[tuple, dict, dict]:
        """What the factor check's verdict depends on, after the closure ran (:mod:`sven_ext.factor_check`).

        Returns:
            ``(step, per_param, per_module)``: the step's rows, graph and hooks; per moving
            parameter (by id) and per recorded module (by id), the shapes of its calls.
        """
        step = (tuple(residual_rows.shape), graph_fingerprint(residual_rows), hooks_fingerprint(self.model))
        per_module: dict = {}
        per_param: dict = {}
        for call in self.calls:
            key = (call.name, tuple(map(tuple, call.shapes)), call.batch_first,
                   tuple(tuple(x.shape) if isinstance(x, torch.Tensor) else None for x in call.leaves))
            per_module[id(call.module)] = per_module.get(id(call.module), ()) + (key,)
            for _, p in call.params:
                per_param[id(p)] = per_param.get(id(p), ()) + (key,)
        return step, per_param, per_module

    def __enter__(self) -> Capture:
        for name, module, kind, owned in self.plan:
            hook = self._hook(name, kind, owned)
            # First among the module's hooks: the factors describe the module's own output; a user's
            # hook that rewrites it is then part of the graph above, like any other layer.
            self._handles.append(module.register_forward_hook(hook, with_kwargs=True, prepend=True))
        if isinstance(self.model, nn.parallel.DistributedDataParallel):
            # Sven differentiates with torch.autograd.grad, which runs no AccumulateGrad hooks, so DDP's
            # gradient all-reduce never fires; no_sync also keeps DDP's forward from preparing its reducer
            # for a backward pass that does not come. Sven reduces the step itself.
            self._no_sync = self.model.no_sync()
            self._no_sync.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self._no_sync is not None:
            self._no_sync.__exit__(*exc)
            self._no_sync = None

    def _hook(self, name: str, kind: str, owned: list[tuple[str, torch.Tensor]]):
        def hook(module, args, kwargs, output):
            flat_out = [output] if isinstance(output, torch.Tensor) else tree_flatten(output)[0]
            outputs = [k for k, t in enumerate(flat_out) if isinstance(t, torch.Tensor) and t.grad_fn is not None]
            if not outputs:
                return None  # e.g. a call under torch.no_grad(): it does not move the residual
            leaves, spec = _flatten_inputs(args, kwargs)
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

    def uses(self, residual_rows: torch.Tensor, chunk_rows: int, shared: set | frozenset = frozenset()) -> list[Use]:
        """The uses of every moving parameter, after the closure ran (it may be called again).

        Args:
            residual_rows: ``(B, m)`` residuals (``Rows.per_sample``) with autograd history.
            chunk_rows: rows per batched backward pass for whole-recorded calls.
            shared: ids of modules to record whole even where their output's first axis has the
                batch's size (e.g. ``pos(arange(T))`` with ``T == B``).

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
            call.whole = id(call.module) in shared or not (
                call.batch_first and all(len(s) > 0 and s[0] == batch for s in call.shapes))
        _output_gradients(
            residual_rows, [c for c in self.calls if not c.whole], [c for c in self.calls if c.whole], chunk_rows
        )
        uses = []
        for call in self.calls:
            uses.extend(_FACTORS[call.kind](call, 1 if call.whole else batch))
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

