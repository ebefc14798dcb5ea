"""``backend="auto"``: what it picks, why, and that it stays within ``max_memory``."""

import pytest
import torch
from torch import nn

import sven_ext
from sven_ext import costs
from sven_ext.testing import LargestStorage, mlp, relative_difference, small_cnn, sven_update, tiny_transformer

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning")


def regression(batch, inputs, outputs, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, inputs, generator=g, dtype=torch.float64)
    y = torch.randn(batch, outputs, generator=g, dtype=torch.float64)
    return lambda model: sven_ext.Residuals(model(x) - y)


def test_small_batch_picks_gram_and_says_why():
    model, loss = mlp((3, 16, 16, 2)), regression(13, 3, 2)
    update, info = sven_update(model, loss, lr=0.1, k=6)
    assert info["backend"] == "gram"
    assert info["auto_reason"].startswith("gram: K needs 5.3 KiB") and "GFLOP" in info["auto_reason"]
    exact, _ = sven_update(model, loss, backend="gram", lr=0.1, k=6)
    assert relative_difference(update, exact) == 0


def test_many_rows_and_small_k_pick_the_sketch():
    model, loss = mlp((3, 16, 16, 2)), regression(1000, 3, 2)  # 2,000 rows, k = 4
    _, info = sven_update(model, loss, lr=0.1, k=4)
    assert info["backend"] == "sketch" and info["sketch_size"] == 14
    assert info["auto_reason"].startswith("sketch: ~") and "more than 4x" in info["auto_reason"]


def test_tight_budget_picks_the_sketch_within_it():
    model, loss = mlp((3, 100, 100, 100, 2), seed=1), regression(300, 3, 2)  # 600 rows, K: 2.7 MiB
    rows, k = 600, 50
    _, free = sven_update(model, loss, lr=0.1, k=k)
    assert free["backend"] == "gram"  # exact, and cheap enough, when memory allows
    # K and eigh's workspace (4 x 2.7 MiB) do not fit beside the factors and the saved activations.
    budget = free["factor_bytes"] + (7 << 20)
    opt = sven_ext.Sven(model, lr=0.1, k=k, max_memory=budget)
    with LargestStorage() as mode:
        opt.step(lambda: loss(model))
    info = opt.last_info
    assert info["backend"] == "sketch", info["auto_reason"]
    assert "K needs 2.7 MiB" in info["auto_reason"] and "over max_memory" in info["auto_reason"]
    assert info["transient_budget"] < 2 << 20
    assert mode.largest < rows * rows  # no K, no transient as large as it


def test_budget_too_small_for_anything_fails_before_allocating():
    model, loss = mlp((3, 16, 16, 2)), regression(300, 3, 2)
    opt = sven_ext.Sven(model, lr=0.1, k=8, max_memory=200_000)
    # The first step checks its factors: that is refused first (the factors alone exceed the budget).
    with LargestStorage() as mode, pytest.raises(ValueError, match=r"the factor check needs .* max_memory"):
        opt.step(lambda: loss(model))
    assert mode.largest < 600 * 18  # neither K nor the R x s sketch was allocated
    opt = sven_ext.Sven(model, lr=0.1, k=8, max_memory=200_000)
    opt._checks.enabled = False  # factors trusted: the backends' own estimates decide
    with LargestStorage() as mode, pytest.raises(ValueError, match=r"max_memory=200000 bytes is too small"):
        opt.step(lambda: loss(model))
    assert mode.largest < 600 * 18


def test_batch_statistics_fall_back_to_dense_within_budget():
    model = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 1)).double()
    loss = regression(16, 3, 1)
    update, info = sven_update(model, loss, lr=0.1, k=4)
    assert info["backend"] == "dense" and "batch statistics in ['1']" in info["auto_reason"]
    oracle, _ = sven_update(model, loss, backend="dense", lr=0.1, k=4)
    assert relative_difference(update, oracle) == 0
    opt = sven_ext.Sven(model, lr=0.1, k=4, max_memory=1000)
    with pytest.raises(ValueError, match=r"batch statistics.*model\.eval\(\)"):
        opt.step(lambda: loss(model))


@pytest.mark.parametrize("expected", ["gram", "sketch"])
@pytest.mark.parametrize("case", ["cnn", "transformer"])
def test_layer_set(monkeypatch, case, expected):
    g = torch.Generator().manual_seed(1)
    if case == "cnn":
        x, y = (torch.randn(7, 3, 7, 7, generator=g, dtype=torch.float64),
                torch.randn(7, 3, generator=g, dtype=torch.float64))
        model, loss = small_cnn(), lambda m: sven_ext.Residuals(m(x) - y)
    else:
        idx, targets = torch.randint(0, 11, (7, 5), generator=g), torch.randint(0, 11, (7, 5), generator=g)
        model = tiny_transformer()

        def loss(m):
            return nn.functional.cross_entropy(m(idx).transpose(1, 2), targets, reduction="none").mean(1)

    if expected == "sketch":  # these batches are small: make the sketch win to run it on every layer kind
        monkeypatch.setattr(costs, "GRAM_PREFERENCE", 0.0)
    kwargs = dict(lr=0.1, k=2, oversampling=2)
    update, info = sven_update(model, loss, **kwargs)
    assert info["backend"] == expected, info["auto_reason"]
    same, _ = sven_update(model, loss, backend=expected, **kwargs)
    assert relative_difference(update, same) == 0


@pytest.mark.parametrize("expected", ["gram", "sketch"])
def test_the_modules_recorded_whole_are_reported_whichever_backend_solves(monkeypatch, expected):
    model, x = mlp((3, 6, 1), seed=3), torch.randn(7, 3, generator=torch.Generator().manual_seed(0),
                                                   dtype=torch.float64)
    if expected == "sketch":
        monkeypatch.setattr(costs, "GRAM_PREFERENCE", 0.0)
    # Rows that mix the samples: both linear layers fail the factor check and are recorded whole.
    _, info = sven_update(model, lambda m: (m(x) - m(x).mean(0)).square().sum(1), lr=0.1, k=2, oversampling=2)
    assert info["backend"] == expected, info["auto_reason"]
    assert info["recorded_whole"] == ["0", "2"]


def test_estimates_scale_as_expected():
    """Gram's cost grows as R^3 (eigh), the sketch's as R s P: many rows favour the sketch."""
    model, small, large = mlp((3, 16, 16, 2)), 100, 10_000
    from sven_ext.capture import capture

    def uses(rows):
        x = torch.randn(rows // 2, 3, dtype=torch.float64)
        params = list(model.parameters())
        with torch.enable_grad(), capture(model, params) as cap:
            out = model(x)
        return cap.uses(out, 64)

    for rows, expected in ((small, "gram"), (large, "sketch")):
        u = uses(rows)
        gram, sketch = costs.estimate_gram(u, rows), costs.estimate_sketch(u, rows, 18, 1, "gaussian")
        assert costs.choose(gram, sketch, 0, 1 << 40, False)[0] == expected


def test_the_free_memory_is_read_only_for_big_steps(monkeypatch):
    small = costs.Estimate("gram", 1 << 20, 1.0, "K needs 1 MiB")
    big = costs.Estimate("gram", costs.UNCHECKED_BYTES, 1.0, "K needs 64 MiB")

    def unread(device):
        raise AssertionError("read the free memory for a small step")

    monkeypatch.setattr(costs, "available_bytes", unread)
    costs.require_fit(small, 1 << 20, None, torch.device("cpu"))
    monkeypatch.setattr(costs, "available_bytes", lambda device: 1 << 20)
    with pytest.raises(ValueError, match="backend='gram' needs about 65.0 MiB.*more than the free memory"):
        costs.require_fit(big, 1 << 20, None, torch.device("cpu"))
    with pytest.raises(ValueError, match="more than the max_memory"):
        costs.require_fit(small, 1 << 20, 1 << 20, torch.device("cpu"))
