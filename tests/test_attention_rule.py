"""``nn.MultiheadAttention``'s own factorisation (sven_ext/layers/attention.py) against dense float64.

Self- and cross-attention, packed and separate projections, both layouts, masks, returned weights,
frozen projections and several rows per sample: every step of a run whose batch and sequence
lengths change equals a fresh dense step (1e-9), passes the factor check (which runs on every new
shape), and takes no parameter through the per-sample fallback.
"""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sven_ext
from sven_ext import factor_check
from sven_ext.layers import DirectUse, LinearUse
from sven_ext.testing import UsesSeen, relative_difference, steps_against_dense, sven_update

# Float64 steps through different factorisations: a few hundred rounded products, amplified by the
# kept spectrum's condition number (rtol 1e-3 caps it at 1e3).
EXACT = 1e-9
SETTINGS = dict(lr=0.1, k=8, rtol=1e-3, kappa=2.0, oversampling=10)
EMBED, HEADS = 8, 2


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class Attender(nn.Module):
    """One ``nn.MultiheadAttention`` between linear maps; inputs always arrive ``(B, T, features)``.

    Args:
        batch_first: the attention's layout (the model transposes for ``False``).
        cross: attend from the query sequence to a separate memory sequence (other length).
        kdim: the memory's features (``!= EMBED``: separate projection weights).
        mask: ``None``, ``"causal"`` (float ``attn_mask``), ``"is_causal"`` or ``"padding"``
            (boolean ``key_padding_mask``, the last memory position of odd samples).
        weights: ``None`` (``need_weights=False``), ``"mean"`` or ``"heads"``: the returned
            attention weights enter the output too.
        rows: outputs per sample (``Residuals`` of shape ``(B, rows)``).
    """

    def __init__(self, batch_first=True, cross=False, kdim=EMBED, mask=None, weights=None, rows=1):
        super().__init__()
        self.batch_first, self.cross, self.mask, self.weights = batch_first, cross, mask, weights
        self.inp = nn.Linear(3, EMBED)
        self.mem = nn.Linear(3, kdim)
        self.attn = nn.MultiheadAttention(EMBED, HEADS, batch_first=batch_first, kdim=kdim, vdim=kdim)
        self.head = nn.Linear(EMBED, rows)

    def forward(self, x, memory):
        q = self.inp(x)
        kv = self.mem(memory) if self.cross else q
        steps, source = q.shape[1], kv.shape[1]
        kwargs = {"need_weights": self.weights is not None, "average_attn_weights": self.weights != "heads"}
        if self.mask in ("causal", "is_causal"):
            kwargs["attn_mask"] = nn.Transformer.generate_square_subsequent_mask(steps, dtype=q.dtype)
            kwargs["is_causal"] = self.mask == "is_causal"
        elif self.mask == "padding":
            pad = torch.zeros(q.shape[0], source, dtype=torch.bool)
            pad[1::2, -1] = True
            kwargs["key_padding_mask"] = pad
        if not self.batch_first:
            q, kv = q.transpose(0, 1), kv.transpose(0, 1)
        out, attn = self.attn(q, kv, kv, **kwargs)
        if not self.batch_first:
            out = out.transpose(0, 1)
        y = torch.tanh(self.head(out).mean(1))
        if attn is not None:
            y = y + attn.pow(2).flatten(1).sum(1, keepdim=True)
        return y


def _batch(batch, steps, source, seed):
    return (torch.randn(batch, steps, 3, generator=_generator(seed), dtype=torch.float64),
            torch.randn(batch, source, 3, generator=_generator(seed + 1), dtype=torch.float64))


def _loss(x, memory):
    return lambda m: sven_ext.Residuals(m(x, memory) - 0.5)


# (B, T, S) per step: a smaller batch, then longer sequences.
SHAPES = ((4, 5, 6), (3, 5, 6), (3, 7, 4))

CASES = {
    "self_batch_first": dict(),
    "self_seq_first": dict(batch_first=False),
    "cross_batch_first": dict(cross=True),
    "cross_seq_first": dict(cross=True, batch_first=False),
    "cross_kdim": dict(cross=True, kdim=5),
    "cross_kdim_seq_first": dict(cross=True, kdim=5, batch_first=False),
    "causal_mask": dict(mask="causal"),
    "is_causal": dict(mask="is_causal", batch_first=False),
    "padding_mask": dict(cross=True, mask="padding"),
    "mean_weights": dict(weights="mean"),
    "head_weights_seq_first": dict(weights="heads", batch_first=False, cross=True),
    "rows_per_sample": dict(rows=3, cross=True),
}


def run_against_dense(model, backend, monkeypatch, shapes=SHAPES):
    """Steps on ``shapes`` against fresh dense steps; returns the relative differences and the checks run."""
    seen = UsesSeen(monkeypatch, model)
    checks = []
    probe = factor_check.probe
    monkeypatch.setattr(factor_check, "probe", lambda *a: (checks.append(1), probe(*a))[1])
    losses = [_loss(*_batch(batch, steps, source, seed)) for seed, (batch, steps, source) in enumerate(shapes)]
    differences = steps_against_dense(model, losses, backend=backend, **SETTINGS)
    return differences, len(checks), seen.kinds


@pytest.mark.parametrize("name", CASES)
def test_gram_steps_equal_dense(name, monkeypatch):
    torch.manual_seed(0)
    model = Attender(**CASES[name]).double()
    differences, checks, kinds = run_against_dense(model, "gram", monkeypatch)
    assert max(differences) <= EXACT, differences
    assert checks == len(SHAPES)  # every step had a new shape, so every step was checked (and passed)
    attention = {n: k for n, k in kinds.items() if n.startswith("attn.")}
    assert set(attention) == {f"attn.{n}" for n, _ in model.attn.named_parameters()}
    assert all(k <= {LinearUse.__name__, DirectUse.__name__} for k in attention.values()), attention


@pytest.mark.parametrize("backend", ["sketch", "auto"])
@pytest.mark.parametrize("name", ["self_seq_first", "cross_kdim"])
def test_other_backends_equal_dense(name, backend, monkeypatch):
    torch.manual_seed(0)
    differences, _, _ = run_against_dense(Attender(**CASES[name]).double(), backend, monkeypatch, SHAPES[:2])
    assert max(differences) <= EXACT, differences


@pytest.mark.parametrize("frozen", ["in_proj_weight", "out_proj.weight", "in_proj_bias"])
def test_frozen_projection(frozen, monkeypatch):
    """A frozen weight leaves its bias a direct use; a frozen bias leaves the weight without one."""
    torch.manual_seed(0)
    model = Attender(cross=True).double()
    model.attn.get_parameter(frozen).requires_grad_(False)
    differences, _, kinds = run_against_dense(model, "gram", monkeypatch, SHAPES[:2])
    assert max(differences) <= EXACT, differences
    assert f"attn.{frozen}" not in kinds


def test_uncovered_calls_take_the_fallback_exactly(monkeypatch):
    """``add_bias_kv`` is outside the rule: the fallback differentiates the module, still exactly."""
    torch.manual_seed(0)
    model = Attender().double()
    model.attn = nn.MultiheadAttention(EMBED, HEADS, batch_first=True, add_bias_kv=True).double()
    differences, _, kinds = run_against_dense(model, "gram", monkeypatch, SHAPES[:1])
    assert max(differences) <= EXACT, differences
    assert kinds["attn.bias_k"] == {"ModuleUse"}


def test_transformer_encoder_float32_matches_float64_dense():
    """``nn.TransformerEncoderLayer`` in float32: the rerun's float32 rounding only."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(EMBED, HEADS, 16, dropout=0.0, batch_first=True)
    model = nn.Sequential(nn.TransformerEncoder(layer, 1, enable_nested_tensor=False), nn.Flatten(), nn.Linear(40, 1))
    x = torch.randn(4, 5, EMBED, generator=_generator(0))

    def loss(m):
        return F.softplus(m(x.to(m[2].weight.dtype))).squeeze(1)


    update, _ = sven_update(model, loss, backend="gram", **SETTINGS)
    expected, _ = sven_update(model, loss, backend="dense", dtype=torch.float64, **SETTINGS)
    assert relative_difference(update, expected) < 1e-4  # float32 rounding, as tests/test_model_zoo
