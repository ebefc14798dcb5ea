"""Data-parallel Sven on torch.distributed: 1-D regression with every rank holding part of each batch.

Problem: ``y = exp(-10 x^2) sin(2 x)``, ``x ~ U[-1, 1]`` (standardised), a GELU MLP
1-16-16-16-1. Every rank builds the same data set from the same seed; each step draws one
batch of ``--batch`` samples (the same indices everywhere) and rank ``r`` keeps its slice of
it (slices differ in size when the world size does not divide the batch). ``Sven(...,
process_group=...)`` takes the step of the whole batch on every rank: not an average of
per-rank steps. With ``--ddp`` the model is wrapped in ``DistributedDataParallel`` first (what
a training script that also runs first-order optimisers may do); Sven never lets DDP reduce.
No warm-up: Sven's safeguard checks every step on the whole batch's loss (each rank's is
summed over the ranks, so every rank takes the same decision) and shortens the first steps,
where the linearised model is poor. ``--warmup N`` adds a linear warm-up over ``N`` steps
(``torch.optim.lr_scheduler`` works as with any optimizer).

Run on CPUs (gloo)::

    torchrun --nproc_per_node=2 -m sven_ext.examples.distributed_regression
    torchrun --nproc_per_node=3 -m sven_ext.examples.distributed_regression --ddp --backend sketch

Rank 0 prints the first step's batch loss before and after it, the training and validation
losses, and the bytes a step sent per rank, next to those of a gradient all-reduce of the same
model.
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.distributed as dist
from torch import nn

from ..optimizer import Sven


def make_data(count: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` samples ``(x, y)`` of shape ``(count, 1)`` in float64, ``y`` not yet standardised."""
    x = torch.rand(count, 1, generator=generator, dtype=torch.float64) * 2 - 1
    return x, torch.exp(-10 * x.square()) * torch.sin(2 * x)


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    layers, width = [nn.Linear(1, 16)], 16
    for _ in range(2):
        layers += [nn.GELU(), nn.Linear(width, width)]
    layers += [nn.GELU(), nn.Linear(width, 1)]
    return nn.Sequential(*layers).double()


def my_slice(batch: int, rank: int, world: int) -> slice:
    """Rank ``rank``'s part of a batch: the first ``batch % world`` ranks get one sample more."""
    sizes = [batch // world + (r < batch % world) for r in range(world)]
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def parse_arguments() -> argparse.Namespace:
    """The command line: epochs, global batch, samples, backend, peak lr, warm-up, DDP."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch", type=int, default=32, help="global batch, split over the ranks")
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--backend", default="gram", choices=["gram", "sketch", "auto"])
    parser.add_argument("--lr", type=float, default=0.5, help="peak step size")
    parser.add_argument("--warmup", type=int, default=0, help="steps of linear warm-up to --lr (default: none)")
    parser.add_argument("--ddp", action="store_true", help="wrap the model in DistributedDataParallel")
    return parser.parse_args()


def train(model: nn.Module, optimizer: Sven, data: tuple, args: argparse.Namespace, rank: int, world: int) -> float:
    """``args.epochs`` epochs on this rank's slices of every batch; rank 0 prints the first step and each
    epoch's losses. Returns the final validation loss."""
    x, y, x_val, y_val = data
    steps = args.samples // args.batch
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / max(args.warmup, 1)))
    mine = my_slice(args.batch, rank, world)
    order = torch.Generator().manual_seed(2)  # one shuffle, identical on every rank
    for epoch in range(args.epochs):
        permutation = torch.randperm(args.samples, generator=order)
        total = 0.0
        for start in range(0, args.samples - args.batch + 1, args.batch):
            index = permutation[start:start + args.batch][mine]
            xb, yb = x[index], y[index]
            # Per-sample losses of this rank's shard; the step returns the whole batch's.
            losses = optimizer.step(lambda: (model(xb) - yb).square().sum(1))
            schedule.step()
            guard = optimizer.last_info.get("safeguard")  # absent when the step kept no singular value
            if rank == 0 and epoch == 0 and start == 0 and guard is not None:
                print(f"first step: mean batch loss {float(losses.mean()):.3e} -> {guard['loss'] / args.batch:.3e} "
                      f"(step scale {guard['scale']:g} after {guard['trials']} evaluation(s))")
            total += float(losses.sum())
        with torch.no_grad():
            validation = float((model(x_val) - y_val).square().mean())
        if rank == 0:
            print(f"epoch {epoch + 1}: train {total / (steps * args.batch):.3e}  validation {validation:.3e}")
    return validation


def main() -> None:
    args = parse_arguments()
    dist.init_process_group("gloo")  # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)  # the ranks share this machine's cores
    generator = torch.Generator().manual_seed(0)
    x, y = make_data(args.samples, generator)
    x_val, y_val = make_data(args.samples, generator)
    mean, std = y.mean(), y.std()
    y, y_val = (y - mean) / std, (y_val - mean) / std

    model = make_model(seed=1)  # the same initial weights on every rank
    if args.ddp:
        model = nn.parallel.DistributedDataParallel(model)
    optimizer = Sven(model, lr=args.lr, backend=args.backend, process_group=dist.group.WORLD)
    validation = train(model, optimizer, (x, y, x_val, y_val), args, rank, world)
    if rank == 0:
        info = optimizer.last_info
        print(f"{world} ranks, {info['rows']} rows per step ({info['local_rows']} here): "
              f"{info['communicated_bytes'] / 1024:.1f} KiB sent per rank per step, a gradient all-reduce "
              f"{info['gradient_allreduce_bytes'] / 1024:.1f} KiB")
    checksum = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    gathered = [torch.empty_like(checksum) for _ in range(world)]
    dist.all_gather(gathered, checksum)
    if rank == 0:
        same = all(torch.equal(g, checksum) for g in gathered)
        print(f"parameters identical on every rank: {same}")
    dist.barrier()  # no rank closes its connections while a peer still finishes a collective
    dist.destroy_process_group()
    if not math.isfinite(validation):
        raise SystemExit("training diverged")


if __name__ == "__main__":
    main()
