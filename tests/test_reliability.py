"""Reliability: clear errors for bad input, atomic steps, numerical edges, determinism and resume."""

import copy
import math

import pytest
import torch
from torch import nn

import sven_ext
from sven_ext import linalg
from sven_ext.backends import gram as gram_module
from sven_ext.backends.factored import Contraction
from sven_ext.backends import sketch as sketch_module
from sven_ext.capture import Capture
from sven_ext.testing import Counter, LargestStorage, mlp, relative_difference, sven_update

BACKENDS = ["dense", "gram", "sketch", "auto"]


def data(batch=7, d_in=3, d_out=1, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, d_in, generator=g, dtype=dtype), torch.randn(batch, d_out, generator=g, dtype=dtype)


def squared_errors(x, y):
    def loss(model):
        return (model(x) - y).square().sum(1)

    return loss


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(k=0), ValueError, "k must be a positive integer or None"),
    (dict(k=2.5), ValueError, "k must be a positive integer or None"),
    (dict(lr=0.0), ValueError, "lr must be a positive finite number"),
    (dict(lr=-1.0), ValueError, "lr must be a positive finite number"),
    (dict(lr=math.inf), ValueError, "lr must be a positive finite number"),
    (dict(rtol=-0.1), ValueError, r"rtol must be in \[0, 1\)"),
    (dict(kappa=0), ValueError, "kappa must be a positive finite number"),
    (dict(atol=-1.0), ValueError, "atol must be >= 0"),
    (dict(backend="svd"), ValueError, "backend must be one of"),
    (dict(solve_dtype=torch.float16), ValueError, "solve_dtype must be torch.float32 or torch.float64"),
    (dict(chunk_rows=0), ValueError, "chunk_rows must be a positive integer"),
    (dict(functional_mode="fast"), ValueError, "functional_mode must be one of"),
])
def test_bad_arguments_name_the_argument(kwargs, error, match):
    with pytest.raises(error, match=match):
        sven_ext.Sven(mlp((3, 4, 1)), **kwargs)


def test_bad_models():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        sven_ext.Sven([torch.zeros(2, requires_grad=True)])
    frozen = mlp((3, 4, 1)).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        sven_ext.Sven(frozen)
    mixed = mlp((3, 4, 1))
    mixed[0].float()
    with pytest.raises(ValueError, match="all parameters must have one dtype"):
        sven_ext.Sven(mixed)
    split = mlp((3, 4, 1))
    split[0].to("meta")
    with pytest.raises(ValueError, match="all parameters must be on one device"):
        sven_ext.Sven(split)
    with pytest.raises(ValueError, match="params must belong to model"):
        sven_ext.Sven(mlp((3, 4, 1)), params=[nn.Parameter(torch.zeros(2))])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("output,error,match", [
    (lambda out: out.square().mean(), ValueError, r"per-sample losses of shape \(B,\), got shape \(\).*reduction"),
    (lambda out: out.square(), ValueError, r"per-sample losses of shape \(B,\), got shape \(7, 1\)"),
    (lambda out: out.square().sum(1) * math.nan, ValueError, "contain NaN or Inf"),
    (lambda out: out.square().sum(1) * math.inf, ValueError, "contain NaN or Inf"),
    (lambda out: out[:0].square().sum(1), ValueError, "empty per-sample losses"),
    (lambda out: out.sum(1), ValueError, "losses must be >= 0"),
    (lambda out: out.detach().square().sum(1), ValueError, "do not depend on any trainable parameter"),
    (lambda out: out.square().sum(1).tolist(), TypeError, "must return per-sample losses"),
    (lambda out: sven_ext.Residuals(out[:, :, None]), ValueError, r"Residuals must have shape \(B,\) or \(B, m\)"),
    (lambda out: sven_ext.Residuals(out.round().long()), TypeError, "must be floating point"),
])
def test_bad_closure_output_is_a_clear_error_and_changes_nothing(backend, output, error, match):
    model = mlp((3, 4, 1))
    x, y = data()
    opt = sven_ext.Sven(model, backend=backend)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(error, match=match):
        opt.step(lambda: output(model(x) - y))
    assert all(torch.equal(before[n], t) for n, t in model.state_dict().items())
    assert "sven" not in opt.state


def test_missing_closure_and_bad_groups():
    model = mlp((3, 4, 1))
    opt = sven_ext.Sven(model)
    with pytest.raises(ValueError, match="needs a closure"):
        opt.step()
    opt.param_groups[0]["lr"] = -0.5
    with pytest.raises(ValueError, match="param group 0: lr must be a finite number >= 0"):
        opt.step(lambda: squared_errors(*data())(model))
    grouped = sven_ext.Sven(model, params=[{"params": [model[0].weight]}, {"params": [model[0].bias], "k": 3}])
    with pytest.raises(ValueError, match="param group 1 sets k=3 but group 0 has None"):
        grouped.step(lambda: squared_errors(*data())(model))


def test_batch_statistics_and_parameters_read_outside_their_module():
    x, y = data(batch=6)
    bn = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1)).double()
    with pytest.raises(ValueError, match=r"module '1' \(BatchNorm1d\) normalises with batch statistics.*eval"):
        sven_ext.Sven(bn, backend="gram").step(lambda: squared_errors(x, y)(bn))

    class Outside(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 1).double()

        def forward(self, x):
            return x @ self.lin.weight.T

    model = Outside()
    with pytest.raises(RuntimeError, match=r"captured no per-sample factors for parameter\(s\) \['lin.weight'\]"):
        sven_ext.Sven(model, backend="gram").step(lambda: squared_errors(x, y)(model))


# ----------------------------------------------------------------------------- atomic steps


def _fail(exc):
    def raise_(*args, **kwargs):
        raise exc

    return raise_


# (stage, backends, patch): each patch makes one stage of the step raise.
STAGES = {
    "closure": (BACKENDS, None),
    "capture": (["gram", "sketch", "auto"], lambda mp: mp.setattr(Capture, "uses", _fail(RuntimeError("capture")))),
    "kernel": (["gram", "auto"], lambda mp: mp.setattr(gram_module, "_linear_gram",
                                                        _fail(torch.OutOfMemoryError("out of memory")))),
    "sketch": (["sketch"], lambda mp: mp.setattr(sketch_module.SketchBackend, "_sketch",
                                                 _fail(RuntimeError("kernel")))),
    # eigh falls back to the SVD: both must fail for the solve to fail.
    "solve": (BACKENDS, lambda mp: (mp.setattr(linalg.torch.linalg, "eigh", _fail(torch.linalg.LinAlgError("eigh"))),
                                    mp.setattr(linalg.torch.linalg, "svd", _fail(torch.linalg.LinAlgError("svd"))))),
    "direction": (["gram", "sketch", "auto"], lambda mp: mp.setattr(
        Contraction, "_directions",
        lambda self, uses, c, release=False: [torch.full_like(p, math.nan) for p in self.params])),
}


@pytest.mark.parametrize("stage", list(STAGES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_failed_step_loses_nothing(monkeypatch, stage, backend):
    backends, patch = STAGES[stage]
    if backend not in backends:
        pytest.skip(f"stage {stage} does not exist in backend {backend}")
    model = Counter()
    x, y = data(batch=12)
    # s = k + 1 and the warm-start columns stay below the 12 rows: the sketch is drawn.
    opt = sven_ext.Sven(model, backend=backend, k=3, oversampling=1, warm_start=True, test_matrix="rademacher")
    closure = squared_errors(x, y)
    opt.step(lambda: closure(model))  # a good step first: there is state to keep
    params = copy.deepcopy(model.state_dict())
    buffers = {name: b for name, b in model.named_buffers()}
    state = copy.deepcopy(opt.state_dict())
    if patch is None:
        def failing():
            closure(model)
            raise KeyError("closure")
    else:
        patch(monkeypatch)
        failing = lambda: closure(model)  # noqa: E731
    with pytest.raises((RuntimeError, KeyError, FloatingPointError, torch.linalg.LinAlgError)):
        opt.step(failing)
    monkeypatch.undo()
    for name, t in model.state_dict().items():
        assert torch.equal(t, params[name]), name
    assert all(b is model.get_buffer(name) for name, b in buffers.items())  # reassigned buffers put back
    after = opt.state_dict()
    assert after["state"].keys() == state["state"].keys()
    for key, value in state["state"]["sven"].items():
        mine = after["state"]["sven"][key]
        assert torch.equal(mine, value) if isinstance(value, torch.Tensor) else mine == value, key
    assert not model.lin._forward_hooks  # capture hooks removed
    opt.step(lambda: closure(model))  # and the optimizer still works


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, 3e38])
def test_the_direction_check_is_exact(monkeypatch, value):
    """One bad entry anywhere is caught; finite entries whose float32 sum overflows are not."""
    model = mlp((3, 5, 2), dtype=torch.float32)
    x, y = data(d_out=2, dtype=torch.float32)
    # No safeguard: the injected direction is checked for finiteness, not for lowering the loss.
    opt = sven_ext.Sven(model, backend="gram", lr=1e-30, k=2, safeguard=None)
    opt.step(lambda: squared_errors(x, y)(model))  # checks the factors once

    def directions(self, uses, c, release=False):
        out = [torch.zeros_like(p) for p in self.params]
        out[2].view(-1)[-1] = value
        out[2].view(-1)[0] = value if value == 3e38 else 0.0  # 6e38 > float32's largest
        return out

    monkeypatch.setattr(Contraction, "_directions", directions)
    before = copy.deepcopy(model.state_dict())
    if math.isfinite(value):
        opt.step(lambda: squared_errors(x, y)(model))
        assert not torch.equal(model.state_dict()["2.weight"], before["2.weight"])
    else:
        with pytest.raises(FloatingPointError, match="not finite"):
            opt.step(lambda: squared_errors(x, y)(model))
        assert all(torch.equal(t, before[n]) for n, t in model.state_dict().items())


# ----------------------------------------------------------------------------- numerical edges


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_residuals_give_a_zero_update_and_a_diagnostic(backend):
    model = mlp((3, 5, 2))
    x, _ = data()
    with pytest.warns(RuntimeWarning, match="zero update: every singular value is below the cut-off"):
        update, info = sven_update(model, lambda m: sven_ext.Residuals(m(x) * 0), backend=backend)
    assert all(torch.equal(d, torch.zeros_like(d)) for d in update.values())
    assert info["rank"] == 0 and "zero update" in info["warning"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_everything_below_the_cut_off_is_a_zero_update_not_nan(backend):
    model = mlp((3, 5, 1))
    x, y = data()
    with pytest.warns(RuntimeWarning, match="zero update"):
        update, info = sven_update(model, squared_errors(x, y), backend=backend, atol=1e30)
    assert all(torch.equal(d, torch.zeros_like(d)) for d in update.values())
    assert info["rank"] == 0


@pytest.mark.parametrize("backend", ["gram", "sketch"])
@pytest.mark.parametrize("batch", [1, 2, 9])
def test_duplicated_samples_and_single_rows(backend, batch):
    model = mlp((3, 6, 1))
    x, y = data(batch=batch)
    if batch > 1:  # every sample twice: J has repeated rows
        x, y = torch.cat([x, x]), torch.cat([y, y])
    loss = squared_errors(x, y)
    mine, info = sven_update(model, loss, backend=backend, k=None)
    oracle, _ = sven_update(model, loss, backend="dense", k=None)
    assert relative_difference(mine, oracle) < 1e-8
    assert info["rank"] <= max(1, batch)


@pytest.mark.parametrize("backend", ["gram", "sketch", "dense"])
@pytest.mark.parametrize("scale", [1e-20, 1e20])
def test_extreme_input_scales(backend, scale):
    """A linear model: scaling the inputs by ``a`` scales J by ``a`` and the min-norm step by ``1/a``."""
    model = nn.Linear(4, 1, bias=False).double()
    x, y = data(batch=5, d_in=4)
    # Residuals r = f(x) - y; scale y with x so that r (hence c) just scales by a.
    ref, _ = sven_update(model, lambda m: sven_ext.Residuals((m(x) - y).squeeze(1)), backend=backend, atol=0, k=3)
    mine, info = sven_update(model, lambda m: sven_ext.Residuals((m(x * scale) - y * scale).squeeze(1)),
                             backend=backend, atol=0, k=3)
    assert info["rank"] == 3
    assert relative_difference(mine, ref) < 1e-10  # J -> aJ and r -> ar leave V S^-1 U^T r unchanged
    assert all(torch.isfinite(d).all() for d in mine.values())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", ["gram", "sketch"])
def test_half_precision_models_accumulate_in_float32_or_better(dtype, backend):
    model = mlp((3, 8, 1), dtype=torch.float32)
    x, y = data(batch=6, dtype=torch.float32)

    def loss(m):
        w = next(m.parameters())
        return (m(x.to(w.dtype)) - y.to(w.dtype)).float().square().sum(1)

    half, _ = sven_update(model, loss, dtype=dtype, backend=backend, k=4)
    # The oracle: float64 dense on the same (rounded) weights.
    rounded = copy.deepcopy(model).to(dtype).double()
    oracle, _ = sven_update(rounded, loss, backend="dense", k=4)
    eps = torch.finfo(dtype).eps
    assert all(torch.isfinite(d).all() for d in half.values())
    # Rounding of the activations and of the returned step (not of K or the solve) bounds the error.
    assert relative_difference(half, oracle) < 30 * eps


# ----------------------------------------------------------------------------- determinism and resume


def _run(model, opt, batches, steps):
    for x, y in batches[:steps]:
        opt.step(lambda: squared_errors(x, y)(model))


@pytest.mark.parametrize("backend,kwargs", [
    ("gram", {}), ("sketch", dict(warm_start=True)), ("sketch", dict(test_matrix="khatri_rao")), ("dense", {}),
])
def test_same_seed_same_trajectory_and_resume_is_bitwise(backend, kwargs):
    torch.manual_seed(0)
    batches = [data(batch=12, seed=s) for s in range(6)]
    make = lambda: mlp((3, 7, 7, 1), seed=3)  # noqa: E731
    settings = dict(backend=backend, lr=0.5, k=4, seed=11, **kwargs)

    a, b = make(), make()
    opt_a, opt_b = sven_ext.Sven(a, **settings), sven_ext.Sven(b, **settings)
    _run(a, opt_a, batches, 6)
    _run(b, opt_b, batches, 6)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))

    # Stop after 3 steps, save, load into fresh objects, continue: the same trajectory bitwise.
    c = make()
    opt_c = sven_ext.Sven(c, **settings)
    _run(c, opt_c, batches, 3)
    saved = copy.deepcopy((c.state_dict(), opt_c.state_dict()))
    d = make()
    opt_d = sven_ext.Sven(d, **settings)
    d.load_state_dict(saved[0])
    opt_d.load_state_dict(saved[1])
    _run(d, opt_d, batches[3:], 3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), d.parameters()))


# ----------------------------------------------------------------------------- memory guard


@pytest.mark.parametrize("backend", ["gram", "dense", "sketch"])
def test_a_named_backend_over_budget_raises_before_allocating(backend):
    model = mlp((3, 16, 1))
    x, y = data(batch=200)
    opt = sven_ext.Sven(model, backend=backend, k=150, oversampling=40, max_memory=64 * 1024)
    with LargestStorage() as seen, pytest.raises(ValueError, match=f"backend='{backend}' needs about .* nothing"):
        opt.step(lambda: squared_errors(x, y)(model))
    assert seen.largest < 200 * 200  # neither K, nor J, nor a 200 x s block was allocated


def test_auto_switches_to_the_sketch_when_gram_does_not_fit():
    model = mlp((3, 16, 1))
    x, y = data(batch=1000)  # gram: K alone is 8 MB, ~32 MB with eigh's copies; sketch ~5 MB
    opt = sven_ext.Sven(model, backend="auto", k=8, max_memory=8 << 20)
    opt.step(lambda: squared_errors(x, y)(model))
    assert opt.last_info["backend"] == "sketch"
    assert "over max_memory" in opt.last_info["auto_reason"]


# ----------------------------------------------------------------------------- long run


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_ten_thousand_steps_of_the_1d_regression(backend):
    """The demo's task and schedule (warm-up, then linear decay), 10,000 steps, every backend."""
    from sven_ext.data import batches, regression_1d
    from sven_ext.demo import DEFAULT_K, DEFAULT_LR, make_mlp, warmup_then_decay

    steps, batch = 10_000, 32
    torch.manual_seed(0)
    split = regression_1d(n_train=4000, n_val=2000, dtype=torch.float64)
    model = make_mlp().double()
    opt = sven_ext.Sven(model, lr=DEFAULT_LR, k=DEFAULT_K, backend=backend)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, warmup_then_decay(4000 // batch, steps))
    generator = torch.Generator().manual_seed(0)
    done = 0
    while done < steps:
        for x, y in batches(split.x_train, split.y_train, batch, generator):
            losses = opt.step(lambda: (model(x) - y).square().sum(1))
            assert torch.isfinite(losses).all(), f"step {done}"
            schedule.step()
            done += 1
            if done == steps:
                break
    with torch.no_grad():
        val = float((model(split.x_val) - split.y_val).square().mean())
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # Predicting the mean scores 1; the demo (10k points, 6,260 steps) ends near 4e-8.
    assert val < 1e-5, val
