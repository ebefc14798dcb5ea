"""The built-in data sets and the mini-batch iterator."""

import math

import pytest
import torch

from sven_ext.data import batches, regression_1d, regression_1d_target


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_regression_1d_shapes_and_dtypes(dtype):
    data = regression_1d(n_train=101, n_val=37, seed=3, dtype=dtype)
    for name, rows in [("x_train", 101), ("y_train", 101), ("x_val", 37), ("y_val", 37)]:
        tensor = getattr(data, name)
        assert tensor.shape == (rows, 1), name
        assert tensor.dtype == dtype, name
        assert tensor.device.type == "cpu", name


def test_regression_1d_inputs_cover_the_interval():
    data = regression_1d(n_train=5000, n_val=5000, seed=0, dtype=torch.float64)
    for x in (data.x_train, data.x_val):
        assert x.min() >= -1 and x.max() <= 1
        assert x.min() < -0.99 and x.max() > 0.99
        assert abs(x.mean().item()) < 0.05  # U[-1, 1]: mean 0, std 1/sqrt(3); 5000 draws give std 0.008
        assert math.isclose(x.std().item(), 1 / math.sqrt(3), rel_tol=0.03)


def test_regression_1d_standardised_with_train_statistics():
    data = regression_1d(n_train=2000, n_val=3000, seed=1, dtype=torch.float64)
    assert data.y_train.mean().abs() < 1e-12
    assert data.y_train.std().sub(1).abs() < 1e-12
    # The validation split reuses the train mean and std: its statistics are close, not exact.
    assert data.y_val.mean().abs() > 1e-6
    raw_train = regression_1d_target(data.x_train)
    mean, std = raw_train.mean(), raw_train.std()
    torch.testing.assert_close(data.y_val, (regression_1d_target(data.x_val) - mean) / std)


def test_regression_1d_target_values():
    x = torch.tensor([0.0, 0.5, -0.5, 1.0], dtype=torch.float64)
    expected = torch.tensor(
        [0.0, math.exp(-2.5) * math.sin(1.0), -math.exp(-2.5) * math.sin(1.0), math.exp(-10.0) * math.sin(2.0)],
        dtype=torch.float64,
    )
    torch.testing.assert_close(regression_1d_target(x), expected, rtol=1e-15, atol=0)


def test_regression_1d_deterministic_per_seed():
    a, b, c = regression_1d(50, 40, seed=7), regression_1d(50, 40, seed=7), regression_1d(50, 40, seed=8)
    for name in ("x_train", "y_train", "x_val", "y_val"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
        assert not torch.equal(getattr(a, name), getattr(c, name)), name


def test_regression_1d_points_do_not_depend_on_dtype():
    f32, f64 = regression_1d(64, 32, seed=2, dtype=torch.float32), regression_1d(64, 32, seed=2, dtype=torch.float64)
    assert torch.equal(f32.x_train, f64.x_train.float())
    assert torch.equal(f32.y_val, f64.y_val.float())


@pytest.mark.parametrize(("n_train", "n_val"), [(1, 10), (10, 0)])
def test_regression_1d_rejects_tiny_splits(n_train, n_val):
    with pytest.raises(ValueError, match="n_train"):
        regression_1d(n_train, n_val)


@pytest.mark.parametrize(("n", "batch_size"), [(100, 32), (96, 32), (5, 8)], ids=["ragged", "exact", "one-batch"])
def test_batches_cover_every_sample_once(n, batch_size):
    x = torch.arange(n, dtype=torch.float32).unsqueeze(1)
    y = 10 * x
    sizes, seen = [], []
    for xb, yb in batches(x, y, batch_size, torch.Generator().manual_seed(0)):
        torch.testing.assert_close(yb, 10 * xb)  # pairs stay together
        sizes.append(xb.shape[0])
        seen.append(xb.squeeze(1))
    assert sizes == [batch_size] * (n // batch_size) + ([n % batch_size] if n % batch_size else [])
    assert torch.equal(torch.cat(seen).sort().values, x.squeeze(1))


def test_batches_shuffle_deterministically_and_differ_between_epochs():
    x = torch.arange(64, dtype=torch.float32).unsqueeze(1)

    def epochs(seed):
        generator = torch.Generator().manual_seed(seed)
        return [torch.cat([xb for xb, _ in batches(x, x, 16, generator)]).squeeze(1) for _ in range(2)]

    first, second = epochs(0)
    assert torch.equal(first, epochs(0)[0]) and torch.equal(second, epochs(0)[1])
    assert not torch.equal(first, second)
    assert not torch.equal(first, x.squeeze(1))
    assert not torch.equal(first, epochs(1)[0])


def test_batches_reject_bad_arguments():
    x = torch.zeros(10, 1)
    with pytest.raises(ValueError, match="same number of samples"):
        next(batches(x, torch.zeros(9, 1), 4, torch.Generator()))
    with pytest.raises(ValueError, match="batch_size"):
        next(batches(x, x, 0, torch.Generator()))
