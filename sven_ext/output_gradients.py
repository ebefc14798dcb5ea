"""The capture's backward pass: every recorded call's output gradients per row (``call.d``), or its
uses where its rule forms them inside the pass (DESIGN.md sections 3 and 3.3).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .host_memory import release_freed_memory

if TYPE_CHECKING:
    from .capture import Call

# The pass hands freed host memory back at every this many recorded outputs (about one
# transformer block's worth; each hand-back walks the allocator's free lists).
RELEASE_EVERY_EDGES = 4


def output_gradients(residual_rows, per_sample: list[Call], whole: list[Call], chunk_rows: int,
                     keep_graph: bool, release: bool) -> None:
    """Fills ``call.d``: ``(R, *rest)`` for per-sample calls (``rest``: the output's shape without
    its batch axis), ``(R, *out.shape)`` for whole ones; an eager rule's call gets its uses
    (``call.early_uses``) instead, as soon as the backward pass reaches it. Without ``keep_graph`` the
    last backward pass frees the graph; with ``release`` (:func:`sven_ext.host_memory.releases`) it
    hands freed host memory back as it goes."""
    batch, m = residual_rows.shape
    rows = batch * m
    if per_sample:
        retain = keep_graph or any(e for c in whole for e in c.edges)
        eager = _eager_calls(per_sample) if m == 1 else []
        early = {id(c) for c in eager}  # by identity: calls compare their tensors by value
        kept = [c for c in per_sample if id(c) not in early]
        edges = [e for c in kept for e in c.edges]
        # That pass frees the forward pass's activations as it goes; their pages go back to the
        # system as it reaches the recorded calls, so its new gradients do not grow the process.
        handles = [e.node.register_prehook(_releasing) for e in edges[::RELEASE_EVERY_EDGES]
                   if release and not retain and e.node is not None]
        handles += [c.edges[0].node.register_prehook(_forming(c, batch)) for c in eager]
        try:
            grads = _per_sample_gradients(residual_rows, edges, [axis for c in kept for axis in c.batch_axes],
                                          retain) if edges else []
        finally:
            for handle in handles:
                handle.remove()
        it = iter(grads)
        for call in kept:
            call.d = [next(it) for _ in call.edges]
        for call in eager:
            if call.early_uses is None:  # the rows do not depend on its output
                call.d = [None]
    edges = [e for c in whole for e in c.edges]
    if edges:
        flat = residual_rows.reshape(-1)
        eye = torch.eye(rows, dtype=flat.dtype, device=flat.device)
        parts = []
        for start in range(0, rows, chunk_rows):
            stop = min(start + chunk_rows, rows)
            parts.append(torch.autograd.grad(
                flat, edges, grad_outputs=eye[start:stop], is_grads_batched=True,
                retain_graph=keep_graph or stop < rows, allow_unused=True,
            ))
        grads = [None if part[0] is None else torch.cat(part) for part in zip(*parts)]
        it = iter(grads)
        for call in whole:
            call.d = [next(it) for _ in call.edges]


def _eager_calls(calls: list[Call]) -> list[Call]:
    """The calls whose rule may form its uses inside the backward pass (``rule.eager``: small
    per-row gradients): one output, and below it in the graph another recorded call's output, so
    the pass is sure to run its node (a node runs only on the way to a requested gradient)."""
    candidates = [c for c in calls if getattr(c.rule, "eager", False) and len(c.edges) == 1
                  and c.edges[0].node is not None]
    if not candidates:
        return []
    chosen = {id(c) for c in candidates}
    targets = {e.node for c in calls if id(c) not in chosen for e in c.edges if e.node is not None}
    reaches: dict = {}

    def reach(node) -> bool:
        # Iterative depth-first walk: whether ``node`` leads to a target below it.
        stack = [(node, iter(n for n, _ in node.next_functions if n is not None))]
        reaches[node] = False
        while stack:
            current, children = stack[-1]
            child = next(children, None)
            if child is None:
                stack.pop()
                if stack and reaches[current]:
                    reaches[stack[-1][0]] = True
                continue
            if child in targets or reaches.get(child):
                reaches[current] = True
            elif child not in reaches:
                reaches[child] = False
                stack.append((child, iter(n for n, _ in child.next_functions if n is not None)))
        return reaches[node]

    return [c for c in candidates if reach(c.edges[0].node)]


def _forming(call: Call, samples: int):
    """A node pre-hook that forms ``call``'s uses from its output gradient, then drops the gradient
    and the call's input (kept only for the rule)."""
    def hook(grad_outputs):
        g = grad_outputs[call.edges[0].output_nr]
        call.d = [None if g is None else g.movedim(call.batch_axes[0], 0)]
        call.early_uses = call.rule(call, samples)
        call.d, call.leaves = [], []
    return hook


def _per_sample_gradients(residual_rows, edges: list, axes: list[int], retain: bool) -> list:
    """The rows' gradients at ``edges`` (the samples' axis of each given by ``axes``), rows first:
    one backward pass, batched over the output columns where a sample has several."""
    batch, m = residual_rows.shape
    if m == 1:
        grads = torch.autograd.grad(
            residual_rows[:, 0], edges, grad_outputs=torch.ones_like(residual_rows[:, 0]),
            retain_graph=retain, allow_unused=True,
        )
        return [None if g is None else g.movedim(axis, 0) for g, axis in zip(grads, axes)]
    # One backward pass per output column, batched: (m, B, ...) -> rows i*m+j.
    eye = torch.eye(m, dtype=residual_rows.dtype, device=residual_rows.device)
    grads = torch.autograd.grad(
        residual_rows, edges, grad_outputs=eye.unsqueeze(1).expand(m, batch, m).contiguous(),
        is_grads_batched=True, retain_graph=retain, allow_unused=True,
    )
    return [None if g is None else _rows_first(g.movedim(axis + 1, 0), batch * m) for g, axis in zip(grads, axes)]


def _releasing(grad_outputs) -> None:
    """A node pre-hook that hands freed host memory back (:func:`sven_ext.host_memory.release_freed_memory`)."""
    release_freed_memory()


def _rows_first(g: torch.Tensor, rows: int) -> torch.Tensor:
    """``(B, m, ...)`` -> ``(B * m, ...)``: row ``i * m + j`` is output ``j`` of sample ``i``."""
    return g.reshape(rows, *g.shape[2:])
