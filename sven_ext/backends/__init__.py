"""Backends: the ways Sven computes its direction. See DESIGN.md section 2."""

from __future__ import annotations

from .auto import AutoBackend
from .base import Backend, SketchSettings, StepDirection, StepSettings
from .dense import DenseBackend
from .functional import FunctionalBackend
from .gram import GramBackend
from .sketch import SketchBackend

_BACKENDS = {"auto": AutoBackend, "dense": DenseBackend, "gram": GramBackend, "sketch": SketchBackend,
             "functional": FunctionalBackend}
BACKEND_NAMES = tuple(_BACKENDS)


def check_backend_name(name: str) -> None:
    """Raises ``ValueError`` for an unknown backend name."""
    if name not in _BACKENDS:
        raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {name!r}")


def make_backend(name: str, model, params, checks=None) -> Backend:
    """The backend called ``name`` for ``model`` (``"auto"`` chooses per step, see :mod:`sven_ext.costs`);
    ``checks``: see :class:`Backend`."""
    check_backend_name(name)
    return _BACKENDS[name](model, params, checks)


__all__ = ["Backend", "StepDirection", "StepSettings", "SketchSettings", "BACKEND_NAMES", "check_backend_name",
           "make_backend"]
