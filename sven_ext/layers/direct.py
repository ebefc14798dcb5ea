"""Parameters whose per-row gradients are small enough to hold: biases, norm affines (DESIGN.md section 3)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .common import first_axis


@dataclass
class DirectUse:
    """Per-row gradients of a small parameter, materialised.

    Attributes:
        param: the parameter.
        g: ``(R, numel)`` per-row gradients, model dtype.
    """

    param: torch.Tensor
    g: torch.Tensor

    @property
    def params(self) -> tuple[torch.Tensor, ...]:
        return (self.param,)

    def rows(self, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
        return self.g[start:stop].to(dtype)

    def direction(self, c: torch.Tensor) -> list[torch.Tensor]:
        return [(self.g.T.to(c.dtype) @ c).view(self.param.shape)]

    def _columns(self, p: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        rest = first_axis(p)[1]
        return self.g[:, lo * rest:hi * rest]

    def pull(self, p: torch.Tensor, lo: int, hi: int, q: torch.Tensor, budget: int) -> torch.Tensor:
        return (self._columns(p, lo, hi).to(q.dtype).T @ q).view(hi - lo, -1, q.shape[1])

    def push(self, p: torch.Tensor, lo: int, hi: int, z: torch.Tensor, budget: int, fused: bool = False):
        return self._columns(p, lo, hi).to(z.dtype) @ z.reshape(-1, z.shape[-1])

    def sketch(self, p, omega, dtype, budget, fused=False):
        return None

    def frobenius_sq(self, dtype: torch.dtype, budget: int) -> float:
        return float(self.g.to(dtype).square().sum())
