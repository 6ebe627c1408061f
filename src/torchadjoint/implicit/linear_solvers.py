"""How Newton's linear systems ``(I - γhJ) x = r`` are solved: the choices a user makes.

An ESDIRK method carries one of these specs (``KVAERNO5.with_linear_solver(...)``; the
default is ``Dense()``); each solve builds an evaluator from it (``spec.evaluator(measured)``)
that computes the Jacobian at a step's start (``evaluator(f, t, y, fy)``) and factorises
``I - γhJ`` (``evaluator.factor(jac, γh)`` -> an object with ``solve``, ``solve_transposed``,
``singular``, ``gamma_h``). The same evaluator serves Newton in the forward steps and the
implicit-function-theorem gradients of ``Direct()``, which need the *exact* Jacobian at the
converged stage.

- :class:`Dense`: the full (n, n) Jacobian (``torch.func.jacrev``, or differences) and one
  LU. Cost O(n) evaluations' worth of autograd and O(n³) per factorisation: the choice for
  small states.
- :class:`BatchedDense`: the state is ``batch_size`` independent systems laid out as the
  rows of a (batch_size, m) tensor (the usual batch of a neural ODE): ``batch_size`` (m, m)
  blocks from ``m`` coloured forward-mode probes, batched LU. Cost O(m) probes and
  O(batch_size · m³) per factorisation instead of O((batch_size·m)³). The assumption is
  checked at every Jacobian with one extra random directional derivative of the whole
  ``f``: rows that interact raise a ValueError naming this option (never a silent wrong
  Jacobian).
- :class:`Krylov`: matrix-free; GMRES with Jacobian-vector products (autograd's double-vjp
  trick on one recorded evaluation of ``f`` per step, or differences when ``f`` is not
  differentiable by autograd), transposed products by ``torch.autograd`` for the gradients. No (n, n) matrix is ever formed: the choice for large states (discretised
  PDEs). A GMRES that does not reach its tolerance counts as a failed Newton iteration
  (the step shrinks).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

from .batched_jacobian import BatchedJacobianEvaluator
from .jacobian import JacobianEvaluator
from .krylov import KrylovEvaluator


@dataclass(frozen=True)
class Dense:
    """The full Jacobian over the flattened state and one LU of ``I - γhJ``."""

    def evaluator(self, measured: Optional[int] = None):

        return JacobianEvaluator(measured)


@dataclass(frozen=True)
class BatchedDense:
    """A block-diagonal Jacobian: the flattened state is ``batch_size`` equal contiguous
    rows (a tensor state of shape (batch_size, ...)) that do not interact through ``f``.

    Checked at every Jacobian of the user's ``f`` (a ValueError if rows interact). For an
    adjoint's backward dynamics (state ``[a_y, a_θ]``) the blocks cover ``a_y`` and the rest
    is left out of the iteration matrix: there it is only Newton's approximation — the
    iteration still converges to the exact stage, or fails and shrinks the step.
    """

    batch_size: int

    def __post_init__(self):
        if not isinstance(self.batch_size, int) or isinstance(self.batch_size, bool) or self.batch_size < 1:
            raise ValueError(f"BatchedDense(batch_size=...) must be a positive integer (the state's leading "
                             f"dimension), got {self.batch_size!r}")

    def evaluator(self, measured: Optional[int] = None):

        return BatchedJacobianEvaluator(self.batch_size, measured)


@dataclass(frozen=True)
class Krylov:
    """Matrix-free Newton–Krylov: restarted GMRES on ``(I - γhJ) x = r`` with products ``Jv``.

    Args:
        rtol: GMRES's relative residual for Newton's corrections (inexact Newton: the
            iteration's own convergence test still decides the stage's accuracy).
        restart: Krylov basis size before a restart.
        max_iterations: products per linear solve before it counts as failed.
        gradient_rtol: relative residual of the transposed solves of ``Direct()``'s
            gradients (None: 1000·eps of the dtype); not reaching it raises.
        preconditioner: optional ``preconditioner(t, y, γh) -> apply``, called once per
            step start and step size, where ``apply(r)`` maps (n,) to (n,) and approximates
            ``(I - γhJ)⁻¹ r`` (e.g. the exact inverse of a PDE's diffusion part). Used as a
            right preconditioner of Newton's solves (any approximation is safe: GMRES still
            solves the unpreconditioned system); the gradients' transposed solves run
            without it.
    """

    rtol: float = 1e-3
    restart: int = 40
    max_iterations: int = 400
    gradient_rtol: Optional[float] = None
    # Not part of equality/hash: any callable will do (the tableau's coefficient cache hashes it).
    preconditioner: Optional[Callable] = field(default=None, compare=False)

    def __post_init__(self):
        for name in ("rtol", "gradient_rtol"):
            value = getattr(self, name)
            if value is None and name == "gradient_rtol":
                continue
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < 1:
                raise ValueError(f"Krylov({name}=...) must be a number in (0, 1), got {value!r}")
        if self.preconditioner is not None and not callable(self.preconditioner):
            raise TypeError(f"Krylov(preconditioner=...) must be a callable (t, y, gamma_h) -> (r -> z), got "
                            f"{type(self.preconditioner).__name__}")
        for name in ("restart", "max_iterations"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Krylov({name}=...) must be a positive integer, got {value!r}")

    def evaluator(self, measured: Optional[int] = None):

        return KrylovEvaluator(self)


LINEAR_SOLVERS = (Dense, BatchedDense, Krylov)


def check_linear_solver(spec):
    """``spec`` itself when it is one of :data:`LINEAR_SOLVERS` (None means ``Dense()``)."""
    if spec is None:
        return Dense()
    if not isinstance(spec, LINEAR_SOLVERS):
        raise TypeError(
            f"linear_solver must be Dense(), BatchedDense(batch_size=...) or Krylov() from "
            f"torchadjoint.implicit, got {spec!r}"
        )
    return spec
