"""PolyakSGD against steps computed by hand."""

import math

import pytest
import torch

import sven_ext


def _problem(w=(1.0, 2.0), x=(1.0, 1.0), y=0.0):
    """``L(w) = 0.5 (w . x - y)^2``: at the defaults ``L = 4.5``, ``g = (3, 3)``, ``||g||^2 = 18``."""
    weight = torch.nn.Parameter(torch.tensor(w, dtype=torch.float64))
    inputs = torch.tensor(x, dtype=torch.float64)

    def make_closure(optimizer):
        def closure():
            optimizer.zero_grad()
            loss = 0.5 * (weight @ inputs - y) ** 2
            loss.backward()
            return loss

        return closure

    return weight, make_closure


@pytest.mark.parametrize(
    "lr, f_star, expected",
    [
        (1.0, 0.0, [0.25, 1.25]),  # Polyak step 4.5 / 18 = 0.25, under the cap
        (0.1, 0.0, [0.7, 1.7]),  # capped at 0.1
        (1.0, 0.9, [0.4, 1.4]),  # (4.5 - 0.9) / 18 = 0.2
    ],
    ids=["uncapped", "capped", "f_star"],
)
def test_step_matches_hand_computation(lr, f_star, expected):
    weight, make_closure = _problem()
    optimizer = sven_ext.PolyakSGD([weight], lr=lr, f_star=f_star)
    loss = optimizer.step(make_closure(optimizer))
    assert float(loss.detach()) == pytest.approx(4.5)
    torch.testing.assert_close(weight.detach(), torch.tensor(expected, dtype=torch.float64))
    assert optimizer.last_info["grad_norm_sq"] == pytest.approx(18.0)
    assert optimizer.last_info["step_size"] == pytest.approx((4.5 - f_star) / 18.0)


def test_uncapped_step_reaches_f_star_on_a_linear_model():
    # For a linear model the linearisation is exact in w . x: one step to f_star = 0 fits it.
    weight, make_closure = _problem(w=(0.3, -1.7, 2.2), x=(0.5, 2.0, -1.0), y=1.5)
    optimizer = sven_ext.PolyakSGD([weight], lr=100.0)
    optimizer.step(make_closure(optimizer))
    residual = float(weight.detach() @ torch.tensor([0.5, 2.0, -1.0], dtype=torch.float64) - 1.5)
    # L = 0.5 e^2 and ||g||^2 = e^2 ||x||^2: the step halves the residual (e -> e / 2).
    assert residual == pytest.approx(0.5 * ((0.3 * 0.5 - 1.7 * 2.0 - 2.2) - 1.5))


def test_no_step_at_or_below_f_star_or_with_zero_gradient():
    weight, make_closure = _problem()
    optimizer = sven_ext.PolyakSGD([weight], lr=1.0, f_star=5.0)
    optimizer.step(make_closure(optimizer))
    torch.testing.assert_close(weight.detach(), torch.tensor([1.0, 2.0], dtype=torch.float64))
    assert optimizer.last_info["step_size"] == 0.0

    weight, make_closure = _problem(w=(0.0, 0.0), y=0.0)  # loss 0, gradient 0
    optimizer = sven_ext.PolyakSGD([weight], lr=1.0)
    optimizer.step(make_closure(optimizer))
    assert weight.detach().abs().max() == 0.0


def test_groups_share_the_polyak_step_and_cap_it_separately():
    a = torch.nn.Parameter(torch.tensor([1.0], dtype=torch.float64))
    b = torch.nn.Parameter(torch.tensor([2.0], dtype=torch.float64))
    optimizer = sven_ext.PolyakSGD([{"params": [a]}, {"params": [b], "lr": 0.1}], lr=1.0)

    def closure():
        optimizer.zero_grad()
        loss = 0.5 * (a + b).square().sum()  # L = 4.5, g = (3, 3)
        loss.backward()
        return loss

    optimizer.step(closure)
    assert a.item() == pytest.approx(1.0 - 0.25 * 3.0)
    assert b.item() == pytest.approx(2.0 - 0.1 * 3.0)


def test_scheduler_scales_the_cap_and_state_dict_round_trips():
    weight, make_closure = _problem()
    optimizer = sven_ext.PolyakSGD([weight], lr=0.2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1)
    optimizer.step(make_closure(optimizer))
    scheduler.step()
    torch.testing.assert_close(weight.detach(), torch.tensor([0.7, 1.7], dtype=torch.float64))
    restored = sven_ext.PolyakSGD([torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))], lr=1.0)
    restored.load_state_dict(optimizer.state_dict())
    assert restored.param_groups[0]["lr"] == pytest.approx(0.1)
    assert restored.param_groups[0]["f_star"] == 0.0


def test_nan_loss_gives_no_step():
    weight = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    optimizer = sven_ext.PolyakSGD([weight], lr=1.0)

    def closure():
        optimizer.zero_grad()
        loss = (weight * math.nan).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    torch.testing.assert_close(weight.detach(), torch.tensor([1.0, 2.0]))


@pytest.mark.parametrize("kwargs", [{"lr": 0.0}, {"lr": -1.0}, {"lr": math.inf}, {"f_star": math.nan}],
                         ids=["zero-lr", "negative-lr", "inf-lr", "nan-f_star"])
def test_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        sven_ext.PolyakSGD([torch.nn.Parameter(torch.zeros(1))], **kwargs)


def test_step_needs_a_closure():
    optimizer = sven_ext.PolyakSGD([torch.nn.Parameter(torch.zeros(1))])
    with pytest.raises(ValueError, match="closure"):
        optimizer.step(None)
