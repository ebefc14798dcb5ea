"""Typed wrappers over the compiled ops, and their fake (meta) impls for torch.compile.

Each op is declared once in ``csrc/ops.cpp`` and implemented per device in
``csrc/cpu`` and ``csrc/cuda``; ``sven_ext.reference`` holds a pure-torch version
of each, used by the tests as the oracle.
"""

from __future__ import annotations

import torch

from . import _extension  # noqa: F401  (loads the library before the ops are looked up)

DISTRIBUTIONS = ("gaussian", "rademacher")


def philox_raw(counters: torch.Tensor, seed: int) -> torch.Tensor:
    """Raw Philox4x32-10 words.

    Args:
        counters: ``(N, 4)`` int64 tensor of 32-bit counter words (values in ``[0, 2**32)``;
            only the low 32 bits of each value are used), any strides.
        seed: 64-bit key; negative values are read as their two's complement.

    Returns:
        ``(N, 4)`` int64 tensor of output words, on the device of ``counters``.
    """
    return torch.ops.sven_ext.philox_raw(counters, seed)


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
    """Block ``[row_offset:row_offset+rows, col_offset:col_offset+cols]`` of a virtual random matrix.

    The virtual matrix is identified by ``(seed, stream)``; each entry is a pure
    function of its global (row, column), so any block can be regenerated on its
    own, on any device, and equals the same block cut from a larger generation.

    Args:
        rows, cols: block shape.
        seed: 64-bit generator key.
        stream: 32-bit stream id (e.g. one per step and layer).
        row_offset, col_offset: global index of the block's first entry.
        distribution: ``"gaussian"`` (standard normal) or ``"rademacher"`` (+-1).
        dtype: a floating dtype; values are computed in float64 and rounded once.
        device: where to generate.

    Returns:
        A contiguous ``(rows, cols)`` tensor.

    Raises:
        ValueError: ``rows`` or ``cols`` negative, or an unknown ``distribution``.
        RuntimeError: from the op, for a non-floating ``dtype`` or offsets and streams out of range.
    """
    if rows < 0 or cols < 0:
        raise ValueError(f"sven_ext.random_block: rows and cols must be >= 0, got rows {rows} and cols {cols}")
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"sven_ext.random_block: distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
    out = torch.empty(rows, cols, dtype=dtype, device=device)
    torch.ops.sven_ext.philox_fill_(out, seed, stream, row_offset, col_offset, distribution)
    return out


def seq_gram(a: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Gram matrix ``K = J J^T`` of a Linear layer applied along a sequence axis.

    With per-sample gradients ``g_i = d_i^T a_i`` (summed over the sequence),
    ``K[i, j] = <g_i, g_j> = sum_{t, t'} (a_i a_j^T)[t, t'] * (d_i d_j^T)[t, t']``,
    computed tile by tile without forming ``g`` or any ``T x T`` matrix per pair.
    Products over the feature axes are accumulated in float32 for float32, float16
    and bfloat16 inputs (float64 for float64); the sum over ``(t, t')`` is float64.
    Non-contiguous inputs are copied to contiguous ones first.

    Args:
        a: ``(B, T, Da)`` layer inputs, float16, bfloat16, float32 or float64.
        d: ``(B, T, Dd)`` gradients at the layer output, same dtype and device as ``a``.

    Returns:
        ``(B, B)`` float64 symmetric tensor on the inputs' device (zeros when ``T``,
        ``Da`` or ``Dd`` is 0).
    """
    return torch.ops.sven_ext.seq_gram(a, d)


def embedding_gram(indices: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Gram matrix ``K = J J^T`` of an Embedding layer.

    ``K[i, j] = sum_{t, t'} [indices[i, t] == indices[j, t']] * (d_i[t] . d_j[t'])``: the
    per-sample gradient scatters ``d_i[t]`` into row ``indices[i, t]`` of the table.
    Dot products accumulate as in :func:`seq_gram`, the sum into K in float64. Index
    values are compared, never used to address memory, so any int64 values work
    (map padding tokens to zero rows of ``d`` to leave them out). Non-contiguous
    inputs are copied to contiguous ones first.

    Args:
        indices: ``(B, T)`` int64 token indices.
        d: ``(B, T, Dd)`` gradients at the embedding output, float16, bfloat16, float32
            or float64, on the device of ``indices``.

    Returns:
        ``(B, B)`` float64 symmetric tensor on the inputs' device.
    """
    return torch.ops.sven_ext.embedding_gram(indices, d)


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
    """Sketch ``Y = J_l Omega`` of a Linear layer's Jacobian rows, fused: no per-row gradient, no Omega stored.

    Row ``r``'s gradient is ``G_r = d_r^T a_r`` (``(d_out, d_in)``, summed over T), flattened
    row-major (entry ``(o, i)`` at index ``o * d_in + i``), and
    ``Y[r, j] = sum_{o, i} G_r[o, i] * Omega[row_offset + o * d_in + i, j]``, where ``Omega`` is
    the virtual matrix of :func:`random_block` for ``(seed, stream, distribution)``: its tiles
    are regenerated where they are used. Several layers (or parameter blocks) of one model share
    a stream by taking consecutive ``row_offset`` ranges. Columns are a function of the column
    index only, so the first ``c`` columns of a sketch with ``cols > c`` equal the sketch with
    ``cols = c``.

    Computed in float64 for float64 inputs, otherwise in float32 (float16/bfloat16 inputs are
    converted; Omega is rounded to float32) with each parameter tile's products summed in
    float32 and the tiles' contributions summed into ``Y`` in float64. The result does not
    depend on the thread count. Non-contiguous inputs are copied to contiguous ones first.

    Args:
        a: ``(R, T, d_in)`` layer inputs, float16, bfloat16, float32 or float64.
        d: ``(R, T, d_out)`` gradients at the layer output, same dtype and device as ``a``.
        seed: 64-bit generator key.
        stream: 32-bit stream id, in ``[0, 2**32)``.
        row_offset: row of Omega that parameter ``(0, 0)`` maps to, ``>= 0``.
        cols: sketch size (columns of Omega), ``>= 1``.
        distribution: ``"gaussian"`` or ``"rademacher"``.

    Returns:
        ``(R, cols)`` float64 tensor on the inputs' device (zeros when T, d_in or d_out is 0).
    """
    return torch.ops.sven_ext.linear_sketch(a, d, seed, stream, row_offset, cols, distribution)


def linear_project(a: torch.Tensor, d: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``Y = J_l Z_l`` for a Linear layer and a stored ``z``, fused: the per-row gradients are never stored.

    ``Y[r, j] = sum_{o, i} G_r[o, i] * z[o, i, j]`` with ``G_r = d_r^T a_r``: the product of the
    power iteration and of the Rayleigh-Ritz step. Computed in float64 when ``a`` or ``z`` is
    float64 (``z`` of another dtype is converted once), otherwise as :func:`linear_sketch`.
    Non-contiguous inputs are copied to contiguous ones first.

    Args:
        a: ``(R, T, d_in)`` layer inputs, float16, bfloat16, float32 or float64.
        d: ``(R, T, d_out)`` gradients at the layer output, same dtype and device as ``a``.
        z: ``(d_out, d_in, s)`` floating, on the device of ``a``.

    Returns:
        ``(R, s)`` float64 tensor on the inputs' device.
    """
    return torch.ops.sven_ext.linear_project(a, d, z)


def block_put_(out: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """Writes ``block`` into the rows ``rows`` and columns ``cols`` of ``out``, in place.

    ``out[..., rows[i], cols[j]] = block[..., i, j]`` for every ``i``, ``j`` (and every
    matrix ``n`` of a batch); every other entry of ``out`` is left as it is. The entries
    are copied bitwise. The index vectors need not be sorted, but each must hold
    distinct values in range. On CUDA that check costs one device-to-host copy of a few
    counters (a sync) whenever ``rows`` or ``cols`` is non-empty. Non-contiguous
    ``rows``, ``cols`` and ``block`` are copied to contiguous ones first, and so is a
    ``block`` that shares memory with ``out``.

    Args:
        out: ``(R, C)`` or ``(N, R, C)`` float16, bfloat16, float32 or float64,
            contiguous (it is written in place; a 2-D ``out`` is viewed as ``(1, R, C)``,
            never copied).
        rows: ``(r,)`` int64 distinct row indices in ``[0, R)``, on the device of ``out``.
        cols: ``(c,)`` int64 distinct column indices in ``[0, C)``, on the device of ``out``.
        block: ``(r, c)`` for a 2-D ``out``, ``(N, r, c)`` for a 3-D one; the dtype and
            device of ``out``.

    Returns:
        ``out``, the tensor passed in.

    Raises:
        ValueError: ``out`` and ``block`` not both 2-D or both 3-D.
        RuntimeError: from the op: a non-contiguous or non-floating ``out``; ``rows`` or
            ``cols`` not 1-D int64, with a value out of range or repeated; ``block`` of
            another dtype or a shape other than ``(N, r, c)``; tensors on several devices.
    """
    if out.dim() != block.dim() or out.dim() not in (2, 3):
        raise ValueError(
            "sven_ext.block_put_: out and block must be both 2-D ((R, C) and (r, c)) or both 3-D "
            f"((N, R, C) and (N, r, c)), got shapes {tuple(out.shape)} and {tuple(block.shape)}"
        )
    if out.dim() == 2:
        torch.ops.sven_ext.block_put_(out.unsqueeze(0), rows, cols, block.unsqueeze(0))
    else:
        torch.ops.sven_ext.block_put_(out, rows, cols, block)
    return out


_FLOATING = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_floating_fake(t, op, name):
    torch._check(
        t.dtype in _FLOATING, lambda: f"sven_ext.{op}: {name} must be float16, bfloat16, float32 or float64, got {t.dtype}"
    )


@torch.library.register_fake("sven_ext::philox_raw")
def _philox_raw_fake(counters, seed):
    torch._check(
        counters.dim() == 2 and counters.shape[1] == 4,
        lambda: f"sven_ext.philox_raw: counters must have shape (N, 4), got {tuple(counters.shape)}",
    )
    torch._check(counters.dtype == torch.int64, lambda: f"sven_ext.philox_raw: counters must be int64, got {counters.dtype}")
    # Contiguous whatever the counters' strides, as the device impls return.
    return counters.new_empty(counters.shape)


@torch.library.register_fake("sven_ext::philox_fill_")
def _philox_fill_fake(out, seed, stream, row_offset, col_offset, distribution):
    torch._check(out.dim() == 2, lambda: f"sven_ext.philox_fill_: out must be 2-D, got shape {tuple(out.shape)}")
    _check_floating_fake(out, "philox_fill_", "out")
    return None


@torch.library.register_fake("sven_ext::seq_gram")
def _seq_gram_fake(a, d):
    torch._check(a.dim() == 3 and d.dim() == 3, lambda: "sven_ext.seq_gram: a and d must be 3-D")
    torch._check(a.device == d.device, lambda: "sven_ext.seq_gram: a and d must be on one device")
    torch._check(a.dtype == d.dtype, lambda: "sven_ext.seq_gram: a and d must have one dtype")
    _check_floating_fake(a, "seq_gram", "a")
    torch._check(a.shape[0] == d.shape[0] and a.shape[1] == d.shape[1], lambda: "sven_ext.seq_gram: B and T must match")
    return a.new_empty((a.shape[0], a.shape[0]), dtype=torch.float64)


@torch.library.register_fake("sven_ext::embedding_gram")
def _embedding_gram_fake(indices, d):
    torch._check(indices.dim() == 2 and d.dim() == 3, lambda: "sven_ext.embedding_gram: indices 2-D and d 3-D")
    torch._check(indices.device == d.device, lambda: "sven_ext.embedding_gram: indices and d must be on one device")
    torch._check(indices.dtype == torch.int64, lambda: "sven_ext.embedding_gram: indices must be int64")
    _check_floating_fake(d, "embedding_gram", "d")
    torch._check(
        indices.shape[0] == d.shape[0] and indices.shape[1] == d.shape[1],
        lambda: "sven_ext.embedding_gram: B and T must match",
    )
    return d.new_empty((d.shape[0], d.shape[0]), dtype=torch.float64)


def _check_linear_factors_fake(a, d, op):
    torch._check(a.dim() == 3 and d.dim() == 3, lambda: f"sven_ext.{op}: a and d must be 3-D")
    torch._check(a.device == d.device, lambda: f"sven_ext.{op}: a and d must be on one device")
    torch._check(a.dtype == d.dtype, lambda: f"sven_ext.{op}: a and d must have one dtype")
    _check_floating_fake(a, op, "a")
    torch._check(a.shape[0] == d.shape[0] and a.shape[1] == d.shape[1], lambda: f"sven_ext.{op}: R and T must match")


@torch.library.register_fake("sven_ext::linear_sketch")
def _linear_sketch_fake(a, d, seed, stream, row_offset, cols, distribution):
    _check_linear_factors_fake(a, d, "linear_sketch")
    torch._check(cols >= 1, lambda: "sven_ext.linear_sketch: cols must be >= 1")
    return a.new_empty((a.shape[0], cols), dtype=torch.float64)


@torch.library.register_fake("sven_ext::linear_project")
def _linear_project_fake(a, d, z):
    _check_linear_factors_fake(a, d, "linear_project")
    torch._check(z.dim() == 3, lambda: "sven_ext.linear_project: z must be 3-D")
    _check_floating_fake(z, "linear_project", "z")
    torch._check(
        z.shape[0] == d.shape[2] and z.shape[1] == a.shape[2],
        lambda: "sven_ext.linear_project: z must have shape (d_out, d_in, s)",
    )
    return a.new_empty((a.shape[0], z.shape[2]), dtype=torch.float64)


@torch.library.register_fake("sven_ext::block_put_")
def _block_put_fake(out, rows, cols, block):
    op = "sven_ext.block_put_"
    torch._check(out.dim() == 3 and block.dim() == 3, lambda: f"{op}: out and block must be 3-D")
    torch._check(rows.dim() == 1 and cols.dim() == 1, lambda: f"{op}: rows and cols must be 1-D")
    torch._check(
        rows.device == out.device and cols.device == out.device and block.device == out.device,
        lambda: f"{op}: out, rows, cols and block must be on one device",
    )
    _check_floating_fake(out, "block_put_", "out")
    torch._check(rows.dtype == torch.int64 and cols.dtype == torch.int64, lambda: f"{op}: rows and cols must be int64")
    torch._check(block.dtype == out.dtype, lambda: f"{op}: out and block must have one dtype")
    torch._check(
        block.shape[0] == out.shape[0] and block.shape[1] == rows.shape[0] and block.shape[2] == cols.shape[0],
        lambda: f"{op}: block must have shape (N, rows.numel(), cols.numel())",
    )
    return None
