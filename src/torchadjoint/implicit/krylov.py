"""Matrix-free Newton–Krylov: GMRES on ``(I - γhJ) x = r`` with Jacobian-vector products.

No Jacobian is formed. :class:`Linearisation` holds ``f`` at a point ``(t, y)`` and applies
``J = ∂f/∂y(t, y)`` to vectors by autograd on one recorded evaluation (``Jv`` by the
double-vjp trick, ``Jᵀu`` — for the gradients of ``Direct()`` — by one backward pass), or
``Jv`` by a forward difference ``(f(y + δv) - f(y)) / δ`` with the usual
``δ = sqrt(eps)·(1 + ‖y‖∞)/‖v‖∞`` when ``f`` is not differentiable by autograd (one call of
``f``). :func:`gmres` is restarted GMRES
(Saad & Schultz 1986) with classical Gram–Schmidt applied twice; the small least-squares problem is solved
on the host each iteration, which also gives the residual for the stopping test.

Forward Newton solves are inexact (relative residual ``rtol``, default 1e-3): the Newton
iteration's own convergence test decides the stage's accuracy, and a GMRES that stalls
counts as a failed iteration (the step shrinks). The transposed solves of the gradients
must be accurate: they run to ``gradient_rtol`` and raise if they cannot get there.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Tuple

import numpy as np
import torch


def gmres(apply: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor, rtol: float, restart: int,
          max_iterations: int) -> Tuple[torch.Tensor, int, bool]:
    """Solve ``A x = b`` (b (n,)) with ``A`` given by ``apply``; returns ``(x, products,
    converged)``, converged when ``‖b - A x‖ ≤ rtol·‖b‖`` (2-norms)."""
    x = torch.zeros_like(b)
    b_norm = float(torch.linalg.vector_norm(b))
    if b_norm == 0.0 or not math.isfinite(b_norm):
        return x, 0, b_norm == 0.0
    target = rtol * b_norm
    products = 0
    residual = b
    while products < max_iterations:
        beta = float(torch.linalg.vector_norm(residual))
        if beta <= target:
            return x, products, True
        basis = [residual / beta]
        hessenberg = np.zeros((restart + 1, restart))
        coefficients = None
        for j in range(min(restart, max_iterations - products)):
            w = apply(basis[j])
            products += 1
            # Classical Gram–Schmidt twice (CGS2: as stable as modified, and one host sync
            # per pass instead of one per basis vector).
            v = torch.stack(basis)
            h1 = v @ w
            w = w - h1 @ v
            h2 = v @ w
            w = w - h2 @ v
            hessenberg[: j + 1, j] = (h1 + h2).cpu().double().numpy()
            hessenberg[j + 1, j] = float(torch.linalg.vector_norm(w))
            if not np.isfinite(hessenberg[: j + 2, j]).all():
                return x, products, False
            rhs = np.zeros(j + 2)
            rhs[0] = beta
            coefficients, *_ = np.linalg.lstsq(hessenberg[: j + 2, : j + 1], rhs, rcond=None)
            left = float(np.linalg.norm(rhs - hessenberg[: j + 2, : j + 1] @ coefficients))
            if left <= target or hessenberg[j + 1, j] <= 1e-14 * beta:  # converged, or the space is exhausted
                break
            basis.append(w / hessenberg[j + 1, j])
        step = torch.stack(basis[: len(coefficients)]).T @ torch.as_tensor(coefficients, dtype=b.dtype, device=b.device)
        x = x + step
        residual = b - apply(x)  # the true residual (the estimate drifts with rounding): restart from it
        products += 1
    return x, products, float(torch.linalg.vector_norm(residual)) <= target


class Linearisation:
    """``J = ∂f/∂y(t, y)`` as an operator: :meth:`jvp` ``Jv``, :meth:`vjp` ``Jᵀu`` (n,).

    One evaluation of ``f`` at ``y`` is recorded (lazily) and every product reuses it:
    ``Jᵀu`` is one backward pass; ``Jv`` is the "double-vjp" trick — ``g(u) = Jᵀu`` recorded
    once with ``create_graph``, then ``Jv = ∂(g·v)/∂u``, one more backward pass — exact, and
    no re-run of ``f`` per product (``torch.func.jvp`` re-runs it, several times slower per
    product on small fields). When ``f``'s output is not connected to ``y`` in the graph (it
    detaches inside, as the adjoints' dynamics do) ``Jv`` falls back to a forward difference.
    """

    def __init__(self, f, t: float, y: torch.Tensor, fy: Optional[torch.Tensor], evaluator: "KrylovEvaluator"):
        self.f, self.t, self.y, self.fy, self.evaluator = f, t, y.detach(), fy, evaluator
        self._graph = None
        self._double = None

    def _recorded(self):
        if self._graph is None:
            with torch.enable_grad():
                x = self.y.clone().requires_grad_(True)
                self._graph = (x, self.f(self.t, x))
        return self._graph

    def jvp(self, v: torch.Tensor) -> torch.Tensor:
        ev = self.evaluator
        ev.stats["njvp"] += 1
        if ev.mode == "autograd":
            if self._double is None:
                x, fx = self._recorded()
                if fx.requires_grad:
                    with torch.enable_grad():
                        u = torch.zeros_like(fx, requires_grad=True)
                        (g,) = torch.autograd.grad(fx, x, u, create_graph=True, allow_unused=True)
                    self._double = (u, g) if g is not None and g.requires_grad else False
                else:
                    self._double = False
                if self._double is False:
                    ev.mode = "differences"
            if ev.mode == "autograd":
                u, g = self._double
                (jv,) = torch.autograd.grad(g, u, v, retain_graph=True, allow_unused=True)
                return torch.zeros_like(v) if jv is None else jv.detach()
        with torch.no_grad():
            if self.fy is None:
                self.fy = self.f(self.t, self.y).detach()
            size = float(v.abs().max())
            if size == 0.0:
                return torch.zeros_like(v)
            eps = torch.finfo(self.y.dtype).eps
            delta = math.sqrt(eps) * (1.0 + float(self.y.abs().max())) / size
            return (self.f(self.t, self.y + delta * v).detach() - self.fy.detach()) / delta

    def vjp(self, u: torch.Tensor) -> torch.Tensor:
        self.evaluator.stats["njvp"] += 1
        x, fx = self._recorded()
        if not fx.requires_grad:  # f does not depend on y (J = 0), as jacrev would also find
            return torch.zeros_like(u)
        (g,) = torch.autograd.grad(fx, x, u, retain_graph=True, allow_unused=True)
        return torch.zeros_like(u) if g is None else g.detach()


class KrylovEvaluator:
    """The evaluator of :class:`~.linear_solvers.Krylov`: ``evaluator(f, t, y, fy)`` ->
    :class:`Linearisation`; ``factor(lin, γh)`` -> :class:`KrylovMatrix`. ``stats``: ``njvp``
    (products ``Jv``/``Jᵀu``), ``nkrylov`` (GMRES solves), ``krylov_failures``."""

    def __init__(self, spec):
        self.spec = spec
        self.count = 0
        self.mode = "autograd"
        self.stats = dict(njvp=0, nkrylov=0, krylov_failures=0)

    def __call__(self, f, t: float, y: torch.Tensor, fy: Optional[torch.Tensor] = None) -> Linearisation:
        self.count += 1
        return Linearisation(f, t, y, fy, self)

    def factor(self, lin: Linearisation, gamma_h: float) -> "KrylovMatrix":
        return KrylovMatrix(lin, gamma_h, self)


class KrylovMatrix:
    """``I - γhJ`` applied by products; :meth:`solve` (Newton, inexact: None when GMRES
    stalls) and :meth:`solve_transposed` (gradients, accurate or RuntimeError)."""

    singular = False

    def __init__(self, lin: Linearisation, gamma_h: float, evaluator: KrylovEvaluator):
        self.lin, self.gamma_h, self.evaluator = lin, gamma_h, evaluator
        build = evaluator.spec.preconditioner
        self.precondition = None if build is None else build(lin.t, lin.y, gamma_h)

    def solve(self, r: torch.Tensor) -> Optional[torch.Tensor]:
        spec, stats = self.evaluator.spec, self.evaluator.stats
        operator = lambda v: v - self.gamma_h * self.lin.jvp(v)  # noqa: E731
        p = self.precondition
        if p is None:
            x, _, converged = gmres(operator, r, spec.rtol, spec.restart, spec.max_iterations)
        else:  # right preconditioning: (A P) z = r, x = P z — the residual tested is A x - r's
            z, _, converged = gmres(lambda v: operator(p(v)), r, spec.rtol, spec.restart, spec.max_iterations)
            x = p(z)
        stats["nkrylov"] += 1
        if not converged:
            stats["krylov_failures"] += 1
            return None
        return x

    def solve_transposed(self, r: torch.Tensor) -> torch.Tensor:
        spec, stats = self.evaluator.spec, self.evaluator.stats
        rtol = spec.gradient_rtol or 1000 * torch.finfo(r.dtype).eps
        limit = max(spec.max_iterations, 2 * r.shape[0])
        x, products, converged = gmres(lambda u: u - self.gamma_h * self.lin.vjp(u), r, rtol, spec.restart, limit)
        stats["nkrylov"] += 1
        if not converged:
            raise RuntimeError(
                f"implicit step at t={self.lin.t:.6g}: GMRES did not solve the transposed Newton system to "
                f"gradient_rtol={rtol:.2g} in {products} products; raise Krylov(max_iterations=...) or "
                f"Krylov(restart=...), loosen gradient_rtol, or use Dense()/BatchedDense() for this gradient"
            )
        return x
