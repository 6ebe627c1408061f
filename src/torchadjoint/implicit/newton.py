"""Simplified Newton iteration for one implicit stage ``Y = base + γh f(t, Y)``.

Every stage of an ESDIRK step (and every retry of a rejected step from the same point)
uses the same iteration matrix ``M = I - γh J``, factorised once (LU); each iteration is
one evaluation of ``f`` and one pair of triangular solves. Convergence is judged as in
Hairer & Wanner (*Solving ODEs II*, §IV.8) and scipy's Radau: with the observed
contraction rate ``ρ``, the remaining error is about ``ρ/(1-ρ)·‖ΔY‖`` (in the error
controller's scaled norm, where 1 is the tolerance); the iteration stops once that is
below ``tol``, and gives up — the step is then rejected and shrunk — when ``ρ ≥ 1`` or
(from the third iteration on) the iterations left could not reach ``tol`` at that rate.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch

FlatFunc = Callable[[float, torch.Tensor], torch.Tensor]

MAX_ITERATIONS = 7


class NewtonMatrix:
    """The LU factorisation of ``I - γh J`` (J (n, n)); :meth:`solve` applies its inverse
    to (n,) vectors and :meth:`solve_transposed` its transpose's. Half precisions are
    factorised in float32 (LAPACK/cuSOLVER have no half LU). The other linear solvers
    (:mod:`.batched_jacobian`, :mod:`.krylov`) offer the same four members; ``solve`` may
    return None when an iterative solve did not converge."""

    def __init__(self, jac: torch.Tensor, gamma_h: float):
        self.gamma_h = gamma_h
        work = jac.float() if jac.dtype in (torch.float16, torch.bfloat16) else jac
        m = torch.eye(jac.shape[0], dtype=work.dtype, device=work.device) - gamma_h * work
        self.lu, self.pivots, info = torch.linalg.lu_factor_ex(m)
        # Exactly singular (γh on an eigenvalue's reciprocal, or a non-finite J): the
        # caller treats it as a failed iteration.
        self.singular = bool(info != 0) or not bool(torch.isfinite(self.lu).all())

    def solve(self, r: torch.Tensor) -> torch.Tensor:
        x = torch.linalg.lu_solve(self.lu, self.pivots, r.to(self.lu.dtype)[:, None])
        return x[:, 0].to(r.dtype)

    def solve_transposed(self, r: torch.Tensor) -> torch.Tensor:
        x = torch.linalg.lu_solve(self.lu, self.pivots, r.to(self.lu.dtype)[:, None], adjoint=True)
        return x[:, 0].to(r.dtype)


class StageSolution(NamedTuple):
    """``y`` (n,) the stage value (None when the iteration failed); ``iterations`` (=
    evaluations of ``f`` = linear solves); ``eta`` the rate estimate ``ρ/(1-ρ)`` for the
    next stage: the largest measured in this one (the carried one when none was)."""

    y: torch.Tensor
    iterations: int
    eta: float


def newton_stage(
    f: FlatFunc,
    t: float,
    base: torch.Tensor,
    gamma_h: float,
    guess: torch.Tensor,
    matrix: NewtonMatrix,
    weight: torch.Tensor,
    tol: float,
    eta: float,
) -> StageSolution:
    """Solve ``Y = base + γh f(t, Y)`` from ``guess``; all (n,), no graph.

    ``weight`` (n,): the controller's tolerance scale (the norm is the RMS of
    ``ΔY / weight``). ``eta``: the rate estimate carried over from the previous stage,
    which lets a first iteration that already moved little be accepted (Hairer's
    ``max(η_old, eps)^0.8``).

    The estimate handed on is the *largest* of this stage's rates, not the last one. The
    next stage's first iteration, which starts from a guess far from the stage value, is
    accepted on it unchecked, and a stage's later iterations can contract far faster than
    its first: an adjoint's ``a_θ`` is bilinear in ``(y, a_y)``, so with ``f`` linear in
    ``y`` the frozen Jacobian leaves ``a_θ`` alone wrong after the first iteration, the
    second fixes it, the third moves nothing (rate ~0). Handing on that ~0 let kvaerno5
    accept single iterations whose ``a_θ`` residual was 119 tolerances (tolerances
    ``rtol = 1e-9`` on a rotation's adjoint), and put a parameter gradient ~50 tolerances
    off; with the largest rate every stage residual stays below 1e-6 tolerances.
    """
    if matrix.singular:
        return StageSolution(None, 0, eta)
    y = guess
    eta = max(eta, torch.finfo(base.dtype).eps) ** 0.8
    previous = None
    # The largest rate estimate measured in this stage: what the next stage's first iteration
    # is judged with (see the docstring's "carried over").
    carried = None
    n_sqrt = math.sqrt(max(base.shape[0], 1))
    for k in range(MAX_ITERATIONS):
        residual = base + gamma_h * f(t, y) - y
        delta = matrix.solve(residual)
        if delta is None:  # an iterative linear solve that did not converge (Krylov)
            return StageSolution(None, k + 1, eta)
        y = y + delta
        norm = float(torch.linalg.vector_norm(delta / weight)) / n_sqrt
        if not math.isfinite(norm):
            return StageSolution(None, k + 1, eta)
        if previous is not None:
            rate = norm / previous if previous > 0 else 0.0
            # Diverging; or, past the first two iterations (often slowed by nonlinearity,
            # then fast), too slow to reach tol in the iterations left.
            if rate >= 1.0 or (k >= 2 and rate ** (MAX_ITERATIONS - 1 - k) / (1.0 - rate) * norm > tol):
                return StageSolution(None, k + 1, eta)
            eta = rate / (1.0 - rate)
            carried = eta if carried is None else max(carried, eta)
        if norm == 0.0 or eta * norm <= tol:
            return StageSolution(y, k + 1, eta if carried is None else carried)
        previous = norm
    return StageSolution(None, MAX_ITERATIONS, eta)
