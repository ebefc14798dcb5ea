"""The functional backend against the dense oracle, its guarantees, and the Poisson example."""

import json

import pytest
import torch

import sven_ext
from sven_ext.examples import poisson
from sven_ext.testing import LargestStorage, mlp, relative_difference, sven_update

EXACT = 1e-9  # float64 exact functional vs float64 dense (rtol = 1e-3: cond(K) <= 1e6)
SKETCH_EXACT = 1e-8  # float64 randomized vs dense when the sketch spans range(J)


def _points(n, dim=2, seed=0):
    return torch.rand(n, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _laplacian(model, points):
    points = points.detach().requires_grad_(True)
    u = model(points)
    (grad,) = torch.autograd.grad(u.sum(), points, create_graph=True)
    return u, sum(torch.autograd.grad(grad[:, i].sum(), points, create_graph=True)[0][:, i]
                  for i in range(points.shape[1]))


def pde_loss(interior, boundary, weight=3.0):
    """Laplacian rows at ``interior`` plus weighted boundary rows: input derivatives in the graph."""

    def loss(model):
        u, lap = _laplacian(model, interior)
        source = torch.sin(3 * interior).prod(1)
        rows = torch.cat([lap + u[:, 0] ** 2 - source, weight * model(boundary).sum(1)])
        return sven_ext.Residuals(rows)

    return loss


def regression(x, y, rows):
    def loss(model):
        out = model(x) - y
        return out.square().sum(1) if rows == "losses" else sven_ext.Residuals(out)

    return loss


def case(name):
    """``(model, loss)``; the name says the rows, and whether ``R <= P`` (rows side) or ``P < R``."""
    if name == "pde-rows-side":  # R = 23 <= P = 105
        return mlp((2, 8, 8, 1), "tanh", seed=1), pde_loss(_points(17, seed=1), _points(6, seed=2))
    if name == "pde-params-side":  # P = 21 < R = 45
        return mlp((2, 5, 1), "tanh", seed=2), pde_loss(_points(37, seed=3), _points(8, seed=4))
    if name == "pde-3d-gelu":  # three inputs, GELU, R = 31 <= P = 85
        return mlp((3, 7, 6, 1), "gelu", seed=3), pde_loss(_points(25, 3, seed=5), _points(6, 3, seed=6))
    x, y = _points(13, 3, seed=7), _points(13, 2, seed=8)
    if name == "residuals-bm-rows-side":  # R = 26 <= P = 53
        return mlp((3, 7, 2), "tanh", seed=4), regression(x, y, "residuals")
    if name == "residuals-bm-params-side":  # P = 17 < R = 26
        return mlp((3, 3, 2), "gelu", seed=5), regression(x, y, "residuals")
    return mlp((3, 5, 2), "gelu", seed=6), regression(x, y, "losses")  # R = 13 <= P = 32


CASES = [  # name, k, kappa
    ("pde-rows-side", None, 2.0),
    ("pde-rows-side", 4, 2.0),
    ("pde-params-side", None, 2.0),
    ("pde-params-side", 5, 2.0),
    ("pde-3d-gelu", 9, 2.0),
    ("residuals-bm-rows-side", 11, 2.0),
    ("residuals-bm-params-side", None, 2.0),
    ("losses", 5, 1.0),
    ("losses", None, 2.0),
]


@pytest.mark.parametrize("name,k,kappa", CASES, ids=lambda v: str(v))
def test_exact_matches_dense(name, k, kappa):
    model, loss = case(name)
    kwargs = dict(lr=0.3, k=k, rtol=1e-3, kappa=kappa, chunk_rows=5)
    mine, info = sven_update(model, loss, backend="functional", **kwargs)
    oracle, dense = sven_update(model, loss, backend="dense", **kwargs)
    assert relative_difference(mine, oracle) < EXACT
    assert info["backend"] == "functional" and info["rank"] == dense["rank"]
    assert info["side"] == ("parameters" if "params-side" in name else "rows")
    torch.testing.assert_close(info["singular_values"], dense["singular_values"], rtol=1e-7, atol=0)


@pytest.mark.parametrize("name", ["pde-rows-side", "pde-params-side"])
def test_chunking_does_not_change_the_step(name):
    model, loss = case(name)
    steps = [sven_update(model, loss, backend="functional", lr=0.5, k=7, chunk_rows=chunk)[0] for chunk in (3, 64)]
    assert relative_difference(steps[0], steps[1]) < 1e-10


def _repeat(t, times=3):
    return t.repeat(times, 1)


@pytest.mark.parametrize("power_iterations", [0, 2])
@pytest.mark.parametrize("name", ["rows-side", "params-side"])
def test_randomized_exact_when_rank_fits_the_sketch(name, power_iterations):
    if name == "rows-side":
        # 6 distinct interior points, each three times (R = 18, P = 105): rank(J) <= 6 < s = 10 < R.
        model, loss, k = mlp((2, 8, 8, 1), "tanh", seed=7), pde_loss(_repeat(_points(6, seed=9)), _points(0)), 6
    else:
        # P = 13 < s = 18 < R = 40: the sketch spans range(J) whatever its rank.
        model, loss, k = mlp((2, 3, 1), "tanh", seed=8), pde_loss(_points(32, seed=10), _points(8, seed=11)), 13
    kwargs = dict(lr=0.4, k=k, rtol=1e-3, oversampling=5 if name == "params-side" else 4,
                  power_iterations=power_iterations, chunk_rows=7)
    mine, info = sven_update(model, loss, backend="functional", functional_mode="randomized", **kwargs)
    oracle, _ = sven_update(model, loss, backend="dense", **kwargs)
    assert info["side"] == "sketch" and info["sketch_size"] < info["rows"]
    assert relative_difference(mine, oracle) < SKETCH_EXACT


def test_randomized_error_shrinks_with_power_iterations():
    # Full rank, decaying spectrum, s = 7 < rank: the sketch is an approximation.
    model, loss = mlp((2, 8, 8, 1), "tanh", seed=12), pde_loss(_points(30, seed=13), _points(10, seed=14))
    kwargs = dict(lr=1.0, k=4, rtol=1e-3, oversampling=3)
    oracle, _ = sven_update(model, loss, backend="dense", **kwargs)
    errors = []
    for q in (0, 1, 2):
        errors.append(sum(
            relative_difference(sven_update(model, loss, backend="functional", functional_mode="randomized",
                                            power_iterations=q, seed=seed, **kwargs)[0], oracle)
            for seed in range(3)
        ) / 3)
    assert errors[0] > 1e-4, errors  # the case does exercise the approximation
    assert errors[2] < errors[1] < errors[0], errors


def test_randomized_is_deterministic_per_seed():
    model, loss = mlp((2, 8, 8, 1), "tanh", seed=15), pde_loss(_points(30, seed=16), _points(10, seed=17))
    kwargs = dict(backend="functional", functional_mode="randomized", lr=1.0, k=4, oversampling=3)
    first, _ = sven_update(model, loss, seed=5, **kwargs)
    again, _ = sven_update(model, loss, seed=5, **kwargs)
    other, _ = sven_update(model, loss, seed=6, **kwargs)
    assert all(torch.equal(first[n], again[n]) for n in first)
    assert not all(torch.equal(first[n], other[n]) for n in first)
    # The step counter is part of the key: a second step draws other test matrices than a first
    # step from the same weights.
    optimizer = sven_ext.Sven(model, seed=5, **kwargs)
    optimizer.step(lambda: loss(model))
    second, _ = sven_update(model, loss, seed=5, **kwargs)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer.step(lambda: loss(model))
    moved = {n: p.detach() - before[n] for n, p in model.named_parameters()}
    assert not all(torch.equal(moved[n], second[n]) for n in moved)


@pytest.mark.parametrize("name,points,sizes", [
    ("rows", 20, (2, 16, 16, 1)),  # R = 26, P = 337: R x P = 8.8k, K 676, chunk x P 1k
    ("parameters", 154, (2, 6, 6, 1)),  # R = 160, P = 67: R x P = 10.7k, N 4.5k, chunk x R x width 2.9k
])
def test_exact_mode_never_holds_the_jacobian(name, points, sizes):
    model = mlp(sizes, "tanh", seed=18)
    loss = pde_loss(_points(points, seed=19), _points(6, seed=20))
    rows, params = points + 6, sum(p.numel() for p in model.parameters())
    optimizer = sven_ext.Sven(model, backend="functional", lr=0.1, chunk_rows=3)
    with LargestStorage() as storage:
        optimizer.step(lambda: loss(model))
    assert optimizer.last_info["side"] == name
    assert storage.largest < rows * params / 2, (storage.largest, rows * params)
    if name == "rows":  # the measurement sees a Jacobian when there is one
        dense = sven_ext.Sven(mlp(sizes, "tanh", seed=18), backend="dense", lr=0.1)
        with LargestStorage() as reference:
            dense.step(lambda: loss(dense.model))
        assert reference.largest >= rows * params


def test_clear_errors():
    model = mlp((2, 4, 1), "tanh")
    x = _points(5)
    optimizer = sven_ext.Sven(model, backend="functional")
    with pytest.raises(ValueError, match="no autograd history"):
        optimizer.step(lambda: sven_ext.Residuals(model(x).detach()[:, 0]))
    # Rows that depend on a tensor requiring grad, but on no parameter of the optimizer.
    other = torch.ones(5, dtype=torch.float64, requires_grad=True)
    with pytest.raises(ValueError, match="do not depend on any trainable parameter"):
        optimizer.step(lambda: sven_ext.Residuals(other * 2))
    with pytest.raises(ValueError, match="functional_mode must be one of"):
        sven_ext.Sven(model, backend="functional", functional_mode="lobpcg")


def test_poisson_problem_rows_and_error():
    problem = poisson.PoissonProblem(interior=40, boundary=12, grid=9, seed=1)
    model = problem.model(width=6)
    rows = problem.residuals(model).values
    assert rows.shape == (52,) and problem.rows == 52
    assert torch.allclose(problem.loss(model), rows.square().sum())
    # The exact solution's Laplacian is -f: a model computing it has zero interior rows.
    class Exact(torch.nn.Module):
        def forward(self, points):
            return poisson.PoissonProblem.solution(points)[:, None] * torch.ones(1, dtype=points.dtype)

    exact_lap = poisson.PoissonProblem.laplacian(Exact(), problem.interior_points)
    torch.testing.assert_close(exact_lap, -problem.source(problem.interior_points))
    assert problem.relative_l2(Exact()) < 1e-15
    boundary = problem.boundary_points
    assert ((boundary == 0) | (boundary == 1)).any(1).all()


def test_poisson_example_smoke(tmp_path, capsys):
    summary = poisson.main(["--quick", "--adam-lrs", "1e-3", "--out", str(tmp_path), "--no-progress", "--threads", "1"])
    sven = summary["histories"]["sven"]
    assert sven["errors"][-1] < 0.5 * sven["errors"][0]
    # The safeguard accepts only steps that lower the loss.
    assert all(b <= a for a, b in zip(sven["losses"], sven["losses"][1:]))
    assert "adam lr=0.001" in summary["adam"] and summary["best_adam"] == "adam lr=0.001"
    assert json.loads((tmp_path / "poisson.json").read_text())["sven"] == summary["sven"]
    assert (tmp_path / "poisson.png").stat().st_size > 0
    assert "relative L2" in capsys.readouterr().out


def test_an_operation_without_double_backward_is_a_clear_error():
    from sven_ext.testing import tiny_transformer

    model = tiny_transformer(11, 8, 2, 5)
    idx = torch.randint(0, 11, (3, 5), generator=torch.Generator().manual_seed(0))
    opt = sven_ext.Sven(model, backend="functional", k=2)
    with pytest.raises(RuntimeError, match="cannot differentiate one of its operations twice"):
        opt.step(lambda: torch.nn.functional.cross_entropy(model(idx).transpose(1, 2), idx, reduction="none").mean(1))
