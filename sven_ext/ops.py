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
        counters: ``(N, 4)`` int64 tensor of 32-bit counter words (values in ``[0, 2**32)``).
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
    """
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
    out = torch.empty(rows, cols, dtype=dtype, device=device)
    torch.ops.sven_ext.philox_fill_(out, seed, stream, row_offset, col_offset, distribution)
    return out


@torch.library.register_fake("sven_ext::philox_raw")
def _philox_raw_fake(counters, seed):
    torch._check(counters.dim() == 2 and counters.shape[1] == 4, lambda: "counters must have shape (N, 4)")
    return torch.empty_like(counters)


@torch.library.register_fake("sven_ext::philox_fill_")
def _philox_fill_fake(out, seed, stream, row_offset, col_offset, distribution):
    return None
