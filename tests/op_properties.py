"""What the op-property tests share: hypothesis settings, value and memory-layout draws, error bounds.

Valid inputs (odd sizes, 1 and 0 where the op allows them; float16 to float64;
transposed, stepped, offset and expanded stride-0 views) must match the float64
reference in ``sven_ext.reference`` within a forward-error bound of the dtype the
op computes in; invalid ones must raise an error that names the op and the
problem. Each test runs on the CPU and, when a GPU is visible, on CUDA
(``tests/test_op_properties_*.py``, one file per op family).

``SVEN_EXT_TEST_MAX_EXAMPLES`` caps the examples per test (e.g. under
compute-sanitizer, where every kernel launch is slow).
"""

import os

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible")),
]
FLOATING = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
NOT_FLOATING = [torch.int32, torch.int64, torch.uint8, torch.bool, torch.complex64]
# Unit roundoff of the precision each op computes in: float64 for float64 inputs,
# float32 otherwise (float16 and bfloat16 values are exact in float32).
EPS = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.float16: 2.0**-24, torch.bfloat16: 2.0**-24}
LAYOUTS = ["contiguous", "transposed", "stepped", "offset", "expanded"]
FLOAT_MESSAGE = "must be float16, bfloat16, float32 or float64"
MAX_EXAMPLES = int(os.environ.get("SVEN_EXT_TEST_MAX_EXAMPLES", "1000000"))


def property_settings(examples):
    # No example database: the tests must not write into the source tree.
    return settings(
        max_examples=max(1, min(examples, MAX_EXAMPLES)),
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


def generator(data):
    return torch.Generator().manual_seed(data.draw(st.integers(0, 2**32 - 1), label="values seed"))


def floats(gen, dtype, device):
    """Random non-zero values of ``dtype``: standard normals rounded once."""

    def make(shape):
        return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)

    return make


def integers(gen, low, high, dtype, device):
    def make(shape):
        return torch.randint(low, high, shape, generator=gen, dtype=torch.int64).to(dtype=dtype, device=device)

    return make


def layout(data, shape, make, name):
    """A tensor of ``shape`` from ``make`` (contiguous shape -> tensor) in a drawn memory layout.

    transposed: a contiguous tensor of the shape with two dims swapped, swapped back;
    stepped: every other entry along a dim; offset: a narrowed view (storage offset);
    expanded: a size-1 dim broadcast with stride 0 (its entries repeat).
    """
    kind = data.draw(st.sampled_from(LAYOUTS), label=f"{name} layout")
    shape = list(shape)
    if kind == "contiguous" or not shape:
        return make(shape)
    dim = data.draw(st.integers(0, len(shape) - 1), label=f"{name} dim")
    if kind == "expanded":
        return make(shape[:dim] + [1] + shape[dim + 1 :]).expand(shape)
    if kind == "transposed" and len(shape) >= 2:
        other = (dim + 1) % len(shape)
        swapped = list(shape)
        swapped[dim], swapped[other] = swapped[other], swapped[dim]
        return make(swapped).transpose(dim, other)
    if kind in ("transposed", "stepped"):
        big = list(shape)
        big[dim] *= 2
        index = [slice(None)] * len(shape)
        index[dim] = slice(None, None, 2)
        return make(big)[tuple(index)]
    big = list(shape)
    big[dim] += 1
    return make(big).narrow(dim, 1, shape[dim])


def assert_within(got, want, scale, eps, terms, float64_terms):
    """|got - want| <= 2 * (terms * eps + float64_terms * 2^-53) * scale entrywise.

    ``scale`` is the op on |inputs| (every rounding error is at most its unit roundoff
    times that). ``terms`` counts the roundings any entry goes through in the op's
    working precision (unit roundoff ``eps``); ``float64_terms`` those in float64: the
    op's float64 accumulation and the float64 reference's own roundings, since ``want``
    is computed, not exact. A sum of n products, accumulated in any order, rounds at
    most n times along any path. The factor 2 covers second-order terms.
    """
    assert got.shape == want.shape, f"shape {tuple(got.shape)}, want {tuple(want.shape)}"
    err = (got.cpu() - want).abs()
    bound = 2 * (terms * eps + float64_terms * EPS[torch.float64]) * scale + 1e-300
    if err.numel():
        worst = int((err - bound).argmax())
        assert bool((err <= bound).all()), (
            f"error {err.flatten()[worst].item():.3e} > bound {bound.flatten()[worst].item():.3e} at flat index {worst}"
        )


def gram_terms(t, *dot_lengths):
    """(terms, float64_terms) of a Gram op entry: T^2 products of dot products of the given lengths.

    Each dot product rounds at most its length in the working precision, their product
    once more; the T^2 products are summed in float64 by the op, and the reference
    rounds the dot products, the product and the sum again in float64.
    """
    dots = sum(dot_lengths) + 1
    return dots, dots + 2 * t * t


def linear_terms(t, d_in, d_out):
    """(terms, float64_terms) of a linear sketch/project entry: sum over P = d_in d_out of G[p] W[p].

    G's entries sum T products, each is multiplied by a W entry (rounded to the working
    precision once, or generated there), and the P products are summed: T + P + 2 in
    the working precision; the float64 reference rounds T + P + 1 times.
    """
    return t + d_in * d_out + 2, t + d_in * d_out + 1


def raises(exc, pattern, fn):
    with pytest.raises(exc, match=pattern):
        fn()
