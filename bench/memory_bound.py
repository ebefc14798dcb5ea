"""Measured peak memory of a Sven step against the estimate ``max_memory`` is checked with.

For each model, batch size and backend, a fresh optimizer takes two steps; each step's extra
peak resident memory (above what the process held when the step began, under exact allocator
accounting) is divided by the estimate the backend checked against ``max_memory`` (the captured
factors plus the backend's estimate, recorded from :func:`sven_ext.costs.require_fit`; the
larger of the two on a step that also checks its factors against autograd, which is checked
against the budget before the check runs). A ratio above 1 is memory the estimate does not
count; far below 1, an estimate that refuses budgets the step would fit.

    python bench/memory_bound.py                      # the whole matrix -> bench/results/memory_bound.json
    python bench/memory_bound.py --batches 32 256     # fewer batch sizes
"""

from __future__ import annotations

import argparse
import time

import common
import torch
import torch.nn.functional as F

import sven_ext
from sven_ext import costs, testing


def models(batch: int, generator: torch.Generator) -> dict:
    """``{name: (model, closure)}``: float32 models, per-sample losses of a batch of ``batch``."""
    torch.manual_seed(0)
    mlp = testing.mlp((784, 512, 512, 10), "gelu", dtype=torch.float32)
    x = torch.randn(batch, 784, generator=generator)
    labels = torch.randint(0, 10, (batch,), generator=generator)
    cnn = testing.small_cnn(10, dtype=torch.float32)
    images = torch.randn(batch, 3, 7, 7, generator=generator)
    block = testing.tiny_transformer(64, 64, 4, 16, dtype=torch.float32)
    tokens = torch.randint(0, 64, (batch, 16), generator=generator)
    return {
        "MLP 784-512-512-10": (mlp, lambda: F.cross_entropy(mlp(x), labels, reduction="none")),
        "CNN (testing.small_cnn)": (cnn, lambda: F.cross_entropy(cnn(images), labels, reduction="none")),
        "transformer block d=64, T=16": (
            block, lambda: F.cross_entropy(block(tokens).transpose(1, 2), tokens, reduction="none").mean(1)),
    }


def measure(model, closure, backend: str, k: int) -> list[dict]:
    checked = []
    real = costs.require_fit

    def recording(estimate, factor_bytes, max_memory, device):
        checked.append(factor_bytes + estimate.bytes)
        return real(estimate, factor_bytes, max_memory, device)

    costs.require_fit = recording
    try:
        # A budget far above any step's: the estimates are then those a real budget is checked against
        # (the factors counted once per storage: costs.held_bytes).
        opt = sven_ext.Sven(model, lr=1e-3, k=k, backend=backend, max_memory=1 << 40)
        steps = []
        for index in range(2):
            checked.clear()
            with common.PeakMemory() as memory:
                start = time.perf_counter()
                opt.step(closure)
                seconds = time.perf_counter() - start
            # A checked step is checked twice: before the factor check and before the solve.
            estimate = max(checked)
            steps.append({"step": index + 1, "estimate_bytes": estimate, "peak_extra_bytes": memory.extra_bytes,
                          "ratio": memory.extra_bytes / estimate, "seconds": seconds,
                          "checked_factors": bool(opt.last_info.get("checked"))})
    finally:
        costs.require_fit = real
    return steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[32, 256, 1024, 4096])
    parser.add_argument("--backends", nargs="+", default=["gram", "sketch"])
    parser.add_argument("--k", type=int, default=32)
    args = parser.parse_args()
    common.exact_memory_accounting()
    # The process's one-time allocations (BLAS and autograd workspaces) are not any step's.
    warm = testing.mlp((4, 4, 1), dtype=torch.float32)
    for backend in args.backends:
        sven_ext.Sven(warm, backend=backend, k=1).step(lambda: warm(torch.ones(3, 4)).square().sum(1))
    results = []
    for batch in args.batches:
        for name, (model, closure) in models(batch, torch.Generator().manual_seed(0)).items():
            for backend in args.backends:
                for step in measure(model, closure, backend, args.k):
                    results.append({"model": name, "batch": batch, "backend": backend, **step})
                    r = results[-1]
                    print(f"{name:30s} B={batch:5d} {backend:6s} step {r['step']}: estimate "
                          f"{costs.mib(r['estimate_bytes']):>10s}, peak extra {costs.mib(r['peak_extra_bytes']):>10s}, "
                          f"ratio {r['ratio']:.2f} ({r['seconds']:.2f} s)", flush=True)
    worst = max(results, key=lambda r: r["ratio"])
    print(f"worst ratio {worst['ratio']:.2f}: {worst['model']}, B={worst['batch']}, {worst['backend']}, "
          f"step {worst['step']}")
    common.write_json("memory_bound.json", {"command": "python bench/memory_bound.py " + " ".join(
        f"--{k} {' '.join(map(str, v)) if isinstance(v, list) else v}" for k, v in vars(args).items()),
        "k": args.k, "results": results})


if __name__ == "__main__":
    main()
