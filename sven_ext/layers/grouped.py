"""Grouped convolutions (depthwise ones above all) as materialised per-row gradients
(DESIGN.md section 3.1).

A convolution with ``groups`` groups is ``groups`` small linear maps over the output locations;
as a :class:`~sven_ext.layers.linear.LinearUse` every backend route runs group by group, which
for a depthwise layer (hundreds of groups of a few weights each) is hundreds of tiny products.
Where the per-row gradients ``sum_t d_r[t]^T a_s(r)[t]`` take no more memory than the unfolded
input (``m * dout <= T``: ``m`` rows per sample, ``dout`` outputs per group, ``T`` locations),
they are formed at once and kept as a :class:`~sven_ext.layers.direct.DirectUse`, whose Gram is
one product with every other direct use.

With one input channel per group (depthwise, any channel multiplier) they are one convolution
of the padded input with the output gradients, every (row, channel) pair its own group: the
kernel offset ``k`` of output location ``t`` reads input ``t * stride + k * dilation``, so the
output gradient acts as a kernel dilated by the layer's stride, stepped by its dilation. No
patches are unfolded. Other grouped layers, and depthwise ones with a single output location,
contract their patches in one einsum.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .direct import DirectUse
from .linear import LinearUse, conv_rule

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _uses(call, weight_rows: torch.Tensor, d: torch.Tensor) -> list:
    """Direct uses of the moving weight and bias: ``weight_rows (R, numel)``, ``d (R, C_out, *out)``."""
    owned = dict(call.params)
    uses = []
    if "weight" in owned:
        uses.append(DirectUse(owned["weight"], weight_rows))
    if "bias" in owned:
        uses.append(DirectUse(owned["bias"], d.flatten(2).sum(2)))
    return uses


def _depthwise(call, samples: int) -> list:
    """One input channel per group: the per-row weight gradients by one grouped convolution."""
    module = call.module
    nd = len(module.kernel_size)
    (d,) = call.d
    rows = d.shape[0]
    x = call.sample_input()
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    x = F.pad(x, module._reversed_padding_repeated_twice, mode=mode)
    x = x.repeat_interleave(rows // samples, dim=0) if rows != samples else x
    channels, out_channels = x.shape[1], d.shape[1]
    kernel = d.reshape(rows * out_channels, 1, *d.shape[2:]).to(x.dtype)
    grads = _CONV[nd](x.reshape(1, rows * channels, *x.shape[2:]), kernel, stride=module.dilation,
                      dilation=module.stride, groups=rows * channels)
    # Left-over input beyond the last full stride gives extra offsets past the kernel: dropped.
    grads = grads[(0, slice(None), *(slice(0, k) for k in module.kernel_size))]
    return _uses(call, grads.reshape(rows, -1), d)


def _contracted(use: LinearUse) -> torch.Tensor:
    """Per-row weight gradients from the patches: ``(R, groups * dout * din)``."""
    samples, steps, groups, din = use.a.shape
    rows, dout = use.d.shape[0], use.d.shape[3]
    d = use.d.view(samples, rows // samples, steps, groups, dout)
    return torch.einsum("stgi,smtgo->smgoi", use.a, d).reshape(rows, -1)


def grouped_conv_rule(call, samples: int) -> list:
    """``nn.Conv1d/2d/3d``: :func:`~sven_ext.layers.linear.conv_rule`, grouped layers as per-row
    gradients where those are no larger than the unfolded input."""
    module = call.module
    (d,) = call.d
    if d is None:
        return []
    groups = module.groups
    # Only calls with the samples on the input's first axis and nothing else before the channels.
    plain = not call.whole and call.sample_input().dim() == len(module.kernel_size) + 2
    small = plain and groups > 1 and (d.shape[0] // samples) * (module.out_channels // groups) <= d.shape[2:].numel()
    # One output location: a one-element kernel per group, which oneDNN runs far slower than the
    # patches' einsum (the patches are then no larger than the input).
    if small and module.in_channels == groups and d.shape[2:].numel() > 1:
        return _depthwise(call, samples)
    uses = conv_rule(call, samples)
    if not small:
        return uses
    return [u for use in uses for u in
            (_uses(call, _contracted(use), d.reshape(d.shape[0], module.out_channels, -1))
             if isinstance(use, LinearUse) else [use])]
