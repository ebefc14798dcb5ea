"""Handing freed host memory back to the system (``sven_ext.host_memory``)."""

from __future__ import annotations

import pytest
import torch

from sven_ext import host_memory


def _resident_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def test_a_step_off_the_cpu_hands_nothing_back():
    assert host_memory.release_freed_memory(torch.device("meta")) is False


@pytest.mark.skipif(host_memory._glibc() is None, reason="glibc's malloc_trim and mallinfo2 only")
def test_freed_heap_memory_goes_back_to_the_system():
    # 32 KiB tensors come from the heap (below glibc's mmap threshold); the last one stays alive,
    # so the freed ones sit below it and are not returned by free() alone.
    blocks = [torch.ones(8192) for _ in range(8192)]  # 256 MiB
    keep = torch.ones(8192)
    before = _resident_mib()
    del blocks
    freed = _resident_mib()
    assert host_memory.release_freed_memory(torch.device("cpu"))
    after = _resident_mib()
    assert after < freed - 128 and after < before - 128, (before, freed, after)
    # Nothing more was freed since: no second hand-back (its page faults would buy nothing).
    assert not host_memory.release_freed_memory(torch.device("cpu"))
    del keep
