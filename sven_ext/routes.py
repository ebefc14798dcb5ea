"""Which route each parameter's block of ``K`` takes in the gram backend (DESIGN.md section 2.1),
shared by the backend and the cost model that prices it."""

from __future__ import annotations

from .layers import DirectUse, EmbeddingUse, LinearUse


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
