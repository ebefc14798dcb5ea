"""Bytes each data-parallel Sven step communicates, against a plain gradient all-reduce.

Spawns ``--world`` CPU processes (gloo) that split one batch (``--batch`` samples, as equal as
possible) and take Sven steps with ``process_group`` (gram and sketch backends), then
data-parallel SGD steps (backward of the mean loss and one all-reduce of the gradient, what
DistributedDataParallel sends). Bytes are what one rank sends under ring algorithms
(:mod:`sven_ext.distributed`); times are medians on this machine and only indicative (all
ranks share its cores). Alongside, what the alternatives would send: all-reducing the
sketch's ``Z_p = J_p^T Q`` (``P s`` numbers per pass) instead of gathering the factors, and
broadcasting the final direction from rank 0.

    python bench/distributed_bench.py      # MLP 784-512-512-10, B = 256 over 2 ranks
    python bench/distributed_bench.py --world 3 --batch 255 --output distributed_bench_w3.json
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import sven_ext  # noqa: E402
from sven_ext import testing  # noqa: E402


def _shards(batch: int, world: int) -> list[int]:
    return [batch // world + (r < batch % world) for r in range(world)]


def _worker(rank: int, args, directory: str, queue) -> None:
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", init_method=f"file://{directory}/store", rank=rank, world_size=args.world)
    dtype = getattr(torch, args.dtype)
    sizes = [int(s) for s in args.sizes.split(",")]
    model = testing.mlp(sizes, "relu", dtype=dtype, seed=0)
    shards = _shards(args.batch, args.world)
    xs, ys = _local_batch(args, sizes, dtype, shards, rank)
    rows = {backend: _sven_row(args, model, backend, xs, ys) for backend in args.backends}
    rows["gradient_allreduce"] = _gradient_allreduce_row(args, model, xs, ys)
    if rank == 0:
        queue.put(_payload(args, model, sizes, shards, rows))
    dist.barrier()
    dist.destroy_process_group()


def _local_batch(args, sizes: list[int], dtype: torch.dtype, shards: list[int],
                 rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's samples of the one batch every rank draws alike."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, sizes[0], generator=generator, dtype=dtype)
    y = torch.randint(0, sizes[-1], (args.batch,), generator=generator)
    start = sum(shards[:rank])
    return x[start:start + shards[rank]], y[start:start + shards[rank]]


def _sven_row(args, model: torch.nn.Module, backend: str, xs: torch.Tensor, ys: torch.Tensor) -> dict:
    """Bytes and median time of a data-parallel Sven step of ``backend`` on a copy of ``model``."""
    net = copy.deepcopy(model)
    optimizer = sven_ext.Sven(net, lr=0.1, backend=backend, safeguard=None, seed=0,
                              process_group=dist.group.WORLD)
    seconds, _ = common.median_seconds(
        lambda: optimizer.step(lambda: F.cross_entropy(net(xs), ys, reduction="none")), repeats=args.repeats)
    info = optimizer.last_info
    return {
        "communicated_bytes": info["communicated_bytes"],
        "by_purpose": info["communication"],
        "ratio_to_gradient_allreduce": info["communicated_bytes"] / info["gradient_allreduce_bytes"],
        "step_s": seconds,
        "rank": info["rank"],
        "sketch_size": info.get("sketch_size"),
        "power_iterations": info.get("power_iterations"),
    }


def _gradient_allreduce_row(args, model: torch.nn.Module, xs: torch.Tensor, ys: torch.Tensor) -> dict:
    """Bytes and median time of a data-parallel SGD step (one gradient all-reduce) on a copy of ``model``."""
    net = copy.deepcopy(model)
    sgd = torch.optim.SGD(net.parameters(), lr=0.1)

    def data_parallel_sgd():
        sgd.zero_grad()
        # Mean over the whole batch: each rank's sum, all-reduced, divided by B.
        (F.cross_entropy(net(xs), ys, reduction="sum") / args.batch).backward()
        flat = torch.cat([p.grad.reshape(-1) for p in net.parameters()])
        dist.all_reduce(flat)
        for p, g in zip(net.parameters(), flat.split([p.numel() for p in net.parameters()])):
            p.grad.copy_(g.view_as(p))
        sgd.step()

    gradient_bytes = 2 * (args.world - 1) / args.world * _parameters(model) * _itemsize(model)
    return {"communicated_bytes": int(round(gradient_bytes)),
            "step_s": common.median_seconds(data_parallel_sgd, repeats=args.repeats)[0]}


def _payload(args, model: torch.nn.Module, sizes: list[int], shards: list[int], rows: dict) -> dict:
    """What the script writes: the measured rows and what the alternatives would send."""
    params, itemsize = _parameters(model), _itemsize(model)
    sketch = rows.get("sketch", {})
    columns, passes = sketch.get("sketch_size"), 1 + (sketch.get("power_iterations") or 0)
    return {
        "model": {"sizes": sizes, "parameters": params, "dtype": args.dtype},
        "batch": args.batch, "world": args.world, "shards": shards,
        "results": rows,
        "alternatives": {
            # All-reduce of Z_p = sum_r J_{r,p}^T Q_r, (P, s), once per pass over the factors.
            "sketch_allreduce_z_bytes": None if columns is None else
            int(round(2 * (args.world - 1) / args.world * params * columns * itemsize * passes)),
            # Rank 0 sends the whole (P,) direction to each other rank (tree: about P per rank).
            "broadcast_direction_bytes": params * itemsize,
            # Every rank contracts all rows itself (no direction all-reduce; the O(B P) work not split).
            "factors_only_bytes": rows[args.backends[0]]["communicated_bytes"]
            - rows[args.backends[0]]["by_purpose"]["directions"],
        },
    }


def _parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _itemsize(model: torch.nn.Module) -> int:
    return next(model.parameters()).element_size()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="784,512,512,10", help="MLP widths, input first")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--backends", nargs="+", default=["gram", "sketch"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--output", default="distributed_bench.json")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    context = mp.get_context("spawn")
    queue = context.SimpleQueue()
    with tempfile.TemporaryDirectory() as directory:
        mp.spawn(_worker, args=(args, directory, queue), nprocs=args.world, join=True)
    payload = queue.get()
    path = common.write_json(args.output, payload)
    for name, row in payload["results"].items():
        ratio = row.get("ratio_to_gradient_allreduce")
        print(f"{name:>18}: {row['communicated_bytes'] / 2**20:8.2f} MiB sent per rank per step"
              + ("" if ratio is None else f" ({ratio:.2f}x the gradient all-reduce)")
              + f", step {row['step_s'] * 1e3:.0f} ms")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
