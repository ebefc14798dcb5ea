"""Per-device costs of the cost model's non-GEMM operations."""

import math

import torch

from sven_ext import device_rates
from sven_ext.device_rates import CPU_RATES, measure, rates_for


def test_cpu_uses_the_fixed_table():
    assert rates_for(torch.device("cpu")) is CPU_RATES
    assert rates_for("cpu") is CPU_RATES


def test_other_devices_are_measured_once(monkeypatch):
    calls = []

    def fake(device):
        calls.append(device)
        return CPU_RATES

    monkeypatch.setattr(device_rates, "measure", fake)
    monkeypatch.setattr(device_rates, "_MEASURED", {})
    for _ in range(3):
        assert rates_for(torch.device("meta")) is CPU_RATES
    assert len(calls) == 1


def test_measure_gives_positive_finite_rates():
    rates = measure(torch.device("cpu"), gemm_size=128, eigh_size=64, numbers=1 << 14, small_ops=20)
    values = [rates.eigh_flops_per_n3, rates.op_overhead_flops, *rates.rng_flops.values()]
    assert all(v > 0 and math.isfinite(v) for v in values)
    assert set(rates.rng_flops) == set(CPU_RATES.rng_flops)
