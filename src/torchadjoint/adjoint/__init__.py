"""Gradient methods: how a solve is differentiated.

Each method is an object passed as ``solve(..., gradient=...)``. :func:`gradient_method`
builds one from its name (used by the command line and the torchdiffeq-style front door).
"""
from .backsolve import Backsolve
from .base import AdjointMismatchWarning, GradientMethod, ReconstructionWarning
from .checkpointed import Checkpointed
from .direct import Direct
from .quadrature import Quadrature

GRADIENT_METHODS = {
    "backsolve": Backsolve,
    "checkpointed": Checkpointed,
    "direct": Direct,
    "quadrature": Quadrature,
}


def gradient_method(name: str, **kwargs) -> GradientMethod:
    """The gradient method called ``name`` (see ``GRADIENT_METHODS``), built with ``kwargs``."""
    if not isinstance(name, str) or name not in GRADIENT_METHODS:
        raise ValueError(f"unknown gradient method {name!r}; choose from {sorted(GRADIENT_METHODS)}")
    return GRADIENT_METHODS[name](**kwargs)


__all__ = ["GradientMethod", "Backsolve", "Checkpointed", "Direct", "Quadrature", "ReconstructionWarning", "AdjointMismatchWarning", "GRADIENT_METHODS", "gradient_method"]
