"""What the operations that are not matrix products cost on a device, in GEMM flops of that device
(DESIGN.md section 2.3).

The cost model (:mod:`sven_ext.costs`) counts work in GEMM-equivalent flops, so that the gram
backend's ``eigh`` of ``K``, the sketch's random numbers and the fixed cost of each tensor op can
be weighed against the products. Their relative costs depend on the device: a GPU runs GEMMs
hundreds of times faster than 2 CPU cores, while ``eigh`` and a kernel launch gain far less. The
CPU's rates are a fixed table (measured on a 2-core machine; fixed, so that ``auto``'s choices on
a CPU are reproducible); any other device type is measured once, at first use, per device.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class DeviceRates:
    """Costs in GEMM flops of the device.

    Attributes:
        eigh_flops_per_n3: ``torch.linalg.eigh`` of an ``n x n`` float64 matrix, per ``n^3``.
        rng_flops: one number of :func:`sven_ext.ops.random_block`, per test matrix kind
            (Khatri-Rao draws Gaussian numbers, fewer of them).
        op_overhead_flops: the fixed cost of one tensor op (dispatch, launch).
    """

    eigh_flops_per_n3: float
    rng_flops: dict = field(hash=False)
    op_overhead_flops: float


# Measured on 2 CPU cores: eigh ~0.85 ns * n^3 at n = 2048..4096 against ~0.033 ns per float64 GEMM
# flop; ~39 ns per Gaussian and ~15 ns per Rademacher number at 1 thread; ~10 us per small op.
CPU_RATES = DeviceRates(eigh_flops_per_n3=25.0,
                        rng_flops={"gaussian": 1200.0, "rademacher": 450.0, "khatri_rao": 1200.0},
                        op_overhead_flops=3e5)

_MEASURED: dict = {}


def rates_for(device: torch.device) -> DeviceRates:
    """The rates of ``device``: the CPU's table, or measured once per device (:func:`measure`)."""
    device = torch.device(device)
    if device.type == "cpu":
        return CPU_RATES
    key = (device.type, device.index)
    if key not in _MEASURED:
        _MEASURED[key] = measure(device)
    return _MEASURED[key]


def measure(device: torch.device, gemm_size: int = 2048, eigh_size: int = 512, numbers: int = 1 << 22,
            small_ops: int = 200) -> DeviceRates:
    """Times a float64 GEMM, an ``eigh``, ``random_block`` and a small op on ``device`` (about 0.1 s on a
    GPU; several seconds on a CPU) and returns their costs in GEMM flops."""
    from . import ops  # the compiled extension, only when something is measured

    device = torch.device(device)
    a = torch.randn(gemm_size, gemm_size, dtype=torch.float64, device=device)
    gemm_seconds = _seconds(lambda: a @ a, device) / (2.0 * gemm_size**3)
    k = torch.randn(eigh_size, eigh_size, dtype=torch.float64, device=device)
    k = k @ k.T
    eigh = _seconds(lambda: torch.linalg.eigh(k), device) / eigh_size**3
    rng = {}
    for kind in ("gaussian", "rademacher"):
        rng[kind] = _seconds(lambda kind=kind: ops.random_block(numbers // 1024, 1024, seed=1, distribution=kind,
                                                                dtype=torch.float32, device=device),
                             device) / numbers / gemm_seconds
    rng["khatri_rao"] = rng["gaussian"]
    x = torch.ones(8, device=device)

    def small():
        for _ in range(small_ops):
            x.add(1.0)

    overhead = _seconds(small, device) / small_ops
    return DeviceRates(eigh / gemm_seconds, rng, overhead / gemm_seconds)


def _seconds(fn, device: torch.device, repeats: int = 3) -> float:
    """Median wall time of ``fn()`` after one warm-up call, synchronised on ``device``."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]
