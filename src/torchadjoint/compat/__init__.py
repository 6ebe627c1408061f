"""A torchdiffeq-compatible front door: ``odeint``, ``odeint_adjoint``, ``odeint_event``.

Replace ``from torchdiffeq import odeint_adjoint as odeint`` with
``from torchadjoint import odeint_adjoint as odeint``; see ``docs/migration.md``.
"""
from .methods import NOT_AVAILABLE, TORCHDIFFEQ_METHODS
from .odeint import odeint, odeint_adjoint, odeint_event
from .options import OPTIONS

__all__ = ["odeint", "odeint_adjoint", "odeint_event", "OPTIONS", "TORCHDIFFEQ_METHODS", "NOT_AVAILABLE"]
