"""Helpers every layer family shares: rows, samples and chunking (DESIGN.md section 3).

A step has ``R = B * m`` rows (``m`` outputs per sample; row ``i * m + j`` is output ``j`` of
sample ``i``). Factors keep a layer's input per sample (``S`` leading entries: ``B``, or 1 for a
call recorded whole) and its output gradient ``D`` per row; ``row // m`` is a row's sample.
"""

from __future__ import annotations

import torch


def combine_rows(d: torch.Tensor, c: torch.Tensor, samples: int) -> torch.Tensor:
    """``sum_j c[i*m+j] * d[i*m+j]`` for every sample ``i``: ``(R, ...)`` -> ``(S, ...)`` in ``c.dtype``."""
    rows = d.shape[0]
    m = rows // samples
    if m == 1:  # one row per sample: a broadcast product (einsum's overhead dominates small steps)
        return d.to(c.dtype) * c.view(rows, *([1] * (d.dim() - 1)))
    flat = torch.einsum("smx,sm->sx", d.reshape(samples, m, -1).to(c.dtype), c.view(samples, m))
    return flat.view(samples, *d.shape[1:])


def sample_index(start: int, stop: int, rows: int, samples: int, device) -> torch.Tensor:
    """The sample of each row ``start:stop``."""
    return torch.arange(start, stop, device=device) // (rows // samples)


def items_within(count: int, item_bytes: int, budget: int) -> int:
    """How many items of ``item_bytes`` fit in ``budget`` (at least 1, at most ``count``)."""
    return max(1, min(count, budget // max(1, item_bytes)))


def first_axis(p: torch.Tensor) -> tuple[int, int]:
    """``(rows, rest)`` of ``p`` seen as a matrix over its first axis."""
    rows = p.shape[0] if p.dim() else 1
    return rows, p.numel() // max(rows, 1)


def rows_of(x: torch.Tensor, start: int, stop: int, rows: int) -> torch.Tensor:
    """Rows ``start:stop`` of a per-sample ``(S, ...)`` tensor, one entry per row (a view where each
    row has its own sample, or all share one)."""
    if x.shape[0] == rows:
        return x[start:stop]
    if x.shape[0] == 1:
        return x.expand(stop - start, *x.shape[1:])
    return x[sample_index(start, stop, rows, x.shape[0], x.device)]
