"""The factor ops by property (seq_gram, embedding_gram, linear_sketch, linear_project); see ``op_properties``."""

import re

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from sven_ext import ops, reference

from op_properties import (
    DEVICES, EPS, FLOAT_MESSAGE, FLOATING, NOT_FLOATING, assert_within, floats, generator, gram_terms, integers,
    layout, linear_terms, property_settings, raises,
)


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
@property_settings(40)
def test_seq_gram_matches_reference(dev, data):
    b, t = _factor_shapes(data)
    da = data.draw(st.integers(0, 17), label="Da")
    dd = data.draw(st.integers(0, 17), label="Dd")
    dtype = data.draw(st.sampled_from(FLOATING), label="dtype")
    values = floats(generator(data), dtype, dev)
    a = layout(data, (b, t, da), values, "a")
    d = layout(data, (b, t, dd), values, "d")
    k = ops.seq_gram(a, d)
    assert k.dtype == torch.float64 and k.device == a.device and k.shape == (b, b)
    a64, d64 = a.cpu().double(), d.cpu().double()
    want = reference.seq_gram(a64, d64)
    assert_within(k, want, reference.seq_gram(a64.abs(), d64.abs()), EPS[dtype], *gram_terms(t, da, dd))
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
    assert_within(ops.seq_gram(a, d), reference.seq_gram(a64, d64), reference.seq_gram(a64.abs(), d64.abs()),
                   EPS[torch.float64], *gram_terms(t, 1, 1))


@pytest.mark.parametrize("dev", DEVICES)
@given(data=st.data())
@property_settings(40)
def test_embedding_gram_matches_reference(dev, data):
    b, t = _factor_shapes(data)
    dd = data.draw(st.integers(0, 17), label="Dd")
    dtype = data.draw(st.sampled_from(FLOATING), label="dtype")
    gen = generator(data)
    # Values are only compared: small vocabularies (many matches) and the whole int64 range.
    low, high = data.draw(st.sampled_from([(0, 1), (0, 3), (-2, 5), (-(2**63), 2**63 - 1)]), label="index range")
    indices = layout(data, (b, t), integers(gen, low, high, torch.int64, dev), "indices")
    d = layout(data, (b, t, dd), floats(gen, dtype, dev), "d")
    k = ops.embedding_gram(indices, d)
    assert k.dtype == torch.float64 and k.device == d.device and k.shape == (b, b)
    d64 = d.cpu().double()
    want = reference.embedding_gram(indices.cpu(), d64)
    assert_within(k, want, reference.embedding_gram(indices.cpu(), d64.abs()), EPS[dtype], *gram_terms(t, dd))
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
@property_settings(30)
def test_seq_gram_rejects(dev, data):
    (a, d), pattern = _bad_factor_pair(data, dev, "a")
    raises(RuntimeError, r"sven_ext\.seq_gram: .*" + pattern, lambda: ops.seq_gram(a, d))


@pytest.mark.parametrize("dev", DEVICES)
@given(data=st.data())
@property_settings(30)
def test_embedding_gram_rejects(dev, data):
    (indices, d), pattern = _bad_factor_pair(data, dev, "indices")
    raises(RuntimeError, r"sven_ext\.embedding_gram: .*" + pattern, lambda: ops.embedding_gram(indices, d))


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
    values = floats(generator(data), dtype, dev)
    return layout(data, (r, t, d_in), values, "a"), layout(data, (r, t, d_out), values, "d")


@pytest.mark.parametrize("dev", DEVICES)
@given(data=st.data())
@property_settings(40)
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
    assert_within(y, want, scale, EPS[a.dtype], *linear_terms(t, d_in, d_out))


@pytest.mark.parametrize("dev", DEVICES)
@given(data=st.data())
@property_settings(40)
def test_linear_project_matches_reference(dev, data):
    a, d = _sketch_factors(data, dev)
    r, t, d_in = a.shape
    d_out = d.shape[2]
    s = data.draw(st.one_of(st.integers(0, 9), st.sampled_from([31, 33, 65])), label="s")
    z_dtype = data.draw(st.sampled_from(FLOATING), label="z dtype")
    z = layout(data, (d_out, d_in, s), floats(generator(data), z_dtype, dev), "z")
    y = ops.linear_project(a, d, z)
    assert y.dtype == torch.float64 and y.device == a.device and y.shape == (r, s)
    a64, d64, z64 = a.cpu().double(), d.cpu().double(), z.cpu().double()
    # float64 when a or z is float64, float32 otherwise.
    eps = EPS[torch.float64] if torch.float64 in (a.dtype, z.dtype) else EPS[torch.float32]
    scale = reference.linear_project(a64.abs(), d64.abs(), z64.abs())
    assert_within(y, reference.linear_project(a64, d64, z64), scale, eps, *linear_terms(t, d_in, d_out))


@pytest.mark.parametrize("dev", DEVICES)
@given(data=st.data())
@property_settings(40)
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
    raises(RuntimeError, prefix + ".*" + pattern, lambda: ops.linear_sketch(a, d, **args))


@pytest.mark.parametrize("dev", DEVICES)
@given(data=st.data())
@property_settings(30)
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
    raises(RuntimeError, prefix + ".*" + pattern, lambda: ops.linear_project(a, d, z))


# Fixed shapes past the kernels' tiles, so that few-example runs (under compute-sanitizer)
# still reach every edge: CUDA Gram tiles of 64 rows (many samples; T > 64, one sample
# per tile in step chunks), sketch tiles of 64 rows, 32 columns and 128 parameters.
GRAM_EDGES = [(70, 1, 3, 2), (2, 70, 3, 17), (65, 2, 17, 5)]
SKETCH_EDGES = [(130, 2, 13, 11, 65), (70, 1, 9, 30, 40), (3, 1, 300, 1, 33)]


@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_tile_edges_matches_reference(dev, dtype):
    gen = torch.Generator().manual_seed(0)
    values = floats(gen, dtype, dev)
    for b, t, da, dd in GRAM_EDGES:
        a, d = values((b, t, da)), values((b, t, dd))
        indices = integers(gen, 0, 3, torch.int64, dev)((b, t))
        a64, d64 = a.cpu().double(), d.cpu().double()
        assert_within(ops.seq_gram(a, d), reference.seq_gram(a64, d64),
                       reference.seq_gram(a64.abs(), d64.abs()), EPS[dtype], *gram_terms(t, da, dd))
        assert_within(ops.embedding_gram(indices, d), reference.embedding_gram(indices.cpu(), d64),
                       reference.embedding_gram(indices.cpu(), d64.abs()), EPS[dtype], *gram_terms(t, dd))
    for r, t, d_in, d_out, cols in SKETCH_EDGES:
        a, d, z = values((r, t, d_in)), values((r, t, d_out)), values((d_out, d_in, cols))
        a64, d64, z64 = a.cpu().double(), d.cpu().double(), z.cpu().double()
        terms = linear_terms(t, d_in, d_out)
        for distribution in ops.DISTRIBUTIONS:
            kwargs = dict(seed=5, stream=7, row_offset=2**32 - 3, cols=cols, distribution=distribution)
            omega = reference.random_block(d_out * d_in, cols, seed=5, stream=7, row_offset=2**32 - 3,
                                           distribution=distribution, dtype=torch.float64)
            scale = reference.linear_project(a64.abs(), d64.abs(), omega.abs().reshape(d_out, d_in, cols))
            assert_within(ops.linear_sketch(a, d, **kwargs), reference.linear_sketch(a64, d64, **kwargs), scale,
                           EPS[dtype], *terms)
        assert_within(ops.linear_project(a, d, z), reference.linear_project(a64, d64, z64),
                       reference.linear_project(a64.abs(), d64.abs(), z64.abs()), EPS[dtype], *terms)
    block = ops.random_block(64, 129, seed=3, stream=1, row_offset=5, col_offset=3, dtype=torch.float64, device=dev)
    want = reference.random_block(64, 129, seed=3, stream=1, row_offset=5, col_offset=3, dtype=torch.float64)
    torch.testing.assert_close(block.cpu(), want, rtol=2.0**-52, atol=2.0**-52)
