"""The exact Gram backend: Sven steps without ever forming the Jacobian (DESIGN.md section 2.1).

One forward pass (the closure) with hooks and one batched backward pass give per-layer
factors (:mod:`sven_ext.capture`). ``K = J J^T`` is accumulated from them layer by layer in
``solve_dtype`` (each layer's products in its factors' precision while ``rtol >= 1e-3``);
:func:`sven_ext.linalg.solve_gram` gives ``c``; the direction ``J^T c`` is one weighted
contraction per layer. Memory ``O(R^2)`` plus the factors.

Per parameter, ``K_p`` comes from the cheapest exact route:

- Linear/conv weight and bias with one position per sample (``T = 1``):
  ``(A A^T + 1) * (D D^T)``, two GEMMs.
- ``T > 1``: a cost model picks ``ops.seq_gram`` (``~R^2 T^2 (din + dout)``, no per-sample
  gradient) or per-sample gradients in row chunks (``~R T din dout + R^2 din dout``).
- Embedding tables: ``ops.embedding_gram``.
- Small parameters (norm affines, the bias of a frozen weight, parameters expanded to the
  batch): their materialised per-row gradients, all
  concatenated into one ``G`` and one ``G G^T``.
- An embedding table tied to an output head (one weight read by an ``nn.Embedding`` and an
  ``nn.Linear``): the two routes above plus their cross term, from the factors
  (``~R^2 T_e T_l d``, no per-sample gradient of the vocabulary-sized weight).
- Anything else (fallback modules, other mixes of uses): per-row gradients in row chunks,
  ``K += G_I G_J^T``.

Microbatched rows (``StepSettings.microbatch_size``): ``K`` is accumulated over the captured
per-sample rows and mapped, ``K' = T K T^T``, and the direction is ``J^T (T^T c')``
(:class:`sven_ext.residuals.RowMap`). A column scale ``S`` (``StepSettings.column_scale``):
``K_S = J S^2 J^T`` and the direction ``S^2 J^T c``; an elementwise ``S`` breaks the Kronecker
structure of the ``T = 1`` route, so every parameter but the materialised small ones takes the
per-row-gradient route with scaled columns.

Element subsets (``StepSettings.element_subsets``, ``param_fraction`` with ``mask_by_block=False``)
are product sets (output units x input features), so without a column scale an ungrouped
Linear/conv weight keeps its routes on smaller factors: ``a`` restricted to the chosen features
and ``d`` to the chosen units (its bias follows the units). ``K_w`` then costs about
``sqrt(f)`` and ``J^T c`` about ``f`` of the full layer's, written back into the weight by
:func:`sven_ext.ops.block_put_`. Every other parameter takes its subset as a 0/1 column scale.

The capture, the factor check and the contraction are :class:`sven_ext.backends.factored.FactoredBackend`'s;
data-parallel, ``K`` and ``c`` are those of the concatenated batch on every rank.
"""

from __future__ import annotations

import dataclasses

import torch

from .. import costs, distributed, ops
from ..factor_check import FactorChecks
from ..layers import EmbeddingUse, LinearUse, factor_bytes
from ..layers.common import items_within, rows_of, sample_index
from ..layers.linear import FormedLinearUse
from ..linalg import Truncation, solve_gram
from ..residuals import Rows
from ..routes import component_rows, components, route, sequence_route, tied_route
from .base import StepDirection, StepSettings
from .factored import FactoredBackend, SubsetLinearUse, gemm_dtype, restrict

# Float32 factors' Gram products run in float32 while ``rtol`` is at least this: their rounding,
# about 1e-7 of the largest eigenvalue, stays below the cut at ``rtol^2`` of it. For a smaller
# ``rtol`` they run in ``solve_dtype``: a float32 ``K``'s noise floor would act as a damping nobody
# asked for (the 1-D regression at rtol = 1e-6 converged with float32 products and diverged with
# exact ones, as the dense backend does).
FLOAT32_GRAM_RTOL = 1e-3
# Per-row weight gradients formed for K in one block are kept for the direction while all kept
# sum to at most this share of the row budget (8 MiB of the default 128): they add to the step's
# peak from the Gram to the direction. The blocks formed after them take the rest, so the step's
# transients stay within the budget the cost model charges.
KEPT_ROWS_SHARE = 1 / 16

class GramBackend(FactoredBackend):
    """Exact ``K = J J^T`` from per-layer factors; ``c`` from its eigendecomposition."""

    name = "gram"

    def estimate(self, rows: Rows, uses: list, settings: StepSettings) -> costs.Estimate:
        """The step's cost (:func:`sven_ext.costs.estimate_gram`) from its captured factors."""
        return costs.estimate_gram(uses, rows.captured.numel(), rows.residual.numel(),
                                   settings.column_scale is not None)

    def solve(self, rows: Rows, uses: list, checked: bool, settings: StepSettings,
              shard: distributed.SingleProcess | distributed.Shard) -> StepDirection:
        """The step from captured factors (what :meth:`batch_factors` returned)."""
        restricted, scales = self._subsets_and_scales(uses, settings)
        uses = restrict(uses, restricted)
        dtype = settings.solve_dtype
        residual = rows.residual.detach().to(dtype)
        count = residual.numel()
        gram, paths, contracted = self._gram(uses, rows, dtype, scales, settings.truncation.rtol)
        truncation = settings.truncation.for_rows(count, rows.scale)
        solution = solve_gram(gram, residual, truncation)
        contract = self._contraction(contracted, rows, scales, shard, restricted)
        info = {
            "gram_bytes": gram.nbytes,
            "factor_bytes": factor_bytes(uses),
            "paths": {self._names.get(id(p), "?"): paths.get(id(p), "unused") for p in self.params},
            "checked": checked,
            "recorded_whole": self.recorded_whole,
            **shard.info(self.params),
        }
        return StepDirection(rows, solution, info, contract=contract)

    def gram(self, closure, settings: StepSettings) -> torch.Tensor:
        """``K = J S^2 J^T`` of the closure's rows, ``(R, R)`` in ``settings.solve_dtype`` (no step taken)."""
        rows, uses, _ = self.factors(closure, settings)
        restricted, scales = self._subsets_and_scales(uses, settings)
        gram, _, _ = self._gram(restrict(uses, restricted), rows, settings.solve_dtype, scales,
                                settings.truncation.rtol)
        return gram if rows.scale == 1 else gram * rows.scale ** 2  # K of the rows the closure returned

    def _gram(self, uses: list, rows: Rows, dtype: torch.dtype, scales: dict,
              rtol: float) -> tuple[torch.Tensor, dict, list]:
        """The step's ``K' = T (sum_p J_p S_p^2 J_p^T) T^T`` in ``dtype``, the route each parameter
        took, and the uses to contract: ``uses`` with a linear map whose per-row gradients were kept
        (:class:`sven_ext.layers.linear.FormedLinearUse`, up to ``KEPT_ROWS_SHARE`` of the row budget)
        in place of its uses.

        ``scales``: ``{id(p): S_p}`` of the parameters with a column scale (the others: ``S_p = I``).
        ``rtol``: the step's cut-off; below ``FLOAT32_GRAM_RTOL`` every product runs in ``dtype``.
        """
        precise = rtol < FLOAT32_GRAM_RTOL
        count = rows.captured.numel()
        gram = torch.zeros(count, count, dtype=dtype, device=self.params[0].device)
        paths = {}
        direct = []
        contracted = []
        kept, keep = 0, int(KEPT_ROWS_SHARE * self.row_budget_bytes)
        for params, group in components(uses):
            scaled = any(id(p) in scales for p in params)
            kind = route(params, group, scaled)
            formed = None
            if kind == "direct":
                g = sum(u.g.to(dtype) for u in group) if len(group) > 1 else group[0].g.to(dtype)
                direct.append(g * scales[id(params[0])].reshape(1, -1).to(dtype) if scaled else g)
                path = "direct"
            elif kind == "linear":
                linear = _merge_linear(group)
                path, formed = _linear_gram(linear, gram, self.row_budget_bytes - kept, precise,
                                            keep - kept if type(linear) is LinearUse else 0)
                if formed is not None:
                    kept += formed.gradients.nbytes
                if isinstance(group[0], SubsetLinearUse):
                    path += " (subset)"
            elif kind == "embedding":
                path = _embedding_gram(_merge_embedding(group), gram)
            elif kind == "tied":
                linear = _merge_linear([u for u in group if isinstance(u, LinearUse)])
                table = _merge_embedding([u for u in group if isinstance(u, EmbeddingUse)])
                path = _tied_gram(linear, table, gram, self.row_budget_bytes - kept, precise)
            else:
                _rows_gram(group, params, gram, self.row_budget_bytes - kept, scales if scaled else None)
                path = "rows"
            paths.update((id(p), path) for p in params)
            contracted.extend(group if formed is None else [formed])
        if direct:
            g = torch.cat(direct, dim=1)
            gram.addmm_(g, g.T)
        return rows.to_rows(rows.to_rows(gram).T), paths, contracted


def _merge_linear(group: list) -> LinearUse:
    """Uses of one weight (a module called twice, tied weights): concatenate along T."""
    if len(group) == 1:
        return group[0]
    samples = max(u.a.shape[0] for u in group)
    a = torch.cat([u.a.expand(samples, *u.a.shape[1:]) for u in group], dim=1)
    d = torch.cat([u.d for u in group], dim=1)
    return dataclasses.replace(group[0], a=a, d=d)  # keeps a subset's indices


def _merge_embedding(group: list) -> EmbeddingUse:
    if len(group) == 1:
        return group[0]
    samples = max(u.indices.shape[0] for u in group)
    indices = torch.cat([u.indices.expand(samples, -1) for u in group], dim=1)
    return EmbeddingUse(group[0].param, indices, torch.cat([u.d for u in group], dim=1))


def _repeat_per_row(x: torch.Tensor, rows: int) -> torch.Tensor:
    """``(S, ...)`` per sample -> ``(R, ...)`` per row (each sample repeated for its ``m`` rows)."""
    m = rows // x.shape[0]
    return x if m == 1 else x.repeat_interleave(m, dim=0)


def _linear_gram(use: LinearUse, gram: torch.Tensor, budget: int, precise: bool,
                 keep: int = 0) -> tuple[str, FormedLinearUse | None]:
    """Adds ``K_w`` of a Linear/conv weight to ``gram``; returns the route taken and, where the
    per-row route formed the weight's gradients in one block of at most ``keep`` bytes, ``use``
    with them kept for its direction.

    The products run in the factors' precision (float32 GEMMs are twice as fast), or with
    ``precise`` in ``gram``'s dtype (see ``FLOAT32_GRAM_RTOL``); the sum over layers in ``gram``'s.
    """
    dtype = gram.dtype
    samples, steps, groups, din = use.a.shape
    rows, dout = use.d.shape[0], use.d.shape[3]
    m = rows // samples
    work = dtype if precise else gemm_dtype(use.a.dtype)
    if steps == 1:
        # K[r, q] = (a_s(r) . a_s(q) + [bias]) * (d_r . d_q), group by group.
        a = use.a.reshape(samples, groups, din).to(work)
        d = use.d.reshape(rows, groups, dout).to(work)
        for g in range(groups):
            aa = (a[:, g] @ a[:, g].T).to(dtype)
            if use.bias is not None:
                aa += 1
            dd = (d[:, g] @ d[:, g].T).to(dtype)
            gram.view(samples, m, samples, m).add_(dd.view(samples, m, samples, m) * aa[:, None, :, None])
        return "gemm", None
    formed = None
    if sequence_route(use, rows) == "seq_gram":
        a = _repeat_per_row(use.a, rows)
        for g in range(groups):
            # seq_gram accumulates the sum over (t, t') in float64 whatever the input precision.
            gram.add_(ops.seq_gram(a[:, :, g].to(work), use.d[:, :, g].to(work)).to(dtype))
        path = "seq_gram"
    else:
        gradients = _weight_rows_gram(use, gram, budget, work, keep)
        if gradients is not None:
            formed = FormedLinearUse(**{f.name: getattr(use, f.name) for f in dataclasses.fields(use)},
                                     gradients=gradients)
        path = "rows"
    if use.bias is not None:
        # The bias's per-row gradients are sum_t d_t: its Gram adds to the weight's, no concatenation.
        bias = use.d.sum(1).reshape(rows, -1).to(dtype)
        gram.addmm_(bias, bias.T)
    return path, formed


def _per_sample_view(d: torch.Tensor, samples: int) -> torch.Tensor:
    """``(R, ...)`` per row -> ``(S, m, ...)``: each sample's rows together."""
    return d.view(samples, d.shape[0] // samples, *d.shape[1:])


def _weight_rows_gram(use: LinearUse, gram: torch.Tensor, budget: int, work: torch.dtype,
                      keep: int = 0) -> torch.Tensor | None:
    """``K += G G^T`` with ``G`` the per-row weight gradients ``sum_t d_t a_t^T``; returns ``G``
    ``(R, groups * dout * din)`` where it was formed in one block of at most ``keep`` bytes.

    ``G`` is formed for every row at once, a block of output units at a time (at most ``budget``
    bytes), so no gradient is formed twice. The products run in ``work`` (see
    :func:`_linear_gram`); blocks are added to ``gram`` in its dtype.
    """
    rows = gram.shape[0]
    samples, _, groups, din = use.a.shape
    dout = use.d.shape[3]
    a = use.a.to(work)
    d = _per_sample_view(use.d, samples)  # (S, m, T, G, dout)
    units = items_within(dout, rows * groups * din * torch.finfo(work).bits // 8, budget)
    for o0 in range(0, dout, units):
        o1 = min(o0 + units, dout)
        block = torch.einsum("stgi,smtgo->smgoi", a, d[..., o0:o1].to(work)).reshape(rows, -1)
        gram.add_((block @ block.T).to(gram.dtype))
        if units == dout and block.nbytes <= keep:
            return block
        del block  # before the next block is formed
    return None


def _embedding_gram(use: EmbeddingUse, gram: torch.Tensor) -> str:
    rows = use.d.shape[0]
    indices = _repeat_per_row(use.indices, rows) if use.indices.shape[0] > 1 else use.indices.expand(rows, -1)
    gram.add_(ops.embedding_gram(indices, use.d.to(gram.dtype)).to(gram.dtype))
    return "embedding_gram"


def _tied_gram(linear: LinearUse, table: EmbeddingUse, gram: torch.Tensor, budget: int, precise: bool) -> str:
    """Adds ``K_w`` of a weight that is both an embedding table and a linear map's (an output head's).

    ``g_r = E_r + L_r``: the table's scatter of ``d^e_r[t]`` into rows ``idx_r[t]`` and the head's
    ``sum_t' d^l_r[t']^T a_r[t']``. Whichever costs less: ``g_r`` formed in blocks of table rows
    (:func:`_tied_rows_gram`), or ``K = K_E + K_L + C + C^T`` with ``K_L`` by ``seq_gram`` and
    the cross term ``C[r, q] = <E_r, L_q> = sum_{t, t'} (d^e_r[t] . a_q[t']) d^l_q[t', idx_r[t]]``
    (:func:`_tied_cross`).
    """
    if tied_route(linear, table, gram.shape[0]) == "rows":
        _tied_rows_gram(linear, table, gram, budget, gram.dtype if precise else gemm_dtype(linear.a.dtype))
        return "rows"
    path = _linear_gram(linear, gram, budget, precise)[0] + " + " + _embedding_gram(table, gram)
    _tied_cross(linear, table, gram, budget)
    return path


def _tied_rows_gram(linear: LinearUse, table: EmbeddingUse, gram: torch.Tensor, budget: int,
                    work: torch.dtype) -> None:
    """``K += G G^T`` with ``G`` the per-row gradients ``E_r + L_r`` of a tied table, formed for every
    row at once in blocks of table rows of at most ``budget`` bytes (in ``work``)."""
    rows = gram.shape[0]
    samples, _, _, dim = linear.a.shape
    vocab = linear.d.shape[3]
    a = linear.a[:, :, 0].to(work)  # (S, T_l, d)
    head = _per_sample_view(linear.d[:, :, 0], samples)  # (S, m, T_l, V)
    indices = rows_of(table.indices, 0, rows, rows)  # (R, T_e): each row's sample's lookups
    row = torch.arange(rows, device=indices.device).unsqueeze(1).expand_as(indices)
    units = items_within(vocab, rows * dim * torch.finfo(work).bits // 8, budget)
    for v0 in range(0, vocab, units):
        v1 = min(v0 + units, vocab)
        block = torch.einsum("sti,smtv->smvi", a, head[..., v0:v1].to(work)).reshape(rows, v1 - v0, dim)
        hit = (indices >= v0) & (indices < v1)
        block.index_put_((row[hit], indices[hit] - v0), table.d[hit].to(work), accumulate=True)
        flat = block.view(rows, -1)
        gram.add_((flat @ flat.T).to(gram.dtype))
        del block, flat  # before the next block is formed


def _tied_cross(linear: LinearUse, table: EmbeddingUse, gram: torch.Tensor, budget: int) -> None:
    """Adds ``C + C^T`` (:func:`_tied_gram`), row by row of ``C`` and in chunks of ``q`` whose
    ``(T_e, T_l)`` blocks fit ``budget`` bytes."""
    dtype, rows = gram.dtype, gram.shape[0]
    a = linear.a[:, :, 0]  # (S_l, T_l, d)
    head = linear.d[:, :, 0]  # (R, T_l, V)
    lookups, indices = table.d, table.indices  # (R, T_e, d), (S_e, T_e)
    steps_e, steps_l = lookups.shape[1], a.shape[1]
    chunk = _rows_within(rows, 3 * steps_e * steps_l, budget)
    cross = torch.empty(rows, rows, dtype=dtype, device=gram.device)
    samples_e = sample_index(0, rows, rows, indices.shape[0], indices.device)
    for r in range(rows):
        idx = indices[samples_e[r]]
        for q0 in range(0, rows, chunk):
            q1 = min(q0 + chunk, rows)
            inner = torch.einsum("td,qsd->qts", lookups[r].to(dtype), rows_of(a, q0, q1, rows).to(dtype))
            picked = head[q0:q1][:, :, idx].to(dtype)  # (q, T_l, T_e): d^l_q[t', idx_r[t]]
            cross[r, q0:q1] = (inner * picked.transpose(1, 2)).sum((1, 2))
    gram.add_(cross).add_(cross.T)


def _rows_within(rows: int, width: int, budget: int) -> int:
    return max(1, min(rows, budget // max(1, 8 * width)))


def _rows_gram(group: list, params: list[torch.Tensor], gram: torch.Tensor, budget: int,
               scales: dict | None = None) -> None:
    """``K += G G^T`` with ``G`` the per-row gradients of ``params`` (sum over ``group``), in row chunks.

    ``scales``: ``{id(p): S_p}``; the columns of ``G`` are scaled by them (``K += G S^2 G^T``;
    a parameter not in it: ``S_p = I``).
    """
    dtype = gram.dtype
    rows = gram.shape[0]
    width = sum(p.numel() for p in params)
    columns = None if scales is None else torch.cat([
        scales[id(p)].reshape(-1).to(dtype) if id(p) in scales else torch.ones(p.numel(), dtype=dtype, device=p.device)
        for p in params
    ])

    def block(start: int, stop: int) -> torch.Tensor:
        g = component_rows(params, group, start, stop, dtype)
        return g if columns is None else g * columns  # out of place: rows() may be a view of the factors

    chunk = _rows_within(rows, width, budget)
    starts = list(range(0, rows, chunk))
    for i, start in enumerate(starts):
        stop = min(start + chunk, rows)
        gi = block(start, stop)
        gram[start:stop, start:stop].addmm_(gi, gi.T)
        for other in starts[i + 1:]:
            end = min(other + chunk, rows)
            cross = gi @ block(other, end).T
            gram[start:stop, other:end] += cross
            gram[other:end, start:stop] += cross.T


def gram_matrix(model: torch.nn.Module, closure, *, params=None, kappa: float = 2.0,
                dtype: torch.dtype = torch.float64, check: bool = True) -> torch.Tensor:
    """The Gram matrix ``K = J J^T`` (the empirical NTK of the residual rows), without forming ``J``.

    Args:
        model: the module the closure runs.
        closure: returns per-sample losses ``(B,)`` or :class:`sven_ext.Residuals`, as for ``Sven.step``.
        params: parameters that span ``J`` (default: every trainable parameter of ``model``).
        kappa: residuals are ``loss ** (kappa / 2)`` for per-sample losses.
        dtype: dtype of ``K`` (float64 by default).
        check: first verify that the captured factors reproduce autograd's ``J^T w`` for random
            ``w`` (one extra backward pass; catches models the factors do not describe).

    Returns:
        ``(R, R)`` symmetric matrix on the parameters' device.
    """
    params = [p for p in (model.parameters() if params is None else params) if p.requires_grad]
    settings = StepSettings(Truncation(None, 0.0), kappa, dtype)
    backend = GramBackend(model, params, FactorChecks(enabled=check))
    return backend.gram(closure, settings)
