"""What ``param_fraction`` saves: Sven step time and peak memory with random parameter subsets.

Each step moves a random subset of the parameter tensors holding about ``param_fraction``
of the elements; the others are not captured (no hooks, no factors, no Gram terms), so time
and memory fall with the fraction. Measured side by side in one process, with an Adam step
as the yardstick, on the MLP 784-512-512-10 at B = 256 (float32, cross-entropy).

    python bench/options_bench.py                      # writes bench/results/options_bench.json
    python bench/options_bench.py --fractions 1 0.25 --repeats 9
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import sven_ext  # noqa: E402
from sven_ext import testing  # noqa: E402
from sven_ext.costs import mib  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fractions", type=float, nargs="+", default=[1.0, 0.5, 0.25])
    parser.add_argument("--repeats", type=int, default=15, help="timed steps per setting (median reported)")
    parser.add_argument("--warmup", type=int, default=8, help="untimed steps first (each new subset is checked once)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--out", default="options_bench.json")
    args = parser.parse_args()
    common.exact_memory_accounting()
    if args.threads:
        torch.set_num_threads(args.threads)

    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = testing.mlp([784, 512, 512, 10], "relu", dtype=torch.float32)
    x = torch.randn(256, 784, generator=generator)
    y = torch.randint(0, 10, (256,), generator=generator)

    def closure():
        return F.cross_entropy(model(x), y, reduction="none")

    adam = torch.optim.Adam(model.parameters(), lr=1e-6)

    def adam_step():
        adam.zero_grad()
        closure().mean().backward()
        adam.step()

    results = {"adam": common.measure(adam_step, repeats=args.repeats)}
    print(f"adam: {results['adam']['median_s'] * 1e3:.1f} ms", flush=True)
    total = sum(p.numel() for p in model.parameters())
    for fraction in args.fractions:
        opt = sven_ext.Sven(model, lr=1e-6, k=128, backend="gram", param_fraction=fraction, seed=1)
        moved = []

        def step():
            opt.step(closure)
            moved.append(opt.last_info["moved_elements"])

        result = common.measure(step, repeats=args.repeats, warmup=args.warmup)
        result["moved_fraction_median"] = statistics.median(moved[args.warmup:]) / total
        results[f"sven_gram_fraction_{fraction:g}"] = result
        print(f"sven gram, param_fraction={fraction:g}: {result['median_s'] * 1e3:.1f} ms, "
              f"peak +{mib(result['peak_extra_bytes'])}, moved {result['moved_fraction_median']:.2f}",
              flush=True)
    full = results[f"sven_gram_fraction_{args.fractions[0]:g}"]
    summary = {
        key: {"time_vs_first": r["median_s"] / full["median_s"],
              "peak_vs_first": r["peak_extra_bytes"] / max(full["peak_extra_bytes"], 1),
              "time_vs_adam": r["median_s"] / results["adam"]["median_s"]}
        for key, r in results.items() if key.startswith("sven")
    }
    path = common.write_json(args.out, {"command": "python bench/options_bench.py " + " ".join(sys.argv[1:]),
                                        "model": "MLP 784-512-512-10 float32, B=256, k=128", "parameters": total,
                                        "results": results, "summary": summary})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
