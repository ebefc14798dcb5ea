"""Step time and peak memory: Sven (gram, dense) vs Adam vs TorchJD's Gramian, one process.

For each model and batch size it measures, side by side:

- ``adam``: one Adam step (forward, backward, update);
- ``sven_gram``: one Sven step with the exact Gram backend;
- ``sven_dense``: one Sven step with the dense backend (the paper's algorithm);
- ``sven_gram_checked``: the same step on a step signature not seen before, so the factor check
  runs (one more backward pass; a fresh optimizer each call);
- ``signature``: what every step adds to find its signature (the walk over the autograd graph and
  the model's hooks), timed on its own;
- ``gram_only``: sven_ext's Gram matrix alone (forward + capture + K), and
- ``torchjd``: TorchJD's ``autogram.Engine.compute_gramian`` for the same matrix (forward + Gramian),
  when ``torchjd`` is installed (``pip install torchjd``).

Adam, the Sven step and the Gram matrix take turns, one call each per round, so a varying load
touches them alike (TorchJD hooks every forward pass while its engine lives: it runs after them).
Peak memory is the process's resident high-water mark above what it held before each call
(Linux ``/proc/self/clear_refs``), so BLAS and allocator overheads count too; it comes from a
second pass of the script under exact memory accounting (``bench/common.py``: ``exact_peaks``),
whose allocator setting would slow the timed calls.

    python bench/step_bench.py                 # all models, writes bench/results/step_bench.json
    python bench/step_bench.py --models mlp1 --repeats 3
    python bench/step_bench.py --against ../old-checkout --rounds 5 --out step_bench_vs_old.json

With ``--against`` it times another checkout's ``bench/step_bench.py`` and this one's in turn, each
in fresh processes that import their own checkout's ``sven_ext`` (``PYTHONPATH``), and reports
both sides' medians over the rounds: a revision against an earlier one on the same machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import common  # noqa: E402

import sven_ext  # noqa: E402
from sven_ext import factor_check, testing  # noqa: E402

try:
    from torchjd.autogram import Engine as TorchJDEngine
except ImportError:  # optional comparison
    TorchJDEngine = None


def _case(name, build, batch, make_batch, loss):
    return {"name": name, "build": build, "batch": batch, "make_batch": make_batch, "loss": loss}


def _classification(batch, shape, classes, generator):
    return torch.randn(batch, *shape, generator=generator), torch.randint(0, classes, (batch,), generator=generator)


def _cross_entropy(out, y):
    return F.cross_entropy(out, y, reduction="none")


def _regression(out, y):
    return (out - y).square().flatten(1).mean(dim=1)


class BenchCNN(torch.nn.Module):
    """conv(1->16, 3x3) - conv(16->32, 3x3, stride 2) - conv(32->32, 3x3, stride 2) - fc(1568->10), ReLU."""

    def __init__(self):
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(16, 32, 3, stride=2, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(32, 32, 3, stride=2, padding=1), torch.nn.ReLU(),
        )
        self.head = torch.nn.Linear(32 * 7 * 7, 10)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


CASES = {
    "mlp1": _case("MLP 784-512-512-10, B=256", lambda: testing.mlp([784, 512, 512, 10], "relu", dtype=torch.float32),
                  256, lambda b, g: _classification(b, (784,), 10, g), _cross_entropy),
    "mlp2": _case("MLP 784-1024-1024-10, B=128",
                  lambda: testing.mlp([784, 1024, 1024, 10], "relu", dtype=torch.float32), 128,
                  lambda b, g: _classification(b, (784,), 10, g), _cross_entropy),
    "transformer": _case("transformer block d=256, 4 heads, T=64, B=64", lambda: testing.Block(256, 4), 64,
                         lambda b, g: (torch.randn(b, 64, 256, generator=g), torch.randn(b, 64, 256, generator=g)),
                         _regression),
    "cnn": _case("CNN 1x28x28 (conv16, conv32/2, conv32/2, fc10), B=128", BenchCNN, 128,
                 lambda b, g: _classification(b, (1, 28, 28), 10, g), _cross_entropy),
}


def run_case(key: str, repeats: int, dense_repeats: int, memory_pass: bool) -> dict:
    """The case's results (times; in the memory pass, peaks from 3 calls each instead) and summary."""
    case = CASES[key]
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = case["build"]()
    x, y = case["make_batch"](case["batch"], generator)
    loss_fn = case["loss"]
    params = sum(p.numel() for p in model.parameters())
    print(f"\n== {case['name']}: {params:,} parameters", flush=True)

    def closure():
        return loss_fn(model(x), y)

    adam = torch.optim.Adam(model.parameters(), lr=1e-6)

    def adam_step():
        adam.zero_grad()
        closure().mean().backward()
        adam.step()

    sven_gram = sven_ext.Sven(model, lr=1e-6, k=case["batch"] // 2, backend="gram", safeguard=None)
    sven_dense = sven_ext.Sven(model, lr=1e-6, k=case["batch"] // 2, backend="dense", safeguard=None)
    sven_gram.step(closure)  # the first step checks the factors (one extra backward)
    rows = closure()

    def signature():
        return factor_check.graph_fingerprint(rows), factor_check.hooks_fingerprint(model)

    # The factors were checked above: time the Gram alone.
    steps = {"adam": adam_step, "sven_gram": lambda: sven_gram.step(closure),
             "sven_gram_checked": lambda: sven_ext.Sven(model, lr=1e-6, k=case["batch"] // 2,
                                                        backend="gram", safeguard=None).step(closure),
             "signature": signature,
             "gram_only": lambda: sven_ext.gram_matrix(model, closure, check=False)}
    if memory_pass:
        results = {name: common.measure(fn, repeats=min(3, repeats)) for name, fn in steps.items()}
    else:
        results = common.interleaved_times(steps, repeats=repeats)
    if TorchJDEngine is not None:
        # TorchJD hooks every forward pass of the model while its engine lives: measured on its own.
        ours = sven_ext.gram_matrix(model, closure)
        engine = TorchJDEngine(*_direct_modules(model), batch_dim=0)

        def torchjd_gram():
            return engine.compute_gramian(closure())

        results["torchjd"] = common.measure(torchjd_gram, repeats=min(3, repeats) if memory_pass else repeats)
        theirs = torchjd_gram().to(torch.float64)
        results["torchjd"]["relative_difference_to_ours"] = float((theirs - ours).norm() / ours.norm())
        del engine
    if dense_repeats > 0:
        results["sven_dense"] = common.measure(lambda: sven_dense.step(closure), repeats=dense_repeats, warmup=0)
    for method, r in results.items():
        print(f"  {method:<17} median {r['median_s'] * 1e3:10.3f} ms", flush=True)
    return summarise(case, params, results, sven_gram.last_info.get("factor_bytes"))


def summarise(case: dict, params: int, results: dict, factor_bytes: int | None) -> dict:
    """A case's results with its sizes and the ratios BENCHMARKS.md quotes."""
    rows = case["batch"]
    gram = results["sven_gram"]["median_s"]
    summary = {
        "name": case["name"], "parameters": params, "batch": rows, "results": results,
        "gram_bytes": 8 * rows * rows, "factor_bytes": factor_bytes,
        "ratio_gram_step_to_adam": gram / results["adam"]["median_s"],
        "check_cost_fraction": results["sven_gram_checked"]["median_s"] / gram - 1,
        "signature_cost_fraction": results["signature"]["median_s"] / gram,
    }
    if "sven_dense" in results:
        summary["speedup_gram_vs_dense"] = results["sven_dense"]["median_s"] / gram
    if "torchjd" in results:
        summary["speedup_gram_vs_torchjd"] = results["torchjd"]["median_s"] / results["gram_only"]["median_s"]
    return summary


def add_memory_summary(summary: dict) -> None:
    """Extra peak of a Sven step over an Adam step, and the budget ``2 (8 B^2 + factors)``."""
    results, rows = summary["results"], summary["batch"]
    summary["extra_peak_over_adam_bytes"] = (results["sven_gram"]["peak_extra_bytes"]
                                             - results["adam"]["peak_extra_bytes"])
    if summary["factor_bytes"] is not None:
        summary["memory_budget_bytes"] = 2 * (8 * rows * rows + summary["factor_bytes"])
    for method, r in results.items():
        print(f"  {summary['name'][:24]:<24} {method:<11} peak extra {r['peak_extra_bytes'] / 2**20:9.1f} MiB")


def _direct_modules(model):
    """Modules that directly own parameters (TorchJD wants ones that are not nested in each other)."""
    return [m for m in model.modules() if any(True for _ in m.parameters(recurse=False))]


def against(args, argv: list[str]) -> None:
    """This checkout's benchmark against another checkout's (``args.against``, its extension built):
    fresh processes of each in turn (the other first), ``args.rounds`` of each, every one running
    ``args.models`` for ``args.repeats`` rounds with its own ``sven_ext`` first on the path. Writes
    both sides' per-round medians, their median over the rounds and this side's over the other's."""
    sides = {"against": Path(args.against).resolve(), "this": ROOT}
    rounds = {side: [] for side in sides}
    with tempfile.TemporaryDirectory() as folder:
        for index in range(args.rounds):
            for side, root in sides.items():
                out = Path(folder) / f"{side}_{index}.json"
                command = [sys.executable, str(root / "bench" / "step_bench.py"), "--models", *args.models,
                           "--repeats", str(args.repeats), "--dense-repeats", "0", "--out", str(out)]
                if args.threads:
                    command += ["--threads", str(args.threads)]
                subprocess.run(command, check=True, cwd=root, env={**os.environ, "PYTHONPATH": str(root)},
                               stdout=subprocess.DEVNULL)
                rounds[side].append(json.loads(out.read_text()))
                print(f"  round {index + 1}: {side} done", flush=True)
    cases = {}
    for position, key in enumerate(args.models):
        methods = {method: {side: _over_rounds(rounds[side], position, method) for side in sides}
                   for method in rounds["this"][0]["cases"][position]["results"]}
        for method, entry in methods.items():
            entry["ratio_this_to_against"] = entry["this"]["median_s"] / entry["against"]["median_s"]
            print(f"  {key:<11} {method:<17} against {entry['against']['median_s'] * 1e3:9.2f} ms  this "
                  f"{entry['this']['median_s'] * 1e3:9.2f} ms  ratio {entry['ratio_this_to_against']:.3f}")
        # Within one process Adam and the Sven step take turns: their ratio does not move with the load.
        to_adam = {side: statistics.median(run["cases"][position]["ratio_gram_step_to_adam"] for run in rounds[side])
                   for side in sides}
        print(f"  {key:<11} gram step / Adam: against {to_adam['against']:.3f}  this {to_adam['this']:.3f}")
        cases[key] = {"name": rounds["this"][0]["cases"][position]["name"], "methods": methods,
                      "gram_step_to_adam_median": to_adam}
    revisions = {side: subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                                      text=True).stdout.strip() for side, root in sides.items()}
    path = common.write_json(args.out, {"command": "python bench/step_bench.py " + " ".join(argv),
                                        "revisions": revisions, "cases": cases})
    print(f"\nwrote {path}")


def _over_rounds(results: list[dict], position: int, method: str) -> dict:
    """One method's per-round medians (each run's median of its repeats) and their median."""
    medians = [run["cases"][position]["results"][method]["median_s"] for run in results]
    return {"median_s": statistics.median(medians), "round_medians_s": medians}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds, one call of each method per round")
    parser.add_argument("--dense-repeats", type=int, default=1, help="timed dense-backend steps (0 to skip)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--out", default="step_bench.json", help="file name under bench/results/")
    parser.add_argument("--against", default=None, metavar="CHECKOUT",
                        help="another checkout of the project (its extension built): run its benchmark and this "
                             "one in turn, in fresh processes, and compare their step times (no dense step)")
    parser.add_argument("--rounds", type=int, default=5, help="with --against: processes of each side")
    args, _ = parser.parse_known_args(argv)  # the memory pass adds its own argument
    if args.against is not None:
        against(args, sys.argv[1:] if argv is None else argv)
        return
    memory_pass = common.memory_pass_file()
    if args.threads:
        torch.set_num_threads(args.threads)
    cases = [run_case(key, args.repeats, args.dense_repeats, memory_pass is not None) for key in args.models]
    flat = {f"{key}/{method}": result
            for key, case in zip(args.models, cases) for method, result in case["results"].items()}
    if memory_pass:
        common.write_peaks(memory_pass, flat)
        return
    print("\npeak memory: a second pass under exact memory accounting", flush=True)
    common.exact_peaks(flat)
    for case in cases:
        add_memory_summary(case)
    path = common.write_json(args.out, {"command": "python bench/step_bench.py " + " ".join(argv or sys.argv[1:]),
                                        "cases": cases})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
