"""When a gradient from a backward re-solve of ``y`` can be trusted, and what happens when not.

Backsolve and Quadrature re-solve ``y`` backwards in time; at every output time they visit
(``t_0`` always) the forward pass knew ``y`` exactly, so the difference is measured there
(the *reconstruction check*). The policy, for adaptive and fixed-step solves alike:

- **drift beyond the tolerance** (``reconstruction_warning``, default 100× the tolerance
  scale ``atol + rtol·|y|``) → :class:`ReconstructionWarning`: the gradient is degraded.
  A fixed-step solve has no tolerance: its scale is ``atol + 1e-4·|y|`` (``FIXED_STEP_RTOL``),
  so it warns past about 1 % relative drift.
- **drift as large as y itself** (``reconstruction_error``, default 1:
  ``‖y_back − y_forward‖ / ‖atol + max_i |y(t_i)|‖`` (the size y reaches over the outputs) above 1, every digit lost) or a
  non-finite reconstruction or gradient → :class:`~torchadjoint.SolveError` naming
  ``Checkpointed()`` and ``Direct()``: such a gradient would wreck an optimiser step.
  ``reconstruction_error=None`` opts out (a warning instead, and the number is returned).
- a backward solve that cannot go on (overflow, step underflow) → its SolveError says that
  the reversed dynamics probably explode and names the same alternatives; a non-finite
  vector-Jacobian product is reported as such (which part, at what time), not as a
  non-finite ``f``.
"""
from __future__ import annotations

import math
import warnings
from typing import List, Optional, Sequence

import torch

from ..errors import SolveError
from .base import ReconstructionWarning

FIXED_STEP_RTOL = 1e-4

ALTERNATIVES = (
    "use gradient=Checkpointed() (re-solves y forwards from stored checkpoints) or gradient=Direct() (autograd "
    "through the solver's steps)"
)


def check_threshold(value, owner: str, name: str) -> Optional[float]:
    """Validate a positive threshold or None."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{owner}({name}=...) must be a positive number or None, got {value!r}")
    return float(value)


def judge_reconstruction(owner: str, times: Sequence[float], tol_drift: List[float], rel_drift: List[float],
                         warn_at: Optional[float], error_at: Optional[float], adaptive: bool, stacklevel: int = 3) -> None:
    """Apply the policy above. ``times``, ``tol_drift`` (RMS in tolerance units) and
    ``rel_drift`` (``‖Δy‖ / ‖atol + max_i |y(t_i)|‖``): one entry per output time checked."""
    bad = [i for i, r in enumerate(rel_drift) if not math.isfinite(r) or (error_at is not None and r > error_at)]
    scale = "the backward tolerance" if adaptive else f"atol + {FIXED_STEP_RTOL:g}·|y| (a fixed-step solve)"
    if bad and error_at is not None:
        i = bad[0] if not math.isfinite(rel_drift[bad[0]]) else max(bad, key=lambda j: rel_drift[j])
        raise SolveError(
            times[i],
            f"{owner} re-computed y(t) backwards with an error of {rel_drift[i]:.3g} times |y| itself "
            f"({tol_drift[i]:.3g}x {scale}): the gradient would be garbage. The dynamics are probably contracting "
            f"forwards, hence expanding backwards; {ALTERNATIVES}, or {'tighten rtol/atol' if adaptive else 'take smaller steps'}. To get the "
            f"number anyway, pass {owner}(reconstruction_error=None)",
            "backward",
        )
    i = max(range(len(tol_drift)), key=lambda j: tol_drift[j] if math.isfinite(tol_drift[j]) else math.inf)
    if (warn_at is not None and not tol_drift[i] <= warn_at) or (bad and error_at is None):
        warnings.warn(
            f"{owner} re-computed y(t) with an error of {tol_drift[i]:.3g}x {scale} at t={times[i]:.6g} "
            f"(threshold {warn_at}; at t_0: {tol_drift[-1]:.3g}x): the gradient is not to be trusted. The dynamics "
            f"are probably contracting forwards, hence expanding backwards. {ALTERNATIVES[0].upper()}{ALTERNATIVES[1:]}, "
            f"or {'tighten rtol/atol' if adaptive else 'take smaller steps'}. Raise or silence this check with "
            f"{owner}(reconstruction_warning=... or None).",
            ReconstructionWarning,
            stacklevel=stacklevel,
        )


def refuse_nonfinite_gradient(owner: str, grads: Sequence[Optional[torch.Tensor]], names: Sequence[str], t0: float,
                              error_at: Optional[float]) -> None:
    """SolveError if a gradient the backward pass produced is NaN or inf (unless opted out)."""
    if error_at is None:
        return
    for g, name in zip(grads, names):
        if g is not None and not bool(torch.isfinite(g).all()):
            raise SolveError(
                t0,
                f"the {owner} gradient with respect to {name} is non-finite (NaN or inf). If the backward pass's "
                f"vector-Jacobian products are finite, the reversed dynamics probably overflow; {ALTERNATIVES}. To get "
                f"the number anyway, pass {owner}(reconstruction_error=None)",
                "backward",
            )


def explain_backward_failure(error: SolveError, owner: str, last: Optional[tuple], reverses_y: bool) -> SolveError:
    """A SolveError of a backward solve, told in the adjoint's terms.

    ``last``: ``(t, f(y), a_y, a_y·∂f/∂y, [a_y·∂f/∂θ parts])`` of the backward pass's last
    evaluation (references, no copies): if ``f`` was finite there but a product was not,
    the product is named. Otherwise, for a method that re-solves ``y`` backwards, the
    message adds that the reversed dynamics probably explode and names the alternatives.
    """
    if last is not None:
        t, fy, a, vjp_y, vjp_p = last
        if bool(torch.isfinite(fy).all()) and bool(torch.isfinite(a).all()):
            parts = []
            if vjp_y is not None and not bool(torch.isfinite(vjp_y).all()):
                parts.append("its part for y (a_y·∂f/∂y, the adjoint's dynamics)")
            for g in vjp_p or ():
                if g is not None and not bool(torch.isfinite(g).all()):
                    parts.append("its part for the parameters (a_y·∂f/∂θ)")
                    break
            if parts:
                new = SolveError(
                    t,
                    f"the backward pass's vector-Jacobian product became non-finite (NaN or inf) at t={t:.10g}: "
                    f"{' and '.join(parts)}, while f itself and the adjoint a_y were finite there. Check the "
                    f"backward of the operations in f (a custom autograd.Function, sqrt or log at 0, ...)",
                    "backward",
                )
                return new
    if reverses_y:
        return SolveError(
            error.t,
            f"{error.reason}. The {owner} adjoint re-solves y backwards in time; if the dynamics are contracting "
            f"forwards they explode backwards: {ALTERNATIVES}",
            error.direction,
        )
    return error
