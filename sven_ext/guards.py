"""What keeps a Sven step atomic and its closure honest (DESIGN.md section 5): the closure's watch,
buffer snapshots, the checks of the optimizer-wide state and of writable parameters, and the
parameter subsets of ``param_fraction``.
"""

from __future__ import annotations

import math

import torch

from .backends.base import ElementSubset
from .safeguard import check_scale
from .update import all_finite


def names_of(model: torch.nn.Module) -> dict:
    """``{id(parameter): name}`` for messages."""
    names = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), name)
    return names


def overlaps_itself(t: torch.Tensor) -> bool:
    """Whether two elements of ``t`` may share memory (an expanded, stride-0 or other self-overlapping view):
    with the dimensions sorted by stride, each stride must step past everything the smaller ones reach."""
    extent = 1
    for stride, size in sorted((stride, size) for size, stride in zip(t.shape, t.stride()) if size > 1):
        if stride < extent:
            return True
        extent += stride * (size - 1)
    return False


class ClosureWatch:
    """What the closure must leave alone: the moving parameters (their version counters count in-place
    writes) and their gradients (a ``backward`` in the closure accumulates into them)."""

    def __init__(self, model: torch.nn.Module, params: list[torch.Tensor]):
        self.model, self.params = model, params
        self.versions = [p._version for p in params]
        self.grads = [(p.grad, None if p.grad is None else p.grad._version) for p in params]
        self.passed = False

    def _edited(self) -> list[str]:
        names = names_of(self.model)
        return [names.get(id(p), "?") for p, version in zip(self.params, self.versions) if p._version != version]

    def _edit_error(self, edited: list[str]) -> ValueError:
        return ValueError(
            f"the closure modified parameter(s) {edited} in place: it must only run the forward pass, since "
            "Sven computes and applies the update itself (edit the parameters before or after step); the "
            "closure's own writes cannot be undone, nothing else was changed"
        )

    def check(self) -> None:
        """Raises ``ValueError`` if the closure that just returned wrote a parameter or called ``backward``."""
        edited = self._edited()
        if edited:
            raise self._edit_error(edited)
        written = [p.grad for p, (grad, version) in zip(self.params, self.grads)
                   if p.grad is not None and (p.grad is not grad or p.grad._version != version)]
        if any(bool(g.any()) for g in written):  # zero_grad(set_to_none=False) writes zeros: harmless
            raise ValueError(
                "the closure called backward(): it must only run the forward pass and return per-sample "
                "losses (or sven_ext.Residuals); Sven differentiates them itself"
            )
        self.passed = True

    def after_failure(self, error: BaseException) -> None:
        """After a failed step: a closure that raised after writing a parameter is named as the cause."""
        if not self.passed and not getattr(error, "_sven_reported", False):
            edited = self._edited()
            if edited:
                raised = self._edit_error(edited)
                raised._sven_reported = True
                raise raised from error


def check_step_state(entry) -> None:
    """The optimizer-wide state ``state["sven"]``: the step counter, the seed, the sketch's basis, the
    safeguard's step scale."""
    if not isinstance(entry, dict) or set(entry) - {"step", "seed", "basis", "scale"}:
        raise ValueError(f"the optimizer state's 'sven' entry must be a dict of 'step', 'seed', 'basis' and 'scale', "
                         "got "
                         f"{sorted(entry) if isinstance(entry, dict) else type(entry).__name__}")
    step = entry.get("step", 0)
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"the optimizer state's step must be an integer >= 0, got {step!r}")
    seed = entry.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"the optimizer state's seed must be an integer, got {seed!r}")
    if "scale" in entry:
        check_scale(entry["scale"])
    basis = entry.get("basis")
    if basis is not None and not (isinstance(basis, torch.Tensor) and basis.dim() == 2 and basis.is_floating_point()
                                  and all_finite([basis])):
        raise ValueError("the optimizer state's basis (the sketch's warm start) must be a finite floating 2-D tensor")


def snapshot_buffers(model: torch.nn.Module) -> list:
    """``(module, name, buffer, copy)`` of every buffer: restores both in-place updates and reassignments."""
    return [(m, name, b, b.clone()) for m in model.modules() for name, b in m._buffers.items() if b is not None]


def restore_buffers(snapshot: list) -> None:
    for module, name, buffer, saved in snapshot:
        module._buffers[name] = buffer
        buffer.copy_(saved)


def draw_element_subsets(model: torch.nn.Module, params: list[torch.Tensor], fraction: float,
                         generator: torch.Generator) -> list[ElementSubset]:
    """One random product set of about ``fraction`` of the elements per parameter
    (``param_fraction`` with ``mask_by_block=False``): ``sqrt(fraction)`` of the first axis times
    ``sqrt(fraction)`` of the rest (adjusted where one side is short), ``fraction`` of a 1-D
    tensor's entries; a layer's bias takes its weight's output units, so that the gram backend
    can restrict the layer's factors."""
    def draw(count: int, size: int) -> torch.Tensor:
        return torch.randperm(size, generator=generator)[:count].sort().values

    weight_of = {id(m.bias): m.weight for m in model.modules()
                 if isinstance(getattr(m, "weight", None), torch.Tensor)
                 and isinstance(getattr(m, "bias", None), torch.Tensor)}
    subsets = {}
    for p in params:
        first, rest = (p.shape[0], p.numel() // max(p.shape[0], 1)) if p.dim() else (1, 1)
        if p.numel() == 0:
            subsets[id(p)] = ElementSubset(torch.zeros(0, dtype=torch.long, device=p.device))
        elif p.dim() > 1:
            units = min(first, max(1, round(math.sqrt(fraction) * first)))
            features = min(rest, max(1, round(fraction * p.numel() / units)))
            units = min(first, max(1, round(fraction * p.numel() / features)))  # where rest is short
            subsets[id(p)] = ElementSubset(draw(units, first).to(p.device), draw(features, rest).to(p.device))
        else:
            subsets[id(p)] = ElementSubset(draw(max(1, round(fraction * first)), first).to(p.device))
    for p in params:
        weight = weight_of.get(id(p))
        if p.dim() == 1 and weight is not None and id(weight) in subsets and weight.shape[0] == p.shape[0]:
            subsets[id(p)] = ElementSubset(subsets[id(weight)].rows)
    return [subsets[id(p)] for p in params]
