"""Microbatched rows and column-scaled Jacobians in the capture-based backends, against dense oracles.

``microbatch_size = m``: the rows are ``(mean of m consecutive losses) ** (kappa / 2)``; the
oracle is the dense backend on a closure that returns the group means itself. ``column_scale
= S``: the direction is ``S (J S)^+ r``; the oracle builds ``J`` row by row with autograd,
scales its columns and takes ``torch.linalg.svd``. Element subsets (``param_fraction`` with
``mask_by_block=False``) are the same oracle with a 0/1 scale: ``M (J M)^+ r``.
"""


import pytest
import torch

import sven_ext
from sven_ext.backends import SketchSettings, StepSettings, make_backend
from sven_ext.backends import factored as factored_module
from sven_ext.backends import sketch as sketch_module
from sven_ext.backends.base import ElementSubset
from sven_ext.linalg import Truncation
from sven_ext.guards import draw_element_subsets
from sven_ext.testing import LargestStorage, mlp, small_cnn, tiny_transformer

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning")

F64 = 1e-9  # gram vs the float64 oracle
EXACT = 1e-8  # sketch vs the float64 oracle when rank(J) <= s
RTOL = 1e-3
CAPTURED = ("gram", "sketch", "auto")


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _scale(params, seed):
    """A positive scale per parameter, spread over [0.2, 3] so it changes the direction."""
    g = torch.Generator().manual_seed(seed)
    return [0.2 + 2.8 * torch.rand(p.shape, generator=g, dtype=p.dtype) for p in params]


def case(name, times=1):
    """``(model, losses)``: per-sample losses ``(B,)``; ``times`` copies of the batch (rank(J) <= the distinct rows)."""
    if name == "mlp":
        x, y = _randn(6, 3, seed=1).repeat(2 * times, 1), _randn(6, 2, seed=2).repeat(2 * times, 1)
        model = mlp((3, 7, 5, 2), "tanh", seed=3)
        return model, lambda: (model(x) - y).square().sum(1)
    if name == "cnn":
        x, y = _randn(6, 3, 7, 7, seed=4).repeat(times, 1, 1, 1), _randn(6, 3, seed=5).repeat(times, 1)
        model = small_cnn(seed=6)
        return model, lambda: (model(x) - y).square().mean(1)
    g = torch.Generator().manual_seed(7)
    idx, targets = torch.randint(0, 11, (6, 5), generator=g), torch.randint(0, 11, (6, 5), generator=g)
    idx, targets = idx.repeat(times, 1), targets.repeat(times, 1)
    model = tiny_transformer(11, 8, 2, 5, shared_positions=True)
    return model, lambda: torch.nn.functional.cross_entropy(model(idx).transpose(1, 2), targets,
                                                             reduction="none").mean(1)


def group_means(losses, m):
    """The oracle's closure: it averages the groups itself (one row per group, no microbatch_size)."""
    return lambda: losses().view(-1, m).mean(1)


def step(backend, model, closure, k, kappa=2.0, m=None, scale=None, subsets=None, fused=None, **sketch):
    """``(flat direction, StepDirection)`` of one ``backend.compute`` call (``fused``: the sketch
    backend's fused ops on or off; ``None``: the device's default)."""
    params = list(model.parameters())
    settings = StepSettings(Truncation(k, RTOL), kappa, microbatch_size=m, column_scale=scale,
                            element_subsets=subsets, sketch=SketchSettings(**sketch))
    chosen = make_backend(backend, model, params) if fused is None else sketch_module.SketchBackend(
        model, params, fused=fused)
    result = chosen.compute(closure, settings)
    return torch.cat([d.reshape(-1) for d in result.directions]), result


def scaled_oracle(model, closure, scale, k, kappa):
    """``S (J S)^+_k r`` from an explicit Jacobian of the closure's rows ``r = closure() ** (kappa / 2)``."""
    params = list(model.parameters())
    with torch.enable_grad():
        r = closure().pow(kappa / 2)
        jac = torch.stack([
            torch.cat([g.reshape(-1) for g in torch.autograd.grad(
                ri, params, retain_graph=True, allow_unused=True, materialize_grads=True)])
            for ri in r
        ])
    s = torch.cat([x.reshape(-1) for x in scale])
    u, sv, vh = torch.linalg.svd(jac * s, full_matrices=False)
    kept = ((sv > RTOL * sv[0]) & (sv > 1e-10)).cumprod(0).sum()
    rank = min(int(kept), k)
    return s * (vh[:rank].T @ ((u[:, :rank].T @ r.detach()) / sv[:rank]))


def relative(a, b):
    return float((a - b).norm() / b.norm())


# ----------------------------------------------------------------------------- microbatch_size


@pytest.mark.parametrize("name,k,kappa,m", [
    ("mlp", 3, 2.0, 1), ("mlp", 3, 2.0, 2), ("mlp", 3, 2.0, 3),
    ("mlp", 3, 1.0, 1), ("mlp", 3, 1.0, 2), ("mlp", 3, 1.0, 3),
    ("cnn", 5, 1.0, 2), ("cnn", 5, 2.0, 3), ("transformer", 2, 1.0, 3), ("transformer", 2, 2.0, 2),
])
def test_microbatch_gram_equals_dense_on_group_means(name, k, kappa, m):
    model, losses = case(name)
    oracle, _ = step("dense", model, group_means(losses, m), k, kappa)
    # The transformer's CPU attention kernel has no double backward, which functional's J v needs.
    for backend in ("gram", "dense") if name == "transformer" else ("gram", "dense", "functional"):
        mine, result = step(backend, model, losses, k, kappa, m)
        assert relative(mine, oracle) < F64, backend
        batch = 12 if name == "mlp" else 6
        assert result.rows.residual.numel() == batch // m and result.rows.losses.shape == (batch,)
        assert result.solution.rank <= k


@pytest.mark.parametrize("name,kappa,m,test_matrix", [
    ("mlp", 2.0, 1, "gaussian"), ("mlp", 1.0, 2, "khatri_rao"), ("mlp", 2.0, 3, "rademacher"),
    ("cnn", 1.0, 2, "gaussian"), ("cnn", 2.0, 3, "khatri_rao"),
])
def test_microbatch_sketch_exact_when_rank_fits(name, kappa, m, test_matrix):
    # 4 copies of 6 distinct samples (mlp: 8 copies): groups of m | 6 repeat too, so rank(J) <= 6 / m.
    model, losses = case(name, times=4)
    k = 6 // m
    oracle, _ = step("dense", model, group_means(losses, m), k, kappa)
    mine, result = step("sketch", model, losses, k, kappa, m, oversampling=2, test_matrix=test_matrix)
    assert result.info["sketch_size"] == k + 2 < result.rows.residual.numel()
    assert relative(mine, oracle) < EXACT


@pytest.mark.parametrize("m", [2, 3])
def test_microbatch_sketch_identity_basis(m):
    model, losses = case("mlp")
    oracle, _ = step("dense", model, group_means(losses, m), 12 // m, 1.0)
    mine, result = step("sketch", model, losses, 12 // m, 1.0, m, oversampling=0)
    assert result.info["test_matrix"] == "identity" and result.info["sketch_size"] == 12 // m
    assert relative(mine, oracle) < EXACT


def test_microbatch_auto():
    model, losses = case("cnn")
    oracle, _ = step("dense", model, group_means(losses, 2), 2, 1.0)
    mine, result = step("auto", model, losses, 2, 1.0, 2)
    assert result.info["backend"] in ("gram", "sketch")
    assert relative(mine, oracle) < EXACT


@pytest.mark.parametrize("backend", ["dense", "functional", *CAPTURED])
def test_microbatch_must_divide_the_batch(backend):
    model, losses = case("mlp")  # B = 12
    with pytest.raises(ValueError, match="microbatch_size=5 does not divide the batch size 12"):
        step(backend, model, losses, 2, m=5)


@pytest.mark.parametrize("backend", ["dense", "functional", *CAPTURED])
def test_microbatch_rejects_residuals_and_bad_sizes(backend):
    model, losses = case("mlp")
    with pytest.raises(ValueError, match="microbatch_size averages per-sample losses.*Residuals"):
        step(backend, model, lambda: sven_ext.Residuals(losses()), 2, m=2)
    with pytest.raises(ValueError, match="microbatch_size must be a positive integer"):
        step(backend, model, losses, 2, m=0)


# ----------------------------------------------------------------------------- column_scale


@pytest.mark.parametrize("name,k,kappa,m", [
    ("mlp", 4, 2.0, None), ("mlp", 4, 1.0, 2), ("mlp", 12, 2.0, 3), ("cnn", 6, 1.0, None), ("cnn", 6, 2.0, 2),
    ("transformer", 3, 2.0, None), ("transformer", 3, 1.0, 3),
])
def test_column_scale_gram_equals_scaled_svd(name, k, kappa, m):
    model, losses = case(name)
    scale = _scale(model.parameters(), seed=len(name))
    rows = losses if m is None else group_means(losses, m)
    oracle = scaled_oracle(model, rows, scale, k, kappa)
    dense, _ = step("dense", model, losses, k, kappa, m, scale)
    assert relative(dense, oracle) < F64
    if name != "transformer":  # no double backward through the CPU attention kernel
        functional, _ = step("functional", model, losses, k, kappa, m, scale)
        assert relative(functional, oracle) < F64
    mine, result = step("gram", model, losses, k, kappa, m, scale)
    assert relative(mine, oracle) < F64
    # An elementwise S has no Kronecker structure: every factored parameter goes through per-row gradients.
    assert set(result.info["paths"].values()) <= {"rows", "direct"}


@pytest.mark.parametrize("name,m,test_matrix,fused", [
    ("mlp", None, "gaussian", False), ("mlp", 3, "khatri_rao", True), ("mlp", 3, "rademacher", False),
    ("cnn", None, "khatri_rao", False), ("cnn", 3, "gaussian", True),
])
def test_column_scale_sketch_exact_when_rank_fits(name, m, test_matrix, fused):
    model, losses = case(name, times=4)
    k = 6 if m is None else 2
    scale = _scale(model.parameters(), seed=11)
    rows = losses if m is None else group_means(losses, m)
    oracle = scaled_oracle(model, rows, scale, k, 1.0)
    mine, result = step("sketch", model, losses, k, 1.0, m, scale, fused=fused, oversampling=2,
                        test_matrix=test_matrix)
    assert result.info["sketch_size"] == k + 2 < result.rows.residual.numel()
    assert result.info["sketch_residual"] is None
    assert relative(mine, oracle) < EXACT


def test_column_scale_sketch_power_iterations_and_tiny_tiles(monkeypatch):
    """Not rank-deficient: q = 2 beats q = 0 against the exact step; 1-byte tiles change nothing."""
    model = mlp((3, 16, 16, 2), seed=9)
    x, y = _randn(36, 3, seed=15), _randn(36, 2, seed=16)  # 18 groups of 2

    def losses():
        return (model(x) - y).square().sum(1)

    scale = _scale(model.parameters(), seed=12)
    exact, _ = step("gram", model, losses, 4, 2.0, 2, scale)
    errors = [relative(step("sketch", model, losses, 4, 2.0, 2, scale, power_iterations=q, seed=1)[0], exact)
              for q in (0, 2)]
    assert errors[1] < errors[0] and errors[1] < 0.1, errors
    default, _ = step("sketch", model, losses, 4, 2.0, 2, scale, power_iterations=1)
    monkeypatch.setattr(sketch_module.SketchBackend, "transient_budget_bytes", 1)
    tiny, _ = step("sketch", model, losses, 4, 2.0, 2, scale, power_iterations=1)
    assert relative(tiny, default) < 1e-10


def test_unit_column_scale_changes_nothing():
    model, losses = case("mlp")
    ones = [torch.ones_like(p) for p in model.parameters()]
    for backend in CAPTURED:
        plain, _ = step(backend, model, losses, 4, 1.0, 2)
        unit, _ = step(backend, model, losses, 4, 1.0, 2, ones)
        assert relative(unit, plain) < F64, backend


def _bad_scales(params):
    ones = [torch.ones_like(p) for p in params]
    nan, negative, zero, wrong = (list(ones) for _ in range(4))
    nan[1] = torch.full_like(params[1], float("nan"))
    negative[0] = -ones[0]
    zero[2] = torch.zeros_like(params[2])
    wrong[1] = torch.ones(3, 3, dtype=params[1].dtype)
    return [
        (ones[:-1], r"one tensor per moving parameter \(6\), got 5 entries"),
        (ones[0], "one tensor per moving parameter"),
        (wrong, r"column_scale\[1\] has shape \(3, 3\).*its parameter has shape \(7,\)"),
        ([*ones[:3], 1.0, *ones[4:]], r"column_scale\[3\] must be a floating-point tensor"),
        ([*ones[:3], ones[3].long(), *ones[4:]], r"column_scale\[3\] must be a floating-point tensor"),
        (nan, r"column_scale\[1\] must be finite and > 0"),
        (negative, r"column_scale\[0\] must be finite and > 0"),
        (zero, r"column_scale\[2\] must be finite and > 0"),
    ]


@pytest.mark.parametrize("backend", ["dense", "functional", *CAPTURED])
def test_bad_column_scale(backend):
    model, losses = case("mlp")
    for scale, match in _bad_scales(list(model.parameters())):
        with pytest.raises(ValueError, match=match):
            step(backend, model, losses, 2, scale=scale)


# ----------------------------------------------------------------------------- element subsets


def _subsets(model, fraction, seed):
    params = list(model.parameters())
    return draw_element_subsets(model, params, fraction, torch.Generator().manual_seed(seed))


def _masks(model, subsets, scale=None):
    params = list(model.parameters())
    scale = scale or [torch.ones_like(p) for p in params]
    return [s * subset.mask(p) for p, s, subset in zip(params, scale, subsets)]


@pytest.mark.parametrize("name,k,kappa,m,fraction", [
    ("mlp", 4, 2.0, None, 0.25), ("mlp", 4, 1.0, 2, 0.5), ("mlp", 12, 2.0, 3, 0.1), ("cnn", 6, 1.0, None, 0.3),
    ("cnn", 6, 2.0, 2, 0.5), ("transformer", 3, 2.0, None, 0.3), ("transformer", 3, 1.0, 3, 0.5),
])
def test_element_subsets_equal_the_masked_svd(name, k, kappa, m, fraction):
    model, losses = case(name)
    subsets = _subsets(model, fraction, seed=len(name) + k)
    rows = losses if m is None else group_means(losses, m)
    oracle = scaled_oracle(model, rows, _masks(model, subsets), k, kappa)
    backends = ("dense", "gram") if name == "transformer" else ("dense", "functional", "gram")  # double backward
    for backend in backends:
        mine, result = step(backend, model, losses, k, kappa, m, subsets=subsets)
        assert relative(mine, oracle) < F64, backend
    # Ungrouped Linear/conv layers keep their routes on the subset's factors.
    paths = result.info["paths"]
    restricted = {"mlp": ["0.weight", "0.bias", "2.weight", "4.weight"], "cnn": ["conv1.weight", "conv4.bias", "head.weight"],
                  "transformer": ["blocks.0.qkv.weight", "blocks.0.fc2.bias"]}[name]
    assert all(paths[n].endswith("(subset)") for n in restricted), paths
    assert "(subset)" not in paths.get("conv2.weight", "")  # grouped: a 0/1 column scale


def test_element_subset_directions_do_not_depend_on_the_chunks(monkeypatch):
    model, losses = case("cnn")
    subsets = _subsets(model, 0.3, seed=4)
    whole, _ = step("gram", model, losses, 6, subsets=subsets)
    monkeypatch.setattr(factored_module, "SUBSET_CHUNK_ELEMENTS", 1)  # one unit at a time
    chunked, _ = step("gram", model, losses, 6, subsets=subsets)
    assert relative(chunked, whole) < 1e-13


class TiedLayers(torch.nn.Module):
    """Two Linear layers sharing one weight, each with its own bias: per-row gradients route."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
        self.b.weight = self.a.weight
        self.head = torch.nn.Linear(4, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.b(torch.tanh(self.a(x)))))


def test_element_subsets_of_a_tied_weight_take_the_rows_route():
    torch.manual_seed(3)
    model = TiedLayers().double()
    x, y = _randn(9, 4, seed=1), _randn(9, 2, seed=2)
    losses = lambda: (model(x) - y).square().sum(1)  # noqa: E731
    subsets = _subsets(model, 0.4, seed=3)
    oracle = scaled_oracle(model, losses, _masks(model, subsets), 5, 2.0)
    mine, result = step("gram", model, losses, 5, subsets=subsets)
    assert relative(mine, oracle) < F64
    assert result.info["paths"]["a.weight"] == "rows" and result.info["paths"]["head.weight"].endswith("(subset)")


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_element_subsets_with_a_column_scale(name):
    # RMSProp before the pseudo-inverse on a subset: S M (J S M)^+ r, through per-row gradients.
    model, losses = case(name)
    subsets, scale = _subsets(model, 0.4, seed=5), _scale(model.parameters(), seed=6)
    oracle = scaled_oracle(model, losses, _masks(model, subsets, scale), 5, 2.0)
    for backend in ("dense", "functional", "gram"):
        mine, result = step(backend, model, losses, 5, 2.0, scale=scale, subsets=subsets)
        assert relative(mine, oracle) < F64, backend
    assert not any("(subset)" in path for path in result.info["paths"].values())


def test_element_subsets_fall_back_where_a_bias_disagrees():
    model, losses = case("mlp")
    subsets = _subsets(model, 0.5, seed=8)
    subsets[1] = ElementSubset(torch.tensor([0, 6]))  # 0.bias no longer on 0.weight's units
    subsets[3] = None  # 2.bias moves entirely
    oracle = scaled_oracle(model, losses, [s.mask(p) if s is not None else torch.ones_like(p)
                                           for p, s in zip(model.parameters(), subsets)], 4, 2.0)
    mine, result = step("gram", model, losses, 4, 2.0, subsets=subsets)
    assert relative(mine, oracle) < F64
    paths = result.info["paths"]
    assert paths["0.weight"] == paths["2.weight"] == "rows" and paths["4.weight"].endswith("(subset)")


@pytest.mark.parametrize("name,m,test_matrix", [("mlp", None, "gaussian"), ("mlp", 3, "khatri_rao"),
                                                ("cnn", None, "rademacher")])
def test_element_subsets_sketch_and_auto_exact_when_rank_fits(name, m, test_matrix):
    model, losses = case(name, times=4)
    k = 6 if m is None else 2
    subsets = _subsets(model, 0.5, seed=9)
    rows = losses if m is None else group_means(losses, m)
    oracle = scaled_oracle(model, rows, _masks(model, subsets), k, 1.0)
    mine, result = step("sketch", model, losses, k, 1.0, m, subsets=subsets, oversampling=2, test_matrix=test_matrix)
    assert result.info["sketch_size"] == k + 2 < result.rows.residual.numel()
    assert relative(mine, oracle) < EXACT
    auto, _ = step("auto", model, losses, k, 1.0, m, subsets=subsets, oversampling=2)
    assert relative(auto, oracle) < EXACT


# ----------------------------------------------------------------------------- memory


@pytest.mark.parametrize("backend", ["gram", "sketch"])
def test_never_allocates_the_jacobian(backend):
    model = mlp((16, 32, 32, 32, 32, 3), seed=11)
    x, y = _randn(26, 16, seed=12), _randn(26, 3, seed=13)
    params = list(model.parameters())
    total, largest_layer = sum(p.numel() for p in params), max(p.numel() for p in params)
    rows = 13  # microbatches of 2
    assert 26 * largest_layer < rows * total
    scale = _scale(params, seed=14)
    with LargestStorage() as mode:  # a fresh backend: the step also checks its factors against autograd
        step(backend, model, lambda: (model(x) - y).square().sum(1), 4, 2.0, 2, scale, oversampling=4)
    assert mode.largest < rows * total, mode.largest
