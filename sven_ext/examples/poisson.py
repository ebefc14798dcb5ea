"""2-D Poisson equation solved by a physics-informed network: Sven (functional backend) against Adam.

Problem: ``-(u_xx + u_yy) = f`` on the unit square, ``u = 0`` on its boundary, with
``f = 2 pi^2 sin(pi x) sin(pi y)``, so the solution is ``u = sin(pi x) sin(pi y)``.
A small tanh MLP ``u_theta(x, y)`` is fitted at collocation points: each interior point
gives the row ``(-Laplacian u_theta - f) / sqrt(N_i)``, each boundary point the row
``sqrt(w / N_b) u_theta``; the sum of their squares is the usual mean-squared PINN loss
with boundary weight ``w``. The Laplacian is taken by autograd with respect to the inputs
(``create_graph=True``), so the rows are not per-sample losses of a forward pass: they go to
``Sven(model, backend="functional")`` as :class:`sven_ext.Residuals`.

Run ``python -m sven_ext.examples.poisson`` (``--help`` for the flags): it trains with Sven,
then with Adam at each learning rate of a grid for the same wall time, prints the relative
L2 errors on a held-out grid, and writes a JSON summary and a plot of error against time.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..optimizer import Sven
from ..residuals import Residuals


@dataclass
class History:
    """Progress of one training run (evaluation time excluded from ``seconds``).

    Attributes:
        steps: step counts at which the error was measured.
        seconds: training wall time at those steps.
        errors: relative L2 error on the held-out grid.
        losses: training loss (sum of squared rows).
    """

    steps: list = field(default_factory=list)
    seconds: list = field(default_factory=list)
    errors: list = field(default_factory=list)
    losses: list = field(default_factory=list)

    def record(self, step: int, seconds: float, error: float, loss: float) -> None:
        self.steps.append(step)
        self.seconds.append(seconds)
        self.errors.append(error)
        self.losses.append(loss)


class PoissonProblem:
    """Collocation points, residual rows and error measure of the 2-D Poisson problem.

    Args:
        interior: number of interior collocation points ``N_i`` (uniform random in the square).
        boundary: number of boundary points ``N_b`` (evenly spaced along the perimeter).
        boundary_weight: ``w``, the weight of the boundary term in the loss.
        grid: the held-out error grid has ``grid x grid`` points, boundary included.
        dtype: dtype of the points (and of the models from :meth:`model`).
        device: where the points live.
        seed: draws the interior points.

    Attributes:
        interior_points: ``(N_i, 2)``.
        boundary_points: ``(N_b, 2)``.
        grid_points: ``(grid^2, 2)``; ``grid_solution``: the exact solution there, ``(grid^2,)``.
    """

    def __init__(self, interior: int = 256, boundary: int = 64, boundary_weight: float = 1.0, grid: int = 101,
                 *, dtype: torch.dtype = torch.float64, device: str | torch.device = "cpu", seed: int = 0):
        if interior < 1 or boundary < 4 or grid < 2:
            raise ValueError(f"need interior >= 1, boundary >= 4 and grid >= 2, got {interior}, {boundary}, {grid}")
        self.dtype = dtype
        self.device = torch.device(device)
        self.boundary_weight = boundary_weight
        generator = torch.Generator().manual_seed(seed)
        self.interior_points = torch.rand(interior, 2, generator=generator, dtype=torch.float64)
        # Perimeter coordinate t in [0, 4): one side per unit, corners included once.
        t = torch.arange(boundary, dtype=torch.float64) * (4.0 / boundary)
        side, s = t.floor(), t - t.floor()
        x = torch.where(side == 0, s, torch.where(side == 1, 1.0, torch.where(side == 2, 1.0 - s, 0.0)))
        y = torch.where(side == 0, 0.0, torch.where(side == 1, s, torch.where(side == 2, 1.0, 1.0 - s)))
        self.boundary_points = torch.stack([x, y], dim=1)
        axis = torch.linspace(0.0, 1.0, grid, dtype=torch.float64)
        self.grid_points = torch.cartesian_prod(axis, axis)
        self.grid_solution = self.solution(self.grid_points)
        for name in ("interior_points", "boundary_points", "grid_points", "grid_solution"):
            setattr(self, name, getattr(self, name).to(device=self.device, dtype=dtype))
        self._source = self.source(self.interior_points)

    @property
    def rows(self) -> int:
        """Number of residual rows ``N_i + N_b``."""
        return self.interior_points.shape[0] + self.boundary_points.shape[0]

    @staticmethod
    def solution(points: torch.Tensor) -> torch.Tensor:
        """``u(x, y) = sin(pi x) sin(pi y)`` at ``(n, 2)`` points: ``(n,)``."""
        return torch.sin(math.pi * points[:, 0]) * torch.sin(math.pi * points[:, 1])

    @staticmethod
    def source(points: torch.Tensor) -> torch.Tensor:
        """``f = -Laplacian u = 2 pi^2 u`` at ``(n, 2)`` points: ``(n,)``."""
        return 2.0 * math.pi ** 2 * PoissonProblem.solution(points)

    def model(self, width: int = 32, depth: int = 1, seed: int = 0) -> nn.Sequential:
        """A tanh MLP ``2 -> width (x depth hidden layers) -> 1`` in the problem's dtype and device."""
        torch.manual_seed(seed)
        layers, fan_in = [], 2
        for _ in range(depth):
            layers += [nn.Linear(fan_in, width), nn.Tanh()]
            fan_in = width
        layers.append(nn.Linear(fan_in, 1))
        return nn.Sequential(*layers).to(device=self.device, dtype=self.dtype)

    @staticmethod
    def laplacian(model: nn.Module, points: torch.Tensor) -> torch.Tensor:
        """``u_xx + u_yy`` of ``model`` at ``(n, 2)`` points, ``(n,)``, with a graph to the parameters.

        Each point's output depends on its own input only, so the gradient of the sum gives every
        point's gradient at once, and one more backward pass per coordinate its second derivative.
        """
        points = points.detach().requires_grad_(True)
        u = model(points).squeeze(-1)
        (grad,) = torch.autograd.grad(u.sum(), points, create_graph=True)
        second = [torch.autograd.grad(grad[:, i].sum(), points, create_graph=True)[0][:, i] for i in range(2)]
        return second[0] + second[1]

    def residuals(self, model: nn.Module) -> Residuals:
        """The ``N_i + N_b`` rows: interior first, then boundary (what a Sven closure returns)."""
        interior = (-self.laplacian(model, self.interior_points) - self._source) / math.sqrt(
            self.interior_points.shape[0])
        boundary = model(self.boundary_points).squeeze(-1) * math.sqrt(
            self.boundary_weight / self.boundary_points.shape[0])
        return Residuals(torch.cat([interior, boundary]))

    def loss(self, model: nn.Module) -> torch.Tensor:
        """The scalar PINN loss ``sum(rows^2)`` (what a first-order optimizer minimises)."""
        return self.residuals(model).values.square().sum()

    @torch.no_grad()
    def relative_l2(self, model: nn.Module) -> float:
        """``||u_theta - u|| / ||u||`` over the held-out grid."""
        error = model(self.grid_points).squeeze(-1) - self.grid_solution
        return float(error.norm() / self.grid_solution.norm())


def _progress(total: int, description: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=description, disable=not enabled, leave=False, dynamic_ncols=True)


def train_sven(problem: PoissonProblem, model: nn.Module, steps: int = 1000, *, lr: float = 1.0,
               k: int | None = None, rtol: float = 1e-6, mode: str = "exact", chunk_rows: int = 64,
               eval_every: int = 10, progress: bool = False, **sven_kwargs) -> History:
    """Trains ``model`` in place with ``Sven(backend="functional")`` for ``steps`` steps.

    Sven's safeguard (on by default) checks each step on the loss and halves it while the loss
    falls by less than the linearised model predicts; training stops early when no scale of a
    step lowers the loss (the step is then the same at every later step: the loss is at the floor
    the rows and the cut-offs allow).

    Args:
        problem: the rows.
        model: from :meth:`PoissonProblem.model`.
        steps: number of Sven steps.
        lr, k, rtol: Sven's step size, rank cap (``None``: every row) and relative cut-off.
        mode: ``functional_mode``, ``"exact"`` or ``"randomized"``.
        chunk_rows: products with ``J`` batched at once.
        eval_every: measure the error every this many steps (and at the last).
        progress: show a progress bar.
        sven_kwargs: passed to :class:`sven_ext.Sven`.
    """
    optimizer = Sven(model, lr=lr, k=problem.rows if k is None else k, rtol=rtol, backend="functional",
                     functional_mode=mode, chunk_rows=chunk_rows, **sven_kwargs)
    history = History()
    history.record(0, 0.0, problem.relative_l2(model), float(problem.loss(model).detach()))
    elapsed = 0.0
    with _progress(steps, "sven", progress) as bar:
        for step in range(1, steps + 1):
            start = time.perf_counter()
            losses = optimizer.step(lambda: problem.residuals(model))
            elapsed += time.perf_counter() - start
            stalled = optimizer.last_info.get("safeguard", {}).get("scale") == 0.0
            if step % eval_every == 0 or step == steps or stalled:
                # The losses are those before the step; the error is measured after it.
                history.record(step, elapsed, problem.relative_l2(model), float(losses.sum()))
                bar.set_postfix(error=f"{history.errors[-1]:.2e}", rank=optimizer.last_info["rank"])
            bar.update()
            if stalled:
                break
    return history


TARGET = 1e-5  # relative L2 error reported as reached (or not) in the summary


def train_adam(problem: PoissonProblem, model: nn.Module, lr: float, seconds: float, *, eval_every: int = 50,
               progress: bool = False) -> History:
    """Trains ``model`` in place with full-batch Adam on the PINN loss for ``seconds`` of training time."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    history = History()
    history.record(0, 0.0, problem.relative_l2(model), float(problem.loss(model).detach()))
    elapsed, step = 0.0, 0
    with _progress(round(seconds), f"adam lr={lr:g}", progress) as bar:
        while elapsed < seconds:
            start = time.perf_counter()
            for _ in range(eval_every):
                optimizer.zero_grad()
                loss = problem.loss(model)
                loss.backward()
                optimizer.step()
            elapsed += time.perf_counter() - start
            step += eval_every
            history.record(step, elapsed, problem.relative_l2(model), float(loss.detach()))
            bar.set_postfix(error=f"{history.errors[-1]:.2e}")
            bar.n = min(round(elapsed), bar.total)
            bar.refresh()
    return history


def _plot(runs: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for label, history in runs.items():
        ax.semilogy(history.seconds, history.errors, label=label, lw=2.0 if label.startswith("sven") else 1.2)
    ax.set_xlabel("training wall time (s)")
    ax.set_ylabel("relative L2 error (held-out grid)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _arguments(argv) -> argparse.Namespace:
    """The command line, with ``--quick``'s defaults where it is given."""
    parser = argparse.ArgumentParser(prog="python -m sven_ext.examples.poisson", description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=1000,
                        help="most Sven steps (it stops earlier when no step scale lowers the loss)")
    parser.add_argument("--interior", type=int, default=256, help="interior collocation points")
    parser.add_argument("--boundary", type=int, default=64, help="boundary collocation points")
    parser.add_argument("--boundary-weight", type=float, default=1.0, help="weight of the boundary term")
    parser.add_argument("--grid", type=int, default=101, help="held-out grid size per axis")
    parser.add_argument("--width", type=int, default=32, help="hidden width of the tanh MLP")
    parser.add_argument("--depth", type=int, default=1, help="hidden layers")
    parser.add_argument("--lr", type=float, default=1.0, help="Sven step size")
    parser.add_argument("--k", type=int, default=None, help="Sven rank cap (default: no cap)")
    parser.add_argument("--rtol", type=float, default=1e-6, help="Sven relative singular-value cut-off")
    parser.add_argument("--mode", choices=("exact", "randomized"), default="exact", help="functional_mode")
    parser.add_argument("--adam-lrs", type=float, nargs="+", default=[1e-4, 3e-4, 1e-3, 3e-3, 1e-2],
                        help="Adam learning rates (each runs for Sven's wall time)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the points and the initial weights")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=Path("."),
                        help="directory for poisson.json and poisson.png (default: the current one)")
    parser.add_argument("--quick", action="store_true",
                        help="defaults for a fast check: fewer points, a narrower net, 30 steps, two Adam rates")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    if parser.parse_known_args(argv)[0].quick:
        # Explicit flags still win over these.
        parser.set_defaults(steps=30, interior=48, boundary=16, width=8, rtol=1e-3, grid=21, adam_lrs=[1e-3, 1e-2])
    return parser.parse_args(argv)


def _summary(args: argparse.Namespace, params: int, sven, runs: dict, best: str, reached) -> dict:
    """What ``poisson.json`` records: the problem, Sven's and each Adam run's result, the histories."""
    budget = sven.seconds[-1]
    return {
        "problem": {"interior": args.interior, "boundary": args.boundary, "boundary_weight": args.boundary_weight,
                    "grid": args.grid, "width": args.width, "depth": args.depth, "parameters": params,
                    "dtype": "float64", "seed": args.seed},
        "sven": {"max_steps": args.steps, "steps": sven.steps[-1], "lr": args.lr, "k": args.k, "rtol": args.rtol,
                 "mode": args.mode, "safeguard": "backtracking",
                 "final_error": sven.errors[-1], "seconds": budget, f"first_step_at_{TARGET:g}": reached},
        "adam": {name: {"final_error": h.errors[-1], "best_error": min(h.errors), "steps": h.steps[-1],
                        "seconds": h.seconds[-1]} for name, h in runs.items() if name != "sven"},
        "best_adam": best,
        "histories": {name: asdict(h) for name, h in runs.items()},
        "environment": {"torch": torch.__version__, "python": platform.python_version(),
                        "machine": platform.machine(), "processor": platform.processor(),
                        "threads": torch.get_num_threads()},
    }


def main(argv=None) -> dict:
    """Command line entry point; returns the summary it writes to ``<out>/poisson.json``."""
    args = _arguments(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    progress = not args.no_progress
    problem = PoissonProblem(args.interior, args.boundary, args.boundary_weight, args.grid, seed=args.seed)
    sven_model = problem.model(args.width, args.depth, seed=args.seed)
    params = sum(p.numel() for p in sven_model.parameters())
    print(f"Poisson 2-D: {args.interior} interior + {args.boundary} boundary rows, tanh MLP "
          f"2-{'-'.join([str(args.width)] * args.depth)}-1 ({params} parameters), float64, "
          f"{torch.get_num_threads()} threads")
    sven = train_sven(problem, sven_model, args.steps, lr=args.lr, k=args.k, rtol=args.rtol, mode=args.mode,
                      eval_every=1, progress=progress)
    budget = sven.seconds[-1]
    reached = next((step for step, error in zip(sven.steps, sven.errors) if error <= TARGET), None)
    print(f"sven  ({args.mode}, lr={args.lr:g}, rtol={args.rtol:g}): relative L2 {sven.errors[-1]:.3e} "
          f"after {sven.steps[-1]} steps{' (no step scale lowered the loss)' if sven.steps[-1] < args.steps else ''}"
          f", {budget:.1f} s; relative L2 <= {TARGET:g} first at step {reached}")
    runs = {"sven": sven}
    for lr in args.adam_lrs:
        history = train_adam(problem, problem.model(args.width, args.depth, seed=args.seed), lr, budget,
                             progress=progress)
        runs[f"adam lr={lr:g}"] = history
        print(f"adam  (lr={lr:g}): relative L2 {history.errors[-1]:.3e} (best {min(history.errors):.3e}) after "
              f"{history.steps[-1]} steps, {history.seconds[-1]:.1f} s")
    best = min((name for name in runs if name != "sven"), key=lambda name: runs[name].errors[-1])
    print(f"best Adam: {best}, relative L2 {runs[best].errors[-1]:.3e}; Sven {sven.errors[-1]:.3e}")

    args.out.mkdir(parents=True, exist_ok=True)
    summary = _summary(args, params, sven, runs, best, reached)
    (args.out / "poisson.json").write_text(json.dumps(summary, indent=1))
    _plot(runs, args.out / "poisson.png",
          f"2-D Poisson, {params} parameters, {problem.rows} rows\nSven vs Adam over a learning-rate grid, same wall time")
    print(f"wrote {args.out / 'poisson.json'} and {args.out / 'poisson.png'}")
    return summary


if __name__ == "__main__":
    main()
