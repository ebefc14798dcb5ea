"""The subset op block_put_ by property, and every op's rejection of mixed devices; see ``op_properties``."""

import re

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from sven_ext import ops, reference

from op_properties import (
    DEVICES, FLOAT_MESSAGE, FLOATING, NOT_FLOATING, floats, generator, layout, property_settings, raises,
)


# ---------------------------------------------------------------------------- subset ops


def _index_vector(data, gen, count, size, dev, name):
    """``count`` distinct indices into ``[0, size)`` in random order, in a drawn layout.

    The values are written into the drawn view; an expanded (stride-0) vector holds one
    value ``count`` times, so it is distinct only when ``count <= 1``.
    """
    values = torch.randperm(size, generator=gen)[:count]
    idx = layout(data, (count,), lambda shape: torch.empty(shape, dtype=torch.int64, device=dev), name)
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
@property_settings(60)
def test_block_put_matches_reference(dev, data):
    batched = data.draw(st.booleans(), label="batched")
    n = data.draw(st.integers(0, 3), label="N") if batched else 1
    big_r, r = _subset_sizes(data)
    big_c, c = _subset_sizes(data)
    dtype = data.draw(st.sampled_from(FLOATING), label="dtype")
    gen = generator(data)
    out = floats(gen, dtype, dev)((n, big_r, big_c))

    def shifted(shape):
        # Away from out's values, so that every write changes its entry.
        return (16 + torch.randn(shape, generator=gen, dtype=torch.float64)).to(dtype=dtype, device=dev)

    block = layout(data, (n, r, c), shifted, "block")
    rows = _index_vector(data, gen, r, big_r, dev, "rows")
    cols = _index_vector(data, gen, c, big_c, dev, "cols")
    if not batched:
        out, block = out[0], block[0]
    before = out.cpu().clone()
    repeated = [name for name, idx in (("rows", rows), ("cols", cols)) if idx.numel() > 1 and idx.stride(0) == 0]
    if repeated:
        raises(RuntimeError, r"sven_ext\.block_put_: " + repeated[0] + " must hold distinct indices",
                lambda: ops.block_put_(out, rows, cols, block))
        assert torch.equal(out.cpu(), before)
        return
    assert ops.block_put_(out, rows, cols, block) is out
    assert out.is_contiguous() and out.dtype == dtype
    assert torch.equal(out.cpu(), reference.block_put_(before, rows.cpu(), cols.cpu(), block.cpu()))


def _block_put(out, rows, cols, block):
    return lambda: torch.ops.sven_ext.block_put_(out, rows, cols, block)


INDEX_RULES = ["repeat", "range", "index_dtype", "index_dim"]
TENSOR_RULES = ["out_dtype", "block_dtype", "layout", "shape", "dim"]


def _bad_index(data, kind, which, idx, size):
    """``idx`` (a valid ``which``, "rows" or "cols", into ``[0, size)``) broken by ``kind`` (one of
    ``INDEX_RULES``), and the message's pattern."""
    if kind == "repeat":
        at, src = data.draw(st.permutations(range(idx.numel())), label="positions")[:2]
        idx[at] = idx[src]
        return idx, which + " must hold distinct indices .* more than once"
    if kind == "range":
        value = data.draw(st.one_of(st.integers(-(2**63), -1), st.integers(size, 2**63 - 1)), label="value")
        at = data.draw(st.integers(0, idx.numel() - 1), label="position")
        idx[at] = value
        pattern = which + r" must hold indices in \[0, [RC] = out\.size\(\d\)\) = "
        return idx, pattern + re.escape(f"[0, {size}), got {which}[")
    if kind == "index_dtype":
        idx = idx.to(data.draw(st.sampled_from([torch.int32, torch.int16, torch.uint8, torch.float32, torch.bool])))
        return idx, which + " must be Long"
    idx = data.draw(st.sampled_from([idx[None], idx[:, None], idx[0]]), label="index view")
    return idx, which + " must be 1-D"


def _bad_out_or_block(data, kind, out, block):
    """A valid ``(out, block)`` pair of ``block_put_`` broken by ``kind`` (one of ``TENSOR_RULES``), and the
    message's pattern."""
    n, big_r, big_c = out.shape
    r, c = block.shape[1:]
    dev = out.device
    if kind == "out_dtype":
        dtype = data.draw(st.sampled_from(NOT_FLOATING), label="dtype")
        return out.to(dtype), block.to(dtype), "out " + FLOAT_MESSAGE
    if kind == "block_dtype":
        dtype = data.draw(st.sampled_from([torch.float64, torch.float16, torch.bfloat16, torch.int32]), label="dtype")
        return out, block.to(dtype), "out and block must have one dtype"
    if kind == "layout":
        view = data.draw(st.sampled_from(["transposed", "stepped", "expanded"]), label="view")
        out = {
            "transposed": torch.zeros(n, big_c, big_r, device=dev).transpose(1, 2),
            "stepped": torch.zeros(n, big_r, 2 * big_c, device=dev)[:, :, ::2],
            "expanded": torch.zeros(1, big_r, big_c, device=dev).expand(n + 1, big_r, big_c),
        }[view]
        if view == "expanded":
            block = torch.ones(n + 1, r, c, device=dev)
        return out, block, "out must be contiguous"
    if kind == "shape":
        axis = data.draw(st.integers(0, 2), label="axis")
        shape = [n, r, c]
        shape[axis] += data.draw(st.sampled_from([-1, 1]), label="change")
        pattern = ["block and out must have the same batch size N", r"block must have rows\.numel\(\) rows",
                   r"block must have cols\.numel\(\) columns"][axis]
        return out, torch.ones(shape, device=dev), pattern
    name = data.draw(st.sampled_from(["out", "block"]), label="tensor")
    if name == "out":
        out = out[0]
    else:
        block = block.flatten(1)
    return out, block, name + " must be 3-D"


@pytest.mark.parametrize("dev", DEVICES)
@given(data=st.data())
@property_settings(60)
def test_block_put_rejects(dev, data):
    n = data.draw(st.integers(1, 3), label="N")
    # At least 2 x 2: a transposed 1-row view would still be contiguous.
    big_r = data.draw(st.integers(2, 9), label="R")
    big_c = data.draw(st.integers(2, 9), label="C")
    r = data.draw(st.integers(2, big_r), label="r")
    c = data.draw(st.integers(2, big_c), label="c")
    gen = generator(data)
    out = torch.zeros(n, big_r, big_c, device=dev)
    rows = torch.randperm(big_r, generator=gen)[:r].to(dev)
    cols = torch.randperm(big_c, generator=gen)[:c].to(dev)
    block = torch.ones(n, r, c, device=dev)
    kind = data.draw(st.sampled_from(INDEX_RULES + TENSOR_RULES), label="kind")
    which = data.draw(st.sampled_from(["rows", "cols"]), label="which")
    if kind in INDEX_RULES:
        idx, size = (rows, big_r) if which == "rows" else (cols, big_c)
        idx, pattern = _bad_index(data, kind, which, idx.clone(), size)
        rows, cols = (idx, cols) if which == "rows" else (rows, idx)
    else:
        out, block, pattern = _bad_out_or_block(data, kind, out, block)
    before = out.clone()
    raises(RuntimeError, r"sven_ext\.block_put_: " + pattern, _block_put(out, rows, cols, block))
    assert torch.equal(out, before)


# ---------------------------------------------------------------------------- devices


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible")
@given(data=st.data())
@property_settings(20)
def test_mixed_devices_rejected_cuda(data):
    moved = data.draw(st.sampled_from(["first", "second", "third"]), label="moved")

    def place(i):
        return "cpu" if ["first", "second", "third"][i] == moved else "cuda"

    a, d = torch.ones(3, 2, 5, device=place(0)), torch.ones(3, 2, 4, device=place(1))
    indices = torch.zeros(3, 2, dtype=torch.int64, device=place(0))
    z = torch.ones(4, 5, 2, device=place(2))
    pair = "must be on one device" if moved != "third" else None
    if pair:
        raises(RuntimeError, r"sven_ext\.seq_gram: a and d " + pair, lambda: ops.seq_gram(a, d))
        raises(RuntimeError, r"sven_ext\.embedding_gram: indices and d " + pair, lambda: ops.embedding_gram(indices, d))
        raises(RuntimeError, r"sven_ext\.linear_sketch: a and d " + pair,
                lambda: ops.linear_sketch(a, d, seed=0, stream=0, cols=2))
    else:
        raises(RuntimeError, r"sven_ext\.linear_project: a and z must be on one device",
                lambda: ops.linear_project(a, d, z))
    # block_put_: out on the first device, rows on the second, cols on the third, block on CUDA.
    out = torch.zeros(2, 3, 4, device=place(0))
    rows, cols = torch.tensor([2, 0], device=place(1)), torch.tensor([3], device=place(2))
    block = torch.ones(2, 2, 1, device="cuda")
    other = {"first": "rows", "second": "rows", "third": "cols"}[moved]
    raises(RuntimeError, r"sven_ext\.block_put_: out and " + other + " must be on one device",
            lambda: ops.block_put_(out, rows, cols, block))
