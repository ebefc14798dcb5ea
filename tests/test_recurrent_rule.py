"""Recurrent layers' own factorisation (sven_ext/layers/recurrent.py) against dense float64.

``nn.RNN`` (tanh and relu), ``nn.GRU`` and ``nn.LSTM``; one or two layers, one or two directions,
both layouts, given or zero initial states, outputs read from the sequence and from ``h_n``/``c_n``,
frozen weights and several rows per sample: every step of a run whose batch and sequence length
change equals a fresh dense step (1e-9), passes the factor check (it runs on every new shape), and
takes no parameter through the per-sample fallback.
"""

from __future__ import annotations


import pytest
import torch
from torch import nn

import sven_ext
from sven_ext import factor_check
from sven_ext.layers import DirectUse, LinearUse
from sven_ext.testing import UsesSeen, relative_difference, steps_against_dense, sven_update

# Float64 steps through different factorisations: a few hundred rounded products, amplified by the
# kept spectrum's condition number (rtol 1e-3 caps it at 1e3).
EXACT = 1e-9
SETTINGS = dict(lr=0.1, k=8, rtol=1e-3, kappa=2.0, oversampling=10)
FEATURES, HIDDEN = 3, 4


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class Reader(nn.Module):
    """A recurrent layer between linear maps; inputs always arrive ``(B, T, FEATURES)``.

    Args:
        cell: ``nn.RNN``, ``nn.GRU`` or ``nn.LSTM``.
        initial: pass initial states computed from the input (else zeros).
        rows: outputs per sample (``Residuals`` of shape ``(B, rows)``).
        options: for the layer (``num_layers``, ``bidirectional``, ``batch_first``, ``nonlinearity``).
    """

    def __init__(self, cell, initial=False, rows=1, **options):
        super().__init__()
        self.batch_first = options.setdefault("batch_first", True)
        self.initial = initial
        self.rnn = cell(FEATURES, HIDDEN, **options)
        self.states = self.rnn.num_layers * (2 if self.rnn.bidirectional else 1)
        self.start = nn.Linear(FEATURES, self.states * HIDDEN)
        self.head = nn.Linear(HIDDEN * (2 if self.rnn.bidirectional else 1) + HIDDEN, rows)

    def forward(self, x):
        seq = x if self.batch_first else x.transpose(0, 1)
        args = ()
        if self.initial:
            h0 = self.start(x[:, 0]).view(x.shape[0], self.states, HIDDEN).transpose(0, 1).contiguous()
            args = ((h0, torch.tanh(h0)),) if isinstance(self.rnn, nn.LSTM) else (h0,)
        out, state = self.rnn(seq, *args)
        out = out if self.batch_first else out.transpose(0, 1)
        h_n = state[1] if isinstance(self.rnn, nn.LSTM) else state  # the cell state where there is one
        return self.head(torch.cat([out.mean(1), h_n[-1]], dim=1))


def _loss(batch, steps, seed):
    x = torch.randn(batch, steps, FEATURES, generator=_generator(seed), dtype=torch.float64)
    return lambda m: sven_ext.Residuals(torch.tanh(m(x)) - 0.25)


SHAPES = ((4, 5), (3, 5), (3, 7))  # a smaller batch, then a longer sequence

CASES = {
    "rnn_tanh": (nn.RNN, dict()),
    "rnn_relu_seq_first": (nn.RNN, dict(nonlinearity="relu", batch_first=False)),
    "gru": (nn.GRU, dict()),
    "gru_two_layers_bidirectional_seq_first": (nn.GRU, dict(num_layers=2, bidirectional=True, batch_first=False)),
    "gru_initial_state": (nn.GRU, dict(initial=True)),
    "lstm": (nn.LSTM, dict()),
    "lstm_seq_first": (nn.LSTM, dict(batch_first=False)),
    "lstm_two_layers_bidirectional_initial": (nn.LSTM, dict(num_layers=2, bidirectional=True, initial=True)),
    "lstm_rows_per_sample": (nn.LSTM, dict(rows=3, num_layers=2)),
    "gru_no_bias_rows_per_sample": (nn.GRU, dict(rows=2, bias=False, batch_first=False)),
}


def run_against_dense(model, backend, monkeypatch, shapes=SHAPES):
    """Steps on ``shapes`` against fresh dense steps; returns the relative differences, the checks run
    and the kinds of use per parameter."""
    seen = UsesSeen(monkeypatch, model)
    checks = []
    probe = factor_check.probe
    monkeypatch.setattr(factor_check, "probe", lambda *a: (checks.append(1), probe(*a))[1])
    losses = [_loss(batch, steps, seed) for seed, (batch, steps) in enumerate(shapes)]
    return steps_against_dense(model, losses, backend=backend, **SETTINGS), len(checks), seen.kinds


def _model(name):
    torch.manual_seed(0)
    cell, options = CASES[name]
    return Reader(cell, **options).double()


@pytest.mark.parametrize("name", CASES)
def test_gram_steps_equal_dense(name, monkeypatch):
    model = _model(name)
    differences, checks, kinds = run_against_dense(model, "gram", monkeypatch)
    assert max(differences) <= EXACT, differences
    assert checks == len(SHAPES)  # every step had a new shape, so every step was checked (and passed)
    recurrent = {n: k for n, k in kinds.items() if n.startswith("rnn.")}
    assert set(recurrent) == {f"rnn.{n}" for n, _ in model.rnn.named_parameters()}
    assert all(k <= {LinearUse.__name__, DirectUse.__name__} for k in recurrent.values()), recurrent


@pytest.mark.parametrize("backend", ["sketch", "auto"])
@pytest.mark.parametrize("name", ["gru_two_layers_bidirectional_seq_first", "lstm_rows_per_sample"])
def test_other_backends_equal_dense(name, backend, monkeypatch):
    differences, _, _ = run_against_dense(_model(name), backend, monkeypatch, SHAPES[:2])
    assert max(differences) <= EXACT, differences


@pytest.mark.parametrize("frozen", ["weight_ih_l0", "bias_hh_l0", "weight_hh_l0_reverse"])
def test_frozen_weights(frozen, monkeypatch):
    """A frozen weight leaves its bias a direct use; frozen parameters get no use."""
    model = _model("lstm_two_layers_bidirectional_initial")
    model.rnn.get_parameter(frozen).requires_grad_(False)
    differences, _, kinds = run_against_dense(model, "gram", monkeypatch, SHAPES[:2])
    assert max(differences) <= EXACT, differences
    assert f"rnn.{frozen}" not in kinds


def test_projected_lstm_takes_the_fallback_exactly(monkeypatch):
    """``proj_size`` is outside the rule: the fallback differentiates the layer, still exactly."""
    torch.manual_seed(0)
    model = Reader(nn.LSTM).double()
    model.rnn = nn.LSTM(FEATURES, HIDDEN * 2, proj_size=HIDDEN, batch_first=True).double()
    model.head = nn.Linear(HIDDEN + HIDDEN * 2, 1).double()  # the cell state keeps the wider size
    differences, _, kinds = run_against_dense(model, "gram", monkeypatch, SHAPES[:1])
    assert max(differences) <= EXACT, differences
    assert kinds["rnn.weight_hr_l0"] == {"ModuleUse"}


@pytest.mark.parametrize("cell", [nn.GRU, nn.LSTM])
def test_float32_matches_float64_dense(cell):
    """Float32 layers (oneDNN's kernels in the forward pass): the rerun's float32 rounding only."""
    torch.manual_seed(0)
    model = Reader(cell, num_layers=2)
    x = torch.randn(4, 6, FEATURES, generator=_generator(0))

    def loss(m):
        return nn.functional.softplus(m(x.to(m.head.weight.dtype))).squeeze(1)

    update, _ = sven_update(model, loss, backend="gram", **SETTINGS)
    expected, _ = sven_update(model, loss, backend="dense", dtype=torch.float64, **SETTINGS)
    assert relative_difference(update, expected) < 1e-4  # float32 rounding, as tests/test_model_zoo
