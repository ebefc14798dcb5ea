"""The random-number ops by property (philox_raw, philox_fill_, random_block); see ``op_properties``."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from sven_ext import ops, reference

from op_properties import (
    DEVICES, FLOAT_MESSAGE, FLOATING, NOT_FLOATING, generator, integers, layout, property_settings, raises,
)


# ----------------------------------------------------------------------------- philox_raw


@pytest.mark.parametrize("dev", DEVICES)
@given(data=st.data())
@property_settings(40)
def test_philox_raw_matches_reference(dev, data):
    n = data.draw(st.integers(0, 37), label="N")
    seed = data.draw(st.integers(-(2**63), 2**63 - 1), label="seed")
    counters = layout(data, (n, 4), integers(generator(data), 0, 2**32, torch.int64, dev), "counters")
    out = ops.philox_raw(counters, seed)
    assert out.shape == (n, 4) and out.dtype == torch.int64 and out.device == counters.device and out.is_contiguous()
    assert torch.equal(out.cpu(), reference.philox_raw(counters.cpu(), seed))


@pytest.mark.parametrize("dev", DEVICES)
@given(data=st.data())
@property_settings(25)
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
    raises(RuntimeError, pattern, lambda: ops.philox_raw(counters, 0))


# ------------------------------------------------------------------- philox_fill_ / random_block


@pytest.mark.parametrize("dev", DEVICES)
@given(data=st.data())
@property_settings(40)
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
@property_settings(40)
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
        raises(RuntimeError, prefix + "out must be contiguous", _fill(bad))
    elif kind == "dtype":
        dtype = data.draw(st.sampled_from(NOT_FLOATING), label="dtype")
        raises(RuntimeError, prefix + "out " + FLOAT_MESSAGE, _fill(out.to(dtype)))
    elif kind == "dim":
        shape = data.draw(st.sampled_from([(rows,), (rows, cols, 1), ()]), label="shape")
        raises(RuntimeError, prefix + "out must be 2-D", _fill(torch.empty(shape, device=dev)))
    elif kind == "distribution":
        name = data.draw(st.sampled_from(["uniform", "Gaussian", ""]), label="distribution")
        raises(RuntimeError, prefix + "distribution must be 'gaussian' or 'rademacher'", _fill(out, distribution=name))
    elif kind == "offset":
        which = data.draw(st.sampled_from(["row_offset", "col_offset"]), label="which")
        value = data.draw(st.integers(-(2**63), -1), label="value")
        raises(RuntimeError, prefix + which + " must be >= 0", _fill(out, **{which: value}))
    elif kind == "stream":
        stream = data.draw(st.one_of(st.integers(-(2**63), -1), st.integers(2**32, 2**63 - 1)), label="stream")
        raises(RuntimeError, prefix + r"stream must be in \[0, 2\^32\)", _fill(out, stream=stream))
    elif kind == "row_span":
        # row_offset + rows would overflow int64 (wrap negative) without the check.
        row_offset = 2**63 - 1 - data.draw(st.integers(0, rows - 1), label="below max")
        raises(RuntimeError, prefix + r"row_offset \+ rows must be <= 2\^63 - 1", _fill(out, row_offset=row_offset))
    else:
        col_offset = data.draw(
            st.one_of(st.integers(2**33 - cols + 1, 2**33), st.integers(2**63 - cols, 2**63 - 1)), label="col_offset"
        )
        raises(RuntimeError, prefix + r"col_offset \+ cols must be <= 2\^33", _fill(out, col_offset=col_offset))


@given(data=st.data())
@property_settings(15)
def test_random_block_wrapper_rejects(data):
    rows = data.draw(st.integers(-5, 5), label="rows")
    cols = data.draw(st.integers(-5, 5), label="cols")
    distribution = data.draw(st.sampled_from(["gaussian", "uniform"]), label="distribution")

    def call():
        return ops.random_block(rows, cols, seed=0, distribution=distribution)

    if rows < 0 or cols < 0:
        raises(ValueError, r"sven_ext\.random_block: rows and cols must be >= 0", call)
    elif distribution == "uniform":
        raises(ValueError, r"sven_ext\.random_block: distribution must be one of", call)
    else:
        assert call().shape == (rows, cols)
