"""torchdiffeq's method names, mapped to this library's Butcher tableaux."""
from __future__ import annotations

from typing import Optional

from ..tableaux import METHODS, ButcherTableau
from ..tableaux.rk4_38 import RK4_38

# torchdiffeq's explicit Runge–Kutta solvers. Its "rk4" is Kutta's 3/8 rule
# (rk4_alt_step_func), not the classical tableau, so the outputs agree step for step.
TORCHDIFFEQ_METHODS = {
    "dopri8": METHODS["dopri8"],
    "dopri5": METHODS["dopri5"],
    "bosh3": METHODS["bosh3"],
    "fehlberg2": METHODS["fehlberg2"],
    "adaptive_heun": METHODS["adaptive_heun"],
    "euler": METHODS["euler"],
    "midpoint": METHODS["midpoint"],
    "heun2": METHODS["heun2"],
    "heun3": METHODS["heun3"],
    "rk4": RK4_38,
    # Fixed-step Adams–Bashforth(–Moulton), order 4 (torchadjoint.tableaux.adams).
    "explicit_adams": METHODS["explicit_adams"],
    "implicit_adams": METHODS["implicit_adams"],
    "fixed_adams": METHODS["fixed_adams"],
}
# torchdiffeq solvers that torchadjoint does not provide as a method of its own: scipy_solver
# is served by compat.scipy_solver (scipy on the CPU), except with event_fn.
NOT_AVAILABLE = ("scipy_solver",)
# Every name the front door accepts: torchdiffeq's, plus this library's own (tsit5, ...).
# The torchdiffeq meaning wins where both exist ("rk4").
ALL_METHODS = {**METHODS, **TORCHDIFFEQ_METHODS}


def resolve_method(method: Optional[str], name: str = "method") -> ButcherTableau:
    """The tableau for a torchdiffeq-style method name (``None`` is ``"dopri5"``)."""
    if method is None:
        return TORCHDIFFEQ_METHODS["dopri5"]
    if isinstance(method, ButcherTableau):
        return method
    if not isinstance(method, str):
        raise TypeError(f"{name} must be a method name (str) or None, got {type(method).__name__}")
    if method in NOT_AVAILABLE:
        raise ValueError(
            f"{name}={method!r} (scipy.integrate.solve_ivp) is served for a plain odeint/odeint_adjoint solve, but "
            f"not in this call (with event_fn, say), where the solve runs on torchadjoint's own "
            f"methods {sorted(ALL_METHODS)}. Instead of scipy_solver use 'dopri5' or 'dopri8' (scipy's RK45, DOP853), or the "
            f"implicit 'kvaerno5' (for Radau, BDF, LSODA on stiff problems); 'rk4' is the fixed-step alternative."
        )
    if method not in ALL_METHODS:
        raise ValueError(f"Invalid {name} {method!r}: must be one of {sorted(ALL_METHODS)}")
    return ALL_METHODS[method]


def end_stages(tableau: ButcherTableau) -> int:
    """How many stages a step evaluates at its own end time (``c == 1``)."""
    return sum(1 for c in tableau.c if c == 1)
