"""Grouped convolutions (depthwise ones above all) as materialised per-row gradients
(DESIGN.md section 3.1).

A convolution with ``groups`` groups is ``groups`` small linear maps over the output locations;
as a :class:`~sven_ext.layers.linear.LinearUse` every backend route runs group by group, which
for a depthwise layer (hundreds of groups of a few weights each) is hundreds of tiny products.
Where the per-row gradients ``sum_t d_r[t]^T a_s(r)[t]`` take no more memory than the unfolded
input they are formed from (``m * dout <= T``: at most ``T`` positions per sample, ``m`` rows),
they are formed in one batched contraction and kept as a
:class:`~sven_ext.layers.direct.DirectUse`, whose Gram is one product with every other direct use.
"""

from __future__ import annotations

import torch

from .direct import DirectUse
from .linear import LinearUse, conv_rule


def _per_row(use: LinearUse) -> list:
    samples, steps, groups, din = use.a.shape
    rows, dout = use.d.shape[0], use.d.shape[3]
    m = rows // samples
    d = use.d.view(samples, m, steps, groups, dout)
    weight = torch.einsum("stgi,smtgo->smgoi", use.a, d).reshape(rows, -1)
    uses = [DirectUse(use.param, weight)]
    if use.bias is not None:
        uses.append(DirectUse(use.bias, use.d.sum(1).reshape(rows, -1)))
    return uses


def grouped_conv_rule(call, samples: int) -> list:
    """``nn.Conv1d/2d/3d``: :func:`~sven_ext.layers.linear.conv_rule`, grouped layers as per-row gradients
    where those are no larger than the unfolded input."""
    uses = conv_rule(call, samples)
    out = []
    for use in uses:
        if isinstance(use, LinearUse) and use.a.shape[2] > 1 and \
                (use.d.shape[0] // use.a.shape[0]) * use.d.shape[3] <= use.a.shape[1]:
            out.extend(_per_row(use))
        else:
            out.append(use)
    return out
