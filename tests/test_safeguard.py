"""The safeguard (sven_ext.safeguard): on by default, a step that raises the loss is shortened, the bare
step is one setting away, the state round-trips, and a failing step still changes nothing."""

import copy
import pickle

import pytest
import torch
from torch import nn

import sven_ext
from sven_ext import safeguard
from sven_ext.testing import mlp


def data(batch=12, d_in=3, d_out=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, d_in, generator=g, dtype=torch.float64),
            torch.randn(batch, d_out, generator=g, dtype=torch.float64))


def residuals(model, x, y):
    return sven_ext.Residuals(model(x) - y)


def batch_loss(model, x, y):
    with torch.no_grad():
        return float((model(x) - y).square().sum())


def step(model, lr, backend="gram", **settings):
    """One step on a copy of ``model``: the copy, the optimizer."""
    model = copy.deepcopy(model)
    x, y = data()
    opt = sven_ext.Sven(model, lr=lr, k=6, backend=backend, **settings)
    opt.step(lambda: residuals(model, x, y))
    return model, opt


def same(a, b):
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_the_safeguard_is_on_by_default():
    model = mlp((3, 8, 2), seed=1)
    opt = sven_ext.Sven(model)
    assert opt.defaults["safeguard"] == "backtracking"
    _, opt = step(model, 0.5)
    info = opt.last_info["safeguard"]
    assert info["trials"] >= 1 and 0 < info["scale"] <= 1 and "scale" in opt.state["sven"]


def test_a_step_that_raises_the_loss_is_shortened_to_one_that_lowers_it():
    model = mlp((3, 8, 2), seed=1)
    x, y = data()
    before = batch_loss(model, x, y)
    bare, _ = step(model, 8.0, safeguard=None)
    assert batch_loss(bare, x, y) > before  # the bare step overshoots
    guarded, opt = step(model, 8.0)
    info = opt.last_info["safeguard"]
    assert info["trials"] >= 2 and info["scale"] == 0.5 ** (info["trials"] - 1)
    assert batch_loss(guarded, x, y) == info["loss"] < before
    # The applied step is the bare step at lr * scale (a power of two: both products are exact).
    smaller, _ = step(model, 8.0 * info["scale"], safeguard=None)
    assert same(guarded, smaller)
    # Its decrease is at least ETA of the decrease the linearised model predicts for it.
    assert info["rho"] >= safeguard.ETA
    # The next step starts from twice the accepted scale.
    assert opt.state["sven"]["scale"] == min(1.0, 2 * info["scale"])


def test_an_accepted_full_step_is_the_bare_step_bitwise():
    model = mlp((3, 8, 2), seed=1)
    guarded, opt = step(model, 0.05)
    assert opt.last_info["safeguard"]["trials"] == 1 and opt.last_info["safeguard"]["scale"] == 1.0
    bare, bare_opt = step(model, 0.05, safeguard=None)
    assert same(guarded, bare)
    assert "safeguard" not in bare_opt.last_info and "scale" not in bare_opt.state["sven"]


def test_trial_evaluations_leave_buffers_as_the_steps_own_closure_left_them():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 2)).double()
    guarded, opt = step(model, 8.0, backend="dense")  # batch statistics couple the samples: dense
    assert opt.last_info["safeguard"]["trials"] >= 2  # several trial forward passes ran
    bare, _ = step(model, 8.0 * opt.last_info["safeguard"]["scale"], backend="dense", safeguard=None)
    assert same(guarded, bare)
    assert all(torch.equal(a, b) for a, b in zip(guarded.buffers(), bare.buffers()))


def test_the_state_round_trips_and_resumes_bitwise():
    model = mlp((3, 8, 2), seed=2)
    batches = [data(seed=s) for s in range(4)]

    def run(model, opt, chunk):
        for x, y in chunk:
            opt.step(lambda: residuals(model, x, y))

    full = copy.deepcopy(model)
    opt = sven_ext.Sven(full, lr=8.0, k=6, backend="gram")
    run(full, opt, batches)
    half = copy.deepcopy(model)
    opt = sven_ext.Sven(half, lr=8.0, k=6, backend="gram")
    run(half, opt, batches[:2])
    assert opt.state["sven"]["scale"] < 1  # the carried scale is part of what resumes
    saved = pickle.loads(pickle.dumps((half.state_dict(), opt.state_dict())))
    fresh = copy.deepcopy(model)
    fresh.load_state_dict(saved[0])
    opt = sven_ext.Sven(fresh, lr=8.0, k=6, backend="gram")
    opt.load_state_dict(saved[1])
    run(fresh, opt, batches[2:])
    assert same(fresh, full)


@pytest.mark.parametrize("scale", [0.0, 1.5, float("nan"), 1, "half"])
def test_a_bad_step_scale_is_refused_at_load_and_changes_nothing(scale):
    model = mlp((3, 8, 2), seed=2)
    x, y = data()
    opt = sven_ext.Sven(model, lr=0.5, k=6, backend="gram")
    opt.step(lambda: residuals(model, x, y))
    saved = copy.deepcopy(opt.state_dict())
    saved["state"]["sven"]["scale"] = scale
    state = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match="step scale must be a float in"):
        opt.load_state_dict(saved)
    assert opt.state_dict() == state


def test_a_closure_that_raises_in_a_trial_changes_nothing():
    model = mlp((3, 8, 2), seed=1)
    x, y = data()
    opt = sven_ext.Sven(model, lr=8.0, k=6, backend="gram")
    opt.step(lambda: residuals(model, x, y))
    params = [p.detach().clone() for p in model.parameters()]
    calls = []

    def closure():
        calls.append(1)
        if len(calls) == 3:  # the second trial evaluation
            raise KeyError("trial")
        return residuals(model, x, y)

    opt.state["sven"]["scale"] = 1.0  # so that the first trial overshoots again and a second one runs
    state = copy.deepcopy(opt.state_dict())
    with pytest.raises(KeyError, match="trial"):
        opt.step(closure)
    assert len(calls) == 3
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
    assert opt.state_dict() == state


def test_a_trial_that_is_not_finite_is_rejected():
    model = mlp((3, 8, 2), seed=1)
    x, y = data()
    calls = []

    def closure():
        calls.append(1)
        out = residuals(model, x, y)
        return sven_ext.Residuals(out.values * float("inf")) if len(calls) == 2 else out

    opt = sven_ext.Sven(model, lr=0.05, k=6, backend="gram")
    before = [p.detach().clone() for p in model.parameters()]
    opt.step(closure)
    info = opt.last_info["safeguard"]
    assert info["trials"] == 2 and info["scale"] == 0.5  # the infinite loss counted as no decrease
    assert not all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


@pytest.mark.parametrize("setting", [dict(momentum=0.5), dict(rmsprop="after")])
def test_with_momentum_or_rmsprop_a_step_that_raises_the_loss_is_shortened(setting):
    model = mlp((3, 8, 2), seed=1)
    x, y = data()
    before = batch_loss(model, x, y)
    bare, _ = step(model, 8.0, safeguard=None, **setting)
    assert batch_loss(bare, x, y) > before
    guarded, opt = step(model, 8.0, **setting)
    info = opt.last_info["safeguard"]
    assert info["rho"] is None and info["trials"] >= 2  # no linear model of these steps: the loss decides
    assert batch_loss(guarded, x, y) == info["loss"] < before
    # The state is that of the applied direction, ``scale`` times the bare one (a power of two: exact).
    t = info["scale"]
    shorter, shorter_opt = step(model, 8.0 * t, safeguard=None, **setting)
    key, power = ("momentum_buffer", 1) if "momentum" in setting else ("square_avg", 2)
    for p, q in zip(guarded.parameters(), shorter.parameters()):
        assert torch.equal(opt.state[p][key], shorter_opt.state[q][key] * t ** power)
    if "momentum" in setting:  # the first step's buffer is the direction: the bare step at lr * scale
        assert same(guarded, shorter)


def test_variable_k_runs_without_the_safeguard():
    _, opt = step(mlp((3, 8, 2), seed=1), 8.0, variable_k=True)
    assert "safeguard" not in opt.last_info and "variable_k_rank" in opt.last_info


def test_an_unknown_safeguard_is_named():
    with pytest.raises(ValueError, match="safeguard must be one of"):
        sven_ext.Sven(mlp((3, 4, 1)), safeguard="levenberg")


def test_without_a_linearised_model_a_trial_needs_only_a_lower_loss():
    model = mlp((3, 8, 2), seed=1)
    x, y = data()
    before = batch_loss(model, x, y)
    # Param groups with different lr: the model's prediction (one lr times J delta) does not apply.
    first, *rest = list(model.parameters())
    opt = sven_ext.Sven(model, params=[{"params": [first], "lr": 4.0}, {"params": rest}], lr=8.0, k=6)
    opt.step(lambda: residuals(model, x, y))
    info = opt.last_info["safeguard"]
    assert info["rho"] is None and info["trials"] >= 2  # the loss alone decides
    assert batch_loss(model, x, y) == info["loss"] < before


def test_a_direction_the_model_says_cannot_descend_moves_nothing_at_no_cost():
    linear = safeguard.Linearisation(torch.tensor([1.0, 2.0], dtype=torch.float64),
                                     torch.tensor([0.5, 0.25], dtype=torch.float64), kappa=2.0, group=1)
    assert linear.slope() > 0
    params = [torch.zeros(3)]
    calls = []
    decision = safeguard.search(params, 3.0, linear, 0.5, lambda s: [torch.ones(3) * s],
                                lambda: calls.append(1) or 0.0, lambda: None)
    assert calls == [] and decision.info["trials"] == 0 and decision.info["scale"] == 0.0
    assert decision.scale == 0.5 and torch.equal(decision.candidate[0][0], params[0])


def test_track_svd_info_predicts_the_step_the_safeguard_applied():
    model = mlp((3, 8, 2), seed=1)
    x, y = data()
    opt = sven_ext.Sven(model, lr=8.0, k=6, backend="gram", track_svd_info=True)
    before = batch_loss(model, x, y)
    opt.step(lambda: residuals(model, x, y))
    info, entry = opt.last_info["safeguard"], opt.svd_history[-1]
    assert info["scale"] < 1
    assert entry["actual_loss_change"] == pytest.approx(info["loss"] - before, rel=1e-12)
    # rho is the actual over the predicted change of the scaled step.
    assert entry["actual_loss_change"] / entry["predicted_loss_change"] == pytest.approx(info["rho"], rel=1e-9)
