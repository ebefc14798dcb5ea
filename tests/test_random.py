"""The Philox ops against the Random123 known answers and the pure-torch reference."""

import os
import subprocess
import sys

import pytest
import torch

from sven_ext import ops, reference

# Random123 kat_vectors, "philox4x32 10": counter words, 64-bit key (k1 << 32 | k0), output words.
KNOWN_ANSWERS = [
    ([0x00000000] * 4, 0x0000000000000000, [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]),
    ([0xFFFFFFFF] * 4, 0xFFFFFFFFFFFFFFFF, [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]),
    (
        [0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344],
        0x299F31D0A4093822,
        [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1],
    ),
]
FLOAT_DTYPES = [torch.float32, torch.float64, torch.bfloat16]


def _signed64(key):
    """The op takes a signed int64 seed: pass keys >= 2**63 as their two's complement."""
    return key - (1 << 64) if key >= 1 << 63 else key


def random_counters(n, generator_seed=0):
    g = torch.Generator().manual_seed(generator_seed)
    return torch.randint(0, 2**32, (n, 4), dtype=torch.int64, generator=g)


@pytest.mark.parametrize("counter, key, expected", KNOWN_ANSWERS, ids=["zeros", "ones", "pi"])
def test_philox_raw_known_answers(device, counter, key, expected):
    out = ops.philox_raw(torch.tensor([counter], dtype=torch.int64, device=device), _signed64(key))
    assert out.cpu().tolist() == [expected]


@pytest.mark.parametrize("seed", [0, 12345, -1, 0x299F31D0A4093822])
def test_philox_raw_matches_reference(device, seed):
    counters = random_counters(1000, generator_seed=seed & 0xFFFF)
    out = ops.philox_raw(counters.to(device), seed).cpu()
    assert torch.equal(out, reference.philox_raw(counters, seed))


def test_philox_raw_cpu_equals_cuda():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device visible")
    counters = random_counters(4096, generator_seed=7)
    assert torch.equal(ops.philox_raw(counters, 99), ops.philox_raw(counters.cuda(), 99).cpu())


BLOCKS = [
    # rows, cols, row_offset, col_offset
    (1, 1, 0, 0),
    (7, 13, 0, 0),
    (5, 31, 3, 1),  # odd column offset: a block starting inside a Gaussian pair
    (33, 2, 2**32 - 3, 7),  # rows crossing 2**32
    (3, 65, 11, 2**32 + 5),
]


@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
@pytest.mark.parametrize("rows, cols, row_offset, col_offset", BLOCKS, ids=lambda v: str(v))
def test_random_block_matches_reference(device, distribution, rows, cols, row_offset, col_offset):
    kwargs = dict(seed=2024, stream=5, row_offset=row_offset, col_offset=col_offset, distribution=distribution)
    got = ops.random_block(rows, cols, dtype=torch.float64, device=device, **kwargs).cpu()
    want = reference.random_block(rows, cols, dtype=torch.float64, **kwargs)
    if distribution == "rademacher":
        assert torch.equal(got, want)
    else:
        # Same double-precision Box-Muller on both sides; only libm's last bits may differ.
        torch.testing.assert_close(got, want, rtol=1e-15, atol=1e-15)


@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
def test_random_block_is_a_cut_of_a_larger_block(device, distribution):
    big = ops.random_block(40, 50, seed=3, stream=1, distribution=distribution, dtype=torch.float64, device=device)
    part = ops.random_block(
        9, 17, seed=3, stream=1, row_offset=21, col_offset=13, distribution=distribution, dtype=torch.float64, device=device
    )
    assert torch.equal(part, big[21:30, 13:30])


def test_random_block_cpu_equals_cuda():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device visible")
    for distribution in ("gaussian", "rademacher"):
        kwargs = dict(seed=77, stream=2, row_offset=5, col_offset=3, distribution=distribution, dtype=torch.float64)
        cpu = ops.random_block(64, 129, device="cpu", **kwargs)
        cuda = ops.random_block(64, 129, device="cuda", **kwargs).cpu()
        if distribution == "rademacher":
            assert torch.equal(cpu, cuda)
        else:
            torch.testing.assert_close(cpu, cuda, rtol=1e-15, atol=1e-15)


def test_gaussian_moments(device):
    z = ops.random_block(500, 400, seed=11, stream=0, dtype=torch.float64, device=device).cpu().flatten()
    n = z.numel()
    # Within 5 standard errors: 1/sqrt(n) for the mean, sqrt(2/n) for the variance, sqrt(15/n) for E z^4.
    assert abs(z.mean().item()) < 5 / n**0.5
    assert abs(z.var().item() - 1) < 5 * (2 / n) ** 0.5
    assert abs(z.pow(4).mean().item() - 3) < 5 * (96 / n) ** 0.5


def test_rademacher_values_and_balance(device):
    x = ops.random_block(300, 301, seed=5, distribution="rademacher", dtype=torch.float32, device=device).cpu()
    assert set(x.unique().tolist()) == {-1.0, 1.0}
    n = x.numel()
    assert abs(x.sum().item()) < 5 * n**0.5


def test_seeds_and_streams_differ(device):
    base = dict(dtype=torch.float64, device=device)
    x = ops.random_block(8, 8, seed=1, stream=0, **base)
    assert not torch.equal(x, ops.random_block(8, 8, seed=2, stream=0, **base))
    assert not torch.equal(x, ops.random_block(8, 8, seed=1, stream=1, **base))
    assert torch.equal(x, ops.random_block(8, 8, seed=1, stream=0, **base))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_random_block_dtypes(device, dtype):
    x = ops.random_block(6, 10, seed=9, dtype=dtype, device=device)
    assert x.dtype == dtype and x.shape == (6, 10) and x.is_contiguous()
    want = ops.random_block(6, 10, seed=9, dtype=torch.float64, device=device).to(dtype)
    assert torch.equal(x, want)  # computed in float64, rounded once


def test_empty_block(device):
    assert ops.random_block(0, 5, seed=1, device=device).shape == (0, 5)
    assert ops.random_block(4, 0, seed=1, device=device).shape == (4, 0)


def test_philox_fill_errors(device):
    fill = torch.ops.sven_ext.philox_fill_
    with pytest.raises(RuntimeError, match=r"sven_ext\.philox_fill_: out must be contiguous"):
        fill(torch.empty(8, 6, device=device).t(), 1, 0, 0, 0, "gaussian")
    with pytest.raises(RuntimeError, match=r"sven_ext\.philox_fill_: out must be float16, bfloat16, float32 or float64"):
        fill(torch.empty(4, 4, dtype=torch.int32, device=device), 1, 0, 0, 0, "gaussian")
    with pytest.raises(RuntimeError, match=r"sven_ext\.philox_fill_: distribution must be 'gaussian' or 'rademacher'"):
        fill(torch.empty(4, 4, device=device), 1, 0, 0, 0, "uniform")
    with pytest.raises(RuntimeError, match=r"sven_ext\.philox_fill_: out must be 2-D"):
        fill(torch.empty(4, device=device), 1, 0, 0, 0, "gaussian")
    with pytest.raises(RuntimeError, match=r"sven_ext\.philox_fill_: stream must be in \[0, 2\^32\)"):
        fill(torch.empty(4, 4, device=device), 1, -1, 0, 0, "gaussian")
    with pytest.raises(ValueError, match="distribution must be one of"):
        ops.random_block(2, 2, seed=0, distribution="uniform", device=device)


def test_philox_raw_errors(device):
    with pytest.raises(RuntimeError, match=r"sven_ext\.philox_raw: counters must have shape \(N, 4\)"):
        ops.philox_raw(torch.zeros(3, 3, dtype=torch.int64, device=device), 0)
    with pytest.raises(RuntimeError, match=r"sven_ext\.philox_raw: counters must be Long"):
        ops.philox_raw(torch.zeros(3, 4, dtype=torch.int32, device=device), 0)


def test_opcheck_philox_raw(device):
    torch.library.opcheck(torch.ops.sven_ext.philox_raw, (random_counters(16).to(device), 42))
    # Non-contiguous counters: the op and its fake both return contiguous words.
    torch.library.opcheck(torch.ops.sven_ext.philox_raw, (random_counters(16).to(device).t().contiguous().t(), 42))


def test_opcheck_philox_fill(device):
    out = torch.empty(5, 7, dtype=torch.float32, device=device)
    torch.library.opcheck(torch.ops.sven_ext.philox_fill_, (out, 42, 3, 1, 2, "gaussian"))


def test_import_without_visible_gpu():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    code = (
        "import torch, sven_ext; "
        "x = sven_ext.ops.random_block(3, 4, seed=1); "
        "assert x.shape == (3, 4) and not torch.cuda.is_available(); print('ok')"
    )
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
