"""Data-parallel Sven over ``torch.distributed``: one step from the union of every rank's rows.

Each rank runs the closure on its own shard of the batch; the step is the one for the
concatenated batch (rank 0's rows first, then rank 1's, ...), applied identically on every
rank. Sven's rows are samples, so this is not an average of per-rank steps: ``K`` has
cross-rank blocks ``K[i, j] = g_i . g_j`` between per-sample gradients of different ranks.
A step goes:

1. **Capture, then agree.** Each rank captures its per-layer factors (:mod:`sven_ext.capture`)
   and all ranks all-reduce one failure flag per rank, before any data moves.
2. **Gather the factors.** The layout of every rank's factors (dtypes, shapes) goes round with
   ``all_gather_object``; then one padded ``all_gather`` per dtype gives every rank every
   rank's rows and factors, concatenated along the sample axis. This is what the cross terms
   need, exactly and at the least cost: the gram backend's ``K`` pairs rows of different ranks,
   and so does the sketch's core ``M = Q^T J J^T Q = sum_p Z_p^T Z_p``, since
   ``Z_p = J_p^T Q = sum_ranks J_{r,p}^T Q_r`` (summing per-rank cores would drop the cross
   terms). Exchanging ``Z_p`` instead costs ``P s`` numbers per pass, the factors
   ``B (d_in + d_out)`` per layer once.
3. **Solve everywhere.** Every rank forms ``K`` (gram) from the gathered factors and solves:
   the single-process computation on the concatenated batch, repeated on every rank. The
   sketch regenerates its test matrices from the shared seed (nothing is sent) and splits its
   passes over the factors by parameter: each rank forms ``Y = J Omega`` and the core's terms
   ``Z_p^T Z_p`` for its share of the layers, and all-reduces of ``Y`` (``R x s``) and ``M``
   (``s x s``) sum them; then every rank solves the same small problem.
4. **Contract and all-reduce.** Each rank contracts its own rows only, ``J_r^T c_r``, and one
   ``all_reduce`` sums the contributions, like a gradient all-reduce. An all-reduce hands
   every rank the same sum, so every rank applies bitwise the same update.

Failure agreement. Before every data collective that follows work which may fail on one rank
(the closure, the capture, the solve), the ranks all-reduce a flag per rank (:class:`Agreement`). A rank that raised
before it contributes its flag and re-raises its own exception; the others raise
:class:`PeerFailure` naming it. Nothing is applied until the last agreement, so a failure on
any rank leaves the parameters unchanged on every rank, and no rank waits for a peer that
has given up. (A rank that dies or fails inside a collective is left to the process group's
timeout.)

What every rank must share: the initial parameters (a common seed, or DDP's broadcast), the
optimizer's settings (``seed`` included: the sketch's test matrices are drawn from it), and
the arguments of torch.func-fallback modules that are not split by sample (e.g. a mask).
Every hooked layer must keep the batch on axis 0 (a layer recorded whole raises
``NotImplementedError``), and samples must have one shape on every rank.

Bytes. ``communicated_bytes`` counts what one rank sends in the step under ring algorithms
(NCCL's and Gloo's): ``(W - 1) n`` for an all-gather of ``n`` bytes per rank and
``2 (W - 1) / W n`` for an all-reduce of ``n`` bytes, with ``W`` ranks.
``gradient_allreduce_bytes`` is the same count for an all-reduce of the moving parameters'
gradient, the communication of a data-parallel first-order step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import pickle

import torch
import torch.distributed as dist

from .layers import DirectUse, EmbeddingUse, LinearUse, ModuleUse
from .residuals import RowMap, Rows

BACKENDS = ("auto", "gram", "sketch")
_AGREED = "_sven_agreed"  # set on an exception every rank has been told about


class PeerFailure(RuntimeError):
    """Raised on the ranks whose own step went well when another rank's step raised."""


def check_group(group) -> None:
    """Raises unless ``group`` is ``None`` or a process group this process belongs to.

    Raises:
        RuntimeError: ``torch.distributed`` is unavailable or not initialised.
        TypeError: ``group`` is not a ``torch.distributed.ProcessGroup``.
        ValueError: this process is not a member of ``group``.
    """
    if group is None:
        return
    if not dist.is_available():
        raise RuntimeError("process_group was given, but this build of torch has no torch.distributed")
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"process_group must be a torch.distributed ProcessGroup or None, got {type(group).__name__}")
    if not dist.is_initialized():
        raise RuntimeError("process_group was given, but torch.distributed is not initialized: call "
                           "torch.distributed.init_process_group first (torchrun sets up its environment)")
    if dist.get_rank(group) < 0:
        raise ValueError("this process is not a member of process_group")


def check_options(backend: str, variable_k: bool, track_svd_info: bool) -> None:
    """Raises ``NotImplementedError`` for settings that do not run data-parallel."""
    if backend not in BACKENDS:
        raise NotImplementedError(
            f"backend={backend!r} does not run data-parallel (process_group): use one of {BACKENDS}"
        )
    for name, value in (("variable_k", variable_k), ("track_svd_info", track_svd_info)):
        if value:
            raise NotImplementedError(
                f"{name} re-evaluates the batch loss with extra closure calls, which is not available with "
                "process_group in this version of sven_ext"
            )


def sum_over_ranks(group, value: float) -> float:
    """``value`` summed over the ranks of ``group`` (float64), the same on every rank; ``value`` itself
    for ``group=None``."""
    if group is None:
        return value
    total = torch.tensor([value], dtype=torch.float64, device=_device(group))
    dist.all_reduce(total, group=group)
    return float(total)


def without_gradient_sync(model: torch.nn.Module):
    """The context a step's capture runs in: ``model.no_sync()`` for a ``DistributedDataParallel`` model,
    else nothing. Sven differentiates with ``torch.autograd.grad``, which runs no ``AccumulateGrad`` hooks,
    so DDP's gradient all-reduce never fires; ``no_sync`` also keeps DDP's forward from preparing its
    reducer for a backward pass that does not come. Sven reduces the step itself."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return model.no_sync()
    return contextlib.nullcontext()


def _device(group) -> torch.device:
    """Where the group's small tensors live: NCCL moves CUDA tensors only."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class Traffic:
    """Bytes one rank sends, by purpose, under ring algorithms (see the module docstring).

    Args:
        group: the process group (``W`` ranks).
    """

    def __init__(self, group):
        self.world = dist.get_world_size(group)
        self.by_purpose: dict[str, int] = {}

    def _add(self, purpose: str, nbytes: float) -> None:
        self.by_purpose[purpose] = self.by_purpose.get(purpose, 0) + int(round(nbytes))

    def all_gather(self, purpose: str, nbytes_per_rank: int) -> None:
        self._add(purpose, (self.world - 1) * nbytes_per_rank)

    def all_reduce(self, purpose: str, nbytes: int) -> None:
        self._add(purpose, 2 * (self.world - 1) / self.world * nbytes)

    @property
    def total(self) -> int:
        return sum(self.by_purpose.values())


class Agreement:
    """A block that succeeds on every rank of ``group`` or raises on every rank.

    On leaving the block every rank all-reduces one failure flag per rank (unless the
    exception leaving it was already agreed on). A rank whose block raised re-raises its own
    exception; the others raise :class:`PeerFailure` naming the failed ranks. ``group=None``:
    a plain block.

    Args:
        group: the process group, or ``None``.
        traffic: where the flags' bytes are counted (``None``: a counter of its own).
    """

    def __init__(self, group, traffic: Traffic | None = None):
        self.group = group
        self.traffic = traffic if traffic is not None or group is None else Traffic(group)

    def __enter__(self) -> Agreement:
        return self

    def __exit__(self, kind, error, traceback) -> bool:
        if self.group is None or getattr(error, _AGREED, False):
            return False
        rank = dist.get_rank(self.group)
        flags = torch.zeros(dist.get_world_size(self.group), dtype=torch.int32, device=_device(self.group))
        flags[rank] = int(error is not None)
        dist.all_reduce(flags, group=self.group)
        self.traffic.all_reduce("agreement", flags.nbytes)
        if error is not None:
            setattr(error, _AGREED, True)
            return False
        failed = flags.nonzero().flatten().tolist()
        if failed:
            peer = PeerFailure(
                f"the Sven step was abandoned because rank(s) {failed} of the process group raised (see their "
                "error); no parameter changed on any rank"
            )
            setattr(peer, _AGREED, True)
            raise peer
        return False

    def report(self, info: dict) -> None:
        """Adds this agreement's bytes to a step's ``communicated_bytes`` and ``communication``."""
        if self.traffic is None:
            return
        info["communicated_bytes"] += self.traffic.total
        for purpose, nbytes in self.traffic.by_purpose.items():
            info["communication"][purpose] = info["communication"].get(purpose, 0) + nbytes


def gather_factors(group, factors, names: dict) -> tuple[Shard, bool]:
    """Runs ``factors()`` on this rank, agrees, and gathers every rank's rows and factors.

    Args:
        group: the process group.
        factors: ``() -> (rows, uses, checked)``, this rank's capture (it runs the closure).
        names: ``{id(param): name}`` for messages.

    Returns:
        ``(shard, checked)``.

    Raises:
        NotImplementedError: a layer is recorded whole (its output has no batch axis 0).
        ValueError: the ranks' factors do not line up (a different model or sequence length).
    """
    traffic = Traffic(group)
    with Agreement(group, traffic):
        rows, uses, checked = factors()
        parts = [_batch_parts(use, rows, names) for use in uses]
    return Shard(group, rows, uses, parts, names, traffic), checked


class SingleProcess:
    """The reducer of a step in one process: the batch is this process's, and every reduction is the
    local value itself. It has :class:`Shard`'s interface, so the backends run one code path."""

    data_parallel = False

    def __init__(self, rows: Rows, uses: list):
        self.rows, self.uses = rows, uses
        self.local_rows, self.local_uses = rows, uses

    def local(self, c: torch.Tensor) -> torch.Tensor:
        return c

    def reduce(self, compute, purpose: str = "directions") -> list[torch.Tensor]:
        return compute()

    def share(self, items: list, costs: list[float]) -> list:
        return items

    def minimum(self, value: int) -> int:
        return value

    def info(self, params: list[torch.Tensor]) -> dict:
        return {}


def batch_of(group, factors, names: dict) -> tuple[SingleProcess | Shard, bool]:
    """The step's batch and its reducer: ``factors()`` (``() -> (rows, uses, checked)``, this process's
    capture) as it is for ``group=None``, else gathered from every rank (:func:`gather_factors`).

    Returns:
        ``(reducer, checked)``.
    """
    if group is None:
        rows, uses, checked = factors()
        return SingleProcess(rows, uses), checked
    return gather_factors(group, factors, names)


class Shard:
    """This rank's part of a data-parallel step and the whole batch gathered from every rank.

    Built by :func:`gather_factors`.

    Attributes:
        group: the process group; ``rank``, ``world``: this rank and the group's size.
        local_rows, local_uses: this rank's rows and factors (``R_r`` step rows).
        rows: the concatenated batch's rows, detached (``R = sum_r R_r`` step rows).
        uses: the concatenated batch's factors, one use per local use, on every rank.
        offset: where this rank's step rows start in ``rows``.
        traffic: bytes sent so far in this step.
    """

    data_parallel = True

    def __init__(self, group, rows: Rows, uses: list, parts: list, names: dict, traffic: Traffic):
        self.group, self.traffic = group, traffic
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self.local_rows, self.local_uses = rows, uses
        row_tensors = [rows.residual.detach(), rows.per_sample.detach(), rows.losses]
        if rows.row_map is not None:
            row_tensors.append(rows.row_map.weights)
        local = row_tensors + [t for per_sample, per_row in parts for t in (*per_sample, *per_row)]
        layout = {
            "tensors": [(str(t.dtype), tuple(t.shape)) for t in local],
            "uses": [_signature(use, names) for use in uses],
            "scale": rows.scale,
        }
        layouts = [None] * self.world
        dist.all_gather_object(layouts, layout, group=group)
        # all_gather_object sends each rank's pickle length (8 bytes), then the pickles padded to the longest.
        traffic.all_gather("layout", 8 + max(len(pickle.dumps(x)) for x in layouts))
        _check_layouts(layouts)
        gathered = _all_gather_cat(group, local, [x["tensors"] for x in layouts], traffic)
        step_rows = [x["tensors"][0][1][0] for x in layouts]
        self.offset = sum(step_rows[:self.rank])
        residual, per_sample, losses = gathered[:3]
        row_map = None if rows.row_map is None else RowMap(gathered[3], rows.row_map.size)
        self.rows = Rows(residual, per_sample, losses, row_map, rows.scale)
        it = iter(gathered[len(row_tensors):])
        self.uses = [
            _rebuild(use, [next(it) for _ in per_sample], [next(it) for _ in per_row], self.rows.batch_size)
            for use, (per_sample, per_row) in zip(uses, parts)
        ]

    def local(self, c: torch.Tensor) -> torch.Tensor:
        """This rank's slice of a vector ``(R, ...)`` over the concatenated step rows."""
        return c[self.offset:self.offset + self.local_rows.residual.numel()]

    def reduce(self, compute, purpose: str = "directions") -> list[torch.Tensor]:
        """``compute()`` on this rank, agreed on, then summed over the ranks.

        Args:
            compute: ``() -> [tensor]``, this rank's part (e.g. ``J_r^T c_r`` per parameter), one dtype.
            purpose: what the bytes are counted under.

        Returns:
            The sum over the ranks, identical on every rank.
        """
        with Agreement(self.group, self.traffic):
            parts = compute()
        flat = torch.cat([p.reshape(-1) for p in parts])
        dist.all_reduce(flat, group=self.group)
        self.traffic.all_reduce(purpose, flat.nbytes)
        return [chunk.view_as(p) for chunk, p in zip(flat.split([p.numel() for p in parts]), parts)]

    def share(self, items: list, costs: list[float]) -> list:
        """This rank's share of ``items``, the same split on every rank (greedy on ``costs``, order kept)."""
        loads, owner = [0.0] * self.world, {}
        for i in sorted(range(len(items)), key=lambda i: -costs[i]):
            rank = loads.index(min(loads))
            owner[i] = rank
            loads[rank] += costs[i]
        return [item for i, item in enumerate(items) if owner[i] == self.rank]

    def minimum(self, value: int) -> int:
        """The smallest of every rank's ``value`` (e.g. a memory budget every rank must honour)."""
        t = torch.tensor([value], dtype=torch.int64, device=_device(self.group))
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group)
        self.traffic.all_reduce("budget", t.nbytes)
        return int(t)

    def info(self, params: list[torch.Tensor]) -> dict:
        """Diagnostics for ``Sven.last_info``: bytes sent so far and those of a gradient all-reduce."""
        gradient = sum(p.numel() * p.element_size() for p in params)
        return {
            "world_size": self.world,
            "local_rows": self.local_rows.residual.numel(),
            "communicated_bytes": self.traffic.total,
            "communication": dict(self.traffic.by_purpose),
            "gradient_allreduce_bytes": int(round(2 * (self.world - 1) / self.world * gradient)),
        }


# --------------------------------------------------------------------------- factors on the wire


def _batch_parts(use, rows: Rows, names: dict) -> tuple[list, list]:
    """``(per-sample tensors, per-row tensors)`` of a use: what the concatenation extends.

    Raises:
        NotImplementedError: the use's layer was recorded whole (``S = 1`` for a batch of more
            than one sample): its input is not split by sample, so it cannot be concatenated.
    """
    if isinstance(use, LinearUse):
        per_sample, per_row = [use.a], [use.d]
    elif isinstance(use, EmbeddingUse):
        per_sample, per_row = [use.indices], [use.d]
    elif isinstance(use, DirectUse):
        per_sample, per_row = [], [use.g]
    elif isinstance(use, ModuleUse):
        per_sample = [x for x, batched in zip(use.leaves, use.batched) if batched]
        per_row = [d for d in use.d if d is not None]
    else:
        raise TypeError(f"unknown use {type(use).__name__}")
    sequence_first = isinstance(use, ModuleUse) and (any(use.leaf_axes) or any(use.axes))
    whole = getattr(use, "whole", False) or sequence_first or any(t.shape[0] != rows.batch_size for t in per_sample) \
        or any(t.shape[0] != rows.captured.numel() for t in per_row)
    if whole:
        raise NotImplementedError(
            f"parameter(s) {[names.get(id(p), '?') for p in use.params]} belong to a layer whose output has no "
            "batch axis 0 (e.g. positions arange(T) shared by the batch, or sequence-first attention); "
            "data-parallel Sven (process_group) needs every layer to keep the batch on axis 0"
        )
    return per_sample, per_row


def _signature(use, names: dict) -> tuple:
    """What must be equal across ranks for the concatenation to make sense."""
    extra = (tuple(use.batched), tuple(d is None for d in use.d)) if isinstance(use, ModuleUse) else ()
    return (type(use).__name__, tuple(names.get(id(p), "?") for p in use.params), *extra)


def _rebuild(use, per_sample: list, per_row: list, samples: int):
    """The use over the concatenated batch, from its gathered tensors."""
    if isinstance(use, LinearUse):
        return dataclasses.replace(use, a=per_sample[0], d=per_row[0])
    if isinstance(use, EmbeddingUse):
        return dataclasses.replace(use, indices=per_sample[0], d=per_row[0])
    if isinstance(use, DirectUse):
        return dataclasses.replace(use, g=per_row[0])
    gathered_samples, gathered_rows = iter(per_sample), iter(per_row)
    leaves = [next(gathered_samples) if batched else x for x, batched in zip(use.leaves, use.batched)]
    d = [None if x is None else next(gathered_rows) for x in use.d]
    return dataclasses.replace(use, leaves=leaves, d=d, samples=samples)


def _check_layouts(layouts: list) -> None:
    """Every rank must hold the same uses and tensors that differ only along axis 0."""
    first = layouts[0]
    for rank, layout in enumerate(layouts[1:], start=1):
        if layout["scale"] != first["scale"]:
            raise ValueError(
                f"rank {rank} divided its residuals by {layout['scale']} where rank 0 used {first['scale']} (largest "
                "|residual| outside [2^-32, 2^32] on some rank): rescale the losses so that every rank's "
                "residuals are of a moderate size"
            )
        if layout["uses"] != first["uses"] or len(layout["tensors"]) != len(first["tensors"]):
            raise ValueError(
                f"rank {rank} captured different layers than rank 0 ({len(layout['uses'])} uses against "
                f"{len(first['uses'])}): every rank must run the same model on its shard"
            )
        for (dtype, shape), (dtype0, shape0) in zip(layout["tensors"], first["tensors"]):
            if dtype != dtype0 or shape[1:] != shape0[1:]:
                raise ValueError(
                    f"rank {rank} captured a factor of shape {shape} ({dtype}) where rank 0 has {shape0} ({dtype0}): "
                    "the ranks' samples must have the same shape (e.g. pad sequences to one length on every rank)"
                )


def _all_gather_cat(group, tensors: list, layouts: list, traffic: Traffic) -> list:
    """Every rank's ``tensors[i]`` concatenated along axis 0, in rank order, for every ``i``.

    One all-gather per dtype: a rank's tensors of that dtype are flattened into one buffer,
    padded to the longest rank's (``layouts[r]``: rank ``r``'s ``(dtype, shape)`` per tensor).
    """
    world, rank = len(layouts), dist.get_rank(group)
    pieces = [[None] * world for _ in tensors]
    by_dtype: dict = {}
    for i, t in enumerate(tensors):
        by_dtype.setdefault(t.dtype, []).append(i)
    for dtype, index in by_dtype.items():
        wire = torch.uint8 if dtype == torch.bool else dtype  # not every backend moves bool
        sizes = [[math.prod(layouts[r][i][1]) for i in index] for r in range(world)]
        length = max(sum(s) for s in sizes)
        buffer = torch.zeros(length, dtype=wire, device=tensors[index[0]].device)
        buffer[:sum(sizes[rank])] = torch.cat([tensors[i].reshape(-1).to(wire) for i in index])
        received = [torch.empty_like(buffer) for _ in range(world)]
        dist.all_gather(received, buffer, group=group)
        traffic.all_gather("factors", buffer.nbytes)
        for r in range(world):
            parts = received[r].split([*sizes[r], length - sum(sizes[r])])
            for i, part in zip(index, parts):
                pieces[i][r] = part.view(layouts[r][i][1]).to(dtype)
    return [torch.cat(per_rank) for per_rank in pieces]
