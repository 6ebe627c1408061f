"""Implicit stepping: Jacobians, Newton's method and the ESDIRK step.

The tableaux (coefficients) live in :mod:`torchadjoint.tableaux`; this package holds what
an implicit step needs beyond them. The loop (:mod:`torchadjoint.integrate`) builds one
stepper per solve through ``tableau.make_stepper`` and calls it with ``rk_step``'s
signature, so every gradient method that runs ``integrate`` can use an implicit method.

How Newton's linear systems are solved is the user's choice (:mod:`.linear_solvers`):
``Dense()`` (default), ``BatchedDense(batch_size)`` for a batch of independent rows, or
``Krylov()`` (matrix-free GMRES) for large states, given to a method by
``METHODS["kvaerno5"].with_linear_solver(...)``.
"""
from .esdirk_step import ESDIRKStepper
from .jacobian import JacobianEvaluator
from .linear_solvers import BatchedDense, Dense, Krylov
from .newton import NewtonMatrix, newton_stage

__all__ = ["ESDIRKStepper", "JacobianEvaluator", "NewtonMatrix", "newton_stage", "Dense", "BatchedDense", "Krylov"]
