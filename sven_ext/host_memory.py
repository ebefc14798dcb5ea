"""Handing freed host memory back to the system between the phases of a CPU step (DESIGN.md section 5).

A CPU step frees a lot of mid-sized memory at a few points: the forward pass's saved activations
during the capture's backward pass, the factors once the directions are formed. glibc's
allocator keeps such memory resident for reuse (its mmap threshold rises after large frees, so
later tensors of a few MB come from the heap, and freed heap pages stay mapped), and the
process's resident size, which is what a memory limit counts, keeps the step's largest
footprint plus the holes. ``malloc_trim(0)`` returns the free pages of every arena to the system;
a later allocation that reuses them faults them back in. Where the C library is not glibc,
:func:`release_freed_memory` does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

import torch


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim``, or ``None`` (not Linux, or not glibc)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_freed_memory(device: torch.device) -> bool:
    """Returns the host memory this process has freed to the system, for a step on ``device``.

    Only for CPU steps (a GPU step's tensors are not in the host heap). Returns whether memory
    could be handed back at all (glibc's ``malloc_trim`` reported pages released).
    """
    trim = _malloc_trim()
    if trim is None or device.type != "cpu":
        return False
    return bool(trim(0))
