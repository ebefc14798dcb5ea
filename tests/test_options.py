"""The reference's options on every backend: damping, weight decay, RMSProp, momentum, parameter
subsets, diagnostics; each against the dense float64 backend or a hand-written formula."""

import copy

import pytest
import torch

import sven_ext
from sven_ext.testing import mlp, relative_difference, sven_update

F64 = 1e-9
BACKENDS = ["gram", "sketch", "functional"]  # compared with "dense"


def data(batch=9, d_in=3, d_out=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, d_in, generator=g, dtype=torch.float64), torch.randn(batch, d_out, generator=g,
                                                                                   dtype=torch.float64)


def squared_errors(x, y):
    return lambda model: (model(x) - y).square().sum(1)


def residuals(x, y):
    return lambda model: sven_ext.Residuals(model(x) - y)


def jacobian_and_residual(model, x, y):
    """Explicit J (rows x P) and r of signed residuals: the hand-written oracle."""
    params = list(model.parameters())
    r = (model(x) - y).reshape(-1)
    rows = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(r[i], params, retain_graph=True)])
            for i in range(r.numel())]
    return torch.stack(rows), r.detach()


def flat(update):
    return torch.cat([d.reshape(-1) for d in update.values()])


@pytest.mark.parametrize("damping", [1e-3, 0.5])
def test_damping_is_the_tikhonov_step(damping):
    model = mlp((3, 5, 2), seed=1)
    x, y = data(batch=7)
    update, _ = sven_update(model, residuals(x, y), backend="dense", lr=1.0, k=100, rtol=0, atol=0, damping=damping)
    jac, r = jacobian_and_residual(model, x, y)
    expected = -jac.T @ torch.linalg.solve(jac @ jac.T + damping * torch.eye(r.numel(), dtype=r.dtype), r)
    torch.testing.assert_close(flat(update), expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kappa", [1.0, 2.0])
def test_damping_matches_dense(backend, kappa):
    model = mlp((3, 6, 2), seed=2)
    x, y = data()
    kwargs = dict(lr=0.7, k=5, damping=0.05, kappa=kappa, oversampling=20)
    mine, _ = sven_update(model, squared_errors(x, y), backend=backend, **kwargs)
    oracle, _ = sven_update(model, squared_errors(x, y), backend="dense", **kwargs)
    assert relative_difference(mine, oracle) < F64


@pytest.mark.parametrize("backend", ["dense", *BACKENDS])
def test_decoupled_weight_decay(backend):
    model = mlp((3, 6, 2), seed=3)
    x, y = data()
    plain, _ = sven_update(model, squared_errors(x, y), backend=backend, lr=0.3, k=4)
    decayed, _ = sven_update(model, squared_errors(x, y), backend=backend, lr=0.3, k=4, weight_decay=0.1)
    for name, p in model.named_parameters():
        torch.testing.assert_close(decayed[name], plain[name] - 0.3 * 0.1 * p.detach(), rtol=1e-12, atol=1e-14)


def _trajectory(model, backend, batches, **kwargs):
    """The bare steps (no safeguard): the options' arithmetic against the dense backend's or a formula."""
    model = copy.deepcopy(model)
    opt = sven_ext.Sven(model, backend=backend, **{"safeguard": None, **kwargs})
    for x, y in batches:
        opt.step(lambda: squared_errors(x, y)(model))
    return {n: p.detach().clone() for n, p in model.named_parameters()}, opt


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("options", [
    dict(rmsprop="after"), dict(rmsprop="after", momentum=0.9), dict(momentum=0.5), dict(rmsprop="before"),
    dict(rmsprop="before", momentum=0.9),
], ids=["after", "after+momentum", "momentum", "before", "before+momentum"])
def test_rmsprop_and_momentum_match_dense_over_steps(backend, options):
    model = mlp((3, 6, 2), seed=4)
    batches = [data(seed=s) for s in range(3)]
    kwargs = dict(lr=0.05, k=4, oversampling=20, **options)
    mine, _ = _trajectory(model, backend, batches, **kwargs)
    oracle, _ = _trajectory(model, "dense", batches, **kwargs)
    start = dict(model.named_parameters())
    moved = {n: p - start[n].detach() for n, p in mine.items()}
    reference = {n: p - start[n].detach() for n, p in oracle.items()}
    assert relative_difference(moved, reference) < F64


def test_rmsprop_after_and_momentum_by_hand():
    model = mlp((3, 6, 2), seed=5)
    batches = [data(seed=s) for s in range(2)]
    beta, eps, mu, lr = 0.9, 1e-8, 0.8, 0.01
    # Plain directions d1, d2 from the same weights the optimized run sees.
    plain = copy.deepcopy(model)
    opt = sven_ext.Sven(plain, backend="dense", lr=1.0, k=4, safeguard=None)
    start = {n: p.detach().clone() for n, p in plain.named_parameters()}
    x, y = batches[0]
    opt.step(lambda: squared_errors(x, y)(plain))
    d1 = {n: start[n] - p.detach() for n, p in plain.named_parameters()}
    v1 = {n: (1 - beta) * d.square() for n, d in d1.items()}
    step1 = {n: d / (v1[n].sqrt() + eps) for n, d in d1.items()}
    after1 = {n: start[n] - lr * step1[n] for n in start}
    with torch.no_grad():
        for n, p in plain.named_parameters():
            p.copy_(after1[n])
    x, y = batches[1]
    opt.step(lambda: squared_errors(x, y)(plain))
    d2 = {n: after1[n] - p.detach() for n, p in plain.named_parameters()}
    v2 = {n: beta * v1[n] + (1 - beta) * d2[n].square() for n in d2}
    step2 = {n: mu * step1[n] + d2[n] / (v2[n].sqrt() + eps) for n in d2}
    expected = {n: after1[n] - lr * step2[n] for n in d2}
    mine, _ = _trajectory(model, "dense", batches, lr=lr, k=4, rmsprop="after", rmsprop_beta=beta, momentum=mu)
    for n in expected:
        torch.testing.assert_close(mine[n], expected[n], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("backend", ["dense", *BACKENDS])
def test_param_fraction_moves_a_subset_like_params_would(backend):
    model = mlp((3, 7, 7, 2), seed=6)
    x, y = data()
    kwargs = dict(lr=0.5, k=4, oversampling=20, seed=3)
    update, info = sven_update(model, squared_errors(x, y), backend=backend, param_fraction=0.4, **kwargs)
    moved = [n for n, d in update.items() if d.abs().sum() > 0]
    assert 0 < len(moved) < len(update) and info["moved_parameters"] == len(moved)
    total = sum(p.numel() for p in model.parameters())
    assert sum(dict(model.named_parameters())[n].numel() for n in moved) >= 0.4 * total
    oracle, _ = sven_update(model, squared_errors(x, y), backend="dense", params=moved, **kwargs)
    assert relative_difference(update, oracle) < F64


def test_param_fraction_draws_differ_between_steps_and_repeat_per_seed():
    def moved_sets(seed):
        model = mlp((3, 7, 7, 7, 2), seed=7)
        opt = sven_ext.Sven(model, backend="gram", lr=0.1, k=3, param_fraction=0.3, seed=seed)
        sets = []
        for s in range(6):
            x, y = data(seed=s)
            before = [p.detach().clone() for p in model.parameters()]
            opt.step(lambda: squared_errors(x, y)(model))
            sets.append(tuple(i for i, (b, p) in enumerate(zip(before, model.parameters())) if not torch.equal(b, p)))
        return sets

    first = moved_sets(1)
    assert len(set(first)) > 1
    assert moved_sets(1) == first


def test_track_svd_info_predicts_the_loss_change_of_small_steps():
    model = mlp((3, 8, 2), seed=8)
    x, y = data()
    seen = []
    opt = sven_ext.Sven(model, backend="gram", lr=1e-3, k=5, track_svd_info=True, callback=seen.append)
    for _ in range(3):
        opt.step(lambda: residuals(x, y)(model))
    assert len(opt.svd_history) == 3 and len(seen) == 3 and seen[-1] is opt.last_info
    entry = opt.svd_history[-1]
    assert entry["rank"] == 5 and entry["singular_values"].numel() == 18
    assert entry["predicted_loss_change"] < 0
    # First order in lr: the linearised prediction matches the actual change closely.
    assert abs(entry["actual_loss_change"] - entry["predicted_loss_change"]) < 1e-2 * abs(entry["actual_loss_change"])


def test_options_resume_bitwise():
    model = mlp((3, 6, 2), seed=9)
    batches = [data(seed=s) for s in range(4)]
    kwargs = dict(backend="gram", lr=0.05, k=4, rmsprop="before", momentum=0.9, weight_decay=0.01, safeguard=None)
    full, _ = _trajectory(model, batches=batches, **kwargs)
    half_model = copy.deepcopy(model)
    opt = sven_ext.Sven(half_model, **kwargs)
    for x, y in batches[:2]:
        opt.step(lambda: squared_errors(x, y)(half_model))
    saved = copy.deepcopy((half_model.state_dict(), opt.state_dict()))
    fresh = copy.deepcopy(model)
    fresh.load_state_dict(saved[0])
    opt = sven_ext.Sven(fresh, **kwargs)
    opt.load_state_dict(saved[1])
    for x, y in batches[2:]:
        opt.step(lambda: squared_errors(x, y)(fresh))
    assert all(torch.equal(full[n], p) for n, p in fresh.named_parameters())


@pytest.mark.parametrize("kwargs,match", [
    (dict(damping=-1.0), "damping must be a finite number >= 0"),
    (dict(weight_decay=float("nan")), "weight_decay must be a finite number >= 0"),
    (dict(microbatch_size=0), "microbatch_size must be an integer >= 1"),
    (dict(param_fraction=0.0), r"param_fraction must be in \(0, 1\]"),
    (dict(param_fraction=1.5), r"param_fraction must be in \(0, 1\]"),
    (dict(rmsprop="adam"), "rmsprop must be one of"),
    (dict(rmsprop_beta=1.0), r"rmsprop_beta must be in \[0, 1\)"),
    (dict(momentum=-0.1), r"momentum must be in \[0, 1\)"),
    (dict(rmsprop_eps=0.0), "rmsprop_eps must be a positive finite number"),
    (dict(callback=3), "callback must be callable"),
])
def test_bad_option_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sven_ext.Sven(mlp((3, 4, 1)), **kwargs)


@pytest.mark.parametrize("backend", ["dense", *BACKENDS, "auto"])
@pytest.mark.parametrize("m", [None, 2])
def test_fitted_samples_with_kappa_below_2_give_zero_rows(backend, m):
    """l ** (kappa / 2) has an infinite derivative at l = 0: a fitted sample adds nothing, not NaN."""
    model = mlp((3, 6, 2), seed=17)
    x, _ = data(batch=8)
    with torch.no_grad():
        y = model(x).clone()
    y[4:] += torch.linspace(0.5, 1.5, 8, dtype=y.dtype).view(4, 2)  # samples 0-3 have zero loss
    kwargs = dict(lr=0.5, k=3, kappa=1.0, oversampling=20, microbatch_size=m)
    mine, info = sven_update(model, squared_errors(x, y), backend=backend, **kwargs)
    oracle, _ = sven_update(model, squared_errors(x[4:], y[4:]), backend="dense", **kwargs)
    assert relative_difference(mine, oracle) < F64
    assert info["rows"] == (8 if m is None else 4)


def _element_steps(model, steps, **kwargs):
    """Per step: the parameter changes and the subsets the optimizer drew (bare steps, no safeguard)."""
    model = copy.deepcopy(model)
    opt = sven_ext.Sven(model, **{"safeguard": None, **kwargs})
    out = []
    for s in range(steps):
        x, y = data(seed=s)
        params, subsets = opt._subset(opt._trainable(), opt._step_settings(), s)
        before = [p.detach().clone() for p in model.parameters()]
        opt.step(lambda: squared_errors(x, y)(model))
        out.append(([p.detach() - b for p, b in zip(model.parameters(), before)], subsets, opt.last_info))
    return out


@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.6])
def test_element_subsets_move_about_the_fraction_and_nothing_else(fraction):
    model = mlp((3, 12, 20, 2), seed=12)
    params = list(model.parameters())
    for changes, subsets, info in _element_steps(model, 2, backend="gram", lr=0.3, k=4, seed=5,
                                                  param_fraction=fraction, mask_by_block=False):
        total = sum(p.numel() for p in params)
        assert info["moved_parameters"] == len(params)
        assert abs(info["moved_elements"] - fraction * total) <= 0.1 * total
        for p, change, subset in zip(params, changes, subsets):
            mask = subset.mask(p)
            assert torch.all(change[mask == 0] == 0) and change.abs().sum() > 0
            if p.dim() > 1:  # a bias has its weight's share of units (about sqrt(fraction))
                assert abs(subset.numel(p) - fraction * p.numel()) <= max(2, 0.3 * fraction * p.numel()), p.shape
        # A layer's bias moves on its weight's units.
        assert torch.equal(subsets[1].rows, subsets[0].rows) and torch.equal(subsets[3].rows, subsets[2].rows)


def test_element_subsets_differ_between_steps_and_repeat_per_seed():
    model = mlp((3, 7, 7, 2), seed=13)
    kwargs = dict(backend="gram", lr=0.1, k=3, param_fraction=0.3, mask_by_block=False)
    first = _element_steps(model, 3, seed=1, **kwargs)
    again = _element_steps(model, 3, seed=1, **kwargs)
    other = _element_steps(model, 3, seed=2, **kwargs)
    assert all(torch.equal(a, b) for (x, _, _), (y, _, _) in zip(first, again) for a, b in zip(x, y))
    assert not torch.equal(first[0][1][0].rows, first[1][1][0].rows) or \
        not torch.equal(first[0][1][0].cols, first[1][1][0].cols)
    assert not all(torch.equal(a, b) for a, b in zip(first[0][0], other[0][0]))


@pytest.mark.parametrize("backend", ["dense", *BACKENDS])
@pytest.mark.parametrize("options", [dict(), dict(weight_decay=0.1), dict(rmsprop="before", momentum=0.9),
                                     dict(rmsprop="after")], ids=["plain", "decay", "before+momentum", "after"])
def test_element_subsets_match_dense_over_steps(backend, options):
    model = mlp((3, 6, 5, 2), seed=14)
    batches = [data(seed=s) for s in range(3)]
    kwargs = dict(lr=0.05, k=4, oversampling=20, param_fraction=0.4, mask_by_block=False, seed=4, **options)
    mine, _ = _trajectory(model, backend, batches, **kwargs)
    oracle, _ = _trajectory(model, "dense", batches, **kwargs)
    start = dict(model.named_parameters())
    assert relative_difference({n: p - start[n].detach() for n, p in mine.items()},
                               {n: p - start[n].detach() for n, p in oracle.items()}) < F64


def test_element_subsets_decay_only_the_subset():
    model = mlp((3, 6, 2), seed=15)
    kwargs = dict(backend="gram", lr=0.3, k=4, seed=2, param_fraction=0.3, mask_by_block=False)
    (plain, subsets, _), = _element_steps(model, 1, **kwargs)
    (decayed, _, _), = _element_steps(model, 1, weight_decay=0.1, **kwargs)
    for p, a, b, subset in zip(model.parameters(), plain, decayed, subsets):
        torch.testing.assert_close(b, a - 0.3 * 0.1 * p.detach() * subset.mask(p), rtol=1e-12, atol=1e-14)


def test_element_subsets_with_variable_k_equal_dense():
    model = mlp((3, 6, 2), seed=16)
    kwargs = dict(lr=0.5, k=4, seed=2, param_fraction=0.5, mask_by_block=False, variable_k=True, weight_decay=0.05)
    (gram, _, info), = _element_steps(model, 1, backend="gram", **kwargs)
    (dense, _, _), = _element_steps(model, 1, backend="dense", **kwargs)
    assert info["variable_k_rank"] >= 1
    assert relative_difference(dict(enumerate(gram)), dict(enumerate(dense))) < F64


def test_rmsprop_before_by_hand():
    model = mlp((3, 5, 2), seed=10)
    batches = [data(batch=4, seed=s) for s in range(2)]  # 8 rows < 32 parameters: pinv is exact
    beta, eps, lr = 0.9, 1e-8, 0.1
    kwargs = dict(lr=lr, k=100, rtol=0, atol=0, rmsprop="before", rmsprop_beta=beta, safeguard=None)
    mine = copy.deepcopy(model)
    opt = sven_ext.Sven(mine, backend="dense", **kwargs)
    for x, y in batches:
        opt.step(lambda: residuals(x, y)(mine))

    hand = copy.deepcopy(model)
    params = list(hand.parameters())
    square = None
    for x, y in batches:
        jac, r = jacobian_and_residual(hand, x, y)
        scale = torch.ones(jac.shape[1], dtype=jac.dtype) if square is None else (square.sqrt() + eps).rsqrt()
        direction = scale * (torch.linalg.pinv(jac * scale) @ r)
        square = (1 - beta) * direction.square() if square is None else beta * square + (1 - beta) * direction.square()
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(torch.nn.utils.parameters_to_vector(params) - lr * direction, params)
    for p, q in zip(mine.parameters(), hand.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("backend", ["dense", "gram", "sketch"])  # functional: no contraction after a move
def test_variable_k_applies_a_prefix_of_the_components_while_the_loss_falls(backend):
    model = mlp((3, 8, 2), seed=11)
    x, y = data(batch=12)
    kwargs = dict(lr=1.0, k=10, oversampling=20)
    update, info = sven_update(model, residuals(x, y), backend=backend, variable_k=True, **kwargs)
    kept = info["variable_k_rank"]
    assert 0 < kept <= info["rank"]
    # Keeping the first `kept` components is the Sven step with rank cap `kept`.
    oracle, _ = sven_update(model, residuals(x, y), backend="dense", **{**kwargs, "k": kept})
    assert relative_difference(update, oracle) < F64
    moved = copy.deepcopy(model)
    with torch.no_grad():
        for n, p in moved.named_parameters():
            p.add_(update[n])
        assert residuals(x, y)(moved).values.square().sum() < residuals(x, y)(model).values.square().sum()


def test_variable_k_on_the_functional_backend_is_a_clear_error():
    model = mlp((3, 8, 2), seed=11)
    x, y = data(batch=12)
    opt = sven_ext.Sven(model, backend="functional", variable_k=True, k=4, safeguard=None)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="variable_k needs U_k and a contraction from the backend"):
        opt.step(lambda: residuals(x, y)(model))
    assert all(torch.equal(before[n], t) for n, t in model.state_dict().items())


def test_variable_k_does_not_combine_with_rmsprop():
    with pytest.raises(ValueError, match="variable_k .* does not combine with rmsprop or momentum"):
        sven_ext.Sven(mlp((3, 4, 1)), variable_k=True, rmsprop="after")
