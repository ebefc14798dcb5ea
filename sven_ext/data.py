"""Built-in data sets (generated, nothing is downloaded) and a mini-batch iterator."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch


@dataclass(frozen=True)
class Split:
    """A train / validation pair of input and target tensors.

    Attributes:
        x_train: ``(N_train, d_in)`` inputs.
        y_train: ``(N_train, d_out)`` targets.
        x_val: ``(N_val, d_in)`` inputs.
        y_val: ``(N_val, d_out)`` targets.
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor


def regression_1d_target(x: torch.Tensor) -> torch.Tensor:
    """The paper's 1-D target ``exp(-10 x^2) sin(2 x)``, before standardisation (elementwise)."""
    return torch.exp(-10.0 * x.square()) * torch.sin(2.0 * x)


def regression_1d(
    n_train: int = 10_000, n_val: int = 10_000, seed: int = 0, dtype: torch.dtype = torch.float32
) -> Split:
    """The paper's 1-D regression task: ``y = exp(-10 x^2) sin(2 x)``, ``x ~ U[-1, 1]``.

    Targets of both splits are standardised with the mean and standard deviation of the
    training targets, so a validation MSE of 1 is what predicting the mean achieves.
    Inputs are drawn in float64 and cast to ``dtype``, so the points do not depend on it.

    Args:
        n_train: number of training points (at least 2: the standard deviation needs them).
        n_val: number of validation points (at least 1).
        seed: seed of the generator that draws the points (train first, then validation).
        dtype: floating dtype of the returned tensors.

    Returns:
        A :class:`Split` of CPU tensors of ``dtype``, each of shape ``(N, 1)``.
    """
    if n_train < 2 or n_val < 1:
        raise ValueError(f"need n_train >= 2 and n_val >= 1, got n_train={n_train}, n_val={n_val}")
    if not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating dtype, got {dtype}")
    generator = torch.Generator().manual_seed(seed)
    x_train = torch.rand(n_train, 1, generator=generator, dtype=torch.float64) * 2.0 - 1.0
    x_val = torch.rand(n_val, 1, generator=generator, dtype=torch.float64) * 2.0 - 1.0
    y_train, y_val = regression_1d_target(x_train), regression_1d_target(x_val)
    mean, std = y_train.mean(), y_train.std()
    return Split(
        x_train.to(dtype),
        ((y_train - mean) / std).to(dtype),
        x_val.to(dtype),
        ((y_val - mean) / std).to(dtype),
    )


def batches(
    x: torch.Tensor, y: torch.Tensor, batch_size: int, generator: torch.Generator
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of shuffled mini-batches; every sample is used exactly once.

    Nothing is dropped: the last batch holds the remaining ``N % batch_size`` samples
    when ``batch_size`` does not divide ``N``. (Sven handles any number of rows; its
    rank cap ``k`` simply exceeds the rank available in a small last batch.)

    Args:
        x: ``(N, ...)`` inputs.
        y: ``(N, ...)`` targets, same ``N`` and device as ``x``.
        batch_size: samples per batch (positive).
        generator: CPU generator of the permutation; the order is a function of its state,
            so two loops given equally seeded generators see the same batches.

    Yields:
        ``(x_batch, y_batch)`` of shapes ``(b, ...)``, with ``b = batch_size`` except possibly last.
    """
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must have the same number of samples, got {x.shape[0]} and {y.shape[0]}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    order = torch.randperm(x.shape[0], generator=generator).to(x.device)
    for start in range(0, x.shape[0], batch_size):
        index = order[start : start + batch_size]
        yield x[index], y[index]
