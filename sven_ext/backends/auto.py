"""``backend="auto"``: capture once, then finish the step with the backend the cost model picks.

The factors are captured first (the closure runs once, as for gram and sketch), so the
choice sees the real shapes of this model and batch; :func:`sven_ext.costs.choose` then
weighs the exact gram backend against the sketch within ``max_memory`` (or the free memory).
``last_info["backend"]`` names what ran and ``last_info["auto_reason"]`` why.
"""

from __future__ import annotations

import torch

from .. import costs
from ..capture import _batch_statistics
from .base import Backend, StepDirection, StepSettings
from .dense import DenseBackend
from .gram import GramBackend
from .sketch import SketchBackend


class AutoBackend(Backend):
    """Chooses gram or sketch per step from the captured factors; dense for models without factors."""

    name = "auto"

    def __init__(self, model: torch.nn.Module, params: list[torch.Tensor], checks=None):
        super().__init__(model, params, checks)
        self.gram = GramBackend(model, params, self.checks)
        self.sketch = SketchBackend(model, params, self.checks)
        self.dense = DenseBackend(model, params, self.checks)
        self._coupled = [name or "<root>" for name, m in model.named_modules() if _batch_statistics(m)]

    def compute(self, closure, settings: StepSettings) -> StepDirection:
        device = self.params[0].device
        budget_given = settings.max_memory is not None
        budget = settings.max_memory if budget_given else costs.available_bytes(device)
        if self._coupled:
            if settings.process_group is not None:
                raise NotImplementedError(
                    f"backend='auto': module(s) {self._coupled} normalise with batch statistics, so only the dense "
                    "backend applies, and it does not run data-parallel (process_group). Call model.eval() "
                    "(running statistics) to use the gram or sketch backend"
                )
            return self._dense(closure, settings, budget, budget_given)
        rows, uses, checked, shard = self.gram.batch_factors(closure, settings)
        if not budget_given:
            budget = shard.minimum(budget)  # data-parallel: every rank must make the same choice
        gram, sketch = self.gram.estimate(rows, uses, settings), self.sketch.estimate(rows, uses, settings)
        name, reason = costs.choose(gram, sketch, self.gram._held(uses, settings), budget, budget_given)
        chosen = self.gram if name == "gram" else self.sketch
        result = chosen.solve(rows, uses, checked, settings, shard)
        # The capture ran on gram's backend, which knows the modules it recorded whole.
        result.info.update(backend=name, auto_reason=reason, recorded_whole=self.gram.recorded_whole)
        return result

    def _dense(self, closure, settings, budget: int, budget_given: bool) -> StepDirection:
        rows = self.dense.rows(closure, settings)
        count, params = rows.residual.numel(), sum(p.numel() for p in self.params)
        fits, reason = costs.dense_fits(count, params, budget, budget_given)
        if not fits:
            raise ValueError(
                f"backend='auto': module(s) {self._coupled} normalise with batch statistics, which couples the "
                f"samples, so only the dense backend applies, and it does not fit ({reason}). Call model.eval() "
                "(running statistics) to use the gram or sketch backend"
            )
        result = self.dense.solve(rows, settings)
        result.info.update(backend="dense", auto_reason=f"{reason}; batch statistics in {self._coupled}")
        return result
