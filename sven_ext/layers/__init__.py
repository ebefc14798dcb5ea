"""One rule per layer family: how a module's per-sample gradients factor (DESIGN.md section 3).

A *rule* turns one recorded call of a module (:class:`sven_ext.capture.Call`: its input with
the samples first, the gradient ``d`` of every row with respect to its output, its moving
parameters) into *uses*: factorisations of the per-row gradients ``g_r = d r_r / d theta`` of
those parameters that never form the ``(R, P)`` Jacobian. Every use offers

- ``params``: the parameters it covers;
- ``rows(start, stop, dtype)``: per-row gradients of rows ``start:stop``, ``(stop - start, numel)``;
- ``direction(c)``: ``J^T c`` in the parameters' shapes, for row weights ``c`` ``(R,)``;
- except the fallback's :class:`ModuleUse`, which the sketch backend reaches through ``rows``:
  the sketch products ``pull``, ``push``, ``sketch`` and ``frobenius_sq`` (below);

and the gram backend, the cost model and the data-parallel gather read the factors of the
families that have a faster route than ``rows`` (:class:`LinearUse`, :class:`EmbeddingUse`,
:class:`DirectUse`).

Sketch products. The sketch backend needs three products per parameter ``p`` and range
``lo:hi`` of its first axis (``p`` seen as a ``(p.shape[0], rest)`` matrix, flattened row-major
like ``p``): ``pull`` = ``J_p[:, lo:hi]^T q`` of shape ``(hi - lo, rest, s)``, ``push`` =
``J_p[:, lo:hi] z`` of shape ``(R, s)``, and ``sketch`` = ``J_p Omega_p`` where a use has a
cheaper route than ``push`` of generated tiles (``None`` otherwise). Products run in the dtype
of ``q``/``z`` (``dtype`` for ``sketch``); transients stay near ``budget`` bytes.

Dispatch is by the class whose ``forward`` the module runs (:func:`rule_for`): a subclass
that keeps its parent's forward shares the parent's rule; one with its own forward computes
something else and takes the fallback (:func:`sven_ext.layers.fallback.module_rule`) unless it
is registered itself. Adding a layer family is one module here and one :func:`register` call.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .attention import attention_rule
from .direct import DirectUse
from .embedding import EmbeddingUse, embedding_rule
from .fallback import ModuleUse, module_rule
from .grouped import grouped_conv_rule
from .linear import LinearUse, linear_rule, transposed_linear_rule
from .norm import (batch_norm_rule, channel_layer_norm_rule, group_norm_rule, hf_rms_norm_rule, layer_norm_rule,
                   rms_norm_rule)
from .recurrent import RECURRENT, recurrent_rule

# One factorisation of (part of) some parameters' per-row gradients.
Use = LinearUse | EmbeddingUse | DirectUse | ModuleUse
Rule = Callable[..., list]

_RULES: dict[type, Rule] = {}
# Classes of libraries that may not be installed, by ``module.qualname`` of their class.
_RULES_BY_NAME: dict[str, Rule] = {}


def register(cls: type | str, rule: Rule) -> None:
    """Makes ``rule`` the factorisation of modules whose ``forward`` is ``cls``'s.

    Args:
        cls: the class, or its ``"module.QualifiedName"`` for a class of an optional library.
        rule: ``rule(call, samples) -> list of uses`` (see the module docstring).
    """
    if isinstance(cls, str):
        _RULES_BY_NAME[cls] = rule
    else:
        _RULES[cls] = rule


def rule_for(module: nn.Module) -> Rule:
    """The rule of ``module``: that of the class whose ``forward`` it runs, else the fallback."""
    if "forward" in vars(module):  # a forward patched onto the instance
        return module_rule
    for cls in type(module).__mro__:
        if "forward" in vars(cls):
            rule = _RULES.get(cls)
            if rule is None:
                rule = _RULES_BY_NAME.get(f"{cls.__module__}.{cls.__qualname__}", module_rule)
            return rule
    return module_rule


def factor_bytes(uses: list) -> int:
    """Bytes held by the factors (inputs shared with the autograd graph are counted too)."""
    total = 0
    for use in uses:
        for t in (getattr(use, "a", None), getattr(use, "d", None), getattr(use, "g", None)):
            if isinstance(t, torch.Tensor):
                total += t.untyped_storage().nbytes()
    return total


register(nn.Linear, linear_rule)
register("transformers.pytorch_utils.Conv1D", transposed_linear_rule)
for _conv in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
    register(_conv, grouped_conv_rule)
register(nn.Embedding, embedding_rule)
register(nn.LayerNorm, layer_norm_rule)
register(nn.RMSNorm, rms_norm_rule)
register(nn.GroupNorm, group_norm_rule)
register(nn.modules.batchnorm._BatchNorm, batch_norm_rule)
register(nn.MultiheadAttention, attention_rule)
for _rnn in RECURRENT:
    register(_rnn, recurrent_rule)
register("torchvision.models.convnext.LayerNorm2d", channel_layer_norm_rule)
register("timm.layers.norm.LayerNorm", layer_norm_rule)
register("timm.layers.norm.LayerNorm2d", channel_layer_norm_rule)
register("timm.layers.norm.RmsNorm", rms_norm_rule)
for _family in ("llama.modeling_llama.LlamaRMSNorm", "mistral.modeling_mistral.MistralRMSNorm",
                "mixtral.modeling_mixtral.MixtralRMSNorm", "qwen2.modeling_qwen2.Qwen2RMSNorm",
                "qwen3.modeling_qwen3.Qwen3RMSNorm", "phi3.modeling_phi3.Phi3RMSNorm"):
    register(f"transformers.models.{_family}", hf_rms_norm_rule)

__all__ = ["DirectUse", "EmbeddingUse", "LinearUse", "ModuleUse", "Use", "factor_bytes", "register", "rule_for"]
