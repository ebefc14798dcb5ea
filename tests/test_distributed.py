"""Data-parallel Sven (``process_group``) against the single-process step on the concatenated batch.

Each world size runs one spawned job (gloo on CPU, float64) whose ranks go through every
check in turn and write what they saw; the test then asserts on it. Shards differ in size.
"""

import copy
import json
import os
import time
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessException
from torch import nn

import sven_ext
from sven_ext import distributed
from sven_ext.backends import gram as gram_module
from sven_ext.testing import mlp, relative_difference, small_cnn, tiny_transformer

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning")

EXACT = 1e-10  # float64, distributed against single-process
SHARDS = {2: (5, 7), 3: (5, 3, 4)}
EVEN_SHARDS = {2: (4, 6), 3: (4, 2, 6)}  # microbatches of 2 do not straddle ranks
JOB_SECONDS = 300


# ----------------------------------------------------------------------------- worker side


def _data(shards, inputs, outputs, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(shards), *inputs, generator=g, dtype=torch.float64)
    return x, torch.randn(sum(shards), outputs, generator=g, dtype=torch.float64)


def _shard(t, shards, rank):
    start = sum(shards[:rank])
    return t[start:start + shards[rank]]


def _squared_errors(x, y):
    return lambda model: (model(x) - y).square().sum(1)


def _distributed(model, loss, steps=1, **kwargs):
    """Parameter change after ``steps`` data-parallel steps on a copy, the last info, the first step's losses."""
    model = copy.deepcopy(model)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = sven_ext.Sven(model, process_group=dist.group.WORLD, **kwargs)
    losses = [optimizer.step(lambda: loss(model)) for _ in range(steps)]
    return _deltas(model, before), optimizer.last_info, losses[0]


def _single(model, loss, steps=1, **kwargs):
    model = copy.deepcopy(model)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = sven_ext.Sven(model, **kwargs)
    for _ in range(steps):
        optimizer.step(lambda: loss(model))
    return _deltas(model, before)


def _deltas(model, before):
    return {str(i): p.detach() - b for i, (p, b) in enumerate(zip(model.parameters(), before))}


def _same_on_every_rank(tensors) -> bool:
    flat = torch.cat([t.reshape(-1) for t in tensors])
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    return all(torch.equal(g, gathered[0]) for g in gathered)


def _compare(model, data, shards, rank, steps=1, reference=None, **kwargs):
    """Data-parallel steps against single-process ones on the concatenated batch.

    Returns the relative difference of the updates, whether every rank applied the same one,
    the step's rows, how far the first step's returned losses are from the whole batch's, the
    bytes sent and the gradient all-reduce's, and the backend that ran.

    ``reference``: the single-process kwargs when they differ from ``kwargs`` (e.g. an exact backend).
    """
    x, y = data
    local = _squared_errors(_shard(x, shards, rank), _shard(y, shards, rank))
    mine, info, losses = _distributed(model, local, steps, **kwargs)
    oracle = _single(model, _squared_errors(x, y), steps, **(reference or kwargs))
    return {
        "diff": relative_difference(mine, oracle),
        "same": _same_on_every_rank(mine.values()),
        "rows": info["rows"],
        "losses": float((losses - _squared_errors(x, y)(model).detach()).abs().max()),
        "bytes": info["communicated_bytes"],
        "gradient_bytes": info["gradient_allreduce_bytes"],
        "communication": info["communication"],
        "backend": info["backend"],
        "safeguard": info.get("safeguard"),
    }


def _check_mlp(rank, world):
    shards, model = SHARDS[world], mlp((3, 8, 8, 2), "tanh", seed=1)
    data = _data(shards, (3,), 2, seed=2)
    return {
        "gram": _compare(model, data, shards, rank, backend="gram", lr=0.5),
        # A step the safeguard shortens: every rank sums the trials' losses and takes the same scale.
        "safeguard": _compare(model, data, shards, rank, backend="gram", lr=8.0),
        # s = 4 columns for 12 rows: a true sketch, equal to the single-process one with the same seed.
        "sketch": _compare(model, data, shards, rank, backend="sketch", lr=0.5, k=2, oversampling=2, seed=7),
        "auto": _compare(model, data, shards, rank, backend="auto", lr=0.5, k=3),
        "microbatch": _compare(model, _data(EVEN_SHARDS[world], (3,), 2, seed=3), EVEN_SHARDS[world], rank,
                               backend="gram", lr=0.5, microbatch_size=2, kappa=1.0),
        # Two steps: the second is scaled by the first's RMSProp statistics, on a subset of tensors.
        "fraction_rmsprop": _compare(model, data, shards, rank, steps=2, backend="sketch", lr=0.5, k=3,
                                     param_fraction=0.5, rmsprop="before", warm_start=True, seed=3, safeguard=None),
        # Element subsets: the gram backend restricts every layer's factors (each rank its own shard's).
        "elements": _compare(model, data, shards, rank, steps=2, backend="gram", lr=0.5, k=3,
                             param_fraction=0.3, mask_by_block=False, weight_decay=0.1, seed=4),
    }


class _Scale(nn.Module):
    """A layer capture has no factors for: its per-sample gradients come from the torch.func fallback."""

    def __init__(self, width):
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, width, dtype=torch.float64))

    def forward(self, x):
        return x * self.weight


def _check_fallback_module(rank, world):
    shards = SHARDS[world]
    torch.manual_seed(14)
    model = nn.Sequential(nn.Linear(3, 6), _Scale(6), nn.Tanh(), nn.Linear(6, 2)).double()
    return _compare(model, _data(shards, (3,), 2, seed=15), shards, rank, backend="gram", lr=0.5)


def _check_exact_sketch(rank, world):
    """rank(J) = 3 <= s = 4: the sketch is the exact step."""
    shards = SHARDS[world]
    torch.manual_seed(0)
    model = nn.Linear(2, 1).double()
    kwargs = dict(lr=0.5, k=2, oversampling=2, rtol=1e-8)
    return _compare(model, _data(shards, (2,), 1, seed=4), shards, rank, backend="sketch",
                    reference=dict(backend="gram", **kwargs), **kwargs)


def _check_cnn(rank, world):
    shards, model = SHARDS[world], small_cnn(outputs=2, seed=5)
    data = _data(shards, (3, 7, 7), 2, seed=6)
    return {
        "gram": _compare(model, data, shards, rank, backend="gram", lr=0.5),
        "sketch": _compare(model, data, shards, rank, backend="sketch", lr=0.5, k=3, oversampling=3, seed=1),
    }


def _check_residual_rows(rank, world):
    """Signed residuals, two rows per sample."""
    shards, model = SHARDS[world], mlp((3, 6, 2), "gelu", seed=8)
    x, y = _data(shards, (3,), 2, seed=9)
    rows = lambda x, y: lambda model: sven_ext.Residuals(model(x) - y)  # noqa: E731
    mine, info, _ = _distributed(model, rows(_shard(x, shards, rank), _shard(y, shards, rank)), backend="gram",
                                 lr=0.3)
    oracle = _single(model, rows(x, y), backend="gram", lr=0.3)
    return {"diff": relative_difference(mine, oracle), "same": _same_on_every_rank(mine.values()),
            "rows": info["rows"]}


def _check_ddp(rank, world):
    """A DDP-wrapped model: Sven's step, no gradient left behind, and DDP still trains afterwards."""
    shards, model = SHARDS[world], mlp((3, 8, 2), "tanh", seed=10)
    x, y = _data(shards, (3,), 2, seed=11)
    oracle = _single(model, _squared_errors(x, y), backend="gram", lr=0.5)
    wrapped = nn.parallel.DistributedDataParallel(copy.deepcopy(model))
    before = [p.detach().clone() for p in wrapped.parameters()]
    optimizer = sven_ext.Sven(wrapped, lr=0.5, backend="gram", process_group=dist.group.WORLD)
    xs, ys = _shard(x, shards, rank), _shard(y, shards, rank)
    optimizer.step(lambda: _squared_errors(xs, ys)(wrapped))
    mine = _deltas(wrapped, before)
    untouched = all(p.grad is None for p in wrapped.parameters())
    _squared_errors(xs, ys)(wrapped).sum().backward()  # an ordinary DDP backward still all-reduces
    grads_agree = _same_on_every_rank([p.grad for p in wrapped.parameters()])
    return {"diff": relative_difference(mine, oracle), "same": _same_on_every_rank(mine.values()),
            "no_grad": untouched, "ddp_backward": grads_agree}


def _failure(rank, world, failing, step_kwargs, setup=None):
    """One step where rank ``failing`` raises; what every rank saw, then a step that works."""
    shards, model = SHARDS[world], mlp((3, 8, 2), "tanh", seed=12)
    x, y = _data(shards, (3,), 2, seed=13)
    xs, ys = _shard(x, shards, rank), _shard(y, shards, rank)
    optimizer = sven_ext.Sven(model, process_group=dist.group.WORLD, **step_kwargs)
    before = [p.detach().clone() for p in model.parameters()]

    def closure():
        out = _squared_errors(xs, ys)(model)
        if setup is None and rank == failing:
            raise ValueError(f"closure failed on rank {rank}")
        return out

    restore = setup(rank) if setup is not None else None
    try:
        optimizer.step(closure)
        seen = {"raised": None}
    except Exception as error:  # noqa: BLE001 - what was raised is the point
        seen = {"raised": type(error).__name__, "message": str(error),
                "peer": isinstance(error, distributed.PeerFailure)}
    finally:
        if restore is not None:
            restore()
    seen["unchanged"] = all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    optimizer.step(lambda: _squared_errors(xs, ys)(model))  # the ranks are still in step
    same = _same_on_every_rank(list(model.parameters()))
    seen["recovered"] = same and not all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    return seen


def _failing_solve(failing):
    """Makes ``solve_gram`` raise on rank ``failing``: a failure after the factors were gathered."""

    def setup(rank):
        if rank != failing:
            return None
        original = gram_module.solve_gram

        def broken(*args, **kwargs):
            raise FloatingPointError("eigh failed on this rank")

        gram_module.solve_gram = broken
        return lambda: setattr(gram_module, "solve_gram", original)

    return setup


def _check_whole_layer(rank, world):
    """Positions looked up once for the whole batch cannot be split by sample: every rank raises."""
    model = tiny_transformer(steps=6, shared_positions=True)  # T = 6: no shard has 6 samples
    idx = torch.randint(0, 11, (SHARDS[world][rank], 6), generator=torch.Generator().manual_seed(rank))
    optimizer = sven_ext.Sven(model, backend="gram", process_group=dist.group.WORLD)
    try:
        optimizer.step(lambda: model(idx).square().mean((1, 2)))
    except NotImplementedError as error:
        return {"raised": "NotImplementedError", "message": str(error)}
    return {"raised": None}


def _check_failures(rank, world):
    last = world - 1
    return {
        "whole_layer": _check_whole_layer(rank, world),
        "closure": _failure(rank, world, last, dict(backend="gram", lr=0.5)),
        "closure_sketch": _failure(rank, world, 0, dict(backend="sketch", lr=0.5, k=2, oversampling=1)),
        "solve": _failure(rank, world, 0, dict(backend="gram", lr=0.5), setup=_failing_solve(0)),
    }


CHECKS = {
    "mlp": _check_mlp,
    "exact_sketch": _check_exact_sketch,
    "cnn": _check_cnn,
    "fallback_module": _check_fallback_module,
    "residual_rows": _check_residual_rows,
    "ddp": _check_ddp,
    "failures": _check_failures,
}


def _worker(rank, world, directory):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{directory}/store", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    results, path = {}, os.path.join(directory, f"rank{rank}.json")
    try:
        for name, check in CHECKS.items():
            started = time.perf_counter()
            results[name] = check(rank, world)
            results[name + "_seconds"] = time.perf_counter() - started
            _write(results, path)  # so far: what the test reports if this rank dies later
    except Exception:  # noqa: BLE001 - reported to the test, which fails with it
        results["error"] = traceback.format_exc()
        _write(results, path)
        return  # the other ranks may wait in a collective: destroying the group could hang
    dist.barrier()  # no rank closes its connections while a peer still finishes a collective
    dist.destroy_process_group()
    # The results are on disk: skip the interpreter's teardown, where gloo's threads can still
    # abort the process (SIGABRT) after everything has passed.
    os._exit(0)


def _write(results, path):
    with open(path + ".part", "w") as f:
        json.dump(results, f)
    os.replace(path + ".part", path)


# ----------------------------------------------------------------------------- test side


def _run(world, directory):
    """Runs the job on ``world`` ranks; every rank's results, failing the test on a hang or an error."""
    os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the spawned ranks before they import torch
    context = mp.start_processes(_worker, args=(world, str(directory)), nprocs=world, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + JOB_SECONDS
    try:
        while not context.join(timeout=max(1.0, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                pytest.fail(f"the {world}-rank job did not finish in {JOB_SECONDS} s (a rank hangs)\n"
                            + _reports(world, directory))
    except ProcessException as died:
        pytest.fail(f"{died}\n{_reports(world, directory)}")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    results = [json.loads((directory / f"rank{r}.json").read_text()) for r in range(world)]
    for rank, result in enumerate(results):
        assert "error" not in result, f"rank {rank}:\n{result['error']}"
    return results


def _reports(world, directory) -> str:
    """What each rank wrote before the job failed: its error, or the checks it finished."""
    lines = []
    for rank in range(world):
        path = directory / f"rank{rank}.json"
        if not path.exists():
            lines.append(f"rank {rank}: wrote nothing")
            continue
        result = json.loads(path.read_text())
        done = [name for name in CHECKS if name in result]
        lines.append(f"rank {rank}: " + (result.get("error") or f"finished the checks {done}"))
    return "\n".join(lines)


@pytest.fixture(scope="module", params=[2, 3], ids=["2-ranks", "3-ranks"])
def job(request, tmp_path_factory):
    world = request.param
    return world, _run(world, tmp_path_factory.mktemp(f"world{world}"))


def _assert_matches(result, rows):
    assert result["diff"] < EXACT, result
    assert result["same"], "the ranks applied different updates"
    assert result["rows"] == rows


def test_mlp_matches_single_process(job):
    world, results = job
    rows = sum(SHARDS[world])
    for rank, result in enumerate(results):
        for name in ("gram", "safeguard", "sketch", "auto", "fraction_rmsprop", "elements"):
            _assert_matches(result["mlp"][name], rows)
            assert result["mlp"][name]["losses"] < 1e-12  # step returns the whole batch's losses
        _assert_matches(result["mlp"]["microbatch"], sum(EVEN_SHARDS[world]) // 2)
        gram = result["mlp"]["gram"]
        assert 0 < gram["bytes"] and gram["gradient_bytes"] > 0
        # The report counts the directions' all-reduce too, not only the factors' gather.
        assert gram["communication"].get("directions", 0) > 0
        assert gram["bytes"] == sum(gram["communication"].values())
        assert result["mlp"]["safeguard"]["safeguard"]["trials"] >= 2
    assert len({json.dumps(r["mlp"]["safeguard"]["safeguard"]) for r in results}) == 1
    # Every rank sends the same amount (padding to the largest shard).
    assert len({r["mlp"]["gram"]["bytes"] for r in results}) == 1


def test_sketch_exact_when_rank_fits(job):
    world, results = job
    for result in results:
        _assert_matches(result["exact_sketch"], sum(SHARDS[world]))
        assert result["exact_sketch"]["backend"] == "sketch"


def test_conv_model(job):
    world, results = job
    for result in results:
        for name in ("gram", "sketch"):
            _assert_matches(result["cnn"][name], sum(SHARDS[world]))


def test_fallback_module(job):
    world, results = job
    for result in results:
        _assert_matches(result["fallback_module"], sum(SHARDS[world]))


def test_signed_residual_rows(job):
    world, results = job
    for result in results:
        _assert_matches(result["residual_rows"], 2 * sum(SHARDS[world]))


def test_ddp_wrapped_model(job):
    _, results = job
    for result in results:
        assert result["ddp"]["diff"] < EXACT and result["ddp"]["same"]
        assert result["ddp"]["no_grad"], "Sven's step left gradients behind (DDP reduced something)"
        assert result["ddp"]["ddp_backward"]


@pytest.mark.parametrize("case,failing", [("closure", -1), ("closure_sketch", 0), ("solve", 0)])
def test_failure_on_one_rank_raises_everywhere(job, case, failing):
    world, results = job
    failing %= world
    for rank, result in enumerate(results):
        seen = result["failures"][case]
        assert seen["unchanged"], f"rank {rank} changed its parameters"
        assert seen["recovered"]
        if rank == failing:
            assert seen["raised"] in ("ValueError", "FloatingPointError") and not seen["peer"]
        else:
            assert seen["raised"] == "PeerFailure" and f"rank(s) [{failing}]" in seen["message"]


def test_layer_without_batch_axis_is_refused(job):
    _, results = job
    for result in results:
        seen = result["failures"]["whole_layer"]
        assert seen["raised"] == "NotImplementedError" and "pos.weight" in seen["message"]


def test_process_group_is_validated():
    model = mlp((3, 4, 1))
    with pytest.raises(TypeError, match="ProcessGroup"):
        sven_ext.Sven(model, process_group=object())
    with pytest.raises(NotImplementedError, match="variable_k"):
        distributed.check_options("gram", True, False)
    with pytest.raises(NotImplementedError, match="dense"):
        distributed.check_options("dense", False, False)
