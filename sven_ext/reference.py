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


def _check_linear_factors(a: torch.Tensor, d: torch.Tensor, op: str) -> None:
    """The shape, dtype and device agreement the linear sketch ops require of ``a`` and ``d``."""
    if a.dim() != 3 or d.dim() != 3:
        raise ValueError(f"{op}: a and d must be 3-D, got shapes {tuple(a.shape)} and {tuple(d.shape)}")
    if a.shape[:2] != d.shape[:2]:
        raise ValueError(f"{op}: a and d must agree in (R, T), got {tuple(a.shape)} and {tuple(d.shape)}")
    if a.dtype != d.dtype or a.device != d.device:
        raise ValueError(f"{op}: a and d must share dtype and device, got {a.dtype}/{a.device} and {d.dtype}/{d.device}")


def _output_blocks(rows: int, d_in: int, d_out: int, cols: int):
    """Ranges of output features whose per-row gradients and random rows stay near 8 MB in float64."""
    per_output = d_in * max(rows, cols, 1)
    step = max(1, 2**20 // max(1, per_output))
    return [(o, min(d_out, o + step)) for o in range(0, d_out, step)]


def linear_sketch(
    a: torch.Tensor,
    d: torch.Tensor,
    *,
    seed: int,
    stream: int,
    row_offset: int = 0,
    cols: int,
    distribution: str = "gaussian",
) -> torch.Tensor:
    """Reference for ``sven_ext.ops.linear_sketch``: per-row gradients of a Linear layer times a virtual Omega.

    Row ``r``'s gradient is ``G_r = d_r^T a_r`` (``(d_out, d_in)``, summed over T),
    flattened row-major (entry ``(o, i)`` at index ``o * d_in + i``), and
    ``Y[r, j] = sum_{o, i} G_r[o, i] * Omega[row_offset + o * d_in + i, j]`` where
    ``Omega`` is the virtual matrix of :func:`random_block` with this ``(seed, stream)``.
    The literal definition in float64, a block of output features at a time
    (``G`` and ``Omega`` are materialised only block by block).

    Args:
        a: ``(R, T, d_in)`` layer inputs, floating.
        d: ``(R, T, d_out)`` gradients at the layer output, same dtype and device as ``a``.
        seed: 64-bit generator key.
        stream: 32-bit stream id.
        row_offset: row of ``Omega`` that parameter ``(0, 0)`` maps to.
        cols: columns of ``Omega`` (sketch size), ``>= 1``.
        distribution: ``"gaussian"`` or ``"rademacher"``.

    Returns:
        ``(R, cols)`` float64 tensor on the inputs' device.
    """
    _check_linear_factors(a, d, "linear_sketch")
    if cols < 1:
        raise ValueError(f"linear_sketch: cols must be >= 1, got {cols}")
    rows, _, d_in = a.shape
    d_out = d.shape[2]
    a64, d64 = a.to(torch.float64), d.to(torch.float64)
    y = torch.zeros(rows, cols, dtype=torch.float64, device=a.device)
    for begin, end in _output_blocks(rows, d_in, d_out, cols):
        # Explicit sizes: a -1 cannot be inferred when R or the block is empty.
        g = torch.einsum("rto,rti->roi", d64[:, :, begin:end], a64).reshape(rows, (end - begin) * d_in)
        omega = random_block(
            (end - begin) * d_in,
            cols,
            seed=seed,
            stream=stream,
            row_offset=row_offset + begin * d_in,
            distribution=distribution,
            dtype=torch.float64,
            device=a.device,
        )
        y += g @ omega
    return y


def linear_project(a: torch.Tensor, d: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Reference for ``sven_ext.ops.linear_project``: ``Y[r, j] = sum_{o, i} (d_r^T a_r)[o, i] * z[o, i, j]``.

    The power-iteration product ``J_l Z_l`` of a Linear layer with a stored ``Z_l``;
    the literal definition in float64, a block of output features at a time.

    Args:
        a: ``(R, T, d_in)`` layer inputs, floating.
        d: ``(R, T, d_out)`` gradients at the layer output, same dtype and device as ``a``.
        z: ``(d_out, d_in, s)`` floating, on the inputs' device.

    Returns:
        ``(R, s)`` float64 tensor on the inputs' device.
    """
    _check_linear_factors(a, d, "linear_project")
    rows, _, d_in = a.shape
    d_out = d.shape[2]
    if z.dim() != 3 or z.shape[0] != d_out or z.shape[1] != d_in:
        raise ValueError(f"linear_project: z must have shape ({d_out}, {d_in}, s), got {tuple(z.shape)}")
    cols = z.shape[2]
    a64, d64, z64 = a.to(torch.float64), d.to(torch.float64), z.to(torch.float64)
    y = torch.zeros(rows, cols, dtype=torch.float64, device=a.device)
    for begin, end in _output_blocks(rows, d_in, d_out, cols):
        g = torch.einsum("rto,rti->roi", d64[:, :, begin:end], a64).reshape(rows, (end - begin) * d_in)
        y += g @ z64[begin:end].reshape((end - begin) * d_in, cols)
    return y


def block_put_(out: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """Reference for ``sven_ext.ops.block_put_``: ``out[..., rows[i], cols[j]] = block[..., i, j]``, in place.

    Torch's advanced-index assignment over the last two dims, for a 2-D ``(R, C)`` or a
    3-D ``(N, R, C)`` ``out`` alike; the indices must be distinct and in range (not
    checked here).

    Args:
        out: ``(R, C)`` or ``(N, R, C)``, written in place.
        rows: ``(r,)`` int64 row indices.
        cols: ``(c,)`` int64 column indices.
        block: ``(r, c)`` or ``(N, r, c)``, out's dtype.

    Returns:
        ``out``.
    """
    out[..., rows[:, None], cols] = block
    return out
