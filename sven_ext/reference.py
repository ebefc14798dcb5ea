"""Pure-torch versions of every compiled op: the oracle the tests compare against.

Slow but obviously correct; written from the same definitions as
``csrc/include/sven_ext/philox.h``.
"""

from __future__ import annotations

import math

import torch

_M0, _M1 = 0xD2511F53, 0xCD9E8D57
_W0, _W1 = 0x9E3779B9, 0xBB67AE85
_MASK32 = 0xFFFFFFFF


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32-bit words of ``a * b`` for a 32-bit constant ``a`` and int64 ``b`` < 2**32."""
    a_hi, a_lo = a >> 16, a & 0xFFFF
    # Each partial product stays below 2**49, so int64 arithmetic is exact.
    hi = (a_hi * b + ((a_lo * b) >> 16)) >> 16
    lo = (((a_hi * b) & 0xFFFF) << 16) + a_lo * b
    return hi, lo & _MASK32


def philox_raw(counters: torch.Tensor, seed: int) -> torch.Tensor:
    """Reference Philox4x32-10 on ``(N, 4)`` int64 counters (see ``sven_ext.ops.philox_raw``)."""
    key = seed & 0xFFFFFFFFFFFFFFFF
    k0, k1 = key & _MASK32, key >> 32
    c = [counters[:, i].to(torch.int64) & _MASK32 for i in range(4)]
    for _ in range(10):
        hi0, lo0 = _mulhilo(_M0, c[0])
        hi1, lo1 = _mulhilo(_M1, c[2])
        c = [hi1 ^ c[1] ^ k0, lo1, hi0 ^ c[3] ^ k1, lo0]
        k0, k1 = (k0 + _W0) & _MASK32, (k1 + _W1) & _MASK32
    return torch.stack(c, dim=1)


def random_block(
    rows: int,
    cols: int,
    *,
    seed: int,
    stream: int = 0,
    row_offset: int = 0,
    col_offset: int = 0,
    distribution: str = "gaussian",
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Reference for ``sven_ext.ops.random_block``: same entries, computed in float64 then rounded."""
    r = torch.arange(row_offset, row_offset + rows, dtype=torch.int64).repeat_interleave(cols)
    col = torch.arange(col_offset, col_offset + cols, dtype=torch.int64).repeat(rows)
    counters = torch.stack([col >> 1, r & _MASK32, r >> 32, torch.full_like(r, stream)], dim=1)
    words = philox_raw(counters, seed)
    odd = (col & 1).bool()
    if distribution == "rademacher":
        bit = torch.where(odd, words[:, 1], words[:, 0]) & 1
        values = bit.to(torch.float64) * 2 - 1
    elif distribution == "gaussian":
        u_radius = ((words[:, 0] << 21) | (words[:, 1] >> 11)).to(torch.float64)
        u_angle = ((words[:, 2] << 21) | (words[:, 3] >> 11)).to(torch.float64)
        u_radius = (u_radius + 0.5) * 2.0**-53
        u_angle = (u_angle + 0.5) * 2.0**-53
        radius = torch.sqrt(-2.0 * torch.log(u_radius))
        angle = 2.0 * math.pi * u_angle
        values = torch.where(odd, radius * torch.sin(angle), radius * torch.cos(angle))
    else:
        raise ValueError(f"unknown distribution {distribution!r}")
    return values.reshape(rows, cols).to(dtype=dtype, device=device)


def _row_blocks(batch: int, steps: int):
    """Row ranges of K small enough that a (rows, B, T, T) float64 transient stays near 8 MB."""
    rows = max(1, 2**20 // max(1, batch * steps * steps))
    return [(i, min(batch, i + rows)) for i in range(0, batch, rows)]


def seq_gram(a: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Reference for ``sven_ext.ops.seq_gram``: ``K[i, j] = sum_{t,t'} (a_i a_j^T)[t,t'] (d_i d_j^T)[t,t']``.

    The literal definition in float64, a block of rows of K at a time.
    """
    a64, d64 = a.to(torch.float64), d.to(torch.float64)
    k = torch.empty(a.shape[0], a.shape[0], dtype=torch.float64, device=a.device)
    for begin, end in _row_blocks(a.shape[0], a.shape[1]):
        sa = torch.einsum("ita,jua->ijtu", a64[begin:end], a64)
        sd = torch.einsum("itd,jud->ijtu", d64[begin:end], d64)
        k[begin:end] = (sa * sd).sum(dim=(2, 3))
    return k


def embedding_gram(indices: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Reference for ``sven_ext.ops.embedding_gram``: ``K[i, j] = sum_{t,t'} [idx_i[t] == idx_j[t']] d_i[t].d_j[t']``.

    The literal definition in float64, a block of rows of K at a time.
    """
    d64 = d.to(torch.float64)
    k = torch.empty(d.shape[0], d.shape[0], dtype=torch.float64, device=d.device)
    for begin, end in _row_blocks(d.shape[0], d.shape[1]):
        match = indices[begin:end, None, :, None] == indices[None, :, None, :]
        sd = torch.einsum("itd,jud->ijtu", d64[begin:end], d64)
        k[begin:end] = torch.where(match, sd, 0.0).sum(dim=(2, 3))
    return k
