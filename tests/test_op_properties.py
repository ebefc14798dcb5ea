"""Every op at its boundary, by property: random shapes, dtypes and memory layouts.

Valid inputs (odd sizes, 1 and 0 where the op allows them; float16 to float64;
transposed, stepped, offset and expanded stride-0 views) must match the float64
reference in ``sven_ext.reference`` within a forward-error bound of the dtype the
op computes in; invalid ones must raise an error that names the op and the
problem. Each test runs on the CPU and, when a GPU is visible, on CUDA.

``SVEN_EXT_TEST_MAX_EXAMPLES`` caps the examples per test (e.g. under
compute-sanitizer, where every kernel launch is slow).
"""

import os
import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sven_ext import ops, reference

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
_MAX_EXAMPLES = int(os.environ.get("SVEN_EXT_TEST_MAX_EXAMPLES", "1000000"))


def _settings(examples):
    # No example database: the tests must not write into the source tree.
    return settings(
        max_examples=max(1, min(examples, _MAX_EXAMPLES)),
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


def _generator(data):
    return torch.Generator().manual_seed(data.draw(st.integers(0, 2**32 - 1), label="values seed"))


def _floats(gen, dtype, device):
    """Random non-zero values of ``dtype``: standard normals rounded once."""

    def make(shape):
        return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)

    return make


def _integers(gen, low, high, dtype, device):
    def make(shape):
        return torch.randint(low, high, shape, generator=gen, dtype=torch.int64).to(dtype=dtype, device=device)

    return make


def _layout(data, shape, make, name):
    """A tensor of ``shape`` from ``make`` (contiguous shape -> tensor) in a drawn memory layout.

    transposed: a contiguous tensor of the shape with two dims swapped, swapped back;
    stepped: every other entry along a dim; offset: a narrowed view (storage offset);
    expanded: a size-1 dim broadcast with stride 0 (its entries repeat).
    """
    layout = data.draw(st.sampled_from(LAYOUTS), label=f"{name} layout")
    shape = list(shape)
    if layout == "contiguous" or not shape:
        return make(shape)
    dim = data.draw(st.integers(0, len(shape) - 1), label=f"{name} dim")
    if layout == "expanded":
        return make(shape[:dim] + [1] + shape[dim + 1 :]).expand(shape)
    if layout == "transposed" and len(shape) >= 2:
        other = (dim + 1) % len(shape)
        swapped = list(shape)
        swapped[dim], swapped[other] = swapped[other], swapped[dim]
        return make(swapped).transpose(dim, other)
    if layout in ("transposed", "stepped"):
        big = list(shape)
        big[dim] *= 2
        index = [slice(None)] * len(shape)
        index[dim] = slice(None, None, 2)
        return make(big)[tuple(index)]
    big = list(shape)
    big[dim] += 1
    return make(big).narrow(dim, 1, shape[dim])


def _assert_within(got, want, scale, eps, terms, float64_terms):
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


def _gram_terms(t, *dot_lengths):
    """(terms, float64_terms) of a Gram op entry: T^2 products of dot products of the given lengths.

    Each dot product rounds at most its length in the working precision, their product
    once more; the T^2 products are summed in float64 by the op, and the reference
    rounds the dot products, the product and the sum again in float64.
    """
    dots = sum(dot_lengths) + 1
    return dots, dots + 2 * t * t


def _linear_terms(t, d_in, d_out):
    """(terms, float64_terms) of a linear sketch/project entry: sum over P = d_in d_out of G[p] W[p].

    G's entries sum T products, each is multiplied by a W entry (rounded to the working
    precision once, or generated there), and the P products are summed: T + P + 2 in
    the working precision; the float64 reference rounds T + P + 1 times.
    """
    return t + d_in * d_out + 2, t + d_in * d_out + 1


def _raises(exc, pattern, fn):
    with pytest.raises(exc, match=pattern):
        fn()


# ----------------------------------------------------------------------------- philox_raw


@pytest.mark.parametrize("dev", DEVICES)
@given(data=st.data())
@_settings(40)
def test_philox_raw_matches_reference(dev, data):
    n = data.draw(st.integers(0, 37), label="N")
    seed = data.draw(st.integers(-(2**63), 2**63 - 1), label="seed")
    counters = _layout(data, (n, 4), _integers(_generator(data), 0, 2**32, torch.int64, dev), "counters")
    out = ops.philox_raw(counters, seed)
    assert out.shape == (n, 4) and out.dtype == torch.int64 and out.device == counters.device and out.is_contiguous()
    assert torch.equal(out.cpu(), reference.philox_raw(counters.cpu(), seed))


@pytest.mark.parametrize("dev", DEVICES)
@given(data=st.data())
@_settings(25)
def test_philox_raw_rejects(dev, data):
    n = data.draw(st.integers(0, 9), label="N")
    kind = data.draw(st.sampled_from(["dim", "width", "dtype"]), label="kind")
    prefix = r"sven_ext\.philox_raw: counters must "
    if kind == "dim":
        shape = data.draw(st.sampled_from([(4,), (n, 4, 1), (1, n, 4)]), label="shape")
        counters, pattern = torch.zeros(shape, dtype=torch.int64, device=dev), prefix + "be 2-D"
    elif kind == "width":
        width = data.draw(st.sampled_from([0, 1, 3, 5, 8]), label="width")
        counters, pattern = torch.zeros(n, width, dtype=torch.int64, device=dev), prefix + r"have shape \(N, 4\)"
    else:
        dtype = data.draw(st.sampled_from([torch.int32, torch.float32, torch.float64, torch.uint8]), label="dtype")
        counters, pattern = torch.zeros(n, 4, dtype=dtype, device=dev), prefix + "be Long"
    _raises(RuntimeError, pattern, lambda: ops.philox_raw(counters, 0))


# ------------------------------------------------------------------- philox_fill_ / random_block


@pytest.mark.parametrize("dev", DEVICES)
@given(data=st.data())
@_settings(40)
def test_random_block_matches_reference(dev, data):
    rows = data.draw(st.integers(0, 19), label="rows")
    cols = data.draw(st.integers(0, 19), label="cols")
    row_offset = data.draw(st.sampled_from([0, 1, 2**32 - 3, 2**62]), label="row_offset base")
    row_offset += data.draw(st.integers(0, 1000), label="row_offset")
    col_offset = data.draw(st.sampled_from([0, 2**32 - 1, 2**33 - 64]), label="col_offset base")
    col_offset += data.draw(st.integers(0, 40), label="col_offset")
    dtype = data.draw(st.sampled_from(FLOATING), label="dtype")
    kwargs = dict(
        seed=data.draw(st.integers(-(2**63), 2**63 - 1), label="seed"),
        stream=data.draw(st.sampled_from([0, 1, 2**32 - 1]), label="stream"),
        row_offset=row_offset,
        col_offset=col_offset,
        distribution=data.draw(st.sampled_from(ops.DISTRIBUTIONS), label="distribution"),
    )
    got = ops.random_block(rows, cols, dtype=dtype, device=dev, **kwargs)
    assert got.shape == (rows, cols) and got.dtype == dtype and got.is_contiguous()
    want = reference.random_block(rows, cols, dtype=torch.float64, **kwargs)
    if kwargs["distribution"] == "rademacher":
        assert torch.equal(got.cpu().double(), want)
    else:
        # Both sides compute in float64 and round once; libm's last bits may differ,
        # and so flip the rounding of a low-precision value by one unit.
        eps = 2.0**-52 if dtype == torch.float64 else torch.finfo(dtype).eps
        torch.testing.assert_close(got.cpu().double(), want, rtol=eps, atol=eps)


def _fill(out, stream=0, row_offset=0, col_offset=0, distribution="gaussian"):
    return lambda: torch.ops.sven_ext.philox_fill_(out, 1, stream, row_offset, col_offset, distribution)


@pytest.mark.parametrize("dev", DEVICES)
@given(data=st.data())
@_settings(40)
def test_philox_fill_rejects(dev, data):
    # At least 2 x 2: a transposed 1-row view would still be contiguous.
    rows = data.draw(st.integers(2, 9), label="rows")
    cols = data.draw(st.integers(2, 9), label="cols")
    out = torch.empty(rows, cols, device=dev)
    kind = data.draw(
        st.sampled_from(["layout", "dtype", "dim", "distribution", "offset", "stream", "row_span", "col_span"]),
        label="kind",
    )
    prefix = r"sven_ext\.philox_fill_: "
    if kind == "layout":
        view = data.draw(st.sampled_from(["transposed", "stepped", "expanded"]), label="view")
        bad = {
            "transposed": torch.empty(cols, rows, device=dev).t(),
            "stepped": torch.empty(rows, 2 * cols, device=dev)[:, ::2],
            "expanded": torch.empty(1, cols, device=dev).expand(rows + 1, cols),
        }[view]
        _raises(RuntimeError, prefix + "out must be contiguous", _fill(bad))
    elif kind == "dtype":
        dtype = data.draw(st.sampled_from(NOT_FLOATING), label="dtype")
        _raises(RuntimeError, prefix + "out " + FLOAT_MESSAGE, _fill(out.to(dtype)))
    elif kind == "dim":
        shape = data.draw(st.sampled_from([(rows,), (rows, cols, 1), ()]), label="shape")
        _raises(RuntimeError, prefix + "out must be 2-D", _fill(torch.empty(shape, device=dev)))
    elif kind == "distribution":
        name = data.draw(st.sampled_from(["uniform", "Gaussian", ""]), label="distribution")
        _raises(RuntimeError, prefix + "distribution must be 'gaussian' or 'rademacher'", _fill(out, distribution=name))
    elif kind == "offset":
        which = data.draw(st.sampled_from(["row_offset", "col_offset"]), label="which")
        value = data.draw(st.integers(-(2**63), -1), label="value")
        _raises(RuntimeError, prefix + which + " must be >= 0", _fill(out, **{which: value}))
    elif kind == "stream":
        stream = data.draw(st.one_of(st.integers(-(2**63), -1), st.integers(2**32, 2**63 - 1)), label="stream")
        _raises(RuntimeError, prefix + r"stream must be in \[0, 2\^32\)", _fill(out, stream=stream))
    elif kind == "row_span":
        # row_offset + rows would overflow int64 (wrap negative) without the check.
        row_offset = 2**63 - 1 - data.draw(st.integers(0, rows - 1), label="below max")
        _raises(RuntimeError, prefix + r"row_offset \+ rows must be <= 2\^63 - 1", _fill(out, row_offset=row_offset))
    else:
        col_offset = data.draw(
            st.one_of(st.integers(2**33 - cols + 1, 2**33), st.integers(2**63 - cols, 2**63 - 1)), label="col_offset"
        )
        _raises(RuntimeError, prefix + r"col_offset \+ cols must be <= 2\^33", _fill(out, col_offset=col_offset))


@given(data=st.data())
@_settings(15)
def test_random_block_wrapper_rejects(data):
    rows = data.draw(st.integers(-5, 5), label="rows")
    cols = data.draw(st.integers(-5, 5), label="cols")
    distribution = data.draw(st.sampled_from(["gaussian", "uniform"]), label="distribution")

    def call():
        return ops.random_block(rows, cols, seed=0, distribution=distribution)

    if rows < 0 or cols < 0:
        _raises(ValueError, r"sven_ext\.random_block: rows and cols must be >= 0", call)
    elif distribution == "uniform":
        _raises(ValueError, r"sven_ext\.random_block: distribution must be one of", call)
    else:
        assert call().shape == (rows, cols)


# ----------------------------------------------------------------------------- Gram ops


def _factor_shapes(data):
    """(B, T): small, or past one CUDA tile of rows (64: many samples, or long sequences)."""
    regime = data.draw(st.sampled_from(["small", "small", "many", "long"]), label="size regime")
    if regime == "many":
        return data.draw(st.sampled_from([63, 65, 130]), label="B"), data.draw(st.integers(1, 2), label="T")
    if regime == "long":
        return data.draw(st.integers(1, 3), label="B"), data.draw(st.sampled_from([65, 130]), label="T")
    return data.draw(st.integers(0, 9), label="B"), data.draw(st.integers(0, 7), label="T")


@pytest.mark.parametrize("dev", DEVICES)
@given(data=st.data())
@_settings(40)
def test_seq_gram_matches_reference(dev, data):
    b, t = _factor_shapes(data)
    da = data.draw(st.integers(0, 17), label="Da")
    dd = data.draw(st.integers(0, 17), label="Dd")
    dtype = data.draw(st.sampled_from(FLOATING), label="dtype")
    values = _floats(_generator(data), dtype, dev)
    a = _layout(data, (b, t, da), values, "a")
    d = _layout(data, (b, t, dd), values, "d")
    k = ops.seq_gram(a, d)
    assert k.dtype == torch.float64 and k.device == a.device and k.shape == (b, b)
    a64, d64 = a.cpu().double(), d.cpu().double()
    want = reference.seq_gram(a64, d64)
    _assert_within(k, want, reference.seq_gram(a64.abs(), d64.abs()), EPS[dtype], *_gram_terms(t, da, dd))
    assert torch.equal(k, k.T)


@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("t", [65, 130])
def test_seq_gram_long_expanded_float64(dev, t):
    # Stride-0 inputs repeat one value along T, so all T^2 products share a sign and
    # their float64 rounding errors add up: at T = 65 this draw is 14 unit roundoffs of
    # the scale off the reference, past a bound that does not grow with T^2.
    gen = torch.Generator().manual_seed(0)
    a, d = (torch.randn(1, 1, 1, generator=gen, dtype=torch.float64).to(dev).expand(1, t, 1) for _ in range(2))
    a64, d64 = a.cpu(), d.cpu()
    _assert_within(ops.seq_gram(a, d), reference.seq_gram(a64, d64), reference.seq_gram(a64.abs(), d64.abs()),
                   EPS[torch.float64], *_gram_terms(t, 1, 1))


@pytest.mark.parametrize("dev", DEVICES)
@given(data=st.data())
@_settings(40)
def test_embedding_gram_matches_reference(dev, data):
    b, t = _factor_shapes(data)
    dd = data.draw(st.integers(0, 17), label="Dd")
    dtype = data.draw(st.sampled_from(FLOATING), label="dtype")
    gen = _generator(data)
    # Values are only compared: small vocabularies (many matches) and the whole int64 range.
    low, high = data.draw(st.sampled_from([(0, 1), (0, 3), (-2, 5), (-(2**63), 2**63 - 1)]), label="index range")
    indices = _layout(data, (b, t), _integers(gen, low, high, torch.int64, dev), "indices")
    d = _layout(data, (b, t, dd), _floats(gen, dtype, dev), "d")
    k = ops.embedding_gram(indices, d)
    assert k.dtype == torch.float64 and k.device == d.device and k.shape == (b, b)
    d64 = d.cpu().double()
    want = reference.embedding_gram(indices.cpu(), d64)
    _assert_within(k, want, reference.embedding_gram(indices.cpu(), d64.abs()), EPS[dtype], *_gram_terms(t, dd))
    assert torch.equal(k, k.T)


def _bad_factor_pair(data, dev, first):
    """A (first, d) pair that breaks one rule of the Gram/sketch ops, and the message's pattern.

    ``first`` is "a" (seq_gram and the sketch ops: 3-D floating) or "indices"
    (embedding_gram: 2-D int64).
    """
    b = data.draw(st.integers(1, 5), label="B")
    t = data.draw(st.integers(1, 5), label="T")
    f = data.draw(st.integers(1, 5), label="features")
    first_ok = torch.ones(b, t, f, device=dev) if first == "a" else torch.zeros(b, t, dtype=torch.int64, device=dev)
    d_ok = torch.ones(b, t, f + 1, device=dev)
    kind = data.draw(st.sampled_from(["first_dim", "d_dim", "batch", "steps", "d_dtype", "first_dtype"]), label="kind")
    if kind == "first_dim":
        bad = first_ok.flatten(1) if first == "a" else first_ok[..., None]
        return (bad, d_ok), f"{first} must be {first_ok.dim()}-D"
    if kind == "d_dim":
        return (first_ok, d_ok.flatten(1)), "d must be 3-D"
    if kind == "batch":
        return (first_ok[: b - 1] if b > 1 else torch.cat([first_ok, first_ok]), d_ok), "dim 0"
    if kind == "steps":
        return (first_ok[:, : t - 1] if t > 1 else torch.cat([first_ok, first_ok], dim=1), d_ok), "dim 1"
    if kind == "d_dtype":
        dtype = data.draw(st.sampled_from(NOT_FLOATING), label="dtype")
        return (first_ok, d_ok.to(dtype)), "d " + FLOAT_MESSAGE
    if first == "a":
        dtype = data.draw(st.sampled_from(NOT_FLOATING + [torch.float64, torch.float16]), label="dtype")
        pattern = "a and d must have one dtype" if dtype.is_floating_point else "a " + FLOAT_MESSAGE
        return (first_ok.to(dtype), d_ok), pattern
    dtype = data.draw(st.sampled_from([torch.int32, torch.int16, torch.uint8, torch.float32, torch.bool]))
    return (first_ok.to(dtype), d_ok), "indices must be Long"


@pytest.mark.parametrize("dev", DEVICES)
@given(data=st.data())
@_settings(30)
def test_seq_gram_rejects(dev, data):
    (a, d), pattern = _bad_factor_pair(data, dev, "a")
    _raises(RuntimeError, r"sven_ext\.seq_gram: .*" + pattern, lambda: ops.seq_gram(a, d))


@pytest.mark.parametrize("dev", DEVICES)
@given(data=st.data())
@_settings(30)
def test_embedding_gram_rejects(dev, data):
    (indices, d), pattern = _bad_factor_pair(data, dev, "indices")
    _raises(RuntimeError, r"sven_ext\.embedding_gram: .*" + pattern, lambda: ops.embedding_gram(indices, d))


# --------------------------------------------------------------------------- sketch ops


def _sketch_factors(data, dev):
    """a (R, T, d_in), d (R, T, d_out): small, or past one CUDA tile of rows (64) and of parameters (128)."""
    if data.draw(st.booleans(), label="big"):
        r = data.draw(st.sampled_from([63, 65, 130]), label="R")
        t = data.draw(st.integers(1, 2), label="T")
        d_in = data.draw(st.sampled_from([17, 37]), label="d_in")
        d_out = data.draw(st.sampled_from([5, 7]), label="d_out")
    else:
        r = data.draw(st.integers(0, 9), label="R")
        t = data.draw(st.integers(0, 5), label="T")
        d_in = data.draw(st.integers(0, 9), label="d_in")
        d_out = data.draw(st.integers(0, 7), label="d_out")
    dtype = data.draw(st.sampled_from(FLOATING), label="dtype")
    values = _floats(_generator(data), dtype, dev)
    return _layout(data, (r, t, d_in), values, "a"), _layout(data, (r, t, d_out), values, "d")


@pytest.mark.parametrize("dev", DEVICES)
@given(data=st.data())
@_settings(40)
def test_linear_sketch_matches_reference(dev, data):
    a, d = _sketch_factors(data, dev)
    r, t, d_in = a.shape
    d_out = d.shape[2]
    # Past one CUDA column block (32) too.
    cols = data.draw(st.one_of(st.integers(1, 9), st.sampled_from([31, 33, 65])), label="cols")
    row_offset = data.draw(st.sampled_from([0, 7, 2**32 - 5, 2**40 + 3]), label="row_offset")
    distribution = data.draw(st.sampled_from(ops.DISTRIBUTIONS), label="distribution")
    kwargs = dict(seed=data.draw(st.integers(-(2**63), 2**63 - 1), label="seed"),
                  stream=data.draw(st.integers(0, 2**32 - 1), label="stream"),
                  row_offset=row_offset, cols=cols, distribution=distribution)
    y = ops.linear_sketch(a, d, **kwargs)
    assert y.dtype == torch.float64 and y.device == a.device and y.shape == (r, cols)
    a64, d64 = a.cpu().double(), d.cpu().double()
    want = reference.linear_sketch(a64, d64, **kwargs)
    omega = reference.random_block(d_out * d_in, cols, seed=kwargs["seed"], stream=kwargs["stream"],
                                   row_offset=row_offset, distribution=distribution, dtype=torch.float64)
    scale = reference.linear_project(a64.abs(), d64.abs(), omega.abs().reshape(d_out, d_in, cols))
    _assert_within(y, want, scale, EPS[a.dtype], *_linear_terms(t, d_in, d_out))


@pytest.mark.parametrize("dev", DEVICES)
@given(data=st.data())
@_settings(40)
def test_linear_project_matches_reference(dev, data):
    a, d = _sketch_factors(data, dev)
    r, t, d_in = a.shape
    d_out = d.shape[2]
    s = data.draw(st.one_of(st.integers(0, 9), st.sampled_from([31, 33, 65])), label="s")
    z_dtype = data.draw(st.sampled_from(FLOATING), label="z dtype")
    z = _layout(data, (d_out, d_in, s), _floats(_generator(data), z_dtype, dev), "z")
    y = ops.linear_project(a, d, z)
    assert y.dtype == torch.float64 and y.device == a.device and y.shape == (r, s)
    a64, d64, z64 = a.cpu().double(), d.cpu().double(), z.cpu().double()
    # float64 when a or z is float64, float32 otherwise.
    eps = EPS[torch.float64] if torch.float64 in (a.dtype, z.dtype) else EPS[torch.float32]
    scale = reference.linear_project(a64.abs(), d64.abs(), z64.abs())
    _assert_within(y, reference.linear_project(a64, d64, z64), scale, eps, *_linear_terms(t, d_in, d_out))


@pytest.mark.parametrize("dev", DEVICES)
@given(data=st.data())
@_settings(40)
def test_linear_sketch_rejects(dev, data):
    prefix = r"sven_ext\.linear_sketch: "
    kind = data.draw(st.sampled_from(["factors", "cols", "stream", "row_offset", "span", "distribution"]), label="kind")
    a, d = torch.ones(3, 2, 5, device=dev), torch.ones(3, 2, 4, device=dev)
    args = dict(seed=0, stream=0, row_offset=0, cols=3, distribution="gaussian")
    if kind == "factors":
        (a, d), pattern = _bad_factor_pair(data, dev, "a")
    elif kind == "cols":
        args["cols"] = data.draw(st.one_of(st.integers(-(2**63), 0), st.integers(2**33 + 1, 2**63 - 1)), label="cols")
        pattern = "cols must be (>= 1|<= 2\\^33)"
    elif kind == "stream":
        args["stream"] = data.draw(st.one_of(st.integers(-(2**63), -1), st.integers(2**32, 2**63 - 1)), label="stream")
        pattern = r"stream must be in \[0, 2\^32\)"
    elif kind == "row_offset":
        args["row_offset"] = data.draw(st.integers(-(2**63), -1), label="row_offset")
        pattern = "row_offset must be >= 0"
    elif kind == "span":
        # row_offset + d_out * d_in (= 20) past int64.
        args["row_offset"] = data.draw(st.integers(2**63 - 20 + 1, 2**63 - 1), label="row_offset")
        pattern = r"row_offset \+ d_out \* d_in must fit in int64"
    else:
        args["distribution"] = data.draw(st.sampled_from(["uniform", "RADEMACHER", ""]), label="distribution")
        pattern = "distribution must be 'gaussian' or 'rademacher'"
    _raises(RuntimeError, prefix + ".*" + pattern, lambda: ops.linear_sketch(a, d, **args))


@pytest.mark.parametrize("dev", DEVICES)
@given(data=st.data())
@_settings(30)
def test_linear_project_rejects(dev, data):
    prefix = r"sven_ext\.linear_project: "
    kind = data.draw(st.sampled_from(["factors", "z_dim", "z_shape", "z_dtype"]), label="kind")
    a, d = torch.ones(3, 2, 5, device=dev), torch.ones(3, 2, 4, device=dev)
    z = torch.ones(4, 5, 6, device=dev)
    if kind == "factors":
        (a, d), pattern = _bad_factor_pair(data, dev, "a")
        z = torch.ones(d.shape[-1], a.shape[-1], 2, device=dev)
    elif kind == "z_dim":
        z = data.draw(st.sampled_from([z.flatten(0, 1), z[..., None], z[0, 0]]), label="z")
        pattern = "z must be 3-D"
    elif kind == "z_shape":
        z = data.draw(st.sampled_from([z.transpose(0, 1), z[:3], z[:, 1:], torch.ones(5, 4, 6, device=dev)]))
        pattern = re.escape("z must have shape (d_out, d_in, s) = (4, 5, s)")
    else:
        z = z.to(data.draw(st.sampled_from(NOT_FLOATING), label="z dtype"))
        pattern = "z " + FLOAT_MESSAGE
    _raises(RuntimeError, prefix + ".*" + pattern, lambda: ops.linear_project(a, d, z))


# ---------------------------------------------------------------------------- subset ops


def _index_vector(data, gen, count, size, dev, name):
    """``count`` distinct indices into ``[0, size)`` in random order, in a drawn layout.

    The values are written into the drawn view; an expanded (stride-0) vector holds one
    value ``count`` times, so it is distinct only when ``count <= 1``.
    """
    values = torch.randperm(size, generator=gen)[:count]
    idx = _layout(data, (count,), lambda shape: torch.empty(shape, dtype=torch.int64, device=dev), name)
    if count > 1 and idx.stride(0) == 0:
        idx[:1].copy_(values[:1])
    else:
        idx.copy_(values)
    return idx


def _subset_sizes(data):
    """(R, r): small (0 and 1 included, r = R too), or past a few CUDA warps and CPU grains."""
    if data.draw(st.booleans(), label="big"):
        size = data.draw(st.sampled_from([37, 65, 130]), label="size")
    else:
        size = data.draw(st.integers(0, 9), label="size")
    return size, data.draw(st.integers(0, size), label="count")


@pytest.mark.parametrize("dev", DEVICES)
@given(data=st.data())
@_settings(60)
def test_block_put_matches_reference(dev, data):
    batched = data.draw(st.booleans(), label="batched")
    n = data.draw(st.integers(0, 3), label="N") if batched else 1
    big_r, r = _subset_sizes(data)
    big_c, c = _subset_sizes(data)
    dtype = data.draw(st.sampled_from(FLOATING), label="dtype")
    gen = _generator(data)
    out = _floats(gen, dtype, dev)((n, big_r, big_c))

    def shifted(shape):
        # Away from out's values, so that every write changes its entry.
        return (16 + torch.randn(shape, generator=gen, dtype=torch.float64)).to(dtype=dtype, device=dev)

    block = _layout(data, (n, r, c), shifted, "block")
    rows = _index_vector(data, gen, r, big_r, dev, "rows")
    cols = _index_vector(data, gen, c, big_c, dev, "cols")
    if not batched:
        out, block = out[0], block[0]
    before = out.cpu().clone()
    repeated = [name for name, idx in (("rows", rows), ("cols", cols)) if idx.numel() > 1 and idx.stride(0) == 0]
    if repeated:
        _raises(RuntimeError, r"sven_ext\.block_put_: " + repeated[0] + " must hold distinct indices",
                lambda: ops.block_put_(out, rows, cols, block))
        assert torch.equal(out.cpu(), before)
        return
    assert ops.block_put_(out, rows, cols, block) is out
    assert out.is_contiguous() and out.dtype == dtype
    assert torch.equal(out.cpu(), reference.block_put_(before, rows.cpu(), cols.cpu(), block.cpu()))


def _block_put(out, rows, cols, block):
    return lambda: torch.ops.sven_ext.block_put_(out, rows, cols, block)


@pytest.mark.parametrize("dev", DEVICES)
@given(data=st.data())
@_settings(60)
def test_block_put_rejects(dev, data):
    n = data.draw(st.integers(1, 3), label="N")
    # At least 2 x 2: a transposed 1-row view would still be contiguous.
    big_r = data.draw(st.integers(2, 9), label="R")
    big_c = data.draw(st.integers(2, 9), label="C")
    r = data.draw(st.integers(2, big_r), label="r")
    c = data.draw(st.integers(2, big_c), label="c")
    gen = _generator(data)
    out = torch.zeros(n, big_r, big_c, device=dev)
    rows = torch.randperm(big_r, generator=gen)[:r].to(dev)
    cols = torch.randperm(big_c, generator=gen)[:c].to(dev)
    block = torch.ones(n, r, c, device=dev)
    kind = data.draw(
        st.sampled_from(["repeat", "range", "index_dtype", "index_dim", "out_dtype", "block_dtype", "layout",
                         "shape", "dim"]),
        label="kind",
    )
    which = data.draw(st.sampled_from(["rows", "cols"]), label="which")
    idx = (rows if which == "rows" else cols).clone()
    prefix = r"sven_ext\.block_put_: "
    if kind == "repeat":
        at, src = data.draw(st.permutations(range(idx.numel())), label="positions")[:2]
        idx[at] = idx[src]
        pattern = which + " must hold distinct indices .* more than once"
    elif kind == "range":
        size = big_r if which == "rows" else big_c
        value = data.draw(st.one_of(st.integers(-(2**63), -1), st.integers(size, 2**63 - 1)), label="value")
        at = data.draw(st.integers(0, idx.numel() - 1), label="position")
        idx[at] = value
        pattern = which + r" must hold indices in \[0, [RC] = out\.size\(\d\)\) = "
        pattern += re.escape(f"[0, {size}), got {which}[")
    elif kind == "index_dtype":
        idx = idx.to(data.draw(st.sampled_from([torch.int32, torch.int16, torch.uint8, torch.float32, torch.bool])))
        pattern = which + " must be Long"
    elif kind == "index_dim":
        idx = data.draw(st.sampled_from([idx[None], idx[:, None], idx[0]]), label="index view")
        pattern = which + " must be 1-D"
    elif kind == "out_dtype":
        dtype = data.draw(st.sampled_from(NOT_FLOATING), label="dtype")
        out, block = out.to(dtype), block.to(dtype)
        pattern = "out " + FLOAT_MESSAGE
    elif kind == "block_dtype":
        dtype = data.draw(st.sampled_from([torch.float64, torch.float16, torch.bfloat16, torch.int32]), label="dtype")
        block = block.to(dtype)
        pattern = "out and block must have one dtype"
    elif kind == "layout":
        view = data.draw(st.sampled_from(["transposed", "stepped", "expanded"]), label="view")
        out = {
            "transposed": torch.zeros(n, big_c, big_r, device=dev).transpose(1, 2),
            "stepped": torch.zeros(n, big_r, 2 * big_c, device=dev)[:, :, ::2],
            "expanded": torch.zeros(1, big_r, big_c, device=dev).expand(n + 1, big_r, big_c),
        }[view]
        if view == "expanded":
            block = torch.ones(n + 1, r, c, device=dev)
        pattern = "out must be contiguous"
    elif kind == "shape":
        axis = data.draw(st.integers(0, 2), label="axis")
        shape = [n, r, c]
        shape[axis] += data.draw(st.sampled_from([-1, 1]), label="change")
        block = torch.ones(shape, device=dev)
        pattern = ["block and out must have the same batch size N", r"block must have rows\.numel\(\) rows",
                   r"block must have cols\.numel\(\) columns"][axis]
    else:
        name = data.draw(st.sampled_from(["out", "block"]), label="tensor")
        if name == "out":
            out = out[0]
        else:
            block = block.flatten(1)
        pattern = name + " must be 3-D"
    if kind in ("repeat", "range", "index_dtype", "index_dim"):
        rows, cols = (idx, cols) if which == "rows" else (rows, idx)
    before = out.clone()
    _raises(RuntimeError, prefix + pattern, _block_put(out, rows, cols, block))
    assert torch.equal(out, before)


# Fixed shapes past the kernels' tiles, so that few-example runs (under compute-sanitizer)
# still reach every edge: CUDA Gram tiles of 64 rows (many samples; T > 64, one sample
# per tile in step chunks), sketch tiles of 64 rows, 32 columns and 128 parameters.
GRAM_EDGES = [(70, 1, 3, 2), (2, 70, 3, 17), (65, 2, 17, 5)]
SKETCH_EDGES = [(130, 2, 13, 11, 65), (70, 1, 9, 30, 40), (3, 1, 300, 1, 33)]


@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_tile_edges_matches_reference(dev, dtype):
    gen = torch.Generator().manual_seed(0)
    values = _floats(gen, dtype, dev)
    for b, t, da, dd in GRAM_EDGES:
        a, d = values((b, t, da)), values((b, t, dd))
        indices = _integers(gen, 0, 3, torch.int64, dev)((b, t))
        a64, d64 = a.cpu().double(), d.cpu().double()
        _assert_within(ops.seq_gram(a, d), reference.seq_gram(a64, d64),
                       reference.seq_gram(a64.abs(), d64.abs()), EPS[dtype], *_gram_terms(t, da, dd))
        _assert_within(ops.embedding_gram(indices, d), reference.embedding_gram(indices.cpu(), d64),
                       reference.embedding_gram(indices.cpu(), d64.abs()), EPS[dtype], *_gram_terms(t, dd))
    for r, t, d_in, d_out, cols in SKETCH_EDGES:
        a, d, z = values((r, t, d_in)), values((r, t, d_out)), values((d_out, d_in, cols))
        a64, d64, z64 = a.cpu().double(), d.cpu().double(), z.cpu().double()
        terms = _linear_terms(t, d_in, d_out)
        for distribution in ops.DISTRIBUTIONS:
            kwargs = dict(seed=5, stream=7, row_offset=2**32 - 3, cols=cols, distribution=distribution)
            omega = reference.random_block(d_out * d_in, cols, seed=5, stream=7, row_offset=2**32 - 3,
                                           distribution=distribution, dtype=torch.float64)
            scale = reference.linear_project(a64.abs(), d64.abs(), omega.abs().reshape(d_out, d_in, cols))
            _assert_within(ops.linear_sketch(a, d, **kwargs), reference.linear_sketch(a64, d64, **kwargs), scale,
                           EPS[dtype], *terms)
        _assert_within(ops.linear_project(a, d, z), reference.linear_project(a64, d64, z64),
                       reference.linear_project(a64.abs(), d64.abs(), z64.abs()), EPS[dtype], *terms)
    block = ops.random_block(64, 129, seed=3, stream=1, row_offset=5, col_offset=3, dtype=torch.float64, device=dev)
    want = reference.random_block(64, 129, seed=3, stream=1, row_offset=5, col_offset=3, dtype=torch.float64)
    torch.testing.assert_close(block.cpu(), want, rtol=2.0**-52, atol=2.0**-52)


# ---------------------------------------------------------------------------- devices


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible")
@given(data=st.data())
@_settings(20)
def test_mixed_devices_rejected_cuda(data):
    moved = data.draw(st.sampled_from(["first", "second", "third"]), label="moved")

    def place(i):
        return "cpu" if ["first", "second", "third"][i] == moved else "cuda"

    a, d = torch.ones(3, 2, 5, device=place(0)), torch.ones(3, 2, 4, device=place(1))
    indices = torch.zeros(3, 2, dtype=torch.int64, device=place(0))
    z = torch.ones(4, 5, 2, device=place(2))
    pair = "must be on one device" if moved != "third" else None
    if pair:
        _raises(RuntimeError, r"sven_ext\.seq_gram: a and d " + pair, lambda: ops.seq_gram(a, d))
        _raises(RuntimeError, r"sven_ext\.embedding_gram: indices and d " + pair, lambda: ops.embedding_gram(indices, d))
        _raises(RuntimeError, r"sven_ext\.linear_sketch: a and d " + pair,
                lambda: ops.linear_sketch(a, d, seed=0, stream=0, cols=2))
    else:
        _raises(RuntimeError, r"sven_ext\.linear_project: a and z must be on one device",
                lambda: ops.linear_project(a, d, z))
    # block_put_: out on the first device, rows on the second, cols on the third, block on CUDA.
    out = torch.zeros(2, 3, 4, device=place(0))
    rows, cols = torch.tensor([2, 0], device=place(1)), torch.tensor([3], device=place(2))
    block = torch.ones(2, 2, 1, device="cuda")
    other = {"first": "rows", "second": "rows", "third": "cols"}[moved]
    _raises(RuntimeError, r"sven_ext\.block_put_: out and " + other + " must be on one device",
            lambda: ops.block_put_(out, rows, cols, block))
