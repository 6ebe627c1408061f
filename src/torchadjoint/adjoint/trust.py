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

Every method (:class:`ParameterErrorEstimate`): under the seminorm the steps are sized for
``(y, a_y)`` alone, so nothing controls the error of ``a_θ = ∫ a_y ∂f/∂θ dt``. Its embedded
error estimate is accumulated over the backward solve anyway; past ``PARAMETER_ERROR_LIMIT``
times the tolerance the backward pass is redone with ``a_θ`` under error control.
"""
from __future__ import annotations

import math
import warnings
from typing import Callable, List, Optional, Sequence

import torch

from ..errors import SolveError
from ..problem import flat_tolerance
from .base import ReconstructionWarning

FIXED_STEP_RTOL = 1e-4
# a_θ's accumulated error estimate per accepted step (RMS, in units of atol·scale + rtol·|a_θ|)
# past which a seminorm backward pass is redone with a_θ error-controlled. The full norm holds
# each step's estimate to 1; the estimate is the embedded (lower-order) one, which overstates
# the error of the solution kept. Measured over the whole test suite and the README's and
# benchmarks' fields: at most 16.5 (tsit5, scalar state); an under-resolved a_θ (a zero-
# initialised output layer, a forcing switched off by its parameter): 2.9e3 and more.
PARAMETER_ERROR_LIMIT = 100.0

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


class ReconstructionCheck:
    """The reconstruction check of one backward pass: the re-solved ``y`` against the
    forward's at the output times the backward solve lands on (``t_0`` last), then
    :func:`judge_reconstruction`.

    The rule (one for Backsolve and Quadrature): the drift is measured against the
    **backward** solve's tolerances and judged by whether the **backward** method is
    adaptive. The re-solved ``y`` is the backward solve's product, made to the tolerance the
    user set for it: a backward ``rtol`` looser than the forward's accepts more drift, and
    judging it against the forward's would warn about what was asked for (a fixed-step
    backward method has no tolerance at all, whatever the forward's). The backward
    tolerances default to the forward's, so by default the two rules agree.

    ``ys`` (N, n): the forward's outputs. Only the first ``problem.checked_size()`` entries
    are compared (a running cost's integral never feeds back into the dynamics).
    """

    def __init__(self, owner: str, problem, ys: torch.Tensor, backward, warn_at: Optional[float],
                 error_at: Optional[float]):
        self.owner, self.warn_at, self.error_at = owner, warn_at, error_at
        self.adaptive = backward.method.adaptive
        self.times = problem.times
        m = self.size = problem.checked_size()
        self.root_size = math.sqrt(m)
        rtol, atol = (flat_tolerance(problem, v, name) for v, name in ((backward.rtol, "rtol"), (backward.atol, "atol")))
        # Per-entry tolerances (tensors) over the checked entries only.
        self.rtol, self.atol = (x if isinstance(x, float) else x[:m] for x in (rtol, atol))
        if not self.adaptive:  # no tolerance: judged on a relative scale
            self.rtol = FIXED_STEP_RTOL
        # ‖Δy‖ is judged against the size y reaches over the outputs, so that a state passing
        # near 0 at one output time does not read as "every digit lost": one (m,) reduction.
        self.y_size = torch.linalg.vector_norm(self.atol + ys[:, :m].abs().amax(0))
        self.rows = ys.unbind(0) if m == ys.shape[1] else ys[:, :m].unbind(0)
        self.visited: List[float] = []
        self.drifts: List[torch.Tensor] = []  # 2-norms of the scaled drift: RMS = 2-norm / sqrt(m)
        self.relative: List[torch.Tensor] = []  # ‖Δy‖ / ‖atol + max_i |y(t_i)|‖

    def drift(self, i: int, y_back: torch.Tensor) -> torch.Tensor:
        """Record and return the 2-norm of ``(y_back - y(t_i)) / (atol + rtol·|y(t_i)|)`` over
        the checked entries (``y_back``: the re-solved state, (n,) or (m,)); no host sync."""
        y_forward = self.rows[i]
        difference = y_back[: self.size] - y_forward
        self.visited.append(self.times[i])
        self.relative.append(torch.linalg.vector_norm(difference) / self.y_size)
        scaled = torch.linalg.vector_norm(difference / (self.atol + self.rtol * y_forward.abs()))
        self.drifts.append(scaled)
        return scaled

    def errors(self) -> List[float]:
        """The drifts recorded, in tolerance units (RMS), in the order recorded: one host sync."""
        return [e / self.root_size for e in torch.stack(self.drifts).tolist()]

    def judge(self, errors: List[float]) -> None:
        """Warn or raise as the policy above says (``errors``: :meth:`errors`)."""
        judge_reconstruction(self.owner, self.visited, errors, torch.stack(self.relative).tolist(), self.warn_at,
                             self.error_at, self.adaptive, stacklevel=4)


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


class ParameterErrorEstimate:
    """The accumulated local error estimate of ``a_θ`` over a backward solve.

    Each step's local estimate is ``e_s = h Σ_i e_i k_i^θ`` with ``e`` the rule's error
    weights (an RK method's ``b - b̂``) and ``k_i^θ`` the integrand at its nodes. Accumulated
    is ``Σ_s ‖e_s‖`` (2-norm over all parameter entries), not the signed sum ``‖Σ_s e_s‖``:
    when ``∂f/∂θ`` oscillates within a step (``sin(ωt)`` with ``hω ≫ 1``) both rules of the
    pair are aliased, each step's estimate is as wrong as the step's integral, and their
    signs alternate, so a signed sum cancels to a small number while the gradient is off by
    100 % or more (a 37x wrong gradient passed unnoticed that way). The sum of norms is what
    a full norm bounds step by step. Held on the device: no host sync per step; read once by
    :meth:`ratio`.
    """

    def __init__(self):
        self.total: Optional[torch.Tensor] = None  # Σ_s ‖e_s‖, a 0-dim tensor

    def add(self, h: float, weights: Sequence[float], stages: Sequence[Sequence[Optional[torch.Tensor]]]) -> None:
        """``total += ‖h Σ_i weights[i] · stages[i]‖`` over every parameter part (None: zero)."""
        local: dict = {}
        for w, parts in zip(weights, stages):
            if w == 0:
                continue
            for j, part in enumerate(parts):
                if part is None:
                    continue
                if j in local:  # in place: ``local`` owns its tensors (made by ``mul`` below)
                    local[j].add_(part, alpha=h * w)
                else:
                    local[j] = part.mul(h * w)
        if not local:
            return
        # One reduction per part, without a squared copy of each parameter tensor.
        norms = [torch.linalg.vector_norm(e) for e in local.values()]
        self.add_norm(norms[0] if len(norms) == 1 else torch.linalg.vector_norm(torch.stack(norms)))

    def add_norm(self, norm: torch.Tensor) -> None:
        """``total += norm`` (a 0-dim tensor: one step's ``‖e_s‖``, or Quadrature's per-batch
        bound of the sum, see ``quadrature.ParameterQuadrature._accumulate``)."""
        if self.total is None:
            self.total = norm.clone()  # a total of its own: ``norm`` may be a graph's output buffer, reused
        else:
            self.total.add_(norm.to(self.total))

    def rescale(self, factor: float) -> None:
        """Multiply the estimate by ``factor`` (Quadrature: from its lower rule to its Gauss rule)."""
        if self.total is not None:
            self.total = self.total * factor

    def ratio(self, a_theta: Sequence[Optional[torch.Tensor]], rtol: float, atol: float, count: int, steps: int) -> float:
        """``Σ_s ‖e_s‖ / √count / (atol + rtol·RMS(a_θ)) / steps`` over ``count`` entries: the
        estimate in units of the tolerance at the gradient's own scale, per accepted step;
        the full norm holds every step's share to at most 1. 0 when nothing was accumulated;
        inf when non-finite. Judged as a whole, not entry by entry: a parameter whose
        gradient is near 0 would hold its share of the error to ``atol`` alone.
        ``a_theta[j]`` the result for part ``j``; ``atol`` already scaled (``adjoint_scale``)."""
        if self.total is None or count == 0:
            return 0.0
        error = float(self.total)
        size = sum(float(a.pow(2).sum()) for a in a_theta if a is not None)
        value = error / math.sqrt(count) / (atol + rtol * math.sqrt(size / count)) / max(steps, 1)
        return value if math.isfinite(value) else math.inf


def parameter_error_too_large(ratio: float) -> bool:
    """Whether a seminorm backward pass must be redone (see :class:`ParameterErrorEstimate`).
    Not for a non-finite estimate: that is a non-finite gradient, which a redo does not
    mend and :func:`refuse_nonfinite_gradient` reports."""
    return math.isfinite(ratio) and ratio > PARAMETER_ERROR_LIMIT


def seminorm_fallback_stats(first: dict, redo: dict) -> dict:
    """``stats["backward"]`` of a pass redone under the full norm: the redo's, with the
    evaluations of both passes counted, ``seminorm_fallback`` True, and the first pass's
    ``parameter_error`` (what triggered it) and ``seminorm_nfe``."""
    stats = dict(redo)
    for key in ("nfe", "nvjp", "adjoint_nfe", "replay_nfe", "quadrature_nfe", "quadrature_vjps", "compile_seconds",
                "graphs_compiled"):
        if key in first and key in redo:
            stats[key] = first[key] + redo[key]
    stats.update(seminorm_fallback=True, parameter_error=first.get("parameter_error", 0.0), seminorm_nfe=first["nfe"])
    return stats


def with_seminorm_fallback(stats: dict, first_pass: Callable[[], tuple], full_pass: Callable[[], tuple]) -> tuple:
    """The gradients of ``first_pass() -> (gradients, a_θ error estimate)``, or, when that
    estimate is too large (:func:`parameter_error_too_large`: the seminorm's steps left
    ``a_θ`` under-resolved, ``a_y`` smooth while ``∂f/∂θ`` varies fast in ``t``), those of
    ``full_pass()``, a redo with ``a_θ`` under error control. ``stats``: the solution's,
    whose ``"backward"`` entry the passes fill; ``seminorm_fallback`` says which happened."""
    grads, parameter_error = first_pass()
    stats["backward"]["seminorm_fallback"] = False
    if not parameter_error_too_large(parameter_error):
        return grads
    first = stats["backward"]
    grads, _ = full_pass()
    stats["backward"] = seminorm_fallback_stats(first, stats["backward"])
    return grads


class ExplosionGuard:
    """``on_accept`` for a backward solve that re-solves ``y`` (Backsolve, Quadrature), around
    the method's own (or None): ends the solve at once, with a SolveError, when the re-solved
    ``y`` (the first ``n`` entries) has grown past :data:`EXPLOSION_FACTOR` times the largest
    entry of any state the forward stored (``ys``). Dynamics that contract forwards explode backwards; without this the
    solve ran on until the next output time, or, with steps pinned by that growth rather than
    by stability (an implicit method), for minutes until ``max_num_steps``."""

    def __init__(self, on_accept, ys: torch.Tensor, n: int):
        self.on_accept, self.n = on_accept, n
        self.bound = EXPLOSION_FACTOR * max(float(ys.abs().max()), 1.0)

    def __call__(self, info) -> bool:
        ended = self.on_accept(info) if self.on_accept is not None else None
        size = float(info.y1[: self.n].abs().max())
        if not size <= self.bound:
            raise SolveError(info.t1, f"the re-solved y reached |y| = {size:.3g}, over {EXPLOSION_FACTOR:g} times the "
                                      f"largest |y| the forward pass stored: it is exploding backwards (if the "
                                      f"forward's y really passes that high between its output times, "
                                      f"reconstruction_error=None lets the solve run on)", "backward")
        return ended


#: How far past the forward's largest state the re-solved y may grow before the backward
#: solve is ended (reconstruction_error=None lets it run on).
EXPLOSION_FACTOR = 1e3
