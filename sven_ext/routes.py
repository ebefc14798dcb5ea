"""Which route each parameter's block of ``K`` takes in the gram backend (DESIGN.md section 2.1),
shared by the backend and the cost model that prices it; the components (parameters joined by
their uses) and their per-row gradients, shared by the gram and sketch backends."""

from __future__ import annotations

import torch

from .layers import DirectUse, EmbeddingUse, LinearUse

# A seq_gram multiply-add against one of the per-row-gradient route (formed in blocks of output
# units, whose GEMMs reduce over the T positions only and write R x block x din): measured 0.47 to
# 0.87 on the 2-core development machine (d = 768; dout 768 to 32,000; T = 32 to 512).
SEQ_GRAM_COST_FACTOR = 0.7


def components(uses: list):
    """Groups uses by connected parameters: ``[(params, uses)]`` (a use may cover several)."""
    parent = {}

    def root(key):
        while parent.setdefault(key, key) != key:
            key = parent[key]
        return key

    tensors = {}
    for use in uses:
        keys = [id(p) for p in use.params]
        tensors.update(zip(keys, use.params))
        for key in keys[1:]:
            parent[root(key)] = root(keys[0])
        root(keys[0])
    groups: dict = {}
    for use in uses:
        groups.setdefault(root(id(use.params[0])), []).append(use)
    out = []
    for group in groups.values():
        seen = {}
        for use in group:
            for p in use.params:
                seen.setdefault(id(p), p)
        out.append((list(seen.values()), group))
    return out


def component_rows(params: list, group: list, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
    """Per-row gradients of rows ``start:stop`` of a component (what :func:`components` returns),
    ``(stop - start, sum of the parameters' numel)`` in ``dtype``: the parameters' columns side by
    side in the order of ``params``, each use's part added into its parameters' columns."""
    if len(group) == 1:
        return group[0].rows(start, stop, dtype)  # already laid out as params
    offsets, width = {}, 0
    for p in params:
        offsets[id(p)] = width
        width += p.numel()
    out = torch.zeros(stop - start, width, dtype=dtype, device=params[0].device)
    for use in group:
        part, col = use.rows(start, stop, dtype), 0
        for p in use.params:
            at = offsets[id(p)]
            out[:, at:at + p.numel()] += part[:, col:col + p.numel()]
            col += p.numel()
    return out


def mergeable(group: list) -> bool:
    """Uses of one weight (and bias) with one layout: a module called several times."""
    first = group[0]
    return all(
        u.param is first.param and u.bias is first.bias and u.a.shape[2:] == first.a.shape[2:]
        and u.d.shape[2:] == first.d.shape[2:]
        for u in group
    )


def tied(group: list) -> bool:
    """Uses of one weight by embedding lookups and by ungrouped, untransposed linear maps (a tied head)."""
    linear = [u for u in group if isinstance(u, LinearUse)]
    tables = [u for u in group if isinstance(u, EmbeddingUse)]
    return (bool(linear) and bool(tables) and len(linear) + len(tables) == len(group) and mergeable(linear)
            and all(u.bias is None and not u.transposed and u.a.shape[2] == 1 for u in linear))


def route(params: list, group: list, scaled: bool) -> str:
    """The route of a component's ``K`` block: ``"direct"`` (materialised small gradients),
    ``"linear"`` (a Linear/conv weight and bias), ``"embedding"``, ``"tied"`` (an embedding tied
    to a linear map) or ``"rows"`` (per-row gradients in chunks).

    Args:
        params: the component's parameters.
        group: its uses.
        scaled: a column scale applies to one of the parameters (only ``"direct"`` keeps it).
    """
    kinds = {LinearUse if isinstance(u, LinearUse) else type(u) for u in group}
    if len(params) == 1 and kinds == {DirectUse}:
        return "direct"
    if scaled:
        return "rows"
    if kinds == {LinearUse} and mergeable(group):
        return "linear"
    if len(params) == 1 and kinds == {EmbeddingUse}:
        return "embedding"
    if len(params) == 1 and tied(group):
        return "tied"
    return "rows"


def sequence_costs(use: LinearUse, rows: int) -> tuple[float, float]:
    """Multiply-adds of a Linear/conv weight's two routes to ``K_w`` for ``T > 1``: ``ops.seq_gram``
    (``~R^2 T^2 (din + dout)``, weighted by ``SEQ_GRAM_COST_FACTOR``) and per-row gradients formed
    once, a block of output units at a time (``~R T din dout + R^2 din dout``), halved where ``K``
    is symmetric."""
    _, steps, groups, din = use.a.shape
    dout = use.d.shape[3]
    seq = SEQ_GRAM_COST_FACTOR * groups * rows * rows * steps * steps * (din + dout) / 2
    return seq, groups * (rows * steps * din * dout + rows * rows * din * dout / 2)


def sequence_route(use: LinearUse, rows: int) -> str:
    """``"seq_gram"`` or ``"rows"``: the cheaper route of a Linear/conv weight with ``T > 1``."""
    seq, per_row = sequence_costs(use, rows)
    return "seq_gram" if seq <= per_row else "rows"


def tied_cross_cost(linear: LinearUse, table: EmbeddingUse, rows: int) -> float:
    """Multiply-adds of a tied table's cross term ``<E_r, L_q>`` (``R^2 T_e T_l d``), which, like
    seq_gram, reduces ``T_e x T_l`` tiles."""
    return SEQ_GRAM_COST_FACTOR * rows * rows * table.d.shape[1] * linear.a.shape[1] * linear.a.shape[3]


def tied_route(linear: LinearUse, table: EmbeddingUse, rows: int) -> str:
    """``"rows"`` (both uses' per-row gradients formed together in blocks of table rows) or
    ``"seq_gram"`` (the head's seq_gram, the table's embedding_gram and their cross term): the cheaper."""
    seq, per_row = sequence_costs(linear, rows)
    return "rows" if per_row <= seq + tied_cross_cost(linear, table, rows) else "seq_gram"
