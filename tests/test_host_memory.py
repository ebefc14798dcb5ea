"""Handing freed host memory back to the system (``sven_ext.host_memory``)."""

from __future__ import annotations

import pytest
import torch

from sven_ext import host_memory


def _resident_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


@pytest.mark.skipif(host_memory._malloc_trim() is None, reason="glibc's malloc_trim only")
def test_only_large_cpu_models_hand_memory_back():
    large = host_memory.RELEASE_MODEL_BYTES // 4
    assert host_memory.releases([torch.empty(large)])
    assert not host_memory.releases([torch.empty(large - 1)])
    assert not host_memory.releases([torch.empty(large, device="meta")])


@pytest.mark.skipif(host_memory._malloc_trim() is None, reason="glibc's malloc_trim only")
def test_freed_heap_memory_goes_back_to_the_system():
    # 32 KiB tensors come from the heap (below glibc's mmap threshold); the last one stays alive,
    # so the freed ones sit below it and are not returned by free() alone.
    blocks = [torch.ones(8192) for _ in range(8192)]  # 256 MiB
    keep = torch.ones(8192)
    before = _resident_mib()
    del blocks
    freed = _resident_mib()
    assert host_memory.release_freed_memory()
    after = _resident_mib()
    assert after < freed - 128 and after < before - 128, (before, freed, after)
    del keep
