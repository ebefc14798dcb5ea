"""Step time and peak memory of each Sven backend and of Adam, against model size and batch size.

Model: an MLP ``64 - w - w - 10`` (GELU, float32) with per-sample squared errors against random
targets; ``w`` is chosen for about 1e4, 1e5, 1e6 and 1e7 parameters (at batch 128), and the
batch runs over 32 ... 4,096 rows (at about 1e5 parameters). Every Sven backend keeps
``k = 32`` singular values (the sketch adds its default oversampling).

Each point runs in two fresh processes: one times ``repeats`` steps after a warm-up step (median),
with the default allocator; the other takes the peak memory of 3 steps, the resident high-water
mark above what the process held before each step, with glibc told to return freed memory
(:data:`sven_ext.harness.environment.MALLOC_ENV`, which would slow the timed steps: every large
allocation maps fresh pages). Points that cannot fit are
recorded as skipped, with the reason: the dense backend's Jacobian is capped at
``DENSE_MAX_ENTRIES`` entries, and a method whose warm-up step took longer than ``max_seconds``
is not run at larger sizes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..optimizer import Sven
from .environment import MALLOC_ENV, environment, measure, torch_threads
from .tasks import mlp, parameter_count

K = 32
PARAMETER_WIDTHS = (68, 280, 963, 3125)  # ~1e4, 1e5, 1e6, 1e7 parameters
BATCHES = (32, 128, 512, 2048, 4096)
PARAMETER_SWEEP_BATCH = 128
BATCH_SWEEP_WIDTH = 280
DENSE_MAX_ENTRIES = 2e7  # rows x parameters of the dense backend's Jacobian (80 MB in float32)
METHODS = ("adam", "sven-gram", "sven-sketch", "sven-dense")


def _step_function(method: str, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor):
    def rows():
        return (model(x) - y).square().mean(dim=1)

    if method == "adam":
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-6)

        def step():
            optimizer.zero_grad()
            rows().mean().backward()
            optimizer.step()

        return step
    optimizer = Sven(model, lr=1e-6, k=K, backend=method.removeprefix("sven-"), safeguard=None)
    return lambda: optimizer.step(rows)


def measure_point(method: str, width: int, batch: int, repeats: int) -> dict:
    """Times ``repeats`` steps of ``method`` (after a warm-up step) and takes their peak memory."""
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = mlp([64, width, width, 10])
    x = torch.randn(batch, 64, generator=generator)
    y = torch.randn(batch, 10, generator=generator)
    step = _step_function(method, model, x, y)
    start = time.perf_counter()
    step()
    warmup = time.perf_counter() - start
    return {**measure(step, repeats=repeats, warmup=0), "warmup_s": warmup, "parameters": parameter_count(model)}


def measure_point_apart(method: str, width: int, batch: int, repeats: int, threads: int) -> dict:
    """:func:`measure_point`'s time from a process with the default allocator and its peak memory
    from one under :data:`MALLOC_ENV` (3 steps)."""
    def child(exact: bool, steps: int) -> dict:
        env = {k: v for k, v in os.environ.items() if k not in MALLOC_ENV}
        env.update(MALLOC_ENV if exact else {})
        args = json.dumps({"method": method, "width": width, "batch": batch, "repeats": steps, "threads": threads})
        out = subprocess.run([sys.executable, "-m", "sven_ext.harness.scaling", args], env=env, check=True,
                             capture_output=True, text=True).stdout
        return json.loads(out.splitlines()[-1])

    timed = child(False, repeats)
    timed["peak_extra_bytes"] = child(True, min(3, repeats))["peak_extra_bytes"]
    return timed


def plan(quick: bool) -> list[dict]:
    """The points: ``{"sweep", "method", "width", "batch"}``, smallest first within each method."""
    widths = PARAMETER_WIDTHS[:2] if quick else PARAMETER_WIDTHS
    batches = BATCHES[:3] if quick else BATCHES
    points = [{"sweep": "parameters", "method": m, "width": w, "batch": PARAMETER_SWEEP_BATCH}
              for m in METHODS for w in widths]
    points += [{"sweep": "batch", "method": m, "width": BATCH_SWEEP_WIDTH, "batch": b} for m in METHODS for b in batches]
    return points


def run_scaling(path: Path, *, quick: bool, threads: int, repeats: int, command: str, progress: bool = True,
                max_seconds: float = 60.0) -> None:
    """Measures every point of :func:`plan` not yet in ``path`` and appends it as a JSON line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    done = set()
    if path.exists():
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if record.get("kind") == "point":
                done.add((record["sweep"], record["method"], record["width"], record["batch"]))
    too_slow: dict[tuple[str, str], str] = {}
    with torch_threads(threads), path.open("a") as handle:
        handle.write(json.dumps({"kind": "environment", "command": command, **environment()}) + "\n")
        points = plan(quick)
        for point in tqdm(points, desc="scaling", disable=not progress, dynamic_ncols=True):
            key = (point["sweep"], point["method"], point["width"], point["batch"])
            if key in done:
                continue
            fixed = (f"batch {point['batch']}" if point["sweep"] == "parameters"
                     else f"MLP 64-{point['width']}-{point['width']}-10") + f", k {K}, {threads} thread(s)"
            record = {"kind": "point", **point, "fixed": fixed, "parameters": None, "median_s": None,
                      "peak_extra_bytes": None}
            approx_parameters = point["width"] ** 2 + 76 * point["width"] + 10
            if point["method"] == "sven-dense" and approx_parameters * point["batch"] > DENSE_MAX_ENTRIES:
                record.update(status="skipped", reason=f"dense Jacobian over {DENSE_MAX_ENTRIES:.0e} entries")
            elif (point["sweep"], point["method"]) in too_slow:
                record.update(status="skipped", reason=too_slow[(point["sweep"], point["method"])])
            else:
                record.update(measure_point_apart(point["method"], point["width"], point["batch"], repeats, threads),
                              status="ok")
                if record["warmup_s"] > max_seconds:
                    too_slow[(point["sweep"], point["method"])] = (
                        f"a smaller size took {record['warmup_s']:.0f} s per step (limit {max_seconds:.0f} s)")
            handle.write(json.dumps(record) + "\n")
            handle.flush()


if __name__ == "__main__":  # one point, for measure_point_apart: JSON in argv[1], JSON out
    point = json.loads(sys.argv[1])
    with torch_threads(point["threads"]):
        result = measure_point(point["method"], point["width"], point["batch"], point["repeats"])
    print(json.dumps(result))
