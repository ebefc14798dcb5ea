"""Handing freed host memory back to the system between the phases of a CPU step (DESIGN.md section 5).

A CPU step of a large model frees a lot of mid-sized memory at a few points: the forward pass's
saved activations during the capture's backward pass, the factors once the directions are
formed. glibc's allocator keeps such memory resident for reuse (its mmap threshold rises after
large frees, so later tensors of a few MB come from the heap, and freed heap pages stay mapped),
and the process's resident size, which is what a memory limit counts, keeps the step's largest
footprint plus the holes. ``malloc_trim(0)`` returns the free pages of every arena to the system;
a later allocation that reuses them faults them back in, which costs time: so memory is handed
back only where at least ``RELEASE_BYTES`` of freed heap is resident, estimated as the growth of
resident memory beyond what the allocator holds in use since the last hand-back (a small model's
step never gets there). Where the C library is not glibc 2.33 or later,
:func:`release_freed_memory` does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys

import torch

# Resident freed heap that makes a hand-back worth its page faults.
RELEASE_BYTES = 32 << 20


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


class _Glibc:
    """glibc's ``malloc_trim`` and ``mallinfo2``; what was resident beyond the memory in use right
    after the last hand-back (the interpreter, the libraries: not the heap's free pages)."""

    def __init__(self, libc):
        self.trim, self.info = libc.malloc_trim, libc.mallinfo2
        self.trim.argtypes, self.trim.restype = [ctypes.c_size_t], ctypes.c_int
        self.info.argtypes, self.info.restype = [], _MallInfo2
        self.baseline: int | None = None

    def resident_beyond_use(self) -> int:
        """Resident bytes beyond those the allocator holds in use (heap and its own mappings)."""
        with open("/proc/self/statm") as f:
            resident = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        info = self.info()
        return resident - int(info.uordblks) - int(info.hblkhd)


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
    where at least ``RELEASE_BYTES`` of it has stayed resident since the last hand-back.

    Only for CPU steps (a GPU step's tensors are not in the host heap). Returns whether it handed
    memory back.
    """
    libc = _glibc()
    if libc is None or device.type != "cpu":
        return False
    if libc.baseline is not None and libc.resident_beyond_use() - libc.baseline < RELEASE_BYTES:
        return False
    libc.trim(0)
    libc.baseline = libc.resident_beyond_use()
    return True
