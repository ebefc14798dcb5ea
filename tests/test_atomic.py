"""Atomic steps on every path: a step either applies a finite update or raises with nothing changed.

Each failure case asserts the error and that parameters, buffers and optimizer state are bitwise
as they were; each success case asserts the update.
"""

import copy
import math
import pickle
import warnings

import pytest
import torch
import torch.distributed as dist
from torch import nn

import sven_ext
from sven_ext import linalg
from sven_ext.backends.factored import Contraction
from sven_ext.testing import Counter, mlp, relative_difference, sven_update

BACKENDS = ["dense", "gram", "sketch", "auto"]
F32 = 1e-4  # float32 gram vs float64 dense of the same weights (as in test_gram_backend.py)


def data(batch=12, d_in=3, d_out=1, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, d_in, generator=g, dtype=dtype), torch.randn(batch, d_out, generator=g, dtype=dtype)


def squared_errors(model, x, y):
    dtype = next(model.parameters()).dtype
    losses = (model(x.to(dtype)) - y.to(dtype)).square().sum(1)
    return losses.float() if dtype == torch.float16 else losses  # half models: float32 rows


class Snapshot:
    """Parameters, buffers (and which tensor each is) and the optimizer's state, to compare bitwise."""

    def __init__(self, model, opt):
        self.model, self.opt = model, opt
        self.tensors = copy.deepcopy(model.state_dict())
        self.buffers = dict(model.named_buffers())
        self.state = copy.deepcopy(opt.state_dict())

    def assert_unchanged(self, skip=()):
        for name, t in self.model.state_dict().items():
            if name not in skip:
                assert torch.equal(t, self.tensors[name]), name
        assert all(b is self.model.get_buffer(name) for name, b in self.buffers.items())
        after = self.opt.state_dict()
        assert after["param_groups"] == self.state["param_groups"]
        assert after["state"].keys() == self.state["state"].keys()
        for key, entry in self.state["state"].items():
            assert after["state"][key].keys() == entry.keys(), key
            for name, value in entry.items():
                mine = after["state"][key][name]
                assert torch.equal(mine, value) if isinstance(value, torch.Tensor) else mine == value, (key, name)


def _injected_directions(value):
    """A replacement of ``Contraction._directions`` whose step direction is ``value`` everywhere (the
    factor check, which compares through its own pulls, still sees the real one)."""

    def directions(self, uses, c, release=False):
        return [torch.full_like(p, value) for p in self.params]

    return directions


# ----------------------------------------------------------------------------- after the commit


def test_a_raising_callback_comes_after_the_applied_step():
    x, y = data()
    reference, model = mlp((3, 4, 1)), mlp((3, 4, 1))
    sven_ext.Sven(reference, backend="gram", k=3).step(lambda: squared_errors(reference, x, y))

    def callback(info):
        raise KeyError("callback")

    opt = sven_ext.Sven(model, backend="gram", k=3, callback=callback)
    with pytest.raises(KeyError, match="callback"):
        opt.step(lambda: squared_errors(model, x, y))
    # Documented: callbacks run after the commit and cannot undo it.
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), reference.parameters()))
    assert opt.state["sven"]["step"] == 1 and opt.last_info["rank"] > 0


def test_a_raising_track_svd_info_forward_comes_after_the_applied_step():
    x, y = data()
    reference, model = mlp((3, 4, 1)), mlp((3, 4, 1))
    # No safeguard: its trial evaluation would be the closure's second call.
    sven_ext.Sven(reference, backend="gram", k=3, safeguard=None).step(lambda: squared_errors(reference, x, y))
    calls = []

    def closure():
        calls.append(1)
        if len(calls) == 2:  # the extra forward pass of track_svd_info
            raise KeyError("second forward")
        return squared_errors(model, x, y)

    opt = sven_ext.Sven(model, backend="gram", k=3, track_svd_info=True, safeguard=None)
    with pytest.raises(KeyError, match="second forward"):
        opt.step(closure)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), reference.parameters()))
    assert opt.state["sven"]["step"] == 1 and opt.svd_history == []


def test_a_warning_turned_into_an_error_changes_nothing():
    model = mlp((3, 4, 1))
    x, y = data()
    opt = sven_ext.Sven(model, backend="gram", atol=1e30)
    snapshot = Snapshot(model, opt)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        with pytest.raises(RuntimeWarning, match="zero update"):
            opt.step(lambda: squared_errors(model, x, y))
    snapshot.assert_unchanged()


# ----------------------------------------------------------------------------- what the closure may do


@pytest.mark.parametrize("backend", [*BACKENDS, "functional"])
def test_a_closure_that_calls_backward_is_a_clear_error(backend):
    model = Counter()
    x, y = data()
    opt = sven_ext.Sven(model, backend=backend, k=3)
    opt.step(lambda: squared_errors(model, x, y))
    snapshot = Snapshot(model, opt)

    def closure():
        losses = squared_errors(model, x, y)
        losses.sum().backward()
        return losses

    with pytest.raises(ValueError, match=r"the closure called backward\(\): it must only run the forward pass"):
        opt.step(closure)
    snapshot.assert_unchanged()
    opt.step(lambda: squared_errors(model, x, y))  # and the optimizer still works


def test_a_closure_that_zeroes_the_gradients_is_fine():
    model = mlp((3, 4, 1))
    x, y = data()
    squared_errors(model, x, y).sum().backward()  # gradients exist, as after another optimizer's steps
    opt = sven_ext.Sven(model, backend="gram")

    def closure():
        model.zero_grad(set_to_none=False)
        return squared_errors(model, x, y)

    before = [p.detach().clone() for p in model.parameters()]
    opt.step(closure)
    assert all(not torch.equal(p, q) for p, q in zip(model.parameters(), before))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("raises", [False, True])
def test_a_closure_that_edits_a_parameter_is_a_clear_error(backend, raises):
    model = Counter()
    x, y = data()
    opt = sven_ext.Sven(model, backend=backend, k=3)
    opt.step(lambda: squared_errors(model, x, y))
    snapshot = Snapshot(model, opt)

    def closure():
        losses = squared_errors(model, x, y)
        with torch.no_grad():
            model.lin.bias.add_(1.0)
        if raises:
            raise KeyError("closure")
        return losses

    with pytest.raises(ValueError, match=r"the closure modified parameter\(s\) \['lin.bias'\] in place") as error:
        opt.step(closure)
    assert isinstance(error.value.__cause__, KeyError) == raises
    # Sven added nothing to the closure's own write, restored the buffers and kept its state.
    assert torch.equal(model.lin.bias, snapshot.tensors["lin.bias"] + 1.0)
    snapshot.assert_unchanged(skip={"lin.bias"})


# ----------------------------------------------------------------------------- parameters Sven cannot write


def test_parameters_that_share_memory_are_refused_when_added():
    model = nn.Linear(3, 4).double()
    model.bias = nn.Parameter(torch.zeros(1, dtype=torch.float64).expand(4))  # stride 0
    with pytest.raises(ValueError, match=r"parameter 'bias' \(shape \(4,\), strides \(0,\)\) has elements that "
                                         r"share memory"):
        sven_ext.Sven(model)
    model.bias.requires_grad_(False)
    opt = sven_ext.Sven(model, backend="gram")  # frozen, it is never written
    x, y = data(d_out=4)
    opt.step(lambda: squared_errors(model, x, y))
    model.bias.requires_grad_(True)
    with pytest.raises(ValueError, match="share memory"):
        opt.add_param_group({"params": [model.bias]})
    assert len(opt.param_groups) == 1
    # A parameter added while frozen, unfrozen later, is refused by the step, before anything changes.
    model.bias.requires_grad_(False)
    grouped = sven_ext.Sven(model, params=[model.weight, model.bias])
    model.bias.requires_grad_(True)
    snapshot = Snapshot(model, grouped)
    with pytest.raises(ValueError, match=r"parameter 'bias' .* has elements that share memory"):
        grouped.step(lambda: squared_errors(model, x, y))
    snapshot.assert_unchanged()


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_parameter_frozen_after_construction_is_a_clear_error(backend):
    model = mlp((3, 4, 1))
    x, y = data()
    opt = sven_ext.Sven(model, backend=backend)
    model.requires_grad_(False)
    snapshot = Snapshot(model, opt)
    with pytest.raises(ValueError, match="no trainable parameters"):
        opt.step(lambda: squared_errors(model, x, y))
    snapshot.assert_unchanged()


# ----------------------------------------------------------------------------- final values checked finite


def _model(dtype, big=None):
    """An MLP; with ``big``, one more parameter ``spare`` of that value, which the forward pass does not use
    (so that the losses stay finite)."""
    model = mlp((3, 4, 1), dtype=dtype)
    if big is not None:
        model.register_parameter("spare", nn.Parameter(torch.full((2,), big, dtype=dtype)))
    return model


# (dtype, value of a spare parameter, injected direction, settings, steps before the failing one, message)
STAGES = {
    "direction": (torch.float32, None, math.nan, dict(), 0, "at the direction stage for parameter '0.weight'"),
    "RMSProp": (torch.float32, None, 1e21, dict(rmsprop="after", lr=1e-30, safeguard=None), 0,
                "at the RMSProp stage for parameter '0.weight'"),
    "momentum": (torch.float16, None, 4e4, dict(momentum=0.99, lr=1e-7, safeguard=None), 1,
                 "at the momentum stage for parameter '0.weight'"),
    "lr": (torch.float16, None, 2.0, dict(lr=6e4), 0, "at the lr stage for parameter '0.weight'"),
    "lr beyond the dtype": (torch.float16, None, 2.0, dict(lr=1e6), 0,
                            "at the lr stage .*1e\\+06 is beyond the dtype's largest value"),
    "weight decay": (torch.float16, 2.0, 0.0, dict(lr=1.0, weight_decay=6e4), 0,
                     r"at the weight decay stage for parameter 'spare'.*\(1 - lr \* weight_decay\)"),
    "update": (torch.float32, 3e38, -3e38, dict(lr=1.0), 0, "at the update stage for parameter 'spare'"),
}


@pytest.mark.parametrize("stage", list(STAGES))
def test_a_value_that_is_not_finite_in_the_parameter_dtype_names_its_stage(monkeypatch, stage):
    dtype, big, direction, settings, steps, match = STAGES[stage]
    model = _model(dtype, big)
    x, y = data()
    opt = sven_ext.Sven(model, backend="gram", k=3, **settings)
    monkeypatch.setattr(Contraction, "_directions", _injected_directions(direction))
    for _ in range(steps):
        opt.step(lambda: squared_errors(model, x, y))
        assert all(torch.isfinite(p).all() for p in model.parameters())
    snapshot = Snapshot(model, opt)
    with pytest.raises(FloatingPointError, match=f"the Sven step is not finite .*{match}"):
        opt.step(lambda: squared_errors(model, x, y))
    snapshot.assert_unchanged()


# ----------------------------------------------------------------------------- state checked like the constructor


def _set_group(key, value):
    def change(saved):
        saved["param_groups"][0][key] = value
    return change


def _set_state(key, make):
    def change(saved):
        saved["state"][0][key] = make(saved["state"][0][key])
    return change


def _add_state(key):
    def change(saved):
        saved["state"][0][key] = torch.zeros_like(saved["state"][0]["momentum_buffer"])
    return change


def _set_step(value):
    def change(saved):
        saved["state"]["sven"]["step"] = value
    return change


LOADS = {
    "k=0": (_set_group("k", 0), r"param group 0: k must be a positive integer or None, got 0"),
    "momentum=1.5": (_set_group("momentum", 1.5), r"param group 0: momentum must be in \[0, 1\), got 1.5"),
    "rtol=nan": (_set_group("rtol", math.nan), r"param group 0: rtol must be in \[0, 1\), got nan"),
    "lr=-1": (_set_group("lr", -1.0), r"param group 0: lr must be a finite number >= 0, got -1.0"),
    "backend": (_set_group("backend", "dense"), r"the state was saved with backend='dense' but this optimizer has "
                                                r"backend='gram'"),
    "step='seven'": (_set_step("seven"), r"step must be an integer >= 0, got 'seven'"),
    "step=-1": (_set_step(-1), r"step must be an integer >= 0, got -1"),
    "nan momentum": (_set_state("momentum_buffer", lambda t: t * math.nan), r"'momentum_buffer' is not finite"),
    "negative square_avg": (_set_state("square_avg", lambda t: -t - 1), r"'square_avg' has negative entries"),
    "another model": (_set_state("momentum_buffer", lambda t: torch.zeros(5, 3, dtype=t.dtype)),
                      r"'momentum_buffer' has shape \(5, 3\) where the parameter has \(4, 3\): the state belongs "
                      "to another model"),
    "a key of another optimizer": (_add_state("exp_avg"), r"state \['exp_avg'\] is not Sven's"),
}


@pytest.mark.parametrize("case", list(LOADS))
def test_a_bad_state_is_refused_at_load_and_changes_nothing(case):
    change, match = LOADS[case]
    x, y = data()
    source = mlp((3, 4, 1))
    settings = dict(backend="gram", k=3, momentum=0.5, rmsprop="after", safeguard=None)
    saving = sven_ext.Sven(source, **settings)
    saving.step(lambda: squared_errors(source, x, y))
    saved = copy.deepcopy(saving.state_dict())
    change(saved)
    model = mlp((3, 4, 1), seed=1)
    opt = sven_ext.Sven(model, **settings)
    opt.step(lambda: squared_errors(model, x, y))
    snapshot = Snapshot(model, opt)
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(saved)
    snapshot.assert_unchanged()
    opt.step(lambda: squared_errors(model, x, y))


def test_a_state_of_another_optimizer_is_refused():
    model = mlp((3, 4, 1))
    x, y = data()
    adam = torch.optim.Adam(model.parameters())
    squared_errors(model, x, y).sum().backward()
    adam.step()
    opt = sven_ext.Sven(model)
    snapshot = Snapshot(model, opt)
    with pytest.raises(ValueError, match=r"param group 0 lacks the setting\(s\) \['k', .*another optimizer"):
        opt.load_state_dict(adam.state_dict())
    snapshot.assert_unchanged()


def test_a_setting_changed_between_steps_is_checked_like_the_constructor():
    model = mlp((3, 4, 1))
    x, y = data()
    opt = sven_ext.Sven(model, momentum=0.5, safeguard=None)
    opt.param_groups[0]["momentum"] = 1.5
    snapshot = Snapshot(model, opt)
    with pytest.raises(ValueError, match=r"param group 0: momentum must be in \[0, 1\), got 1.5"):
        opt.step(lambda: squared_errors(model, x, y))
    snapshot.assert_unchanged()


def test_add_param_group_is_checked_like_the_constructor():
    model = nn.Sequential(nn.Linear(3, 4).double(), nn.Linear(4, 1).float())
    opt = sven_ext.Sven(model, params=[model[0].weight])
    with pytest.raises(ValueError, match="params must belong to model: 1 tensor"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2, dtype=torch.float64))]})
    with pytest.raises(ValueError, match="all parameters must have one dtype"):
        opt.add_param_group({"params": [model[1].weight]})
    with pytest.raises(ValueError, match=r"param group 1: k must be a positive integer or None, got 0"):
        opt.add_param_group({"params": [model[0].bias], "k": 0})
    assert len(opt.param_groups) == 1
    opt.add_param_group({"params": [model[0].bias], "lr": 0.5})
    assert opt.param_groups[1]["lr"] == 0.5


# ----------------------------------------------------------------------------- copies


@pytest.mark.parametrize("backend,settings", [("gram", dict(momentum=0.5, safeguard=None)),
                                              ("sketch", dict(warm_start=True, k=2, oversampling=1))])
def test_deepcopy_and_pickle_give_working_optimizers_of_the_copied_model(backend, settings):
    x, y = data()
    model = mlp((3, 4, 1))
    opt = sven_ext.Sven(model, backend=backend, **settings)
    opt.step(lambda: squared_errors(model, x, y))
    copies = [copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))]
    before = copy.deepcopy(model.state_dict())
    for other in copies:
        assert other.model is not model
        other.step(lambda: squared_errors(other.model, x, y))
    assert all(torch.equal(t, before[n]) for n, t in model.state_dict().items())  # the original did not move
    opt.step(lambda: squared_errors(model, x, y))
    for other in copies:
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), other.model.parameters()))
        assert other.state["sven"]["step"] == 2


def test_an_optimizer_with_a_process_group_refuses_to_be_copied(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        opt = sven_ext.Sven(mlp((3, 4, 1)), backend="gram", process_group=dist.group.WORLD)
        with pytest.raises(TypeError, match="a Sven optimizer with a process_group cannot be copied or pickled"):
            copy.deepcopy(opt)
        with pytest.raises(TypeError, match="cannot be copied or pickled"):
            pickle.dumps(opt)
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- numerical edges


@pytest.mark.parametrize("backend", ["gram", "auto", "dense", "functional"])
@pytest.mark.parametrize("scale,atol", [(1e20, linalg.DEFAULT_ATOL), (1e30, linalg.DEFAULT_ATOL), (1e-30, 0.0)])
def test_extreme_loss_scales_give_the_dense_step(backend, scale, atol):
    """Losses times ``a`` scale r and J by ``a``: the step is unchanged, the singular values scale by ``a``.

    In float32, ``K = J J^T`` of such rows would leave the dtype's range (1e40 or 1e-60)."""
    model = mlp((3, 16, 2), dtype=torch.float32)
    x, y = data(batch=24, d_out=2, dtype=torch.float32)
    loss = lambda m: squared_errors(m, x, y) * scale  # noqa: E731
    oracle, reference = sven_update(model, loss, dtype=torch.float64, backend="dense", atol=atol, k=8)
    mine, info = sven_update(model, loss, backend=backend, atol=atol, k=8)
    assert info["rank"] == 8
    assert relative_difference(mine, oracle) < F32
    values = info["singular_values"]
    assert float((values - reference["singular_values"]).norm() / reference["singular_values"].norm()) < F32


@pytest.mark.parametrize("backend", ["gram", "dense"])
@pytest.mark.parametrize("rows", ["microbatch", "residuals (B, m)", "kappa=1"])
def test_extreme_scales_of_every_kind_of_rows(backend, rows):
    """Microbatched losses (the captured losses and the group rows are scaled apart), signed residuals with
    two outputs per sample, and square roots of the losses, at 1e30 in float32."""
    model = mlp((3, 16, 2), dtype=torch.float32)
    x, y = data(batch=24, d_out=2, dtype=torch.float32)
    scale = 1e30
    if rows == "microbatch":
        loss, settings = (lambda m: squared_errors(m, x, y) * scale), dict(microbatch_size=2)
    elif rows == "residuals (B, m)":
        loss, settings = (lambda m: sven_ext.Residuals((m(x.to(m[0].weight.dtype)) - y.to(m[0].weight.dtype))
                                                       * scale)), {}
    else:
        loss, settings = (lambda m: squared_errors(m, x, y) * scale), dict(kappa=1.0)
    oracle, _ = sven_update(model, loss, dtype=torch.float64, backend="dense", k=6, **settings)
    mine, info = sven_update(model, loss, backend=backend, k=6, **settings)
    assert info["rank"] == 6
    assert relative_difference(mine, oracle) < F32


@pytest.mark.parametrize("backend", [dict(backend="sketch"), dict(backend="functional", functional_mode="randomized")])
@pytest.mark.parametrize("scale,atol", [(1e20, linalg.DEFAULT_ATOL), (1e-30, 0.0)])
def test_extreme_loss_scales_give_a_sketch_its_own_step(backend, scale, atol):
    """A sketch (s < R) against itself at scale 1: the same test matrices, the same subspace."""
    model = mlp((3, 16, 2), dtype=torch.float32)
    x, y = data(batch=24, d_out=2, dtype=torch.float32)
    settings = dict(k=4, oversampling=2, atol=atol, **backend)
    plain, _ = sven_update(model, lambda m: squared_errors(m, x, y), **settings)
    scaled, info = sven_update(model, lambda m: squared_errors(m, x, y) * scale, **settings)
    assert info["rank"] == 4
    assert relative_difference(scaled, plain) < F32


def test_rows_inside_the_window_are_left_as_they_are():
    from sven_ext.residuals import row_scale

    below = 2.0 ** 32 - 2.0 ** 8  # float32's largest number under 2^32
    assert row_scale(torch.tensor([below, -1.0])) == 1.0
    assert row_scale(torch.tensor([2.0 ** -32, 0.0])) == 1.0
    assert row_scale(torch.zeros(3)) == 1.0
    assert row_scale(torch.tensor([2.0 ** 32])) == 2.0  # the window is [2^-32, 2^32)
    assert row_scale(torch.tensor([2.0 ** 40])) == 2.0 ** 9
    assert row_scale(torch.tensor([-(2.0 ** -40)])) == 2.0 ** -8


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_finite_residual_with_an_infinite_derivative_is_a_floating_point_error(backend):
    model = mlp((3, 8, 2))
    x, y = data(d_out=2)
    opt = sven_ext.Sven(model, backend=backend, k=3)
    snapshot = Snapshot(model, opt)

    def closure():
        out = model(x)
        # sqrt at 0: the row is 0, its derivative infinite.
        return sven_ext.Residuals(torch.cat([out[:, 0] - y[:, 0], (out[:1, 1] - out[:1, 1].detach()).sqrt()]))

    with pytest.raises(FloatingPointError, match="is not finite .* infinite derivative"):
        opt.step(closure)
    snapshot.assert_unchanged()


@pytest.mark.parametrize("failures", [1, 2])
@pytest.mark.parametrize("backend", ["gram", "sketch"])
def test_an_eigh_that_does_not_converge_falls_back(monkeypatch, backend, failures):
    """One failure: eigh again in float64; two: the SVD of K. Either gives the step eigh gives."""
    model = mlp((3, 8, 1))
    x, y = data(batch=20)
    settings = dict(backend=backend, k=4, oversampling=3, solve_dtype=torch.float32)
    expected, _ = sven_update(model, lambda m: squared_errors(m, x, y), **settings)
    real, calls = torch.linalg.eigh, []

    def eigh(matrix):
        calls.append(matrix.dtype)
        if len(calls) <= failures:
            raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")
        return real(matrix)

    monkeypatch.setattr(linalg.torch.linalg, "eigh", eigh)
    mine, info = sven_update(model, lambda m: squared_errors(m, x, y), **settings)
    assert calls == [torch.float32, torch.float64]
    assert info["rank"] == 4
    assert relative_difference(mine, expected) < 1e-5  # float32 eigh against a float64 retry


@pytest.mark.parametrize("settings", [dict(damping=1e-3), dict(variable_k=True), dict(track_svd_info=True)])
def test_options_in_units_of_the_rows_are_scaled_with_them(settings):
    """Damping, variable_k's coefficients and track_svd_info's prediction read the rows in the closure's
    units: losses times 2^80 (rows divided by 2^48 inside) give the step and diagnostics of the plain ones."""
    model = mlp((3, 8, 1))
    x, y = data(batch=16)
    factor = 2.0 ** 80
    base = dict(backend="gram", k=4, lr=0.5, **settings)
    if "damping" in settings:
        scaled_settings = {**base, "damping": settings["damping"] * factor ** 2}  # s^2 scales by factor^2
    else:
        scaled_settings = base
    plain, plain_info = sven_update(model, lambda m: squared_errors(m, x, y), **base)
    scaled, info = sven_update(model, lambda m: squared_errors(m, x, y) * factor, **scaled_settings)
    assert relative_difference(scaled, plain) < 1e-12
    assert torch.allclose(info["singular_values"], plain_info["singular_values"] * factor, rtol=1e-12, atol=0)
    if "variable_k" in settings:
        assert info["variable_k_rank"] == plain_info["variable_k_rank"]
    if "track_svd_info" in settings:
        assert info["predicted_loss_change"] == pytest.approx(plain_info["predicted_loss_change"] * factor, rel=1e-12)


def test_gram_matrix_is_that_of_the_rows_the_closure_returned():
    from sven_ext.backends.gram import gram_matrix

    model = mlp((3, 8, 1))
    x, y = data(batch=16)
    plain = gram_matrix(model, lambda: squared_errors(model, x, y))
    scaled = gram_matrix(model, lambda: squared_errors(model, x, y) * 2.0 ** 80)
    assert float((scaled - plain * 2.0 ** 160).norm() / scaled.norm()) < 1e-14


# ----------------------------------------------------------------------------- memory bound


@pytest.mark.parametrize("backend", ["gram", "sketch"])
def test_the_memory_estimate_includes_the_update(backend):
    """Few rows, many parameters: K and the sketch's blocks are tiny, the update (directions and new
    values, 2 x 2.1 MB) is not; a budget below them is refused with nothing changed."""
    model = mlp((3, 512, 512, 1))
    x, y = data(batch=4)
    params = sum(p.numel() for p in model.parameters())
    opt = sven_ext.Sven(model, backend=backend, k=2, oversampling=1, max_memory=params * 8 * 3 // 2)
    snapshot = Snapshot(model, opt)
    with pytest.raises(ValueError, match=f"backend='{backend}' needs about .* The forward pass and the capture "
                                         "have run; nothing of the solve was allocated and nothing changed"):
        opt.step(lambda: squared_errors(model, x, y))
    snapshot.assert_unchanged()
    opt.param_groups[0]["max_memory"] = 6 * params * 8
    opt.step(lambda: squared_errors(model, x, y))


@pytest.mark.parametrize("backend", ["gram", "sketch"])
def test_a_lowered_max_memory_is_refused_before_the_forward_pass(backend):
    model = mlp((3, 16, 1))
    x, y = data()
    calls = []

    def closure():
        calls.append(1)
        return squared_errors(model, x, y)

    # No safeguard: the test counts the closure's calls, and its trial evaluation is one.
    opt = sven_ext.Sven(model, backend=backend, k=3, max_memory=1 << 30, safeguard=None)
    opt.step(closure)
    for group in opt.param_groups:
        group["max_memory"] = 1024
    snapshot = Snapshot(model, opt)
    with pytest.raises(ValueError, match="previous step's shapes needed .* refused before its forward pass"):
        opt.step(closure)
    assert len(calls) == 1  # the closure did not run
    snapshot.assert_unchanged()
    with pytest.raises(ValueError, match="more than the max_memory"):  # the retry runs and is checked
        opt.step(closure)
    assert len(calls) == 2
    snapshot.assert_unchanged()
