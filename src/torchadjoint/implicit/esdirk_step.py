"""One ESDIRK step (explicit first stage, then one Newton solve per stage).

``ESDIRKStepper`` is called by the integration loop exactly like ``rk_step`` and returns
the same ``StepResult``: ``y1`` (n,), ``f1 = None``, ``error`` (n,) the embedded
estimate, ``stages`` (s, n) the stage derivatives ``k_i``. The last stage's derivative
is ``f(t1, y1)`` only to Newton accuracy, so it is not passed on as the next step's first
stage (FSAL): the loop evaluates ``f(t1, y1)`` afresh. That costs one evaluation per step
and makes a step a function of ``(t0, y0, h)`` alone. Stage derivatives of implicit stages are read off the solved stage
equation, ``k_i = (Y_i - base_i) / (γh)``, not re-evaluated: ``y1 = y0 + h Σ b_i k_i``
holds exactly and stiff components are not amplified by the Newton residual.

Jacobian policy: ``J = ∂f/∂y(t0, y0)`` is computed once per step start and reused by
every stage and by every retry of a rejected step from the same point; the LU of
``I - γhJ`` is recomputed only when ``h`` changes, and Newton's rate estimate starts
afresh each step. A step's result thus depends on ``(t0, y0, h)`` alone — not on the
solve's history — which is what lets the checkpointing gradients replay the forward's
steps bitwise (the price: one Jacobian per step, where Radau codes keep one across
steps).

A Newton iteration that fails to converge rejects the step (with an error estimate that
makes the controller halve ``h``); it never raises by itself.
"""
from __future__ import annotations

import torch

from ..controller import SemiNorm
from ..errors import SolveError
from ..step import StepResult
from .implicit_function import attach_stage_gradient
from .linear_solvers import check_linear_solver
from .newton import newton_stage


def _smallest(value) -> float:
    if isinstance(value, torch.Tensor):
        return float(value.min()) if value.numel() else 0.0
    return float(value)


def newton_tolerance(rtol: float) -> float:
    """Where Newton's iteration stops, in the error controller's scaled norm (1 = the tolerance):
    scipy's Radau rule, ``sqrt(rtol)`` but no tighter than ten float64 rounding errors allow,
    with the cap lowered from 0.03 to 1e-3.

    Why the lower cap: a stage converged only to 0.03 of the tolerance passes its error to the
    later stages of an ESDIRK step, each solved on its own, and into the embedded error
    estimate. At loose tolerances that left Robertson's y1(4e5) 117 tolerances off at rtol 1e-3
    and 27 at 1e-4 (float64), with a Newton failure in every other step; with the cap at 1e-3
    the same solves are within 7 and 3 tolerances and take about half the evaluations (2251
    against 5664, 2776 against 5232). At rtol 1e-6 and tighter nothing changes. (The floor
    stays float64's: with float32's, float32 solves came out worse, 338 tolerances off at
    rtol 1e-4 against 70.)
    """
    if rtol <= 0:
        return 1e-3
    return max(10 * 2.2e-16 / rtol, min(1e-3, rtol**0.5))


class ESDIRKStepper:
    """The Newton machinery of one solve with an ESDIRK tableau.

    ``controller``: the solve's :class:`~torchadjoint.controller.PIController`; its
    tolerances scale the Newton convergence test. ``f``: the solve's function (its
    ``feedback_size`` attribute, when present, bounds the Jacobian's nonzero columns).
    ``stats``: ``njev`` (Jacobians; with ``Krylov()``, linearisation points), ``nlu``
    (factorisations), ``nsolve`` (linear solves, = Newton iterations), ``newton_failures``
    (steps rejected because Newton did not converge); with ``Krylov()`` also ``njvp``,
    ``nkrylov``, ``krylov_failures`` (see :mod:`.krylov`). The tableau's ``linear_solver``
    (:mod:`.linear_solvers`) decides how the Jacobian is held and factorised.
    """

    def __init__(self, tableau, controller, f=None):
        self.tableau = tableau
        self.controller = controller
        # How many leading entries of the state feed back into f: an adjoint's dynamics
        # may say so (``feedback_size``: a_θ never does); the seminorm's contract says the
        # same. The Jacobian's other columns are zero and cost no evaluations.
        measured = getattr(f, "feedback_size", None)
        if measured is None and isinstance(controller.norm, SemiNorm):
            measured = controller.norm.measured
        self.jacobian = check_linear_solver(tableau.linear_solver).evaluator(measured)
        self.tol = newton_tolerance(_smallest(controller.rtol))
        self._stats = dict(nlu=0, nsolve=0, newton_failures=0)
        self._jac_at = None  # (t0, y0) the cached Jacobian belongs to
        self._jac = None
        self._matrix = None  # the factorised I - γhJ for the current (point, h)

    @property
    def stats(self) -> dict:
        return dict(njev=self.jacobian.count, **self._stats, **getattr(self.jacobian, "stats", {}))

    def _iteration_matrix(self, f, t0: float, y0: torch.Tensor, f0: torch.Tensor, gamma_h: float, point):
        # ``point``: the caller's y0 tensor itself (not a detached copy, a new object each
        # call), so that the retries of a rejected step from it find its Jacobian.
        if self._jac_at is None or self._jac_at[0] != t0 or self._jac_at[1] is not point:
            self._jac = self.jacobian(f, t0, y0, f0)
            self._jac_at = (t0, point)
            self._matrix = None
        if self._matrix is None or self._matrix.gamma_h != gamma_h:
            self._matrix = self.jacobian.factor(self._jac, gamma_h)
            self._stats["nlu"] += 1
        return self._matrix

    def __call__(self, f, t0: float, y0: torch.Tensor, f0: torch.Tensor, h: float, t1: float, tableau, coeffs) -> StepResult:
        s, c, gamma_h = tableau.stages, tableau.c, tableau.gamma * h
        a = coeffs.a_rows
        with torch.no_grad():
            y0d, f0d = y0.detach(), f0.detach()
            matrix = self._iteration_matrix(f, t0, y0d, f0d, gamma_h, y0)
            weight = self.controller.scale(y0d, y0d)
            ks = y0d.new_empty((s, y0d.shape[0]))
            ks[0] = f0d
            values = [y0d]
            eta = 1.0
            for i in range(1, s):
                ti = t1 if c[i] == 1 else t0 + c[i] * h
                base = torch.addmv(y0d, ks[:i].T, a[i], alpha=h)
                solution = newton_stage(f, ti, base, gamma_h, base + gamma_h * ks[i - 1], matrix, weight, self.tol, eta)
                self._stats["nsolve"] += solution.iterations
                if solution.y is None:
                    self._stats["newton_failures"] += 1
                    if abs(h) <= self.controller.min_step:
                        # The controller accepts any step at min_step: this one has no result.
                        raise SolveError(
                            t0, f"Newton's iteration did not converge at stage {i + 1} even with the step at "
                            f"min_step={self.controller.min_step:.3g}; lower min_step, or loosen rtol/atol")
                    return StepResult(y0, None, self._halving_error(weight, tableau.order), ks)
                eta = solution.eta
                values.append(solution.y)
                ks[i] = (solution.y - base) / gamma_h
        if torch.is_grad_enabled():
            ks = self._with_gradient(f, t0, y0, f0, h, t1, values, tableau, coeffs)
        # Stiffly accurate: y1 is the last stage value (the same sum, up to rounding).
        y1 = torch.addmv(y0, ks.T, coeffs.b, alpha=h)
        error = torch.mv(ks.T, coeffs.b_error) * h
        return StepResult(y1, None, error, ks)

    def _halving_error(self, weight: torch.Tensor, order: int) -> torch.Tensor:
        # An error estimate whose ratio makes the controller halve the step (Hairer's
        # response to a failed Newton iteration): safety · ratio^(-1/order) = 1/2. An
        # infinite one would shrink by dfactor (1/5) and overshoot, then regrow into the
        # same failure.
        ratio = (2.0 * self.controller.safety) ** order
        return weight * ratio

    def _with_gradient(self, f, t0, y0, f0, h, t1, values, tableau, coeffs) -> torch.Tensor:
        """The stage derivatives again, now with the autograd graph of the implicit
        function theorem (see :mod:`.implicit_function`): (s, n), bitwise the values of
        the solve without a graph (the same operations on the same numbers)."""
        s, c, gamma_h, a = tableau.stages, tableau.c, tableau.gamma * h, coeffs.a_rows
        ks = [f0]
        for i in range(1, s):
            ti = t1 if c[i] == 1 else t0 + c[i] * h
            base = torch.addmv(y0, torch.stack(ks).T, a[i], alpha=h)
            y = attach_stage_gradient(f, ti, base, gamma_h, values[i], self.jacobian)
            ks.append((y - base) / gamma_h)
        return torch.stack(ks)
