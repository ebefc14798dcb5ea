"""Normalisation layers: ``nn.LayerNorm``, ``nn.RMSNorm``, ``nn.GroupNorm``, ``nn.BatchNorm*d``
in eval mode, torchvision's channel ``LayerNorm2d`` and the RMS norms of Hugging Face's Llama
family (they normalise in float32 whatever the model's dtype) (DESIGN.md section 3.3).

The affine weight's per-row gradient is ``sum D * xhat`` over everything but the normalised
feature axes, the bias's ``sum D``, with ``xhat`` recomputed from the recorded input: both are
held as :class:`~sven_ext.layers.direct.DirectUse`. BatchNorm with batch statistics couples the
samples and is refused before the step (:func:`sven_ext.capture.capture`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .direct import DirectUse


def _norm(call, samples: int, kind: str) -> list:
    """LayerNorm / RMSNorm / GroupNorm / eval BatchNorm: ``g_w = sum D * xhat``, ``g_b = sum D``."""
    (d,) = call.d
    if d is None:
        return []
    module = call.module
    x = call.sample_input()
    channels = kind in ("group_norm", "batch_norm", "channel_layer_norm")  # normalised over axis 1
    inner = x.reshape(-1, *x.shape[2:]) if call.whole and channels else x
    with torch.no_grad():
        if kind == "layer_norm":
            xhat = F.layer_norm(inner, module.normalized_shape, None, None, module.eps)
        elif kind == "rms_norm":
            xhat = F.rms_norm(inner, module.normalized_shape, None, module.eps)
        elif kind == "hf_rms_norm":
            wide = inner.float()
            xhat = (wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + module.variance_epsilon)).to(inner.dtype)
        elif kind == "channel_layer_norm":
            xhat = F.layer_norm(inner.movedim(1, -1), module.normalized_shape, None, None, module.eps).movedim(-1, 1)
        elif kind == "group_norm":
            xhat = F.group_norm(inner, module.num_groups, None, None, module.eps)
        else:
            xhat = F.batch_norm(inner, module.running_mean, module.running_var, None, None, False, 0.0, module.eps)
    xhat = xhat.reshape(x.shape)
    rows = d.shape[0]
    m = rows // samples
    rest = d.shape[1:]
    if not channels:
        keep = 1 if kind == "hf_rms_norm" else len(module.normalized_shape)
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


def _eager(rule):
    """Marks a rule whose uses are per-row gradients (a few numbers a row): the capture forms them as
    soon as its backward pass reaches the norm's output, and drops that gradient and the norm's
    input there instead of holding them to the end of the pass."""
    rule.eager = True
    return rule


@_eager
def layer_norm_rule(call, samples: int) -> list:
    """``nn.LayerNorm``."""
    return _norm(call, samples, "layer_norm")


@_eager
def rms_norm_rule(call, samples: int) -> list:
    """``nn.RMSNorm``."""
    return _norm(call, samples, "rms_norm")


@_eager
def group_norm_rule(call, samples: int) -> list:
    """``nn.GroupNorm``."""
    return _norm(call, samples, "group_norm")


@_eager
def batch_norm_rule(call, samples: int) -> list:
    """``nn.BatchNorm1d/2d/3d`` with running statistics."""
    return _norm(call, samples, "batch_norm")


@_eager
def channel_layer_norm_rule(call, samples: int) -> list:
    """torchvision's ``LayerNorm2d``: a layer norm over the channels (axis 1) of ``(N, C, H, W)``."""
    return _norm(call, samples, "channel_layer_norm")


@_eager
def hf_rms_norm_rule(call, samples: int) -> list:
    """``weight * x / rms(x)`` over the last axis, computed in float32 (``LlamaRMSNorm`` and its copies)."""
    return _norm(call, samples, "hf_rms_norm")

