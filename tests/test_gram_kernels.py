"""seq_gram and embedding_gram against the float64 reference, per device and dtype."""

import pytest
import torch

from sven_ext import ops, reference

# (B, T, Da, Dd): every B in {1, 3, 7, 17}, T in {1, 5, 13} and D in {1, 3, 31, 65}, odd on purpose.
SHAPES = [
    (1, 1, 1, 1),
    (1, 13, 65, 3),
    (3, 5, 31, 65),
    (3, 13, 1, 31),
    (7, 1, 65, 31),
    (7, 5, 3, 1),
    (7, 13, 31, 3),
    (17, 1, 3, 65),
    (17, 5, 65, 65),
    (17, 13, 1, 1),
]
# Shapes that cut into several CPU tiles (512 rows) and CUDA tiles (64 rows): many
# tile pairs (parallel over pairs), one sample per tile in chunks (T > 512), a
# short last tile.
BIG_SHAPES = [(200, 13, 5, 3), (3, 600, 3, 2), (70, 1, 4, 4), (5, 130, 6, 2)]
LOW_PRECISION = [torch.float32, torch.float16, torch.bfloat16]


def _ids(shape):
    return "B{}-T{}-Da{}-Dd{}".format(*shape)


def _inputs(shape, dtype, device, seed=0):
    b, t, da, dd = shape
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(b, t, da, generator=g, dtype=torch.float64)
    d = torch.randn(b, t, dd, generator=g, dtype=torch.float64)
    return a.to(dtype=dtype, device=device), d.to(dtype=dtype, device=device)


def _indices(b, t, vocab, device, seed=0):
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randint(0, vocab, (b, t), generator=g).to(device)


def _pair_scale(row_norms):
    """N_i N_j with N_i = sum_t of the row norm products of sample i."""
    n = row_norms.sum(dim=1)
    return n[:, None] * n[None, :]


def _bound(a, d, eps):
    """Forward-error bound of K (against the float64 reference) for feature dot products rounded with unit roundoff eps.

    ``a=None`` is embedding_gram's (an index match instead of the ``a`` dot product).
    The inputs are exact in float64. Each feature dot product of length n errs by at
    most n * eps |x| |y| and their product by one rounding more; the T^2 products are
    summed in float64 by the op (at most T^2 roundings) and the float64 reference
    rounds its dot products, product and sum again, so
    |dK[i, j]| <= ((Da + Dd + 1) eps + (2 T^2 + Da + Dd + 1) 2^-53) N_i N_j with
    N_i = sum_t |a_i[t]| |d_i[t]|. A factor 2 covers second-order terms.
    """
    d64 = d.double().cpu()
    norms = d64.norm(dim=2)
    dots = d.shape[2] + 1
    if a is not None:
        norms = norms * a.double().cpu().norm(dim=2)
        dots += a.shape[2]
    steps = d.shape[1]
    return 2 * (dots * eps + (2 * steps * steps + dots) * 2.0**-53) * _pair_scale(norms)


def _assert_within(got, want, bound):
    err = (got.cpu() - want.cpu()).abs()
    assert bool((err <= bound + 1e-300).all()), f"max error {err.max().item():.3e}, bound there {bound.flatten()[err.argmax()].item():.3e}"


def _assert_float64_close(got, want):
    # rtol 1e-12 per entry, and an absolute floor at 1e-12 of the largest entry for
    # off-diagonal entries that are small by cancellation.
    torch.testing.assert_close(got.cpu(), want.cpu(), rtol=1e-12, atol=1e-12 * want.abs().max().item())


@pytest.mark.parametrize("shape", SHAPES + BIG_SHAPES, ids=_ids)
def test_seq_gram_float64(device, shape):
    a, d = _inputs(shape, torch.float64, device)
    k = ops.seq_gram(a, d)
    assert k.dtype == torch.float64 and k.device == a.device and k.shape == (shape[0], shape[0])
    _assert_float64_close(k, reference.seq_gram(a.cpu(), d.cpu()))
    assert torch.equal(k, k.T)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("shape", SHAPES[::3] + BIG_SHAPES[:1], ids=_ids)
def test_seq_gram_low_precision(device, shape, dtype):
    a, d = _inputs(shape, dtype, device)
    k = ops.seq_gram(a, d)
    assert k.dtype == torch.float64
    # float16/bfloat16 inputs are exact in float32, where their products are accumulated.
    _assert_within(k, reference.seq_gram(a.cpu(), d.cpu()), _bound(a, d, 2.0**-24))
    assert torch.equal(k, k.T)


def test_seq_gram_single_step_is_hadamard_of_grams(device):
    a, d = _inputs((9, 1, 7, 5), torch.float64, device)
    a2, d2 = a[:, 0].cpu(), d[:, 0].cpu()
    _assert_float64_close(ops.seq_gram(a, d), (a2 @ a2.T) * (d2 @ d2.T))


def test_seq_gram_equals_per_sample_gradient_gram(device):
    a, d = _inputs((6, 11, 4, 3), torch.float64, device)
    g = torch.einsum("btd,bta->bda", d.cpu(), a.cpu()).flatten(1)
    _assert_float64_close(ops.seq_gram(a, d), g @ g.T)


@pytest.mark.parametrize("vocab", [1, 3, 50, 10**12], ids=lambda v: f"vocab{v}")
@pytest.mark.parametrize("shape", SHAPES[1::2] + [(200, 13, 1, 5), (3, 600, 1, 2)], ids=_ids)
def test_embedding_gram_float64(device, shape, vocab):
    b, t, _, dd = shape
    _, d = _inputs(shape, torch.float64, device)
    idx = _indices(b, t, vocab, device)
    k = ops.embedding_gram(idx, d)
    assert k.dtype == torch.float64 and k.device == d.device and k.shape == (b, b)
    _assert_float64_close(k, reference.embedding_gram(idx.cpu(), d.cpu()))
    assert torch.equal(k, k.T)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_embedding_gram_low_precision(device, dtype):
    _, d = _inputs((17, 13, 1, 31), dtype, device)
    idx = _indices(17, 13, 5, device)
    k = ops.embedding_gram(idx, d)
    _assert_within(k, reference.embedding_gram(idx.cpu(), d.cpu()), _bound(None, d, 2.0**-24))


def test_embedding_gram_repeated_and_negative_indices(device):
    # Within-sample repeats, values shared across samples, values held by one sample
    # only, negative values: only equality matters.
    idx = torch.tensor([[4, 4, 7, -2], [7, 7, 7, 4], [-2, 9, 9, 0], [5, 6, 8, 1]], device=device)
    _, d = _inputs((4, 4, 1, 6), torch.float64, device)
    k = ops.embedding_gram(idx, d)
    _assert_float64_close(k, reference.embedding_gram(idx.cpu(), d.cpu()))
    # Sample 3 shares no value with the others.
    assert torch.count_nonzero(k[3, :3]) == 0


def test_embedding_gram_equals_per_sample_gradient_gram(device):
    vocab, (b, t, dd) = 11, (8, 9, 5)
    _, d = _inputs((b, t, 1, dd), torch.float64, device)
    idx = _indices(b, t, vocab, device)
    g = torch.zeros(b, vocab, dd, dtype=torch.float64)
    g.scatter_add_(1, idx.cpu()[:, :, None].expand(b, t, dd), d.cpu())
    g = g.flatten(1)
    _assert_float64_close(ops.embedding_gram(idx, d), g @ g.T)


def test_non_contiguous_inputs_are_accepted(device):
    a, d = _inputs((5, 7, 6, 4), torch.float64, device)
    a_t = a.transpose(1, 2).contiguous().transpose(1, 2)  # same values, other strides
    d_s = torch.cat([d, d], dim=2)[:, :, ::2]
    assert not a_t.is_contiguous() and not d_s.is_contiguous()
    want = reference.seq_gram(a.cpu(), d_s.cpu())
    _assert_float64_close(ops.seq_gram(a_t, d_s), want)
    idx = _indices(5, 14, 4, device)[:, ::2]
    assert not idx.is_contiguous()
    _assert_float64_close(ops.embedding_gram(idx, d_s), reference.embedding_gram(idx.cpu(), d_s.cpu()))


@pytest.mark.parametrize("shape", [(0, 5, 3, 2), (4, 0, 3, 2), (4, 5, 0, 2), (4, 5, 3, 0)], ids=_ids)
def test_empty_sizes(device, shape):
    a, d = _inputs(shape, torch.float32, device)
    k = ops.seq_gram(a, d)
    assert k.shape == (shape[0], shape[0]) and k.dtype == torch.float64
    assert torch.count_nonzero(k) == 0
    if shape[2] == 0:  # embedding: no Da axis
        return
    k = ops.embedding_gram(torch.zeros(shape[:2], dtype=torch.int64, device=device), d)
    assert k.shape == (shape[0], shape[0]) and torch.count_nonzero(k) == 0


def test_cpu_equals_cuda():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device visible")
    for dtype in (torch.float64, torch.float32):
        for shape in SHAPES + BIG_SHAPES:
            a, d = _inputs(shape, dtype, "cpu")
            k_cpu, k_cuda = ops.seq_gram(a, d), ops.seq_gram(a.cuda(), d.cuda()).cpu()
            eps = 2.0**-24 if dtype == torch.float32 else 2.0**-53
            # Two computed results, each within one bound of the exact K.
            _assert_within(k_cuda, k_cpu, 2 * _bound(a, d, eps))
            idx = _indices(shape[0], shape[1], 7, "cpu")
            e_cpu, e_cuda = ops.embedding_gram(idx, d), ops.embedding_gram(idx.cuda(), d.cuda()).cpu()
            _assert_within(e_cuda, e_cpu, 2 * _bound(None, d, eps))


def test_seq_gram_errors(device):
    a, d = _inputs((3, 4, 5, 6), torch.float32, device)
    with pytest.raises(RuntimeError, match=r"sven_ext\.seq_gram: a must be 3-D, got shape \[3, 20\]"):
        ops.seq_gram(a.flatten(1), d)
    with pytest.raises(RuntimeError, match=r"sven_ext\.seq_gram: a and d must have the same batch size B"):
        ops.seq_gram(a[:2], d)
    with pytest.raises(RuntimeError, match=r"sven_ext\.seq_gram: a and d must have the same sequence length T"):
        ops.seq_gram(a[:, :3], d)
    with pytest.raises(RuntimeError, match=r"sven_ext\.seq_gram: a and d must have one dtype, got Float and Double"):
        ops.seq_gram(a, d.double())
    with pytest.raises(RuntimeError, match=r"sven_ext\.seq_gram: a must be float16, bfloat16, float32 or float64, got Int"):
        ops.seq_gram(a.int(), d)


def test_embedding_gram_errors(device):
    _, d = _inputs((3, 4, 1, 6), torch.float32, device)
    idx = _indices(3, 4, 5, device)
    with pytest.raises(RuntimeError, match=r"sven_ext\.embedding_gram: indices must be Long, got Int"):
        ops.embedding_gram(idx.int(), d)
    with pytest.raises(RuntimeError, match=r"sven_ext\.embedding_gram: indices must be 2-D"):
        ops.embedding_gram(idx.flatten(), d)
    with pytest.raises(RuntimeError, match=r"sven_ext\.embedding_gram: indices and d must have the same batch size B"):
        ops.embedding_gram(idx[:2], d)
    with pytest.raises(RuntimeError, match=r"sven_ext\.embedding_gram: indices and d must have the same sequence length T"):
        ops.embedding_gram(idx[:, :3], d)
    with pytest.raises(RuntimeError, match=r"sven_ext\.embedding_gram: d must be float16, bfloat16, float32 or float64"):
        ops.embedding_gram(idx, d.long())


def test_mixed_devices_error():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device visible")
    a, d = _inputs((3, 4, 5, 6), torch.float32, "cpu")
    with pytest.raises(RuntimeError, match=r"sven_ext\.seq_gram: a and d must be on one device"):
        ops.seq_gram(a, d.cuda())
    with pytest.raises(RuntimeError, match=r"sven_ext\.embedding_gram: indices and d must be on one device"):
        ops.embedding_gram(_indices(3, 4, 5, "cpu"), d.cuda())


def test_embedding_gram_independent_of_thread_count():
    _, d = _inputs((33, 13, 1, 7), torch.float64, "cpu")
    idx = _indices(33, 13, 6, "cpu")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        serial = ops.embedding_gram(idx, d)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(serial, ops.embedding_gram(idx, d))


def test_opcheck(device):
    a, d = _inputs((5, 3, 4, 6), torch.float32, device)
    torch.library.opcheck(torch.ops.sven_ext.seq_gram, (a, d))
    torch.library.opcheck(torch.ops.sven_ext.embedding_gram, (_indices(5, 3, 4, device), d))


def test_torch_compile_fullgraph(device):
    a, d = _inputs((4, 3, 5, 2), torch.float32, device)
    idx = _indices(4, 3, 3, device)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def both(a, d, idx):
        return ops.seq_gram(a * 2, d) + ops.embedding_gram(idx, d)

    want = 4 * reference.seq_gram(a.cpu(), d.cpu()) + reference.embedding_gram(idx.cpu(), d.cpu())
    torch.testing.assert_close(both(a, d, idx).cpu(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
