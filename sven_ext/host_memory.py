"""Handing freed host memory back to the system between the phases of a CPU step (DESIGN.md section 5).

A CPU step of a large model frees a lot of mid-sized memory at a few points: the forward pass's
saved activations during the capture's backward pass, the factors once the directions are
formed. glibc's allocator keeps such memory resident for reuse (its mmap threshold rises after
large frees, so later tensors of a few MB come from the heap, and freed heap pages stay mapped),
and the process's resident size, which is what a memory limit counts, keeps the step's largest
footprint plus the holes. ``malloc_trim(0)`` returns the free pages of every arena to the system;
a later allocation that reuses them faults them back in, which costs time: so memory is handed
back only once at least ``RELEASE_BYTES`` more is free than at the last hand-back (a small
model's step never gets there). Where the C library is not glibc 2.33 or later,
:func:`release_freed_memory` does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

import torch

# Free heap bytes, beyond those already handed back, that make a hand-back worth its page faults.
RELEASE_BYTES = 32 << 20


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


class _Glibc:
    """glibc's ``malloc_trim`` and ``mallinfo2``, and the free bytes already handed back."""

    def __init__(self, libc):
        self.trim, self.info = libc.malloc_trim, libc.mallinfo2
        self.trim.argtypes, self.trim.restype = [ctypes.c_size_t], ctypes.c_int
        self.info.argtypes, self.info.restype = [], _MallInfo2
        self.released = 0  # free bytes whose pages went back at the last hand-back (less what was reused)

    def free_bytes(self) -> int:
        return int(self.info().fordblks)


@functools.cache
def _glibc() -> _Glibc | None:
    """The allocator's entry points, or ``None`` (not Linux, not glibc, or glibc before 2.33)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return _Glibc(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"))
    except (OSError, AttributeError):
        return None


def release_freed_memory(device: torch.device) -> bool:
    """Hands the host memory this process has freed back to the system, for a step on ``device``,
    where at least ``RELEASE_BYTES`` more is free than at the last hand-back.

    Only for CPU steps (a GPU step's tensors are not in the host heap). Returns whether it handed
    memory back.
    """
    libc = _glibc()
    if libc is None or device.type != "cpu":
        return False
    free = libc.free_bytes()
    libc.released = min(libc.released, free)  # reused chunks are resident again
    if free - libc.released < RELEASE_BYTES:
        return False
    libc.trim(0)
    libc.released = libc.free_bytes()
    return True
