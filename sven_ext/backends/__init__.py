"""Backends: the ways Sven computes its direction. See DESIGN.md section 2."""

from __future__ import annotations

from .base import Backend, StepDirection, StepSettings
from .dense import DenseBackend
from .gram import GramBackend

BACKEND_NAMES = ("auto", "dense", "gram", "sketch", "functional")
_IMPLEMENTED = {"dense": DenseBackend, "gram": GramBackend}


def check_backend_name(name: str) -> None:
    """Raises ``ValueError`` for an unknown name and ``NotImplementedError`` for one not built yet."""
    if name not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {name!r}")
    if name != "auto" and name not in _IMPLEMENTED:
        raise NotImplementedError(
            f"backend {name!r} is not available in this version of sven_ext; "
            f"use one of {tuple(_IMPLEMENTED)} or 'auto'"
        )


def make_backend(name: str, model, params) -> Backend:
    """The backend called ``name`` for ``model`` (``"auto"`` picks one, see :func:`choose_backend`)."""
    check_backend_name(name)
    return _IMPLEMENTED[choose_backend(model, params) if name == "auto" else name](model, params)


def choose_backend(model, params) -> str:
    """The backend ``"auto"`` uses for this model.

    The exact Gram backend: it covers every module (unsupported ones through a
    per-module fallback) in ``O(R^2)`` memory plus the layer factors.
    """
    return "gram"


__all__ = ["Backend", "StepDirection", "StepSettings", "BACKEND_NAMES", "check_backend_name", "make_backend"]
