"""What ``param_fraction`` saves: Sven step time and peak memory with random parameter subsets.

Two kinds of subset, each about ``param_fraction`` of the elements: whole parameter tensors
(``mask_by_block=True``: the others are not captured, no hooks, factors or Gram terms) and
elements of every tensor (``mask_by_block=False``: the gram backend restricts each layer's
factors to the chosen units and inputs). Measured side by side in one process, with an Adam
step as the yardstick, on an MLP (default 784-512-512-10 at B = 256; float32, cross-entropy).
Times come from the default allocator, peak memory from a second pass of the script under exact
memory accounting (``bench/common.py``: ``exact_peaks``).

    python bench/options_bench.py                      # writes bench/results/options_bench.json
    python bench/options_bench.py --fractions 1 0.25 --repeats 9
    python bench/options_bench.py --sizes 784-2048-2048-10 --batch 64 --out options_bench_wide.json
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


def main() -> int:
    args = _arguments()
    memory_pass = common.memory_pass_file()
    if args.threads:
        torch.set_num_threads(args.threads)

    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    sizes = [int(width) for width in args.sizes.split("-")]
    model = testing.mlp(sizes, "relu", dtype=torch.float32)
    x = torch.randn(args.batch, sizes[0], generator=generator)
    y = torch.randint(0, sizes[-1], (args.batch,), generator=generator)
    k = min(128, args.batch)

    def closure():
        return F.cross_entropy(model(x), y, reduction="none")

    steps, moved = _steps(args, model, closure, k)
    if memory_pass:
        peaks = {name: common.measure(fn, repeats=3, warmup=args.warmup) for name, fn in steps.items()}
        common.write_peaks(memory_pass, peaks)
        return 0
    # One step of each setting per round: a load that comes and goes touches all of them alike.
    results = common.interleaved_times(steps, repeats=args.repeats, warmup=args.warmup)
    total = sum(p.numel() for p in model.parameters())
    for name, result in results.items():
        if name in moved:
            result["moved_fraction_median"] = statistics.median(moved[name]) / total
        print(f"{name}: {result['median_s'] * 1e3:.1f} ms"
              + (f", moved {result['moved_fraction_median']:.2f}" if name in moved else ""), flush=True)
    print("peak memory: a second pass under exact memory accounting", flush=True)
    common.exact_peaks(results)
    path = common.write_json(args.out, {"command": "python bench/options_bench.py " + " ".join(sys.argv[1:]),
                                        "model": f"MLP {args.sizes} float32, B={args.batch}, k={k}", "parameters": total,
                                        "results": results, "summary": _summary(args, results)})
    print(f"wrote {path}")
    return 0


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="784-512-512-10", help="MLP layer widths")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--fractions", type=float, nargs="+", default=[1.0, 0.5, 0.25])
    parser.add_argument("--repeats", type=int, default=15, help="timed rounds, one step of each setting per round")
    parser.add_argument("--warmup", type=int, default=8, help="untimed steps first (each new subset is checked once)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--out", default="options_bench.json")
    args, _ = parser.parse_known_args()  # the memory pass adds its own argument
    return args


def _steps(args, model: torch.nn.Module, closure, k: int) -> tuple[dict, dict]:
    """``({name: step}, {name: [moved elements per step]})``: an Adam step, then a Sven step per setting."""
    adam = torch.optim.Adam(model.parameters(), lr=1e-6)

    def adam_step():
        adam.zero_grad()
        closure().mean().backward()
        adam.step()

    steps, moved = {"adam": adam_step}, {}
    settings = [(fraction, True) for fraction in args.fractions]
    settings += [(fraction, False) for fraction in args.fractions if fraction < 1]
    for fraction, by_block in settings:
        name = f"sven_gram_fraction_{fraction:g}" + ("" if by_block else "_elements")
        opt = sven_ext.Sven(model, lr=1e-6, k=k, backend="gram", safeguard=None, param_fraction=fraction,
                            mask_by_block=by_block, seed=1)
        moved[name] = []

        def step(opt=opt, moved=moved[name]):
            opt.step(closure)
            moved.append(opt.last_info["moved_elements"])

        steps[name] = step
    return steps, moved


def _summary(args, results: dict) -> dict:
    """Each Sven setting's time and peak memory against the first fraction's, and its time against Adam's."""
    full = results[f"sven_gram_fraction_{args.fractions[0]:g}"]
    return {
        key: {"time_vs_first": r["median_s"] / full["median_s"],
              "peak_vs_first": r["peak_extra_bytes"] / max(full["peak_extra_bytes"], 1),
              "time_vs_adam": r["median_s"] / results["adam"]["median_s"]}
        for key, r in results.items() if key.startswith("sven")
    }


if __name__ == "__main__":
    sys.exit(main())
