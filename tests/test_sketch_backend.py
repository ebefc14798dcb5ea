"""The sketch backend against the dense oracle, and the guarantees it makes."""

import copy

import pytest
import torch
from torch import nn

import sven_ext
from sven_ext.backends import SketchSettings, StepSettings
from sven_ext.backends import sketch as sketch_module
from sven_ext.settings import Settings
from sven_ext.testing import LargestStorage, mlp, relative_difference, small_cnn, sven_update, tiny_transformer

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning")

EXACT = 1e-8  # float64 sketch vs float64 dense when the basis spans range(J)
TEST_MATRICES = ("gaussian", "rademacher", "khatri_rao")


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _repeat(t, times=3):
    """Duplicated samples: ``times`` copies of the batch, so rank(J) <= the distinct rows."""
    return t.repeat(times, *([1] * (t.dim() - 1)))


def regression(x, y, rows="losses"):
    def loss(model):
        out = model(x) - y
        return out.square().sum(1) if rows == "losses" else sven_ext.Residuals(out)

    return loss


def token_loss(idx, targets):
    def loss(model):
        return nn.functional.cross_entropy(model(idx).transpose(1, 2), targets, reduction="none").mean(1)

    return loss


class Attention(nn.Module):
    """``nn.MultiheadAttention`` (the torch.func fallback) between two Linear layers."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(3, 8)
        self.att = nn.MultiheadAttention(8, 2, batch_first=True)
        self.out = nn.Linear(8, 2)

    def forward(self, x):
        h = self.inp(x)
        return self.out(self.att(h, h, h)[0]).mean(1)


def low_rank_case(name):
    """``(model, loss, k)`` with duplicated samples: rank(J) <= k < s < R."""
    if name == "mlp":
        return mlp((3, 16, 16, 2)), regression(_repeat(_randn(6, 3, seed=1)), _repeat(_randn(6, 2, seed=2))), 6
    if name == "mlp-residuals-bm":
        x, y = _repeat(_randn(4, 3, seed=1)), _repeat(_randn(4, 3, seed=2))
        return mlp((3, 8, 8, 3), "tanh"), regression(x, y, "residuals"), 12
    if name == "cnn-groups":
        x, y = _repeat(_randn(5, 3, 7, 7, seed=3)), _repeat(_randn(5, 3, seed=4))
        return small_cnn(), regression(x, y, "residuals"), 15
    if name == "mha-fallback":
        torch.manual_seed(5)
        x, y = _repeat(_randn(4, 4, 3, seed=5)), _repeat(_randn(4, 2, seed=6))
        return Attention().double(), regression(x, y, "residuals"), 8
    g = torch.Generator().manual_seed(7)
    idx, targets = torch.randint(0, 11, (5, 5), generator=g), torch.randint(0, 11, (5, 5), generator=g)
    model = tiny_transformer(11, 8, 2, 5, shared_positions=name == "transformer-shared-positions")
    return model, token_loss(_repeat(idx, 4), _repeat(targets, 4)), 5


@pytest.mark.parametrize("test_matrix", TEST_MATRICES)
@pytest.mark.parametrize("case", ["mlp", "mlp-residuals-bm", "cnn-groups", "mha-fallback", "transformer-tied",
                                  "transformer-shared-positions"])
def test_exact_when_rank_fits_the_sketch(case, test_matrix):
    model, loss, k = low_rank_case(case)
    kwargs = dict(lr=0.1, k=k, oversampling=4)
    mine, info = sven_update(model, loss, backend="sketch", test_matrix=test_matrix, **kwargs)
    oracle, dense_info = sven_update(model, loss, backend="dense", **kwargs)
    assert info["test_matrix"] == test_matrix and info["sketch_size"] == k + 4 < info["rows"]
    assert info["rank"] == dense_info["rank"]
    assert relative_difference(mine, oracle) < EXACT
    if info["sketch_residual"] is not None:  # one use per parameter (not the tied embedding)
        assert info["sketch_residual"] < 1e-6


def test_sketch_as_wide_as_the_batch_is_exact():
    x, y = _randn(9, 3, seed=8), _randn(9, 2, seed=9)
    model = mlp((3, 8, 8, 2), seed=1)
    mine, info = sven_update(model, regression(x, y), backend="sketch", lr=0.1, k=9)
    oracle, _ = sven_update(model, regression(x, y), backend="dense", lr=0.1, k=9)
    assert info["test_matrix"] == "identity" and info["sketch_size"] == 9
    assert relative_difference(mine, oracle) < EXACT


def _sketch_step(model, fused, k, **sketch):
    """The sketch backend with the fused ops on or off, and the settings of a step with rank cap ``k``."""
    backend = sketch_module.SketchBackend(model, list(model.parameters()), fused=fused)
    return backend, StepSettings(Settings(k=k).truncation, 2.0, sketch=SketchSettings(**sketch))


@pytest.mark.parametrize("case", ["mlp-residuals-bm", "cnn-groups", "transformer-tied"])
def test_fused_ops_match_the_gemm_routes(case):
    model, loss, k = low_rank_case(case)
    results = []
    for fused in (False, True):
        backend, settings = _sketch_step(model, fused, max(2, k - 4), oversampling=2, power_iterations=1)
        result = backend.compute(lambda: loss(model), settings)
        results.append((torch.cat([d.reshape(-1) for d in result.directions]), result.info))
    (gemm, info), (fused, fused_info) = results
    assert not info["fused"] and fused_info["fused"]
    assert float((fused - gemm).norm() / gemm.norm()) < 1e-10


@pytest.mark.parametrize("case", ["mlp-residuals-bm", "cnn-groups", "mha-fallback", "transformer-tied"])
def test_tiny_transients_change_nothing(monkeypatch, case):
    """A 1-byte budget: one parameter row per tile, one row or sample per chunk, everywhere."""
    model, loss, k = low_rank_case(case)
    kwargs = dict(lr=0.1, k=max(2, k - 4), oversampling=2, power_iterations=1, test_matrix="gaussian")
    default, _ = sven_update(model, loss, backend="sketch", **kwargs)
    monkeypatch.setattr(sketch_module.SketchBackend, "transient_budget_bytes", 1)
    tiny, info = sven_update(model, loss, backend="sketch", **kwargs)
    assert info["transient_budget"] == 1
    assert relative_difference(tiny, default) < 1e-10


def decaying_case():
    """An MLP regression with signed residuals: 80 rows, a spread-out spectrum."""
    x, y = _randn(40, 3, seed=10), _randn(40, 2, seed=11)
    return mlp((3, 16, 16, 2), seed=2), regression(x, y, "residuals")


@pytest.mark.parametrize("test_matrix", TEST_MATRICES)
def test_power_iterations_approach_the_exact_rank_k_update(test_matrix):
    model, loss = decaying_case()
    exact, _ = sven_update(model, loss, backend="gram", lr=0.1, k=8)
    errors = {}
    for q in (0, 1, 2):
        mine, info = sven_update(model, loss, backend="sketch", lr=0.1, k=8, power_iterations=q,
                                 test_matrix=test_matrix, seed=3)
        assert info["power_iterations"] == q
        errors[q] = relative_difference(mine, exact)
    print(f"{test_matrix}: relative error against the exact rank-8 update by power iterations {errors}")
    assert errors[2] < errors[0]
    assert errors[2] < 0.05


def _steps(model, loss, count, **kwargs):
    opt = sven_ext.Sven(model, backend="sketch", **kwargs)
    for _ in range(count):
        opt.step(lambda: loss(model))
    return opt


def test_same_seed_same_steps_and_state_dict_round_trip():
    model, loss = decaying_case()
    kwargs = dict(lr=0.05, k=6, seed=11)
    a, b, c = copy.deepcopy(model), copy.deepcopy(model), copy.deepcopy(model)
    _steps(a, loss, 3, **kwargs)
    _steps(b, loss, 3, **kwargs)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    other = _steps(copy.deepcopy(model), loss, 1, **{**kwargs, "seed": 12})
    first = _steps(c, loss, 1, **kwargs)
    assert not all(torch.equal(p, q) for p, q in zip(c.parameters(), other.model.parameters()))
    # Continue from a saved state in a fresh optimizer (built with another seed: the state wins).
    saved = copy.deepcopy(first.state_dict())
    resumed = sven_ext.Sven(c, backend="sketch", lr=0.05, k=6, seed=99)
    resumed.load_state_dict(saved)
    for _ in range(2):
        resumed.step(lambda: loss(c))
    for pa, pc in zip(a.parameters(), c.parameters()):
        assert torch.equal(pa, pc)
    assert resumed.state["sven"]["step"] == 3 and resumed.state["sven"]["seed"] == 11


def test_warm_start_joins_the_previous_basis_and_round_trips():
    model, loss = decaying_case()
    kwargs = dict(lr=0.05, k=6, warm_start=True, power_iterations=0)
    a, c = copy.deepcopy(model), copy.deepcopy(model)
    opt = _steps(a, loss, 1, **kwargs)
    basis = opt.state["sven"]["basis"]
    assert basis.shape == (80, opt.last_info["rank"])
    assert opt.last_info["warm_start_columns"] == 0
    opt.step(lambda: loss(a))
    assert opt.last_info["warm_start_columns"] == basis.shape[1]
    assert opt.last_info["sketch_size"] == 6 + 10 + basis.shape[1]
    first = _steps(c, loss, 1, **kwargs)
    resumed = sven_ext.Sven(c, backend="sketch", lr=0.05, k=6, warm_start=True, power_iterations=0)
    resumed.load_state_dict(copy.deepcopy(first.state_dict()))
    resumed.step(lambda: loss(c))
    for pa, pc in zip(a.parameters(), c.parameters()):
        assert torch.equal(pa, pc)


def test_float32_model():
    x, y = _repeat(_randn(5, 3, 7, 7, seed=3)), _repeat(_randn(5, 3, seed=4))

    def loss(model):
        dtype = next(model.parameters()).dtype
        return sven_ext.Residuals(model(x.to(dtype)) - y.to(dtype))

    model = small_cnn().float()  # the float64 oracle starts from exactly these weights
    mine, info = sven_update(model, loss, backend="sketch", lr=0.1, k=15, oversampling=4)
    oracle, _ = sven_update(model, loss, dtype=torch.float64, backend="dense", lr=0.1, k=15)
    assert relative_difference(mine, oracle) < 1e-4


@pytest.mark.parametrize("kwargs,match", [
    (dict(oversampling=-1), "oversampling must be an integer >= 0"),
    (dict(power_iterations=1.5), "power_iterations must be an integer >= 0"),
    (dict(test_matrix="sparse"), "test_matrix must be one of"),
    (dict(warm_start=1), "warm_start must be True or False"),
    (dict(seed="a"), "seed must be an integer"),
    (dict(max_memory=0), "max_memory must be an integer >= 1"),
])
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sven_ext.Sven(mlp((3, 4, 1)), backend="sketch", **kwargs)


def test_max_memory_too_small_for_the_sketch():
    model, loss = decaying_case()
    opt = sven_ext.Sven(model, backend="sketch", k=6, max_memory=100_000)
    with pytest.raises(ValueError, match="backend=.sketch. needs about .* more than the max_memory"):
        opt.step(lambda: loss(model))


@pytest.mark.parametrize("fused", [False, True], ids=["gemm", "fused"])
@pytest.mark.parametrize("test_matrix", TEST_MATRICES)
def test_never_allocates_the_jacobian_or_omega(fused, test_matrix):
    model = mlp((16, *[32] * 8, 3), seed=11)
    x, y = _randn(13, 16, seed=12), _randn(13, 3, seed=13)
    loss = regression(x, y, "residuals")
    rows, k, oversampling = 39, 8, 10
    columns = k + oversampling
    params = sum(p.numel() for p in model.parameters())
    largest_layer = max(p.numel() for p in model.parameters())
    assert 4 * largest_layer * columns < params * columns < rows * params
    backend, settings = _sketch_step(model, fused, k, oversampling=oversampling, test_matrix=test_matrix)
    for _ in range(2):  # the first step also checks the factors against autograd
        with LargestStorage() as mode:
            result = backend.compute(lambda: loss(model), settings)
        # Z_l, an Omega tile or a per-row product of one layer at most: never R x P, P x s or Omega whole.
        assert mode.largest <= 4 * largest_layer * columns, mode.largest
    assert result.info["sketch_size"] == columns and result.info["fused"] == fused
