"""The zoo benchmark's turn orders: each method right after each other one equally often."""

from __future__ import annotations

import collections
import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture(scope="module")
def zoo_bench():
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("zoo_bench", BENCH / "zoo_bench.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(BENCH))


@pytest.mark.parametrize("count", [2, 3, 4, 5, 6])
def test_each_method_follows_each_other_equally_often(zoo_bench, count):
    orders = zoo_bench.balanced_orders(count)
    assert all(sorted(order) == list(range(count)) for order in orders)
    pairs = collections.Counter((order[i], order[i + 1]) for order in orders for i in range(count - 1))
    assert len(pairs) == count * (count - 1)  # every ordered pair of different methods
    assert len(set(pairs.values())) == 1


def test_balanced_times_calls_each_once_per_round(zoo_bench):
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "abcd"}
    results = zoo_bench.balanced_times(fns, repeats=8)
    assert calls[:4] == list("abcd")  # the warm-up
    assert all(sorted(calls[4 + 4 * r:8 + 4 * r]) == list("abcd") for r in range(8))
    assert calls[4:8] != calls[8:12]
    assert all(len(result["times_s"]) == 8 for result in results.values())
