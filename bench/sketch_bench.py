"""Benchmarks of the sketch backend (randomized SVD over the captured factors).

Four parts, each writing ``bench/results/sketch_<part>.json`` (with the environment block):

- ``large-rows``: one Sven sketch step with 65,536 residual rows on a ~1M-parameter MLP
  regression (``K`` alone would need 32 GiB); time and peak resident memory.
- ``transformer``: a Sven sketch step on a >= 100M-parameter transformer (d=768, 16 layers,
  vocab 32k, T=128, tied head) at B=16; peak memory next to what the dense backend needs
  (computed, not run: ``R * P * 8`` bytes for ``J`` alone).
- ``scaling``: step time of sketch, gram and Adam on a fixed MLP as B grows from 32 to 16,384
  (plot ``sketch_scaling.png``); gram stops where ``eigh(K)`` alone exceeds the time limit.
- ``accuracy``: relative error of the sketch update against the exact rank-k update (gram) and
  its time, over oversampling, power iterations and the test matrix; and the fused ops against
  the GEMM routes.

    python bench/sketch_bench.py accuracy
    python bench/sketch_bench.py scaling --max-gram-rows 4096
    python bench/sketch_bench.py large-rows
    python bench/sketch_bench.py transformer
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import sven_ext  # noqa: E402
from sven_ext import testing  # noqa: E402
from sven_ext.backends import SketchSettings, StepSettings  # noqa: E402
from sven_ext.backends import sketch as sketch_module  # noqa: E402
from sven_ext.settings import Settings  # noqa: E402


def _step_timer(opt, closure):
    def run():
        opt.step(closure)

    return run


def _backend_step(model, fused: bool, k: int, lr: float, **sketch):
    """``step(closure)``: the sketch backend's direction with the fused ops on or off (the CPU default
    takes the GEMM routes) and the update ``p -= lr * direction``: Sven's bare step without the
    optimizer's checks and commit, at step 0 of the generator (every call draws the same sketch)."""
    params = list(model.parameters())
    backend = sketch_module.SketchBackend(model, params, fused=fused)
    settings = StepSettings(Settings(k=k).truncation, 2.0, sketch=SketchSettings(**sketch))

    def step(closure):
        directions = backend.compute(closure, settings).directions
        with torch.no_grad():
            for p, d in zip(params, directions):
                p.sub_(d, alpha=lr)

    return step


def _timed(fn, repeats: int, warmup: int = 1) -> dict:
    out = common.measure(fn, repeats=repeats, warmup=warmup)
    return {"median_s": out["median_s"], "times_s": out["times_s"], "peak_extra_bytes": out["peak_extra_bytes"]}


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


# ----------------------------------------------------------------------------- (a) 65,536 rows


def large_rows(args) -> dict:
    torch.manual_seed(0)
    rows = args.rows
    model = testing.mlp((16, 1024, 1024, 1), "tanh", dtype=torch.float32)
    params = sum(p.numel() for p in model.parameters())
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, 16, generator=g)
    y = torch.sin(x.sum(1, keepdim=True))
    opt = sven_ext.Sven(model, lr=1e-3, k=args.k, backend="sketch", safeguard=None, power_iterations=args.q)

    def closure():
        return sven_ext.Residuals(model(x) - y)

    times, peaks = _timed_steps(opt, closure, args.repeats, "step")
    hwm = common.status_kib("VmHWM") * 1024
    info = {k: v for k, v in opt.last_info.items() if k not in ("singular_values",)}
    return {
        "model": "MLP 16-1024-1024-1 tanh, float32, Residuals (B, 1)", "parameters": params, "rows": rows,
        "k": args.k, "power_iterations": args.q, "step_times_s": times,
        "median_s_after_first": statistics.median(times[1:] or times), "first_step_checks_the_factors": True,
        "peak_extra_bytes": max(peaks), "process_peak_rss_bytes": hwm,
        "gram_bytes_not_allocated": rows * rows * 8, "dense_jacobian_bytes_not_allocated": rows * params * 8,
        "last_info": {k: (v if isinstance(v, (int, float, str, bool, type(None))) else str(v))
                      for k, v in info.items()},
    }


def _timed_steps(opt, closure, count: int, label: str) -> tuple[list[float], list[int]]:
    """Times and peak extra memory of ``count`` steps, each printed as it finishes (these steps take minutes)."""
    times, peaks = [], []
    for _ in range(count):
        with common.PeakMemory() as mem:
            start = time.perf_counter()
            opt.step(closure)
            times.append(time.perf_counter() - start)
        peaks.append(mem.extra_bytes)
        print(f"  {label} {len(times)}: {times[-1]:.1f} s, peak extra {_gib(mem.extra_bytes)}", flush=True)
    return times, peaks


# ----------------------------------------------------------------------------- (b) 100M transformer


def transformer(args) -> dict:
    # Positions looked up per sample: a shared arange(T) lookup has no batch axis, and the capture then
    # differentiates every row through the whole model (one vmapped backward per row).
    model = testing.tiny_transformer(args.vocab, 768, 12, 128, layers=args.layers, dtype=torch.float32)
    params = sum(p.numel() for p in model.parameters())
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, args.vocab, (args.batch, 128), generator=g)
    targets = torch.randint(0, args.vocab, (args.batch, 128), generator=g)

    def closure():
        return F.cross_entropy(model(idx).transpose(1, 2), targets, reduction="none").mean(1)

    print(f"  transformer: {params / 1e6:.1f}M parameters, B={args.batch}, T=128", flush=True)
    results = {}
    baseline = common.status_kib("VmRSS") * 1024
    for test_matrix in args.test_matrices:
        opt = sven_ext.Sven(model, lr=1e-4, k=args.k, backend="sketch", safeguard=None, test_matrix=test_matrix,
                            power_iterations=args.q)
        times, peaks = _timed_steps(opt, closure, args.steps, f"{test_matrix} step")
        results[test_matrix] = {"step_times_s": times, "median_s_after_first": statistics.median(times[1:] or times),
                                "peak_extra_bytes": max(peaks), "sketch_size": opt.last_info["sketch_size"],
                                "rank": opt.last_info["rank"]}
    adam = torch.optim.Adam(model.parameters(), lr=1e-6)

    def adam_step():
        adam.zero_grad()
        closure().mean().backward()
        adam.step()

    results["adam"] = _timed(adam_step, repeats=2)
    rows = args.batch
    return {
        "model": f"TinyTransformer d=768, {args.layers} layers, 12 heads, vocab {args.vocab}, T=128, tied head, "
                 "float32",
        "parameters": params, "batch": rows, "k": args.k, "power_iterations": args.q,
        "model_and_data_rss_bytes": baseline, "results": results,
        "process_peak_rss_bytes": common.status_kib("VmHWM") * 1024,
        "dense_jacobian_bytes": rows * params * 8,
        "dense_note": "the dense backend needs J (R x P float64) = R * P * 8 bytes before its SVD (which "
                      "copies it) and jacrev's transients; computed, not run",
    }


# ----------------------------------------------------------------------------- (d) scaling and accuracy


def _mlp_case(batch: int, seed: int = 0, dtype=torch.float32):
    """The fixed MLP of the scaling and accuracy parts, its batch, and a closure maker."""
    model = testing.mlp((64, 256, 256, 10), "relu", dtype=dtype, seed=seed)
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(batch, 64, generator=g, dtype=dtype), torch.randint(0, 10, (batch,), generator=g)
    return model, lambda m: (lambda: F.cross_entropy(m(x), y, reduction="none"))


def scaling(args) -> dict:
    rows = []
    for batch in args.batches:
        model, make_closure = _mlp_case(batch)
        closure = make_closure(model)
        adam = torch.optim.Adam(model.parameters(), lr=1e-6)

        def adam_step():
            adam.zero_grad()
            closure().mean().backward()
            adam.step()

        repeats = 3 if batch <= 2048 else 1
        entry = {"batch": batch, "adam": _timed(adam_step, repeats=repeats)}
        sketch = sven_ext.Sven(model, lr=1e-6, k=args.k, backend="sketch", safeguard=None)
        entry["sketch"] = _timed(_step_timer(sketch, closure), repeats=repeats)
        fused = _backend_step(model, True, args.k, 1e-6)
        entry["sketch_fused_ops"] = _timed(lambda: fused(closure), repeats=repeats)
        if batch <= args.max_gram_rows:
            gram = sven_ext.Sven(model, lr=1e-6, k=args.k, backend="gram", safeguard=None)
            entry["gram"] = _timed(_step_timer(gram, closure), repeats=repeats, warmup=1 if batch <= 2048 else 0)
        line = "  ".join(f"{name} {entry[name]['median_s'] * 1e3:9.1f} ms"
                         for name in ("adam", "sketch", "sketch_fused_ops", "gram") if name in entry)
        print(f"  B={batch:6d}  {line}", flush=True)
        rows.append(entry)
    _plot(rows, args)
    return {"model": "MLP 64-256-256-10 relu, float32, cross-entropy per sample", "k": args.k,
            "oversampling": 10, "power_iterations": sketch_module.DEFAULT_POWER_ITERATIONS,
            "max_gram_rows": args.max_gram_rows, "results": rows}


def _plot(rows, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in ("adam", "sketch", "sketch_fused_ops", "gram"):
        points = [(r["batch"], r[name]["median_s"]) for r in rows if name in r]
        label = {"adam": "Adam", "sketch": "Sven sketch", "sketch_fused_ops": "Sven sketch (fused ops)",
                 "gram": "Sven gram"}[name]
        ax.loglog(*zip(*points), marker="o", label=label)
    ax.set_xlabel("batch size B (rows)")
    ax.set_ylabel("step time (s), median")
    ax.set_title(f"MLP 64-256-256-10, k={args.k}, 2 CPU cores")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(common.RESULTS / "sketch_scaling.png", dpi=120)


def _smooth_case(batch: int, seed: int = 1):
    """A tanh MLP regression of a smooth target (signed residuals): a decaying spectrum."""
    model = testing.mlp((8, 64, 64, 1), "tanh", dtype=torch.float64, seed=seed)
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, 8, generator=g, dtype=torch.float64) * 2 - 1
    y = torch.exp(-2 * x.square().sum(1, keepdim=True)) * torch.sin(2 * x[:, :1])
    return model, lambda m: (lambda: sven_ext.Residuals(m(x) - y))


def _linearised_residual(model, make_closure, update) -> float:
    """``||r + J delta|| / ||r||`` by a JVP: how far the step gets in the linearised model.

    For the exact rank-k step (lr = 1) this is ``||(I - U_k U_k^T) r|| / ||r||``.
    """
    params = {n: p.detach() for n, p in model.named_parameters()}

    def rows(p):
        out = make_closure(lambda inputs: torch.func.functional_call(model, p, (inputs,)))()
        return out.values.reshape(-1) if isinstance(out, sven_ext.Residuals) else out

    tangent = {n: u for n, u in zip(params, update)}
    r, jd = torch.func.jvp(rows, (params,), (tangent,))
    return float((r + jd).norm() / r.norm())


def _repeated_update(model, make_step, make_closure, repeats: int) -> tuple[list[torch.Tensor], float]:
    """One step's update from ``model``'s weights and the median time of that step: ``make_step(m)``
    gives ``step(closure)`` for a copy ``m``, whose every call starts from the same weights and draw."""
    m = copy.deepcopy(model)
    before = [p.detach().clone() for p in m.parameters()]
    step = make_step(m)
    step(make_closure(m))  # the first step also checks the factors against autograd
    times = []
    for _ in range(repeats):  # the same step again: same weights, same draw
        for p, b in zip(m.parameters(), before):
            p.data.copy_(b)
        start = time.perf_counter()
        step(make_closure(m))
        times.append(time.perf_counter() - start)
    return [p.detach() - b for p, b in zip(m.parameters(), before)], statistics.median(times)


def _sven_update(model, make_closure, args, backend: str, **kwargs) -> tuple[list[torch.Tensor], float, dict]:
    """One Sven step's update (lr=1) from ``model``'s weights, its median time and ``last_info``."""
    made = []

    def make_step(m):
        opt = sven_ext.Sven(m, lr=1.0, k=args.k, backend=backend, safeguard=None, **kwargs)
        made.append(opt)

        def step(closure):
            if opt.state:  # the step counter back to 0: the same draw every time
                opt.state["sven"]["step"] = 0
            opt.step(closure)

        return step

    update, elapsed = _repeated_update(model, make_step, make_closure, args.repeats)
    return update, elapsed, made[0].last_info


def accuracy(args) -> dict:
    cases = {
        "smooth-regression": ("MLP 8-64-64-1 tanh, float64, signed residuals of a smooth target",
                              *_smooth_case(args.batch)),
        "relu-classification": ("MLP 64-256-256-10 relu, float64, cross-entropy per sample",
                                *_mlp_case(args.batch, seed=1, dtype=torch.float64)),
    }
    out = {"batch": args.batch, "k": args.k, "cases": {}}
    for case, (description, model, make_closure) in cases.items():
        print(f"  == {case}: {description}", flush=True)

        exact, gram_time, gram_info = _sven_update(model, make_closure, args, "gram")
        exact_linear = _linearised_residual(model, make_closure, exact)

        def error(update):
            num = sum(float((u - e).square().sum()) for u, e in zip(update, exact))
            return (num / sum(float(e.square().sum()) for e in exact)) ** 0.5

        sv = gram_info["singular_values"]
        table = []
        for test_matrix in ("gaussian", "rademacher", "khatri_rao"):
            for oversampling in args.oversampling:
                for q in args.power_iterations:
                    update, elapsed, info = _sven_update(model, make_closure, args, "sketch", seed=5,
                                                         test_matrix=test_matrix, oversampling=oversampling,
                                                         power_iterations=q)
                    row = {"test_matrix": test_matrix, "oversampling": oversampling, "power_iterations": q,
                           "sketch_size": info["sketch_size"], "relative_error": error(update),
                           "linearised_residual": _linearised_residual(model, make_closure, update),
                           "time_s": elapsed, "sketch_residual": info["sketch_residual"]}
                    table.append(row)
                    print(f"  {test_matrix:<10} p={oversampling:<3d} q={q}  update error {row['relative_error']:.2e}"
                          f"  ||r+Jd||/||r|| {row['linearised_residual']:.4f} (exact {exact_linear:.4f})"
                          f"  {elapsed * 1e3:8.1f} ms", flush=True)
        routes = {}
        for flag in (False, True):
            update, elapsed = _repeated_update(model, lambda m: _backend_step(m, flag, args.k, 1.0, seed=5),
                                               make_closure, args.repeats)
            routes["fused" if flag else "gemm"] = {"time_s": elapsed, "relative_error": error(update)}
        print(f"  gram {gram_time * 1e3:.1f} ms; default sketch by route: {routes}", flush=True)
        out["cases"][case] = {
            "model": description, "gram_time_s": gram_time, "exact_linearised_residual": exact_linear,
            "singular_values_k_and_next": [float(sv[0]), float(sv[-1])], "rank": gram_info["rank"],
            "table": table, "routes_default_settings": routes,
        }
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="part", required=True)
    p = sub.add_parser("large-rows")
    p.add_argument("--rows", type=int, default=65_536)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--q", type=int, default=sketch_module.DEFAULT_POWER_ITERATIONS)
    p.add_argument("--repeats", type=int, default=2)
    p = sub.add_parser("transformer")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--vocab", type=int, default=32_000)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--q", type=int, default=sketch_module.DEFAULT_POWER_ITERATIONS)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--test-matrices", nargs="+", default=["khatri_rao", "gaussian"])
    p = sub.add_parser("scaling")
    p.add_argument("--batches", type=int, nargs="+", default=[32, 128, 512, 2048, 4096, 16_384])
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--max-gram-rows", type=int, default=4096)
    p = sub.add_parser("accuracy")
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--oversampling", type=int, nargs="+", default=[0, 5, 10, 20])
    p.add_argument("--power-iterations", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    print(f"sketch_bench {args.part}: torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    run = {"large-rows": large_rows, "transformer": transformer, "scaling": scaling, "accuracy": accuracy}[args.part]
    payload = run(args)
    payload["command"] = "python bench/sketch_bench.py " + " ".join(sys.argv[1:] if argv is None else argv)
    path = common.write_json(f"sketch_{args.part.replace('-', '_')}.json", payload)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
