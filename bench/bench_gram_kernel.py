"""Times the fused Gram kernels against plain-torch ways of computing the same K.

For each shape (B, T, Da, Dd), ``ops.seq_gram`` against
  - ``reference``: ``sven_ext.reference.seq_gram`` (the literal definition in float64 einsums);
  - ``per_sample``: materialise the per-sample gradients G = einsum('btd,bta->bda') in float64,
    then K = G_flat G_flat^T (one GEMM; memory B * Da * Dd * 8 bytes);
and ``ops.embedding_gram`` against its reference and the per-sample gradients scattered into the
(vocab, Dd) table. Achieved rates count the fused kernel's flops,
2 * B(B+1)/2 * T^2 * (Da + Dd) + B(B+1)/2 * T^2 (the upper triangle of pairs), whichever path ran.

    python bench/bench_gram_kernel.py                      # default shapes, CPU, float32 and float64
    python bench/bench_gram_kernel.py --device cuda --repeats 20
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from sven_ext import ops, reference
from sven_ext.harness.environment import environment, median_seconds

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SHAPES = ["64,64,256,256", "256,4,512,512", "128,16,784,512"]
DEFAULT_EMBEDDING_SHAPES = ["64,64,256,1000", "256,16,128,50000"]  # B, T, Dd, vocab


def fused_flops(b: int, t: int, da: int, dd: int) -> float:
    pairs = b * (b + 1) / 2
    return 2 * pairs * t * t * (da + dd) + pairs * t * t


def per_sample_seq_gram(a: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    g = torch.einsum("btd,bta->bda", d.double(), a.double()).flatten(1)
    return g @ g.T


def per_sample_embedding_gram(idx: torch.Tensor, d: torch.Tensor, vocab: int) -> torch.Tensor:
    b, t, dd = d.shape
    g = torch.zeros(b, vocab, dd, dtype=torch.float64, device=d.device)
    g.scatter_add_(1, idx[:, :, None].expand(b, t, dd), d.double())
    g = g.flatten(1)
    return g @ g.T


def mm_gflops(dtype, device: str, n: int = 1024) -> float:
    """The library GEMM's rate on this machine: the ceiling the fused kernel's GEMM flops run against."""
    x = torch.randn(n, n, dtype=dtype, device=device)
    y = torch.randn(n, n, dtype=dtype, device=device)
    sec, _ = median_seconds(lambda: torch.mm(x, y), repeats=7, warmup=2)
    return 2 * n**3 / sec / 1e9


def rel_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    return ((x - y).abs().max() / y.abs().max().clamp_min(1e-300)).item()


def bench_seq(shape, dtype, device, args, ceiling: float) -> dict:
    b, t, da, dd = shape
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(b, t, da, generator=g).to(dtype=dtype, device=device)
    d = torch.randn(b, t, dd, generator=g).to(dtype=dtype, device=device)
    flops = fused_flops(b, t, da, dd)
    row = {"op": "seq_gram", "B": b, "T": t, "Da": da, "Dd": dd, "dtype": str(dtype).replace("torch.", ""),
           "fused_gflop": flops / 1e9}
    t_op, k = median_seconds(lambda: ops.seq_gram(a, d), repeats=args.repeats, warmup=args.warmup)
    row["seq_gram_s"] = t_op
    row["seq_gram_gflops"] = flops / t_op / 1e9
    row["of_mm_rate"] = row["seq_gram_gflops"] / ceiling
    baselines = {"per_sample": lambda: per_sample_seq_gram(a, d)}
    if not args.skip_reference:
        baselines["reference"] = lambda: reference.seq_gram(a, d)
    for name, fn in baselines.items():
        t_base, k_base = median_seconds(fn, repeats=max(1, args.repeats // 2), warmup=min(args.warmup, 1))
        row[f"{name}_s"] = t_base
        row[f"speedup_vs_{name}"] = t_base / t_op
        row[f"max_rel_diff_vs_{name}"] = rel_diff(k, k_base)
    return row


def bench_embedding(shape, dtype, device, args) -> dict:
    b, t, dd, vocab = shape
    g = torch.Generator(device="cpu").manual_seed(1)
    idx = torch.randint(0, vocab, (b, t), generator=g).to(device)
    d = torch.randn(b, t, dd, generator=g).to(dtype=dtype, device=device)
    flops = fused_flops(b, t, 0, dd)
    row = {"op": "embedding_gram", "B": b, "T": t, "Dd": dd, "vocab": vocab, "dtype": str(dtype).replace("torch.", ""),
           "fused_gflop": flops / 1e9}
    t_op, k = median_seconds(lambda: ops.embedding_gram(idx, d), repeats=args.repeats, warmup=args.warmup)
    row["embedding_gram_s"] = t_op
    # Equivalent rate: the fused formula's flops, though the grouping by value does far fewer.
    row["embedding_gram_gflops"] = flops / t_op / 1e9
    baselines = {}
    if b * vocab * dd * 8 <= args.max_per_sample_bytes:
        baselines["per_sample"] = lambda: per_sample_embedding_gram(idx, d, vocab)
    if not args.skip_reference:
        baselines["reference"] = lambda: reference.embedding_gram(idx, d)
    for name, fn in baselines.items():
        t_base, k_base = median_seconds(fn, repeats=max(1, args.repeats // 2), warmup=min(args.warmup, 1))
        row[f"{name}_s"] = t_base
        row[f"speedup_vs_{name}"] = t_base / t_op
        row[f"max_rel_diff_vs_{name}"] = rel_diff(k, k_base)
    return row


def print_row(row: dict) -> None:
    op = row["op"]
    dims = f"B={row['B']} T={row['T']} " + (
        f"Da={row['Da']} Dd={row['Dd']}" if op == "seq_gram" else f"Dd={row['Dd']} V={row['vocab']}"
    )
    parts = [f"{op:15s} {dims:34s} {row['dtype']:8s} {row[op + '_s'] * 1e3:9.2f} ms {row[op + '_gflops']:8.2f} GFLOP/s"]
    if "of_mm_rate" in row:
        parts[0] += f" ({row['of_mm_rate']:.0%} of mm)"
    for name in ("per_sample", "reference"):
        if f"{name}_s" in row:
            parts.append(f"{name} {row[name + '_s'] * 1e3:9.2f} ms (x{row['speedup_vs_' + name]:.2f})")
    print(" | ".join(parts), flush=True)


def parse_shapes(items, n):
    shapes = []
    for item in items:
        values = tuple(int(v) for v in item.split(","))
        if len(values) != n:
            raise SystemExit(f"shape {item!r} must have {n} comma-separated integers")
        shapes.append(values)
    return shapes


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="*", default=DEFAULT_SHAPES, help="seq_gram shapes B,T,Da,Dd")
    parser.add_argument(
        "--embedding-shapes", nargs="*", default=DEFAULT_EMBEDDING_SHAPES, help="embedding_gram shapes B,T,Dd,vocab"
    )
    parser.add_argument("--dtypes", nargs="*", default=["float32", "float64"], choices=["float32", "float64"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-reference", action="store_true", help="time only the per-sample baseline")
    parser.add_argument(
        "--max-per-sample-bytes", type=float, default=2e9, help="skip the embedding per-sample baseline above this"
    )
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default: bench/results/gram_kernel_<device>.json)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible")

    env = {**environment(), "device": args.device}  # before the runs: the load average that they met
    rows, ceilings = [], {}
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        ceilings[f"mm_{dtype_name}_gflops"] = mm_gflops(dtype, args.device)
        print(f"torch.mm 1024^3 {dtype_name}: {ceilings[f'mm_{dtype_name}_gflops']:.1f} GFLOP/s", flush=True)
        for shape in parse_shapes(args.shapes, 4):
            rows.append(bench_seq(shape, dtype, args.device, args, ceilings[f"mm_{dtype_name}_gflops"]))
            print_row(rows[-1])
        for shape in parse_shapes(args.embedding_shapes, 4):
            rows.append(bench_embedding(shape, dtype, args.device, args))
            print_row(rows[-1])

    out = args.out or ROOT / "bench" / "results" / f"gram_kernel_{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "benchmark": "bench_gram_kernel",
        "environment": env,
        "settings": {"warmup": args.warmup, "repeats": args.repeats, "statistic": "median wall time"},
        "notes": (
            "gflops counts the fused formula's flops, 2*B(B+1)/2*T^2*(Da+Dd) + B(B+1)/2*T^2, for every path; "
            "of_mm_rate is that rate over torch.mm's on 1024^3 in the same run. embedding_gram groups tokens by "
            "value and does far fewer flops: its gflops is an equivalent rate."
        ),
        "ceilings": ceilings,
        "results": rows,
    }
    payload["environment"]["load_average_end"] = list(os.getloadavg())
    out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
