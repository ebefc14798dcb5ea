"""CUDA against CPU for every op, the machine's ceilings, and kernel timings against them.

Called by bench/gpu/check.sh on a GPU machine; runs the same sections on CPU (smaller
sizes) when no GPU is visible or with --cpu-only, so it can be tried anywhere.

Ceilings: device-to-device copy bandwidth (bytes read + written over time, one large
tensor copy) and torch.mm rates in float32 (TF32 off) and float64. Kernel rates:
seq_gram and embedding_gram count the fused formula's flops
(2 * B(B+1)/2 * T^2 * (Da + Dd) + B(B+1)/2 * T^2) against the GEMM rate of their
accumulation dtype; random_block counts bytes written against the copy bandwidth;
linear_sketch and linear_project count 2*R*T*d_out*d_in + 2*R*d_out*d_in*cols (forming the
per-row gradients, projecting them) against the GEMM rate of their compute dtype, and are
also compared with the unfused torch path (per-row gradients by einsum, Omega by
random_block or the stored z, one mm) where that fits in memory. block_put_ counts the
bytes it reads and writes (the block in, as many out) against the copy bandwidth, and is
compared with torch's index assignment ``out[:, rows[:, None], cols] = block``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
# The source tree's in-place build (check.sh builds with build_ext --inplace), whatever the cwd.
sys.path.insert(0, str(ROOT))

import sven_ext  # noqa: E402
from sven_ext import ops, reference  # noqa: E402


class Timer:
    """Median seconds of fn() on `device` after warm-up (CUDA events on a GPU)."""

    def __init__(self, device: str, warmup: int = 2, repeats: int = 10):
        self.device, self.warmup, self.repeats = device, warmup, repeats

    def __call__(self, fn) -> float:
        for _ in range(self.warmup):
            fn()
        times = []
        for _ in range(self.repeats):
            if self.device == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
        return statistics.median(times)


def fused_flops(b: int, t: int, da: int, dd: int) -> float:
    pairs = b * (b + 1) / 2
    return 2 * pairs * t * t * (da + dd) + pairs * t * t


def sketch_flops(r: int, t: int, d_in: int, d_out: int, cols: int) -> float:
    return 2.0 * r * t * d_out * d_in + 2.0 * r * d_out * d_in * cols


def sketch_bound(a, d, w, eps):
    """Forward-error bound of Y = G W (see tests/test_sketch_kernels.py), for both sides."""
    g_abs = torch.einsum("rto,rti->roi", d.double().abs(), a.double().abs()).flatten(1)
    n = a.shape[1] + a.shape[2] * d.shape[2] + 2
    return 4 * n * eps * (g_abs @ w.double().abs().reshape(g_abs.shape[1], -1)) + 1e-300


def ceilings(device: str, timer: Timer, big: bool) -> dict:
    n_copy = (1 << 28) if big else (1 << 24)  # float32 elements: 1 GiB on a GPU, 64 MiB on a CPU
    src = torch.randn(n_copy, device=device)
    dst = torch.empty_like(src)
    t_copy = timer(lambda: dst.copy_(src))
    copy_bw = 2 * src.numel() * src.element_size() / t_copy
    src = dst = None  # frees the copy buffers
    torch.backends.cuda.matmul.allow_tf32 = False
    out = {"copy_GBps": copy_bw / 1e9}
    for dtype in (torch.float32, torch.float64):
        n = 8192 if big else 1024
        x = torch.randn(n, n, device=device, dtype=dtype)
        y = torch.randn(n, n, device=device, dtype=dtype)
        t_mm = timer(lambda: torch.mm(x, y))
        out[f"mm_{str(dtype)[6:]}_TFLOPs"] = 2 * n**3 / t_mm / 1e12
    return out


def compare(device: str, cpu_only: bool) -> list[dict]:
    """Each op on `device` against the CPU op (on a GPU) or the reference (CPU only)."""
    rows = []

    def record(name, ok, detail):
        rows.append({"check": name, "ok": bool(ok), "detail": detail})
        print(f"  {'PASS' if ok else 'FAIL'}  {name:52s} {detail}", flush=True)

    other = "cpu" if not cpu_only else None
    # One generator through every section, in this order: each draws the same inputs on any machine.
    gen = torch.Generator().manual_seed(0)
    for section in (_compare_random, _compare_gram, _compare_sketch, _compare_block_put):
        section(record, device, other, gen)
    return rows


def _compare_random(record, device: str, other: str | None, gen: torch.Generator) -> None:
    """philox_raw (bitwise) and random_block in both distributions."""
    counters = torch.randint(0, 2**32, (100_000, 4), generator=gen, dtype=torch.int64)
    want = ops.philox_raw(counters, 1234) if other else reference.philox_raw(counters, 1234)
    got = ops.philox_raw(counters.to(device), 1234).cpu()
    record("philox_raw bitwise", torch.equal(got, want), f"{counters.shape[0]} counters")

    for distribution in ("gaussian", "rademacher"):
        kwargs = dict(seed=99, stream=3, row_offset=17, col_offset=5, distribution=distribution, dtype=torch.float64)
        got = ops.random_block(300, 257, device=device, **kwargs).cpu()
        want = ops.random_block(300, 257, device="cpu", **kwargs) if other else reference.random_block(300, 257, **kwargs)
        err = (got - want).abs().max().item()
        ok = err == 0 if distribution == "rademacher" else err <= 1e-14
        record(f"random_block {distribution} float64", ok, f"max abs diff {err:.2e}")


def _compare_gram(record, device: str, other: str | None, gen: torch.Generator) -> None:
    """seq_gram and embedding_gram within their forward-error bounds, and symmetric."""
    shapes = [(1, 1, 1, 1), (7, 13, 31, 65), (17, 5, 65, 3), (200, 13, 5, 3), (3, 600, 7, 2), (70, 1, 4, 4), (33, 64, 128, 96)]
    for dtype, eps in ((torch.float64, 2.0**-53), (torch.float32, 2.0**-24), (torch.bfloat16, 2.0**-24)):
        for shape in shapes:
            b, t, da, dd = shape
            a = torch.randn(b, t, da, generator=gen).to(dtype)
            d = torch.randn(b, t, dd, generator=gen).to(dtype)
            got = ops.seq_gram(a.to(device), d.to(device)).cpu()
            want = ops.seq_gram(a, d) if other else reference.seq_gram(a, d)
            # Forward-error bound of the feature dot products (see tests/test_gram_kernels.py), for both sides.
            norms = (a.double().norm(dim=2) * d.double().norm(dim=2)).sum(dim=1)
            bound = 4 * (da + dd) * eps * norms[:, None] * norms[None, :] + 1e-300
            ratio = ((got - want).abs() / bound).max().item()
            sym = torch.equal(got, got.T)
            record(f"seq_gram {str(dtype)[6:]} B{b} T{t} Da{da} Dd{dd}", ratio <= 1 and sym, f"err/bound {ratio:.2e}")
            idx = torch.randint(0, 7, (b, t), generator=gen)
            got = ops.embedding_gram(idx.to(device), d.to(device)).cpu()
            want = ops.embedding_gram(idx, d) if other else reference.embedding_gram(idx, d)
            norms = d.double().norm(dim=2).sum(dim=1)
            bound = 4 * dd * eps * norms[:, None] * norms[None, :] + 1e-300
            ratio = ((got - want).abs() / bound).max().item()
            record(f"embedding_gram {str(dtype)[6:]} B{b} T{t} Dd{dd}", ratio <= 1 and torch.equal(got, got.T),
                   f"err/bound {ratio:.2e}")


def _compare_sketch(record, device: str, other: str | None, gen: torch.Generator) -> None:
    """linear_sketch (both distributions) and linear_project within their forward-error bounds."""
    # (R, T, d_in, d_out, cols): odd sizes, several row tiles, column blocks and super-tile groups.
    sketch_shapes = [(1, 1, 1, 1, 1), (7, 3, 37, 19, 21), (33, 5, 5, 3, 7), (300, 2, 60, 40, 70), (3, 1, 9000, 5, 3),
                     (130, 1, 129, 3, 65)]
    for dtype, eps in ((torch.float64, 2.0**-53), (torch.float32, 2.0**-24)):
        for shape in sketch_shapes:
            r, t, d_in, d_out, cols = shape
            a = torch.randn(r, t, d_in, generator=gen).to(dtype)
            d = torch.randn(r, t, d_out, generator=gen).to(dtype)
            name = f"{str(dtype)[6:]} R{r} T{t} din{d_in} dout{d_out} cols{cols}"
            for distribution in ("gaussian", "rademacher"):
                kwargs = dict(seed=5, stream=7, row_offset=1 << 33, cols=cols, distribution=distribution)
                got = ops.linear_sketch(a.to(device), d.to(device), **kwargs).cpu()
                want = ops.linear_sketch(a, d, **kwargs) if other else reference.linear_sketch(a, d, **kwargs)
                omega = reference.random_block(d_in * d_out, cols, seed=5, stream=7, row_offset=1 << 33,
                                               distribution=distribution, dtype=torch.float64)
                ratio = ((got - want).abs() / sketch_bound(a, d, omega, eps)).max().item()
                record(f"linear_sketch {distribution[:5]} {name}", ratio <= 1, f"err/bound {ratio:.2e}")
            z = torch.randn(d_out, d_in, cols, generator=gen).to(dtype)
            got = ops.linear_project(a.to(device), d.to(device), z.to(device)).cpu()
            want = ops.linear_project(a, d, z) if other else reference.linear_project(a, d, z)
            ratio = ((got - want).abs() / sketch_bound(a, d, z, eps)).max().item()
            record(f"linear_project {name}", ratio <= 1, f"err/bound {ratio:.2e}")


def _compare_block_put(record, device: str, other: str | None, gen: torch.Generator) -> None:
    """block_put_ bitwise (a copy)."""
    # (N, R, C, r, c): one entry, odd sizes, a whole matrix, a thin subset of a tall one.
    for dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
        for n, big_r, big_c, r, c in [(1, 1, 1, 1, 1), (3, 37, 53, 11, 29), (2, 300, 401, 300, 401),
                                      (1, 4099, 33, 4000, 7)]:
            out = torch.randn(n, big_r, big_c, generator=gen).to(dtype)
            block = torch.randn(n, r, c, generator=gen).to(dtype)
            sub_rows, sub_cols = torch.randperm(big_r, generator=gen)[:r], torch.randperm(big_c, generator=gen)[:c]
            want = (ops.block_put_ if other else reference.block_put_)(out.clone(), sub_rows, sub_cols, block)
            got = ops.block_put_(out.to(device), sub_rows.to(device), sub_cols.to(device), block.to(device)).cpu()
            record(f"block_put_ {str(dtype)[6:]} N{n} R{big_r} C{big_c} r{r} c{c}", torch.equal(got, want), "bitwise")


def timings(device: str, timer: Timer, ceil: dict, big: bool) -> list[dict]:
    """Kernel timings against the machine's ceilings, GPU sizes when `big`, CPU sizes otherwise."""
    # One generator through every section, in this order (as in compare).
    gen = torch.Generator().manual_seed(1)
    return (_time_gram(device, timer, ceil, big, gen) + _time_sketch(device, timer, ceil, big, gen)
            + _time_block_put(device, timer, ceil, big, gen) + _time_random_fill(device, timer, ceil, big))


def _mm_ceiling(ceil: dict, dtype: torch.dtype) -> float:
    return ceil["mm_float64_TFLOPs"] if dtype == torch.float64 else ceil["mm_float32_TFLOPs"]


def _time_gram(device: str, timer: Timer, ceil: dict, big: bool, gen: torch.Generator) -> list[dict]:
    """seq_gram (against per-sample gradients where they fit) and embedding_gram."""
    if big:
        seq_shapes = [(64, 64, 256, 256), (256, 4, 512, 512), (128, 16, 784, 512), (512, 64, 1024, 1024), (64, 512, 256, 256)]
        emb_shapes = [(64, 64, 256, 1000), (256, 128, 512, 50000)]
    else:
        seq_shapes = [(32, 16, 64, 64), (64, 4, 128, 128)]
        emb_shapes = [(32, 16, 64, 100)]
    rows = []
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        ceiling = _mm_ceiling(ceil, dtype)
        for b, t, da, dd in seq_shapes:
            a = torch.randn(b, t, da, generator=gen).to(dtype=dtype, device=device)
            d = torch.randn(b, t, dd, generator=gen).to(dtype=dtype, device=device)
            sec = timer(lambda: ops.seq_gram(a, d))
            tflops = fused_flops(b, t, da, dd) / sec / 1e12
            row = {"op": "seq_gram", "shape": [b, t, da, dd], "dtype": str(dtype)[6:], "ms": sec * 1e3,
                   "TFLOPs": tflops, "of_mm_ceiling": tflops / ceiling}
            if dtype != torch.bfloat16 and b * da * dd * 8 <= 2e9:
                def per_sample():
                    g = torch.einsum("btd,bta->bda", d.double(), a.double()).flatten(1)
                    return g @ g.T

                row["per_sample_ms"] = timer(per_sample) * 1e3
            rows.append(row)
        for b, t, dd, vocab in emb_shapes:
            idx = torch.randint(0, vocab, (b, t), generator=gen).to(device)
            d = torch.randn(b, t, dd, generator=gen).to(dtype=dtype, device=device)
            sec = timer(lambda: ops.embedding_gram(idx, d))
            tflops = fused_flops(b, t, 0, dd) / sec / 1e12
            rows.append({"op": "embedding_gram", "shape": [b, t, dd, vocab], "dtype": str(dtype)[6:], "ms": sec * 1e3,
                         "TFLOPs": tflops, "of_mm_ceiling": tflops / ceiling})
    return rows


def _time_sketch(device: str, timer: Timer, ceil: dict, big: bool, gen: torch.Generator) -> list[dict]:
    """linear_sketch and linear_project, against the unfused torch path where it fits in memory."""
    # The shapes of bench/bench_sketch_kernel.py (one smaller set on CPU); fewer repeats: big calls.
    if big:
        sketch_shapes = [(4096, 1, 784, 512, 42), (1024, 16, 256, 256, 42), (256, 1, 1024, 1024, 138)]
    else:
        sketch_shapes = [(256, 1, 256, 128, 42), (64, 8, 128, 64, 42)]
    sketch_timer = Timer(device, warmup=1, repeats=max(1, min(timer.repeats, 5)))
    rows = []
    for dtype in (torch.float32, torch.float64):
        ceiling = _mm_ceiling(ceil, dtype)
        for r, t, d_in, d_out, cols in sketch_shapes:
            a = torch.randn(r, t, d_in, generator=gen).to(dtype=dtype, device=device)
            d = torch.randn(r, t, d_out, generator=gen).to(dtype=dtype, device=device)
            z = torch.randn(d_out, d_in, cols, generator=gen).to(dtype=dtype, device=device)
            flops = sketch_flops(r, t, d_in, d_out, cols)
            unfused_fits = r * d_in * d_out * a.element_size() <= 4e9
            cases = {
                "linear_sketch gauss": (lambda: ops.linear_sketch(a, d, seed=1, stream=0, cols=cols),
                                        lambda: unfused(a, d, ops.random_block(d_in * d_out, cols, seed=1, dtype=dtype,
                                                                               device=device))),
                "linear_sketch radem": (lambda: ops.linear_sketch(a, d, seed=1, stream=0, cols=cols,
                                                                  distribution="rademacher"), None),
                "linear_project": (lambda: ops.linear_project(a, d, z), lambda: unfused(a, d, z.flatten(0, 1))),
            }
            for name, (fn, baseline) in cases.items():
                sec = sketch_timer(fn)
                tflops = flops / sec / 1e12
                row = {"op": name, "shape": [r, t, d_in, d_out, cols], "dtype": str(dtype)[6:], "ms": sec * 1e3,
                       "TFLOPs": tflops, "of_mm_ceiling": tflops / ceiling}
                if baseline is not None and unfused_fits:
                    row["per_sample_ms"] = sketch_timer(baseline) * 1e3
                rows.append(row)
    return rows


def _time_block_put(device: str, timer: Timer, ceil: dict, big: bool, gen: torch.Generator) -> list[dict]:
    """block_put_ of a random half of the rows and of the columns (sorted), against torch's index assignment."""
    n, big_r, big_c = (4, 4096, 4096) if big else (1, 2048, 2048)
    rows = []
    for dtype in (torch.float32, torch.float64):
        out = torch.randn(n, big_r, big_c, generator=gen).to(dtype=dtype, device=device)
        block = torch.randn(n, big_r // 2, big_c // 2, generator=gen).to(dtype=dtype, device=device)
        sub_rows = torch.randperm(big_r, generator=gen)[: big_r // 2].sort().values.to(device)
        sub_cols = torch.randperm(big_c, generator=gen)[: big_c // 2].sort().values.to(device)
        sec = timer(lambda: ops.block_put_(out, sub_rows, sub_cols, block))
        gbps = 2 * block.numel() * block.element_size() / sec / 1e9

        def index_put():
            out[:, sub_rows[:, None], sub_cols] = block

        rows.append({"op": "block_put_", "shape": [n, big_r, big_c, big_r // 2, big_c // 2], "dtype": str(dtype)[6:],
                     "ms": sec * 1e3, "GBps_moved": gbps, "of_copy_ceiling": gbps / ceil["copy_GBps"],
                     "baseline_ms": timer(index_put) * 1e3})
    return rows


def _time_random_fill(device: str, timer: Timer, ceil: dict, big: bool) -> list[dict]:
    """philox_fill_ in both distributions: bytes written against the copy bandwidth."""
    fill_shape = (8192, 8192) if big else (1024, 1024)
    rows = []
    for distribution in ("gaussian", "rademacher"):
        out = torch.empty(fill_shape, device=device)
        sec = timer(lambda: torch.ops.sven_ext.philox_fill_(out, 7, 1, 0, 0, distribution))
        gbps = out.numel() * out.element_size() / sec / 1e9
        rows.append({"op": f"random_block {distribution}", "shape": list(fill_shape), "dtype": "float32",
                     "ms": sec * 1e3, "GBps_written": gbps, "of_copy_ceiling": gbps / ceil["copy_GBps"]})
    return rows


def unfused(a: torch.Tensor, d: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The unfused sketch: materialised per-row gradients (R, P) times a materialised (P, cols) W."""
    g = torch.einsum("rto,rti->roi", d, a).flatten(1)
    return g @ w


def print_timings(rows: list[dict]) -> None:
    # baseline: per-sample gradients (Gram ops), the unfused path (sketch ops), torch indexing (block_put_).
    print(f"  {'op':23s} {'shape':20s} {'dtype':9s} {'ms':>9s} {'rate':>15s} {'of ceiling':>10s} {'baseline ms':>13s}")
    for r in rows:
        if "TFLOPs" in r:
            tflops = r["TFLOPs"]
            rate = f"{tflops:.2f} TFLOP/s" if tflops >= 1 else f"{tflops * 1e3:.1f} GFLOP/s"
            frac = r["of_mm_ceiling"]
        else:
            rate, frac = f"{r.get('GBps_moved', r.get('GBps_written')):.0f} GB/s", r["of_copy_ceiling"]
        baseline = r.get("per_sample_ms", r.get("baseline_ms"))
        extra = f"{baseline:13.3f}" if baseline is not None else ""
        shape = "x".join(str(v) for v in r["shape"])
        print(f"  {r['op']:23s} {shape:20s} {r['dtype']:9s} {r['ms']:9.3f} {rate:>15s} {frac:10.1%} {extra}", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-only", action="store_true", help="run on CPU even when a GPU is visible")
    parser.add_argument("--json", type=Path, action="append", default=[], help="write the full results here (repeatable)")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)

    cpu_only = args.cpu_only or not torch.cuda.is_available()
    device = "cpu" if cpu_only else "cuda"
    big = not cpu_only
    env = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "sven_ext_with_cuda": sven_ext.WITH_CUDA,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name() if not cpu_only else platform.processor() or "cpu",
        "cpu_only": cpu_only,
    }
    if not cpu_only:
        props = torch.cuda.get_device_properties(0)
        env.update(multiprocessors=props.multi_processor_count, memory_GiB=props.total_memory / 2**30)
    print("environment:", json.dumps(env), flush=True)
    if cpu_only:
        print("no GPU in use: CPU sizes, ops checked against the pure-torch reference", flush=True)

    timer = Timer(device, repeats=args.repeats)
    print("== CUDA vs CPU" if not cpu_only else "== ops vs reference", flush=True)
    checks = compare(device, cpu_only)
    print("== ceilings", flush=True)
    ceil = ceilings(device, timer, big)
    print("  " + "  ".join(f"{k} {v:.2f}" for k, v in ceil.items()), flush=True)
    print("== kernel timings (median of %d after warm-up)" % args.repeats, flush=True)
    rows = timings(device, timer, ceil, big)
    print_timings(rows)

    failed = [c["check"] for c in checks if not c["ok"]]
    print(f"== {len(checks) - len(failed)}/{len(checks)} comparisons passed", flush=True)
    payload = {"environment": env, "checks": checks, "ceilings": ceil, "timings": rows}
    for path in args.json:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload, indent=2) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
