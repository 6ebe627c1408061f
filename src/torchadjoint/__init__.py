"""torchadjoint: neural ODEs in PyTorch, trained with the continuous adjoint method."""
from .adjoint import GRADIENT_METHODS, AdjointMismatchWarning, Backsolve, Checkpointed, Direct, GradientMethod, Quadrature, ReconstructionWarning, gradient_method
from .compat import odeint, odeint_adjoint, odeint_event
from .errors import SolveError, TimeResolutionWarning, ToleranceWarning
from .events import EventSolution, solve_to_event
from .solution import Solution
from .solve import solve
from .tableaux import ADAPTIVE_METHODS, FIXED_STEP_METHODS, METHODS, ButcherTableau

__version__ = "0.1.0"

__all__ = [
    "solve",
    "solve_to_event",
    "EventSolution",
    "odeint",
    "odeint_adjoint",
    "odeint_event",
    "Solution",
    "SolveError",
    "ToleranceWarning",
    "TimeResolutionWarning",
    "GradientMethod",
    "Backsolve",
    "Checkpointed",
    "Direct",
    "Quadrature",
    "ReconstructionWarning",
    "AdjointMismatchWarning",
    "GRADIENT_METHODS",
    "gradient_method",
    "ButcherTableau",
    "METHODS",
    "ADAPTIVE_METHODS",
    "FIXED_STEP_METHODS",
]
