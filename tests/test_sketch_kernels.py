"""linear_sketch and linear_project against the float64 reference, per device and dtype."""

import functools

import pytest
import torch

from sven_ext import ops, reference

# (R, T, d_in, d_out, cols): every R in {1, 7, 33}, T in {1, 3, 5}, d_in in {1, 5, 37},
# d_out in {1, 3, 19} and cols in {1, 7, 21}, odd on purpose.
SHAPES = [
    (1, 1, 1, 1, 1),
    (1, 5, 37, 3, 21),
    (7, 1, 5, 19, 7),
    (7, 3, 37, 1, 1),
    (7, 5, 1, 3, 21),
    (33, 1, 37, 19, 21),
    (33, 3, 5, 1, 7),
    (33, 5, 37, 19, 1),
]
# Shapes that cut into several CPU tiles and row blocks (and CUDA row and column blocks):
# P = 2,400 parameters, R = 300 rows, cols = 70; and a long run of one output's inputs.
BIG_SHAPES = [(300, 2, 60, 40, 70), (3, 1, 9000, 5, 3)]
DISTRIBUTIONS = ["gaussian", "rademacher"]
EPS = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.float16: 2.0**-24, torch.bfloat16: 2.0**-24}


def _ids(shape):
    return "R{}-T{}-din{}-dout{}-cols{}".format(*shape)


def _factors(shape, dtype, device, seed=0):
    r, t, d_in, d_out, _ = shape
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(r, t, d_in, generator=g, dtype=torch.float64)
    d = torch.randn(r, t, d_out, generator=g, dtype=torch.float64)
    return a.to(dtype=dtype, device=device), d.to(dtype=dtype, device=device)


@functools.lru_cache(maxsize=64)
def _omega(rows, cols, row_offset, distribution, seed=11, stream=5):
    """Rows [row_offset, row_offset + rows) of the virtual matrix in float64 (cached: do not modify)."""
    return reference.random_block(rows, cols, seed=seed, stream=stream, row_offset=row_offset,
                                  distribution=distribution, dtype=torch.float64)


def _abs_product(a, d, w):
    """sum_p |G|_r[p] |w[p, j]| with |G|_r = sum_t |d_r[t]| (x) |a_r[t]|: the scale of every rounding error."""
    g_abs = torch.einsum("rto,rti->roi", d.double().abs().cpu(), a.double().abs().cpu()).flatten(1)
    return g_abs @ w.double().abs().cpu().reshape(g_abs.shape[1], -1)


def _bound(a, d, w, eps):
    """Forward-error bound of Y = G W computed with unit roundoff eps, against the float64 reference (W exact in float64).

    G's entries are sums of T products (error <= T eps |G|), W is rounded once (eps |W|), and a
    dot product of n terms adds n eps sum |G||W|; the CPU (GEMM over a tile) and CUDA (over a
    shared-memory tile) kernels sum at most n = P terms in the working precision before adding
    into float64, so |dY| <= (T + P + 2) eps |G| |W|; the float64 reference rounds T + P + 1
    times (unit roundoff 2^-53). A factor 2 covers second-order terms.
    """
    n = a.shape[1] + a.shape[2] * d.shape[2]
    return 2 * ((n + 2) * eps + (n + 1) * 2.0**-53) * _abs_product(a, d, w) + 1e-300


def _assert_within(got, want, bound):
    err = (got.cpu() - want.cpu()).abs()
    worst = int(err.argmax()) if err.numel() else 0
    assert bool((err <= bound).all()), (
        f"max error {err.max().item():.3e}, bound there {bound.flatten()[worst].item():.3e}"
    )


def _assert_float64_close(got, want, a, d, w):
    # Per entry: within 1e-12 of |G||W| (the float64 forward-error bound is ~(T + P) 1e-16 of it).
    _assert_within(got, want, 1e-12 * _abs_product(a, d, w) + 1e-300)


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
@pytest.mark.parametrize("row_offset", [0, 123_456_789_012], ids=["offset0", "offset_big"])
@pytest.mark.parametrize("shape", SHAPES + BIG_SHAPES, ids=_ids)
def test_linear_sketch_float64(device, shape, row_offset, distribution):
    a, d = _factors(shape, torch.float64, device)
    cols = shape[4]
    y = ops.linear_sketch(a, d, seed=11, stream=5, row_offset=row_offset, cols=cols, distribution=distribution)
    assert y.dtype == torch.float64 and y.device == a.device and y.shape == (shape[0], cols)
    want = reference.linear_sketch(a.cpu(), d.cpu(), seed=11, stream=5, row_offset=row_offset, cols=cols,
                                   distribution=distribution)
    omega = _omega(shape[2] * shape[3], cols, row_offset, distribution)
    _assert_float64_close(y, want, a, d, omega)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
@pytest.mark.parametrize("shape", SHAPES[1::2] + BIG_SHAPES[:1], ids=_ids)
def test_linear_sketch_low_precision(device, shape, distribution, dtype):
    a, d = _factors(shape, dtype, device)
    cols = shape[4]
    y = ops.linear_sketch(a, d, seed=11, stream=5, row_offset=7, cols=cols, distribution=distribution)
    assert y.dtype == torch.float64
    # Inputs are exact in float64 and (float16/bfloat16 too) in float32, where the kernel computes.
    want = reference.linear_sketch(a.cpu(), d.cpu(), seed=11, stream=5, row_offset=7, cols=cols,
                                   distribution=distribution)
    omega = _omega(shape[2] * shape[3], cols, 7, distribution)
    _assert_within(y, want, _bound(a, d, omega, EPS[dtype]))


def test_linear_sketch_single_step_by_hand(device):
    # T = 1, d_out = 1, d_in = 2: G_r = d_r * (a_r0, a_r1), rows 40 and 41 of Omega.
    a = torch.tensor([[[1.5, -2.0]], [[0.25, 4.0]]], dtype=torch.float64, device=device)
    d = torch.tensor([[[3.0]], [[-1.0]]], dtype=torch.float64, device=device)
    omega = ops.random_block(2, 5, seed=3, stream=9, row_offset=40, dtype=torch.float64)
    want = torch.stack([3.0 * (1.5 * omega[0] - 2.0 * omega[1]), -1.0 * (0.25 * omega[0] + 4.0 * omega[1])])
    y = ops.linear_sketch(a, d, seed=3, stream=9, row_offset=40, cols=5)
    torch.testing.assert_close(y.cpu(), want, rtol=1e-15, atol=1e-14)


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_linear_sketch_reproduces_omega(device, distribution):
    # One-hot per-row gradients (G_r = e_r, d_in = R, d_out = T = 1) pick rows of Omega
    # exactly; the tile is large enough for the CPU's vectorised tile generation (AVX2 Philox, library
    # Box-Muller). Rademacher entries are bitwise random_block's; Gaussian ones within a few ulps
    # (another libm's log, cos and sin).
    rows, cols, row_offset = 64, 161, (1 << 32) - 10
    a = torch.eye(rows, dtype=torch.float64, device=device)[:, None, :]
    d = torch.ones(rows, 1, 1, dtype=torch.float64, device=device)
    y = ops.linear_sketch(a, d, seed=-5, stream=3, row_offset=row_offset, cols=cols, distribution=distribution)
    omega = ops.random_block(rows, cols, seed=-5, stream=3, row_offset=row_offset, distribution=distribution,
                             dtype=torch.float64)
    if distribution == "rademacher":
        assert torch.equal(y.cpu(), omega)
    else:
        torch.testing.assert_close(y.cpu(), omega, rtol=1e-15, atol=1e-15)


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_linear_sketch_equals_per_row_gradients_times_omega(device, distribution):
    a, d = _factors((9, 4, 6, 5, 0), torch.float64, device)
    g = torch.einsum("rto,rti->roi", d.cpu(), a.cpu()).flatten(1)
    omega = ops.random_block(30, 13, seed=1, stream=2, row_offset=100, distribution=distribution,
                             dtype=torch.float64)
    y = ops.linear_sketch(a, d, seed=1, stream=2, row_offset=100, cols=13, distribution=distribution)
    _assert_float64_close(y, g @ omega, a, d, omega)


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_linear_sketch_columns_are_a_function_of_the_column(device, distribution):
    # Columns [0:c1] of a sketch with more columns equal the sketch with c1 columns: so
    # does any prefix, odd or even (column pairs share a Philox call).
    a, d = _factors((33, 3, 37, 19, 0), torch.float64, device)
    kwargs = dict(seed=4, stream=1, row_offset=5, distribution=distribution)
    wide = ops.linear_sketch(a, d, cols=21, **kwargs)
    omega = _omega(37 * 19, 21, 5, distribution, seed=4, stream=1)
    for c1 in (1, 7, 8, 20):
        narrow = ops.linear_sketch(a, d, cols=c1, **kwargs)
        _assert_float64_close(narrow, wide[:, :c1], a, d, omega[:, :c1])


def test_linear_sketch_row_offset_splits_layers(device):
    # The outputs o < 7 and o >= 7 of a layer are two consecutive row ranges of Omega.
    a, d = _factors((7, 3, 5, 19, 0), torch.float64, device)
    kwargs = dict(seed=8, stream=2, cols=21)
    whole = ops.linear_sketch(a, d, row_offset=1000, **kwargs)
    first = ops.linear_sketch(a, d[:, :, :7], row_offset=1000, **kwargs)
    second = ops.linear_sketch(a, d[:, :, 7:], row_offset=1000 + 7 * 5, **kwargs)
    _assert_float64_close(first + second, whole, a, d, _omega(5 * 19, 21, 1000, "gaussian", seed=8, stream=2))


def test_linear_sketch_is_linear_in_d(device):
    a, d1 = _factors((7, 5, 37, 3, 0), torch.float64, device, seed=1)
    _, d2 = _factors((7, 5, 37, 3, 0), torch.float64, device, seed=2)
    kwargs = dict(seed=6, stream=0, row_offset=3, cols=7, distribution="rademacher")
    mixed = ops.linear_sketch(a, 2.0 * d1 - 0.5 * d2, **kwargs)
    parts = 2.0 * ops.linear_sketch(a, d1, **kwargs) - 0.5 * ops.linear_sketch(a, d2, **kwargs)
    omega = _omega(37 * 3, 7, 3, "rademacher", seed=6, stream=0)
    _assert_float64_close(mixed, parts, a, 2 * d1.abs() + d2.abs(), omega)


def test_linear_sketch_seed_and_stream_change_omega(device):
    a, d = _factors((5, 1, 4, 3, 0), torch.float64, device)
    base = ops.linear_sketch(a, d, seed=1, stream=0, cols=6)
    assert not torch.allclose(base, ops.linear_sketch(a, d, seed=2, stream=0, cols=6))
    assert not torch.allclose(base, ops.linear_sketch(a, d, seed=1, stream=1, cols=6))
    assert torch.equal(base, ops.linear_sketch(a, d, seed=1, stream=0, cols=6))


@pytest.mark.parametrize("shape", SHAPES + BIG_SHAPES, ids=_ids)
def test_linear_project_float64(device, shape):
    r, t, d_in, d_out, s = shape
    a, d = _factors(shape, torch.float64, device)
    z = torch.randn(d_out, d_in, s, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(device)
    y = ops.linear_project(a, d, z)
    assert y.dtype == torch.float64 and y.device == a.device and y.shape == (r, s)
    _assert_float64_close(y, reference.linear_project(a.cpu(), d.cpu(), z.cpu()), a, d, z)
    explicit = torch.einsum("rto,rti,oij->rj", d.cpu(), a.cpu(), z.cpu())
    _assert_float64_close(y, explicit, a, d, z)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES[::3] + BIG_SHAPES[:1], ids=_ids)
def test_linear_project_low_precision(device, shape, dtype):
    r, t, d_in, d_out, s = shape
    a, d = _factors(shape, dtype, device)
    z = torch.randn(d_out, d_in, s, generator=torch.Generator().manual_seed(3)).to(dtype=dtype, device=device)
    y = ops.linear_project(a, d, z)
    assert y.dtype == torch.float64
    _assert_within(y, reference.linear_project(a.cpu(), d.cpu(), z.cpu()), _bound(a, d, z, EPS[dtype]))


def test_linear_project_float64_z_with_float32_factors(device):
    # A float64 z makes the op compute in float64: only the factors' own rounding remains.
    a, d = _factors((7, 3, 5, 19, 0), torch.float32, device)
    z = torch.randn(19, 5, 7, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(device)
    y = ops.linear_project(a, d, z)
    _assert_float64_close(y, reference.linear_project(a.cpu(), d.cpu(), z.cpu()), a, d, z)


def test_non_contiguous_inputs_are_accepted(device):
    a, d = _factors((5, 7, 6, 4, 0), torch.float64, device)
    a_t = a.transpose(1, 2).contiguous().transpose(1, 2)  # same values, other strides
    d_s = torch.cat([d, d], dim=2)[:, :, ::2]
    assert not a_t.is_contiguous() and not d_s.is_contiguous()
    omega = _omega(6 * 4, 9, 0, "gaussian", seed=2, stream=3)
    want = reference.linear_sketch(a.cpu(), d_s.cpu(), seed=2, stream=3, cols=9)
    _assert_float64_close(ops.linear_sketch(a_t, d_s, seed=2, stream=3, row_offset=0, cols=9), want, a, d_s, omega)
    z = torch.randn(9, 6, 4, dtype=torch.float64, device=device).permute(2, 1, 0)
    assert not z.is_contiguous()
    _assert_float64_close(ops.linear_project(a_t, d_s, z), reference.linear_project(a.cpu(), d_s.cpu(), z.cpu()),
                          a, d_s, z)


@pytest.mark.parametrize("shape", [(0, 5, 3, 2, 4), (4, 0, 3, 2, 4), (4, 5, 0, 2, 4), (4, 5, 3, 0, 4)], ids=_ids)
def test_empty_sizes(device, shape):
    a, d = _factors(shape, torch.float32, device)
    y = ops.linear_sketch(a, d, seed=0, stream=0, cols=shape[4])
    assert y.shape == (shape[0], shape[4]) and y.dtype == torch.float64 and torch.count_nonzero(y) == 0
    z = torch.ones(shape[3], shape[2], shape[4], device=device)
    y = ops.linear_project(a, d, z)
    assert y.shape == (shape[0], shape[4]) and torch.count_nonzero(y) == 0
    y = ops.linear_project(a, d, z[:, :, :0])
    assert y.shape == (shape[0], 0)


@pytest.mark.parametrize("op", ["sketch", "project"])
def test_independent_of_thread_count(op):
    a, d = _factors((300, 2, 200, 200, 0), torch.float32, "cpu")
    z = torch.randn(200, 200, 70, generator=torch.Generator().manual_seed(3))

    def run():
        if op == "sketch":
            return ops.linear_sketch(a, d, seed=1, stream=2, row_offset=3, cols=70)
        return ops.linear_project(a, d, z)

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        serial = run()
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(serial, run())


def test_cpu_equals_cuda():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device visible")
    for dtype in (torch.float64, torch.float32):
        for shape in SHAPES + BIG_SHAPES:
            a, d = _factors(shape, dtype, "cpu")
            cols = shape[4]
            for distribution in DISTRIBUTIONS:
                kwargs = dict(seed=11, stream=5, row_offset=77, cols=cols, distribution=distribution)
                y_cpu = ops.linear_sketch(a, d, **kwargs)
                y_cuda = ops.linear_sketch(a.cuda(), d.cuda(), **kwargs).cpu()
                omega = _omega(shape[2] * shape[3], cols, 77, distribution)
                _assert_within(y_cuda, y_cpu, 2 * _bound(a, d, omega, EPS[dtype]))
            z = torch.randn(shape[3], shape[2], cols, dtype=dtype)
            p_cpu, p_cuda = ops.linear_project(a, d, z), ops.linear_project(a.cuda(), d.cuda(), z.cuda()).cpu()
            _assert_within(p_cuda, p_cpu, 2 * _bound(a, d, z, EPS[dtype]))


def test_linear_sketch_errors(device):
    a, d = _factors((3, 4, 5, 6, 0), torch.float32, device)
    sketch = ops.linear_sketch
    with pytest.raises(RuntimeError, match=r"sven_ext\.linear_sketch: a must be 3-D, got shape \[3, 20\]"):
        sketch(a.flatten(1), d, seed=0, stream=0, cols=2)
    with pytest.raises(RuntimeError, match=r"sven_ext\.linear_sketch: a and d must have the same number of rows R"):
        sketch(a[:2], d, seed=0, stream=0, cols=2)
    with pytest.raises(RuntimeError, match=r"sven_ext\.linear_sketch: a and d must have the same sequence length T"):
        sketch(a[:, :3], d, seed=0, stream=0, cols=2)
    with pytest.raises(RuntimeError, match=r"sven_ext\.linear_sketch: a and d must have one dtype, got Float and Double"):
        sketch(a, d.double(), seed=0, stream=0, cols=2)
    with pytest.raises(RuntimeError, match=r"sven_ext\.linear_sketch: a must be float16, bfloat16, float32 or float64, got Int"):
        sketch(a.int(), d, seed=0, stream=0, cols=2)
    with pytest.raises(RuntimeError, match=r"sven_ext\.linear_sketch: cols must be >= 1, got 0"):
        sketch(a, d, seed=0, stream=0, cols=0)
    with pytest.raises(RuntimeError, match=r"sven_ext\.linear_sketch: stream must be in \[0, 2\^32\), got 4294967296"):
        sketch(a, d, seed=0, stream=2**32, cols=2)
    with pytest.raises(RuntimeError, match=r"sven_ext\.linear_sketch: row_offset must be >= 0, got -1"):
        sketch(a, d, seed=0, stream=0, row_offset=-1, cols=2)
    with pytest.raises(RuntimeError, match=r"sven_ext\.linear_sketch: distribution must be 'gaussian' or 'rademacher', got 'uniform'"):
        sketch(a, d, seed=0, stream=0, cols=2, distribution="uniform")


def test_linear_project_errors(device):
    a, d = _factors((3, 4, 5, 6, 0), torch.float32, device)
    z = torch.randn(6, 5, 2, device=device)
    with pytest.raises(RuntimeError, match=r"sven_ext\.linear_project: z must have shape \(d_out, d_in, s\) = \(6, 5, s\), got \[5, 6, 2\]"):
        ops.linear_project(a, d, z.transpose(0, 1))
    with pytest.raises(RuntimeError, match=r"sven_ext\.linear_project: z must be 3-D, got shape \[30, 2\]"):
        ops.linear_project(a, d, z.flatten(0, 1))
    with pytest.raises(RuntimeError, match=r"sven_ext\.linear_project: z must be float16, bfloat16, float32 or float64, got Long"):
        ops.linear_project(a, d, z.long())
    with pytest.raises(RuntimeError, match=r"sven_ext\.linear_project: d must be 3-D"):
        ops.linear_project(a, d[0], z)


def test_mixed_devices_error():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device visible")
    a, d = _factors((3, 4, 5, 6, 0), torch.float32, "cpu")
    with pytest.raises(RuntimeError, match=r"sven_ext\.linear_sketch: a and d must be on one device"):
        ops.linear_sketch(a, d.cuda(), seed=0, stream=0, cols=2)
    with pytest.raises(RuntimeError, match=r"sven_ext\.linear_project: a and z must be on one device"):
        ops.linear_project(a, d, torch.randn(6, 5, 2, device="cuda"))


def test_opcheck(device):
    a, d = _factors((5, 3, 4, 6, 0), torch.float32, device)
    torch.library.opcheck(torch.ops.sven_ext.linear_sketch, (a, d, 3, 1, 10, 7, "gaussian"))
    torch.library.opcheck(torch.ops.sven_ext.linear_sketch, (a.double(), d.double(), 3, 1, 0, 4, "rademacher"))
    torch.library.opcheck(torch.ops.sven_ext.linear_project, (a, d, torch.randn(6, 4, 5, device=device)))


def test_torch_compile_fullgraph(device):
    a, d = _factors((4, 3, 5, 2, 0), torch.float32, device)
    z = torch.randn(2, 5, 3, device=device)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def both(a, d, z):
        return ops.linear_sketch(a * 2, d, seed=1, stream=2, cols=3) + ops.linear_project(a, d, z)

    want = 2 * reference.linear_sketch(a.cpu(), d.cpu(), seed=1, stream=2, cols=3)
    want += reference.linear_project(a.cpu(), d.cpu(), z.cpu())
    torch.testing.assert_close(both(a, d, z).cpu(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
