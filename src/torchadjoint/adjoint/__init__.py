"""Gradient methods: how a solve is differentiated."""
from .backsolve import Backsolve, ReconstructionWarning
from .base import GradientMethod
from .direct import Direct

__all__ = ["GradientMethod", "Backsolve", "Direct", "ReconstructionWarning"]
