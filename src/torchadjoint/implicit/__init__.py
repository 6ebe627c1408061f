"""Implicit stepping: Jacobians, Newton's method and the ESDIRK step.

The tableaux (coefficients) live in :mod:`torchadjoint.tableaux`; this package holds what
an implicit step needs beyond them. The loop (:mod:`torchadjoint.integrate`) builds one
stepper per solve through ``tableau.make_stepper`` and calls it with ``rk_step``'s
signature, so every gradient method that runs ``integrate`` can use an implicit method.
"""
from .esdirk_step import ESDIRKStepper
from .jacobian import JacobianEvaluator
from .newton import NewtonMatrix, newton_stage

__all__ = ["ESDIRKStepper", "JacobianEvaluator", "NewtonMatrix", "newton_stage"]
