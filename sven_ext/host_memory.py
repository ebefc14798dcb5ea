"""Handing freed host memory back to the system between the phases of a CPU step (DESIGN.md section 5).

A CPU step of a large model frees a lot of mid-sized memory at a few points: the forward pass's
saved activations during the capture's backward pass, the factors once the directions are
formed. glibc's allocator keeps such memory resident for reuse (its mmap threshold rises after
large frees, so later tensors of a few MB come from the heap, and freed heap pages stay mapped),
and the process's resident size, which is what a memory limit counts, keeps the step's largest
footprint plus the holes. ``malloc_trim(0)`` returns the free pages of every arena to the system;
a later allocation that reuses them faults them back in, and the trim itself walks the
allocator's free lists: both cost time in proportion to the heap, not to what is returned. So
memory is handed back only in steps whose parameters take at least ``RELEASE_MODEL_BYTES``, where
the activations and factors freed between the phases are hundreds of MB and a hand-back costs
a millisecond or two of a step of seconds; a smaller model's step never hands anything back.
Where the C library is not glibc, :func:`release_freed_memory` does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

import torch

# Parameters' bytes from which a step hands its freed memory back.
RELEASE_MODEL_BYTES = 64 << 20


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim``, or ``None`` (not Linux, or not glibc)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def releases(params: list[torch.Tensor]) -> bool:
    """Whether a step on ``params`` hands its freed host memory back: CPU tensors of at least
    ``RELEASE_MODEL_BYTES`` (a GPU step's tensors are not in the host heap)."""
    return (_malloc_trim() is not None and bool(params) and params[0].device.type == "cpu"
            and sum(p.numel() * p.element_size() for p in params) >= RELEASE_MODEL_BYTES)


def release_freed_memory() -> bool:
    """Hands the host memory this process has freed back to the system (glibc's ``malloc_trim``);
    whether any was."""
    trim = _malloc_trim()
    return trim is not None and bool(trim(0))
