"""Backends: the ways Sven computes its direction. See DESIGN.md section 2."""

from __future__ import annotations

from .auto import AutoBackend
from .base import Backend, SketchSettings, StepDirection, StepSettings
from .dense import DenseBackend
from .gram import GramBackend
from .sketch import SketchBackend

BACKEND_NAMES = ("auto", "dense", "gram", "sketch", "functional")
_IMPLEMENTED = {"auto": AutoBackend, "dense": DenseBackend, "gram": GramBackend, "sketch": SketchBackend}


def check_backend_name(name: str) -> None:
    """Raises ``ValueError`` for an unknown name and ``NotImplementedError`` for one not built yet."""
    if name not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {name!r}")
    if name not in _IMPLEMENTED:
        raise NotImplementedError(
            f"backend {name!r} is not available in this version of sven_ext; use one of {tuple(_IMPLEMENTED)}"
        )


def make_backend(name: str, model, params) -> Backend:
    """The backend called ``name`` for ``model`` (``"auto"`` chooses per step, see :mod:`sven_ext.costs`)."""
    check_backend_name(name)
    return _IMPLEMENTED[name](model, params)


__all__ = ["Backend", "StepDirection", "StepSettings", "SketchSettings", "BACKEND_NAMES", "check_backend_name",
           "make_backend"]
