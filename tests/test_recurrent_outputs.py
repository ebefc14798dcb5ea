"""Recurrent layers' rule (sven_ext/layers/recurrent.py) where it reads the call's own output sequence:
a model that reads only ``h_n``/``c_n`` (no gradient reaches the sequence), and one that modifies the
sequence in place after the call (the rule must not read the modified values). Both against dense
float64 (1e-9, as tests/test_recurrent_rule.py), with every recurrent parameter factored by the rule.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import sven_ext
from sven_ext.layers import DirectUse, LinearUse, recurrent
from sven_ext.testing import UsesSeen, steps_against_dense

EXACT = 1e-9  # as tests/test_recurrent_rule.py
SETTINGS = dict(lr=0.1, k=8, rtol=1e-3, kappa=2.0, oversampling=10)
FEATURES, HIDDEN = 3, 4


class StateReader(nn.Module):
    """Reads only the last layer's final state (and the cell state where there is one)."""

    def __init__(self, cell, **options):
        super().__init__()
        self.rnn = cell(FEATURES, HIDDEN, batch_first=True, **options)
        self.head = nn.Linear(HIDDEN * (2 if cell is nn.LSTM else 1), 1)

    def forward(self, x):
        _, state = self.rnn(x)
        last = torch.cat([state[0][-1], state[1][-1]], dim=1) if isinstance(state, tuple) else state[-1]
        return self.head(last).squeeze(1)


class SequenceReader(nn.Module):
    """Reads the output sequence, optionally scaling it in place first (autograd allows that for
    float64 layers)."""

    def __init__(self, cell, in_place: bool):
        super().__init__()
        self.rnn = cell(FEATURES, HIDDEN, batch_first=True)
        self.head = nn.Linear(HIDDEN, 1)
        self.in_place = in_place

    def forward(self, x):
        out, _ = self.rnn(x)
        if self.in_place:
            out.mul_(2.0)
        return self.head(out.mean(1)).squeeze(1)


def _steps_against_dense(model, monkeypatch) -> tuple[float, dict]:
    seen = UsesSeen(monkeypatch, model)
    def loss_of(batch, steps, seed):
        x = torch.randn(batch, steps, FEATURES, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        return lambda m: sven_ext.Residuals(torch.tanh(m(x)) - 0.25)

    losses = [loss_of(batch, steps, seed) for seed, (batch, steps) in enumerate(((4, 5), (3, 7)))]
    differences = steps_against_dense(model, losses, backend="gram", **SETTINGS)
    kinds = {n: k for n, k in seen.kinds.items() if n.startswith("rnn.")}
    assert set(kinds) == {f"rnn.{n}" for n, _ in model.rnn.named_parameters()}
    assert all(k <= {LinearUse.__name__, DirectUse.__name__} for k in kinds.values()), kinds
    return max(differences), kinds


@pytest.mark.parametrize("cell", [nn.RNN, nn.GRU, nn.LSTM])
def test_only_the_final_state_is_read(cell, monkeypatch):
    torch.manual_seed(0)
    difference, _ = _steps_against_dense(StateReader(cell, num_layers=2, bidirectional=True).double(), monkeypatch)
    assert difference <= EXACT


# float64 LSTM's output sequence is a view, whose in-place change leaves the recorded call off the
# graph: the capture refuses that for every layer alike, so it is not a case of the rule.
@pytest.mark.parametrize(("cell", "in_place"), [(nn.GRU, False), (nn.GRU, True), (nn.RNN, True), (nn.LSTM, False)])
def test_sequence_read_unless_modified(cell, in_place, monkeypatch):
    """A one-layer call's output sequence is read, not rerun, unless it changed after the call."""
    torch.manual_seed(0)
    fused, reruns = dict(recurrent._FUSED), []

    def counted(mode):
        def run(*args):
            reruns.append(mode)
            return fused[mode](*args)
        return run

    monkeypatch.setattr(recurrent, "_FUSED", {mode: counted(mode) for mode in fused})
    difference, _ = _steps_against_dense(SequenceReader(cell, in_place).double(), monkeypatch)
    assert difference <= EXACT
    assert bool(reruns) == in_place
