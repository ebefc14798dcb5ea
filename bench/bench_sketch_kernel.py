"""Times the fused Linear-layer sketch kernels against torch.mm on the same machine, in the same run.

For each shape (R, T, d_in, d_out, cols) and dtype:
  - ``linear_sketch`` (Gaussian and Rademacher Omega) and ``linear_project`` (a stored z):
    achieved GFLOP/s, counting 2*R*T*d_out*d_in (forming the per-row gradients) +
    2*R*d_out*d_in*cols (projecting them);
  - ``mm``: torch.mm on the unfused problem's shape, (R x K) @ (K x cols) with the per-row
    gradients and Omega materialised, K = P = d_in*d_out cut to keep the operands under
    --mm-max-bytes (the rate does not depend on K at these sizes): the GEMM the fused kernel
    replaces; and ``mm_square``, torch.mm on 2048^3, the machine's best GEMM rate;
  - the random generation's time share: ``linear_sketch`` on one row of the factors (its
    GEMV is 1/R of the full GEMM work, so it times Omega's generation and little else), over
    the full call. ``t_sketch - t_project`` estimates the same cost another way.
The target: fused projection at >= 40% of torch.mm's GFLOP/s on this CPU.

    python bench/bench_sketch_kernel.py                      # default shapes, float32
    python bench/bench_sketch_kernel.py --dtypes float32 float64 --repeats 5
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median_seconds, write_json  # noqa: E402

from sven_ext import ops  # noqa: E402

DEFAULT_SHAPES = ["4096,1,784,512,42", "1024,16,256,256,42", "256,1,1024,1024,138"]
TARGET = 0.40


def fused_flops(r: int, t: int, d_in: int, d_out: int, cols: int) -> float:
    return 2.0 * r * t * d_out * d_in + 2.0 * r * d_out * d_in * cols


def mm_rate(m: int, k: int, n: int, dtype, args) -> float:
    x = torch.randn(m, k, dtype=dtype)
    y = torch.randn(k, n, dtype=dtype)
    out = torch.empty(m, n, dtype=dtype)
    sec = median_seconds(lambda: torch.mm(x, y, out=out), repeats=max(args.repeats, 3), warmup=args.warmup)[0]
    return 2.0 * m * k * n / sec / 1e9


def bench_shape(shape, dtype, args, square_rate: float) -> dict:
    r, t, d_in, d_out, cols = shape
    g = torch.Generator().manual_seed(0)
    a = torch.randn(r, t, d_in, generator=g).to(dtype)
    d = torch.randn(r, t, d_out, generator=g).to(dtype)
    z = torch.randn(d_out, d_in, cols, generator=g).to(dtype)
    params = d_in * d_out
    flops = fused_flops(r, t, d_in, d_out, cols)
    element = torch.finfo(dtype).bits // 8
    k = max(1, min(params, int(args.mm_max_bytes // (element * (r + cols)))))
    row = {"R": r, "T": t, "d_in": d_in, "d_out": d_out, "cols": cols, "dtype": str(dtype).replace("torch.", ""),
           "gflop": flops / 1e9, "mm_shape": [r, k, cols]}
    row["mm_gflops"] = mm_rate(r, k, cols, dtype, args)
    row["mm_square_gflops"] = square_rate

    t_project = median_seconds(lambda: ops.linear_project(a, d, z), repeats=args.repeats, warmup=args.warmup)[0]
    row["project_s"] = t_project
    row["project_gflops"] = flops / t_project / 1e9
    for distribution in ("gaussian", "rademacher"):
        kwargs = dict(seed=1, stream=2, row_offset=0, cols=cols, distribution=distribution)
        t_sketch = median_seconds(lambda: ops.linear_sketch(a, d, **kwargs), repeats=args.repeats, warmup=args.warmup)[0]
        t_gen = median_seconds(lambda: ops.linear_sketch(a[:1], d[:1], **kwargs), repeats=args.repeats, warmup=args.warmup)[0]
        row[f"{distribution}_s"] = t_sketch
        row[f"{distribution}_gflops"] = flops / t_sketch / 1e9
        row[f"{distribution}_generation_s"] = t_gen
        row[f"{distribution}_generation_share"] = t_gen / t_sketch
        row[f"{distribution}_ns_per_entry"] = t_gen / (params * cols) * 1e9
        row[f"{distribution}_minus_project_share"] = max(0.0, t_sketch - t_project) / t_sketch
    for name in ("project", "gaussian", "rademacher"):
        row[f"{name}_of_mm"] = row[f"{name}_gflops"] / row["mm_gflops"]
        row[f"{name}_of_mm_square"] = row[f"{name}_gflops"] / square_rate
        row[f"{name}_meets_target"] = row[f"{name}_of_mm"] >= TARGET
    return row


def print_row(row: dict) -> None:
    head = f"R={row['R']} T={row['T']} d_in={row['d_in']} d_out={row['d_out']} cols={row['cols']} {row['dtype']}"
    print(f"{head}: mm {row['mm_gflops']:.1f} GFLOP/s (square {row['mm_square_gflops']:.1f})", flush=True)
    for name in ("project", "gaussian", "rademacher"):
        line = (f"  {name:10s} {row[name + '_s'] * 1e3:9.1f} ms {row[name + '_gflops']:7.1f} GFLOP/s"
                f" = {row[name + '_of_mm']:5.0%} of mm, {row[name + '_of_mm_square']:5.0%} of square mm")
        if name != "project":
            line += (f" | generation {row[name + '_generation_share']:4.0%} of the call"
                     f" ({row[name + '_ns_per_entry']:.2f} ns/entry)")
        print(line, flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="*", default=DEFAULT_SHAPES, help="R,T,d_in,d_out,cols")
    parser.add_argument("--dtypes", nargs="*", default=["float32"], choices=["float32", "float64"])
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--mm-max-bytes", type=float, default=2**28, help="cap on the mm baseline's operands")
    parser.add_argument("--out", default="sketch_kernel_cpu.json", help="file name under bench/results/")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    load_before = list(os.getloadavg())
    print(f"load average before: {load_before}", flush=True)
    rows, squares = [], {}
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        squares[dtype_name] = mm_rate(2048, 2048, 2048, dtype, args)
        for item in args.shapes:
            shape = tuple(int(v) for v in item.split(","))
            if len(shape) != 5:
                raise SystemExit(f"shape {item!r} must be R,T,d_in,d_out,cols")
            rows.append(bench_shape(shape, dtype, args, squares[dtype_name]))
            print_row(rows[-1])
    load_after = list(os.getloadavg())
    print(f"load average after: {load_after}", flush=True)
    path = write_json(args.out, {
        "benchmark": "bench_sketch_kernel",
        "settings": {"warmup": args.warmup, "repeats": args.repeats, "statistic": "median wall time",
                     "threads": torch.get_num_threads(), "target_of_mm": TARGET},
        "load_average_before": load_before,
        "load_average_after": load_after,
        "notes": (
            "gflops count 2*R*T*d_out*d_in + 2*R*d_out*d_in*cols for every path. mm: torch.mm on the unfused "
            "problem's shape (mm_shape = R x K @ K x cols, K = P cut to fit --mm-max-bytes); mm_square: 2048^3. "
            "generation: linear_sketch on one row (Omega's generation plus a 1/R share of the GEMM work)."
        ),
        "mm_square_gflops": squares,
        "results": rows,
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
