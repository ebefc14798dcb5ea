"""block_put_ against the pure-torch reference, per device and dtype: a copy, so bitwise."""

import pytest
import torch

from sven_ext import ops, reference

FLOATING = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
# (N, R, C, r, c): single rows and columns, whole matrices, empty subsets, empty
# batches and matrices, odd sizes; the last two are big enough for several CPU
# threads and CUDA grid-stride steps.
SHAPES = [
    (1, 1, 1, 1, 1),
    (3, 1, 7, 1, 4),
    (2, 6, 1, 3, 1),
    (1, 5, 7, 5, 7),
    (4, 5, 7, 0, 3),
    (3, 9, 4, 9, 0),
    (0, 5, 7, 2, 3),
    (2, 0, 3, 0, 2),
    (2, 3, 0, 2, 0),
    (2, 37, 53, 11, 29),
    (1, 37, 53, 37, 1),
    (5, 37, 53, 20, 53),
    (3, 300, 401, 257, 199),
]


def _ids(shape):
    return "N{}-R{}-C{}-r{}-c{}".format(*shape)


def _inputs(shape, dtype, device, seed=0):
    """out ~ N(0, 1) and block ~ 16 + N(0, 1) (so every written entry changes), unsorted subsets."""
    n, big_r, big_c, r, c = shape
    g = torch.Generator().manual_seed(seed)
    out = torch.randn(n, big_r, big_c, generator=g, dtype=torch.float64)
    block = 16 + torch.randn(n, r, c, generator=g, dtype=torch.float64)
    rows = torch.randperm(big_r, generator=g)[:r]
    cols = torch.randperm(big_c, generator=g)[:c]
    return (out.to(dtype=dtype, device=device), rows.to(device), cols.to(device),
            block.to(dtype=dtype, device=device))


def _want(out, rows, cols, block):
    return reference.block_put_(out.cpu().clone(), rows.cpu(), cols.cpu(), block.cpu())


def _outside(rows, cols, shape):
    """Mask of the (R, C) entries outside the subset rows x cols."""
    inside = torch.zeros(shape, dtype=torch.bool)
    inside[rows.cpu()[:, None], cols.cpu()] = True
    return ~inside


@pytest.mark.parametrize("dtype", FLOATING, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
def test_block_put_matches_reference(device, shape, dtype):
    out, rows, cols, block = _inputs(shape, dtype, device)
    before = out.cpu().clone()
    want = _want(out, rows, cols, block)
    ptr = out.data_ptr()
    assert ops.block_put_(out, rows, cols, block) is out
    assert out.data_ptr() == ptr and out.dtype == dtype
    assert torch.equal(out.cpu(), want)
    # Entries outside the subset are the ones out held before.
    mask = _outside(rows, cols, shape[1:3]).expand(out.shape)
    assert torch.equal(out.cpu()[mask], before[mask])
    if shape[0] and shape[3] and shape[4]:
        assert torch.equal(out.cpu()[:, rows.cpu()[:, None], cols.cpu()], block.cpu())


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(1, 1, 1, 1, 1), (1, 37, 53, 11, 29), (1, 6, 4, 0, 2)], ids=_ids)
def test_block_put_2d(device, shape, dtype):
    out, rows, cols, block = _inputs(shape, dtype, device, seed=1)
    out2, block2 = out[0], block[0]
    want = reference.block_put_(out2.cpu().clone(), rows.cpu(), cols.cpu(), block2.cpu())
    ptr = out2.data_ptr()
    assert ops.block_put_(out2, rows, cols, block2) is out2
    assert out2.data_ptr() == ptr
    assert torch.equal(out2.cpu(), want)
    assert torch.equal(out[0].cpu(), want)  # written through the view: out was not copied


@pytest.mark.parametrize("dtype", FLOATING, ids=str)
def test_non_contiguous_inputs_are_accepted(device, dtype):
    out, rows, cols, block = _inputs((3, 37, 53, 11, 29), dtype, device, seed=2)
    block_t = block.transpose(1, 2).contiguous().transpose(1, 2)  # same values, other strides
    rows_s = rows.repeat_interleave(2)[::2]  # stride 2
    cols_s = torch.stack([cols, cols + 1], dim=1)[:, 0]  # stride 2
    block_e = block[:1].expand(3, -1, -1)  # stride 0 along N
    assert not (block_t.is_contiguous() or rows_s.is_contiguous() or cols_s.is_contiguous()
                or block_e.is_contiguous())
    assert torch.equal(cols_s, cols) and torch.equal(rows_s, rows)
    for b in (block_t, block_e):
        want = _want(out, rows, cols, b)
        ops.block_put_(out, rows_s, cols_s, b)
        assert torch.equal(out.cpu(), want)


def test_block_sharing_memory_with_out(device):
    # block is rows [1, 4) of out itself: the op must read it before overwriting it.
    out = torch.randn(1, 6, 5, dtype=torch.float64, device=device)
    block = out[:, 1:4]
    assert block.is_contiguous()
    rows, cols = torch.tensor([2, 0, 1], device=device), torch.tensor([4, 1, 3, 0, 2], device=device)
    want = _want(out, rows, cols, block.clone())
    ops.block_put_(out, rows, cols, block)
    assert torch.equal(out.cpu(), want)


def test_independent_of_thread_count():
    out, rows, cols, block = _inputs((3, 300, 401, 257, 199), torch.float32, "cpu", seed=3)
    threads = torch.get_num_threads()
    serial = out.clone()
    try:
        torch.set_num_threads(1)
        ops.block_put_(serial, rows, cols, block)
        torch.set_num_threads(max(2, threads))
        ops.block_put_(out, rows, cols, block)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(serial, out)


def test_cpu_equals_cuda():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device visible")
    for dtype in FLOATING:
        for seed, shape in enumerate(SHAPES):
            out, rows, cols, block = _inputs(shape, dtype, "cpu", seed=seed)
            out_cuda = out.cuda()
            ops.block_put_(out, rows, cols, block)
            ops.block_put_(out_cuda, rows.cuda(), cols.cuda(), block.cuda())
            assert torch.equal(out_cuda.cpu(), out), (dtype, shape)


def _valid(device, dtype=torch.float32):
    return _inputs((2, 6, 5, 3, 4), dtype, device, seed=4)


def _put(out, rows, cols, block):
    return lambda: torch.ops.sven_ext.block_put_(out, rows, cols, block)


PREFIX = r"sven_ext\.block_put_: "


def _rejects(pattern, fn, out=None):
    before = out.clone() if out is not None else None
    with pytest.raises(RuntimeError, match=PREFIX + pattern):
        fn()
    if out is not None:  # nothing written
        assert torch.equal(out, before)


@pytest.mark.parametrize("which", ["rows", "cols"])
def test_repeated_indices_rejected(device, which):
    out, rows, cols, block = _valid(device)
    if which == "rows":
        rows = torch.tensor([4, 1, 4], device=device)
    else:
        cols = torch.tensor([3, 0, 0, 3], device=device)
    smallest = 4 if which == "rows" else 0
    _rejects(which + r" must hold distinct indices .*got " + str(smallest) + r" more than once \(repeated entries: ",
             _put(out, rows, cols, block), out)


@pytest.mark.parametrize("bad", [-1, -(2**63), "size", 2**62], ids=["minus1", "int64min", "size", "huge"])
@pytest.mark.parametrize("which", ["rows", "cols"])
def test_out_of_range_indices_rejected(device, which, bad):
    out, rows, cols, block = _valid(device)
    size = 6 if which == "rows" else 5
    value = size if bad == "size" else bad
    idx = (rows if which == "rows" else cols).clone()
    idx[1] = value
    if which == "rows":
        rows = idx
        bound = r"\[0, R = out\.size\(1\)\) = \[0, 6\)"
    else:
        cols = idx
        bound = r"\[0, C = out\.size\(2\)\) = \[0, 5\)"
    _rejects(f"{which} must hold indices in {bound}, got {which}\\[1\\] = {value} \\(entries out of range: 1\\)",
             _put(out, rows, cols, block), out)


def test_out_of_range_reported_before_repeats(device):
    out, _, cols, block = _valid(device)
    rows = torch.tensor([2, 2, 7], device=device)
    _rejects(r"rows must hold indices in .*got rows\[2\] = 7", _put(out, rows, cols, block), out)
    # An empty out has no valid index at all.
    _rejects(r"rows must hold indices in .*= \[0, 0\), got rows\[0\] = 0",
             _put(torch.empty(2, 0, 5, device=device), torch.zeros(1, dtype=torch.int64, device=device), cols,
                  torch.empty(2, 1, 4, device=device)))


def test_argument_errors(device):
    out, rows, cols, block = _valid(device)
    _rejects(r"rows must be Long, got Int", _put(out, rows.int(), cols, block))
    _rejects(r"cols must be Long, got Float", _put(out, rows, cols.float(), block))
    _rejects(r"out and block must have one dtype, got Float and Double", _put(out, rows, cols, block.double()))
    _rejects(r"out and block must have one dtype, got BFloat16 and Half",
             _put(out.bfloat16(), rows, cols, block.half()))
    _rejects(r"out must be float16, bfloat16, float32 or float64, got Int", _put(out.int(), rows, cols, block.int()))
    _rejects(r"out must be contiguous \(it is written in place\)", _put(out.transpose(1, 2), rows, cols, block))
    _rejects(r"out must be contiguous", _put(torch.cat([out, out], 2)[:, :, ::2], rows, cols, block))
    _rejects(r"block and out must have the same batch size N \(dim 0\)", _put(out, rows, cols, block[:1]))
    _rejects(r"block must have rows\.numel\(\) rows \(dim 1\)", _put(out, rows[:2], cols, block))
    _rejects(r"block must have cols\.numel\(\) columns \(dim 2\)", _put(out, rows, cols, block[:, :, :3]))
    _rejects(r"out must be 3-D, got shape \[6, 5\]", _put(out[0], rows, cols, block[0]))
    _rejects(r"rows must be 1-D", _put(out, rows[:, None], cols, block))
    _rejects(r"cols must be 1-D", _put(out, rows, cols[None], block))
    _rejects(r"block must be 3-D", _put(out, rows, cols, block[0]))


def test_wrapper_dims(device):
    out, rows, cols, block = _valid(device)
    for o, b in ((out, block[0]), (out[0], block), (out[None], block[None]), (out[0, 0], block[0, 0])):
        with pytest.raises(ValueError, match=r"sven_ext\.block_put_: out and block must be both 2-D"):
            ops.block_put_(o, rows, cols, b)


def test_mixed_devices_error_cuda():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device visible")
    out, rows, cols, block = _valid("cuda")
    _rejects(r"out and rows must be on one device", _put(out, rows.cpu(), cols, block))
    _rejects(r"out and cols must be on one device", _put(out, rows, cols.cpu(), block))
    _rejects(r"out and block must be on one device", _put(out, rows, cols, block.cpu()))
    _rejects(r"out and rows must be on one device", _put(out.cpu(), rows, cols.cpu(), block.cpu()))


def test_opcheck(device):
    out, rows, cols, block = _valid(device)
    torch.library.opcheck(torch.ops.sven_ext.block_put_, (out, rows, cols, block))


def test_torch_compile_fullgraph(device):
    out, rows, cols, block = _valid(device)
    want = _want(out, rows, cols, 2 * block)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def put(out, rows, cols, block):
        return ops.block_put_(out, rows, cols, 2 * block)

    assert torch.equal(put(out, rows, cols, block).cpu(), want)
    assert torch.equal(out.cpu(), want)
