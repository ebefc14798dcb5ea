"""Embedding tables: ``nn.Embedding`` (DESIGN.md section 3.2).

Row ``r``'s gradient scatters ``d_r[t]`` into table row ``indices_s(r)[t]``: the factors are
the looked-up indices per sample and the output gradient per row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .common import combine_rows, items_within, rows_of, sample_index


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
        index = sample_index(start, stop, self.d.shape[0], self.indices.shape[0], self.d.device)
        out = torch.zeros(count, *self.param.shape, dtype=dtype, device=self.d.device)
        row = torch.arange(count, device=self.d.device).unsqueeze(1).expand(count, steps)
        out.index_put_((row, self.indices[index]), self.d[start:stop].to(dtype), accumulate=True)
        return out.reshape(count, -1)

    def direction(self, c: torch.Tensor, into: torch.Tensor | None = None) -> list[torch.Tensor]:
        """``J^T c`` in ``c.dtype``; with ``into`` (the table's shape) added into it instead (a tied
        table's other use already wrote it), with no table-sized zeros."""
        dc = combine_rows(self.d, c, self.indices.shape[0])
        out = torch.zeros(self.param.shape, dtype=c.dtype, device=c.device) if into is None else into
        return [out.index_add_(0, self.indices.reshape(-1), dc.reshape(-1, dc.shape[-1]).to(out.dtype))]

    # Sketch products: only the looked-up positions ("pairs" (row, t)) contribute, sorted by index.

    def _pairs(self):
        """``(row, index, position)`` of every pair sorted by table index; position indexes ``d.view(-1, dim)``."""
        rows, steps = self.d.shape[0], self.d.shape[1]
        flat = rows_of(self.indices, 0, rows, rows).reshape(-1)
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
        chunk = items_within(b1 - b0, 2 * dim * cols * (torch.finfo(q.dtype).bits // 8), budget)
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
        chunk = items_within(row.numel(), dim * cols * (torch.finfo(z.dtype).bits // 8), budget)
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
            chunk = items_within(row.numel(), (dim + 2 * cols) * (torch.finfo(dtype).bits // 8), budget)
            for c0 in range(0, row.numel(), chunk):
                c1 = min(c0 + chunk, row.numel())
                values = u[index[c0:c1]] * (d[position[c0:c1]].to(dtype) @ v)
                y.index_add_(0, row[c0:c1], values)
            return y
        tokens, counts = torch.unique_consecutive(index, return_counts=True)
        offsets = [0, *torch.cumsum(counts, 0).tolist()]
        per_token = dim * cols * (torch.finfo(dtype).bits // 8)
        step = items_within(tokens.numel(), per_token, budget)
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


def embedding_rule(call, samples: int) -> list:
    """``nn.Embedding``: the indices are the input."""
    (d,) = call.d
    if d is None:
        return []
    module = call.module
    if module.scale_grad_by_freq:
        raise ValueError(
            f"module {call.name!r}: scale_grad_by_freq=True scales gradients by batch counts, which couples "
            "the samples; the gram backend cannot factor it (use backend='dense')"
        )
    indices = call.sample_input().reshape(samples, -1)
    d = d.reshape(d.shape[0], -1, module.embedding_dim)
    if module.padding_idx is not None:
        pad = (indices == module.padding_idx).repeat_interleave(d.shape[0] // samples, 0)
        d = d.masked_fill(pad.unsqueeze(-1), 0)
    return [EmbeddingUse(call.params[0][1], indices, d)]
