"""Per-row weight gradients formed for the Gram and kept for the direction (DESIGN.md section 2.1).

A linear map on the per-row route forms its rows' gradients for ``K`` in one block where they fit;
while they fit ``KEPT_ROWS_SHARE`` of the row budget they are kept and give the direction
(:class:`sven_ext.layers.linear.FormedLinearUse`) instead of a contraction of the factors. Each
case below is checked three ways in float64: the step with the kept gradients, the step with none
kept, and the dense step.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import sven_ext
from sven_ext import routes
from sven_ext.backends import gram as gram_module
from sven_ext.backends.base import StepSettings
from sven_ext.backends.gram import GramBackend
from sven_ext.factor_check import FactorChecks
from sven_ext.layers.linear import FormedLinearUse, LinearUse
from sven_ext.linalg import Truncation
from sven_ext.testing import relative_difference, sven_update

# Float64 steps through different factorisations: a few hundred rounded products, amplified by the
# kept spectrum's condition number (rtol 1e-3 caps it at 1e3).
EXACT = 1e-9
SETTINGS = {"lr": 0.1, "k": 6, "rtol": 1e-3}


class Sequence(nn.Module):
    """Linear maps over a sequence: one called twice, then a head with ``rows`` outputs per sample."""

    def __init__(self, rows: int = 1):
        super().__init__()
        self.inner = nn.Linear(3, 5)
        self.mix = nn.Linear(5, 5, bias=False)
        self.head = nn.Linear(5, rows)

    def forward(self, x):
        h = torch.tanh(self.inner(x))
        h = torch.tanh(self.mix(torch.tanh(self.mix(h))))
        return self.head(h).sum(1)


class Convolutions(nn.Module):
    """A convolution and a grouped one with more outputs per group than output locations (a grouped
    :class:`LinearUse`), over a 1-D signal."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(2, 4, 3)
        self.grouped = nn.Conv1d(4, 8, 3, groups=2)
        self.head = nn.Linear(16, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.grouped(torch.tanh(self.conv(x)))).flatten(1))


class Transposed(nn.Module):
    """Hugging Face's ``Conv1D`` (a weight stored ``(din, dout)``) over a sequence."""

    def __init__(self):
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.proj = Conv1D(6, 3)
        self.head = nn.Linear(6, 1)

    def forward(self, x):
        return self.head(torch.tanh(self.proj(x))).sum(1)


def _case(name: str):
    """``(model, loss, the names of the weights whose gradients are kept)``, float64."""
    g = torch.Generator().manual_seed(5)
    sequence = ["inner.weight", "mix.weight", "head.weight"]
    if name == "sequence":
        model, x, kept = Sequence(), torch.randn(6, 4, 3, generator=g), sequence
    elif name == "sequence_rows_per_sample":
        model, x, kept = Sequence(rows=3), torch.randn(4, 4, 3, generator=g), sequence
    elif name == "convolutions":
        model, x, kept = Convolutions(), torch.randn(5, 2, 6, generator=g), ["conv.weight", "grouped.weight"]
    else:
        pytest.importorskip("transformers")
        model, x, kept = Transposed(), torch.randn(5, 4, 3, generator=g), ["proj.weight", "head.weight"]
    model = model.double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.7)
    x = x.double()
    if name == "sequence_rows_per_sample":
        return model, lambda m: sven_ext.Residuals(torch.tanh(m(x)) - 0.3), kept
    return model, lambda m: (torch.tanh(m(x)) - 0.3).square().sum(1), kept


@pytest.fixture
def formed(monkeypatch):
    """Sends every sequence map to the per-row route and records the weights whose direction came
    from kept gradients."""
    monkeypatch.setattr(routes, "SEQ_GRAM_COST_FACTOR", float("inf"))
    seen = []
    direction = FormedLinearUse.direction

    def recording(self, c):
        seen.append(self.param)
        return direction(self, c)

    monkeypatch.setattr(FormedLinearUse, "direction", recording)
    return seen


@pytest.mark.parametrize("name", ["sequence", "sequence_rows_per_sample", "convolutions", "transposed"])
def test_kept_gradients_give_the_dense_step(monkeypatch, formed, name):
    model, loss, kept = _case(name)
    dense, _ = sven_update(model, loss, backend="dense", **SETTINGS)
    step, info = sven_update(model, loss, backend="gram", **SETTINGS)
    assert len(formed) == len(kept)
    assert all(info["paths"][n] == "rows" for n in kept)
    assert relative_difference(step, dense) < EXACT
    monkeypatch.setattr(gram_module, "KEPT_ROWS_SHARE", 0.0)  # the factors' contraction instead
    formed.clear()
    contracted, _ = sven_update(model, loss, backend="gram", **SETTINGS)
    assert not formed
    assert relative_difference(contracted, dense) < EXACT
    assert relative_difference(step, contracted) < EXACT


def _uses(model, loss, budget: int):
    """The uses a gram step of ``model`` contracts, with a row budget of ``budget`` bytes."""
    backend = GramBackend(model, list(model.parameters()), FactorChecks(enabled=False))
    backend.row_budget_bytes = budget
    settings = StepSettings(Truncation(None, 1e-3), 2.0, torch.float64)
    rows, uses, _ = backend.factors(lambda: loss(model), settings)
    _, _, contracted = backend._gram(uses, rows, torch.float64, {}, 1e-3)
    return contracted


def test_kept_gradients_stay_within_their_share_of_the_budget(monkeypatch, formed):
    model, loss, _ = _case("sequence")
    # Per-row gradients in float64, 6 rows, formed in this order: inner 6 * 5 * 3 * 8 = 720 bytes, mix
    # 6 * 5 * 5 * 8 = 1,200, head 6 * 1 * 5 * 8 = 240; kept while they fit a quarter of the budget.
    monkeypatch.setattr(gram_module, "KEPT_ROWS_SHARE", 0.25)
    for budget, expected in ((4 * 2160, {"inner.weight", "mix.weight", "head.weight"}),
                             (4 * 1920, {"inner.weight", "mix.weight"}), (4 * 1200, {"inner.weight", "head.weight"}),
                             (4 * 719, {"head.weight"}), (4 * 239, set())):
        contracted = _uses(model, loss, budget)
        names = {id(p): n for n, p in model.named_parameters()}
        kept = {names[id(u.param)] for u in contracted if isinstance(u, FormedLinearUse)}
        assert kept == expected, budget
        assert sum(u.gradients.nbytes for u in contracted if isinstance(u, FormedLinearUse)) \
            <= gram_module.KEPT_ROWS_SHARE * budget
        # Every other use is contracted as captured; the map called twice is one use once kept.
        assert sum(isinstance(u, LinearUse) and names[id(u.param)] == "mix.weight" for u in contracted) == \
            (1 if "mix.weight" in expected else 2)


def test_formed_direction_is_the_sum_of_the_rows_gradients():
    """Against the use's own per-row gradients, weighted: grouped, transposed, with a bias."""
    g = torch.Generator().manual_seed(2)
    rows, samples, steps = 6, 3, 4
    for groups, din, dout, transposed in ((1, 3, 5, False), (2, 3, 4, False), (1, 4, 2, True)):
        weight = torch.zeros((din, dout) if transposed else (groups * dout, din), dtype=torch.float64)
        bias = torch.zeros(groups * dout, dtype=torch.float64)
        a = torch.randn(samples, steps, groups, din, generator=g, dtype=torch.float64)
        d = torch.randn(rows, steps, groups, dout, generator=g, dtype=torch.float64)
        use = LinearUse(weight, a, d, bias, transposed)
        per_row = use.rows(0, rows, torch.float64)
        c = torch.randn(rows, generator=g, dtype=torch.float64)
        gradients = torch.einsum("stgi,smtgo->smgoi", a, d.view(samples, 2, steps, groups, dout)).reshape(rows, -1)
        formed = FormedLinearUse(weight, a, d, bias, transposed, gradients=gradients)
        expected = c @ per_row
        got = torch.cat([part.reshape(-1) for part in formed.direction(c)])
        assert float((got - expected).norm() / expected.norm()) < 1e-14
        assert [part.shape for part in formed.direction(c)] == [weight.shape, bias.shape]
