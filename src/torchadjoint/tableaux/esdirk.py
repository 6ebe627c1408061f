"""The ESDIRK tableau: an implicit Runge–Kutta method with an explicit first stage.

``k_1 = f(t0, y0)``, then each stage solves ``Y_i = y0 + h Σ_{j<i} a_ij k_j + γ h f(t_i, Y_i)``
(one nonlinear solve per stage, all with the same matrix ``I - γ h J``). Stiffly
accurate (the last row of ``a`` is ``b``), so ``y1`` is the last stage value and its
derivative is ``f(t1, y1)`` up to the Newton tolerance — close, but not bitwise, so it
is not reused as the next step's first stage (no FSAL; see
:mod:`torchadjoint.implicit.esdirk_step`). The stepping machinery lives in
:mod:`torchadjoint.implicit`; this file holds coefficients and their checks only.

A tableau checks itself when built: rows sum to ``c``, a constant diagonal ``γ`` after
the explicit stage, Butcher's order conditions for ``b`` (the declared order) and for the
embedded ``b - b_error`` (one less), and L-stability (``R(∞) = 0``, ``|R(iy)| ≤ 1``); with a
``dense_order``, the dense output is derived from the order conditions too.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from .base import TableauTensors, cached_cast
from .order_conditions import continuous_extension_of_matrix, order_residuals


@dataclass(frozen=True)
class ESDIRKTableau:
    """An ESDIRK method ``y1 = y0 + h Σ b_i k_i`` with an embedded error estimate.

    Attributes:
        name: the method's name, as accepted by ``solve(method=...)``.
        order: order of ``y1``; the embedded solution has order ``order - 1``.
        c: nodes, length ``s`` (``c[0] == 0``, ``c[-1] == 1``).
        a: rows of the lower-triangular stage matrix *with* its diagonal: row ``i`` has
            ``i + 1`` entries (row 0 is ``(0,)``: the explicit stage).
        b_error: ``b - b_hat`` (sums to 0); ``b`` is the last row of ``a``.
        dense_order: the order of the dense output (None: cubic Hermite through ``y0, y1,
            f0, f1``, order 3). Given, ``dense`` is a continuous extension over the stages
            and ``f1`` of that order and degree
            (:func:`~.order_conditions.continuous_extension_of_matrix`): for kvaerno5,
            order 4, so that what reads the dense output (``interpolation="dense"``,
            Quadrature's Gauss nodes, Checkpointed's stored trajectory) converges with the
            method's order 5 once integrated over a step, not with order 4.
        gamma, b, fsal (False), dense: derived (``dense`` (s + 1, dense_order) or None).
        linear_solver: how Newton's linear systems ``(I - γhJ) x = r`` are solved: a spec
            from :mod:`torchadjoint.implicit.linear_solvers` (None: ``Dense()``, one LU of
            the Jacobian over the whole flattened state). Choose another with
            :meth:`with_linear_solver`; it changes no coefficient.
    """

    name: str
    order: int
    c: tuple
    a: tuple
    b_error: tuple
    gamma: float = field(init=False)
    b: tuple = field(init=False)
    fsal: bool = field(init=False, default=False)
    dense: Optional[tuple] = field(init=False, default=None)
    implicit: bool = field(init=False, default=True)
    linear_solver: Optional[object] = None
    dense_order: Optional[int] = None

    def __post_init__(self):
        s = len(self.c)
        if len(self.a) != s or len(self.b_error) != s:
            raise ValueError(f"tableau {self.name}: c, a and b_error must all have {s} rows")
        if self.c[0] != 0 or self.a[0] != (0.0,):
            raise ValueError(f"tableau {self.name}: the first stage must be explicit (c[0] = 0, a[0] = (0,))")
        for i, row in enumerate(self.a):
            if len(row) != i + 1:
                raise ValueError(f"tableau {self.name}: row {i} of a must have {i + 1} entries, has {len(row)}")
            if abs(sum(row) - self.c[i]) > 1e-10:
                raise ValueError(f"tableau {self.name}: row {i} of a sums to {sum(row)!r}, expected c[{i}] = {self.c[i]!r}")
        gamma = self.a[1][1]
        if any(row[-1] != gamma for row in self.a[1:]):
            raise ValueError(f"tableau {self.name}: the diagonal after the first stage must be constant (γ = {gamma})")
        if self.c[-1] != 1:
            raise ValueError(f"tableau {self.name}: the last node must be 1 (stiffly accurate)")
        object.__setattr__(self, "gamma", float(gamma))
        object.__setattr__(self, "b", tuple(self.a[-1]))  # stiffly accurate: y1 is the last stage
        if abs(sum(self.b_error)) > 1e-10:
            raise ValueError(f"tableau {self.name}: b_error sums to {sum(self.b_error)!r}, expected 0")
        a = self.matrix()
        b = np.asarray(self.b)
        b_hat = b - np.asarray(self.b_error)
        for weights, order, what in ((b, self.order, "b"), (b_hat, self.order - 1, "the embedded b - b_error")):
            for q, residual in enumerate(order_residuals(a, weights, order), start=1):
                if residual > 1e-10:
                    raise ValueError(
                        f"tableau {self.name}: {what} violates the order-{q} conditions (residual {residual:.2e}); "
                        f"declared order {order}"
                    )
        if self.dense_order is not None:
            if not (isinstance(self.dense_order, int) and 3 <= self.dense_order < self.order):
                raise ValueError(f"tableau {self.name}: dense_order must be an int from 3 to order - 1 = "
                                 f"{self.order - 1}, got {self.dense_order!r}")
            # Raises ValueError when the stages carry no extension of that order.
            object.__setattr__(self, "dense", continuous_extension_of_matrix(a, b, self.dense_order, self.dense_order))
        # L-stability: R(z) = 1 + z bᵀ (I - zA)⁻¹ 1 must vanish at infinity and stay in the
        # unit disc on the imaginary axis (A-stability, checked on a grid).
        if abs(self.stability(-1e9)) > 1e-6:
            raise ValueError(f"tableau {self.name}: not L-stable, |R(-1e9)| = {abs(self.stability(-1e9)):.2e}")
        worst = max(abs(self.stability(1j * y)) for y in np.logspace(-3, 4, 300))
        if worst > 1 + 1e-10:
            raise ValueError(f"tableau {self.name}: not A-stable, |R(iy)| reaches {worst:.6f}")

    def matrix(self) -> np.ndarray:
        """The (s, s) stage matrix, diagonal included, float64."""
        s = len(self.c)
        a = np.zeros((s, s))
        for i, row in enumerate(self.a):
            a[i, : i + 1] = row
        return a

    def stability(self, z: complex) -> complex:
        """The stability function ``R(z)`` (the step's factor on ``y' = λy``, ``z = hλ``),
        as ``det(I - zA + z 1bᵀ) / det(I - zA)``: no cancellation for large ``|z|``, unlike
        ``1 + z bᵀ(I - zA)⁻¹1``."""
        a = self.matrix()
        s = a.shape[0]
        one_b = np.outer(np.ones(s), np.asarray(self.b))
        return complex(np.linalg.det(np.eye(s) - z * a + z * one_b) / np.linalg.det(np.eye(s) - z * a))

    @property
    def stages(self) -> int:
        return len(self.c)

    @property
    def adaptive(self) -> bool:
        return True

    def as_tensors(self, dtype: torch.dtype, device: torch.device) -> TableauTensors:
        """Coefficients as tensors: ``a`` (s, s) with the diagonal, ``b``, ``b_error`` (s,);
        ``a_rows[i]`` (i,) the explicit part of row ``i`` (cached per pair: :func:`~.base.cached_cast`)."""
        return cached_cast(self, dtype, device, self._cast)

    def _cast(self, dtype: torch.dtype, device: torch.device) -> TableauTensors:
        a = torch.tensor(self.matrix(), dtype=dtype, device=device)
        b = torch.tensor(self.b, dtype=dtype, device=device)
        be = torch.tensor(self.b_error, dtype=dtype, device=device)
        dense = None if self.dense is None else torch.tensor(self.dense, dtype=dtype, device=device)
        return TableauTensors(a, b, be, dense, tuple(a[i, :i] for i in range(self.stages)))

    def with_linear_solver(self, linear_solver) -> "ESDIRKTableau":
        """The same method with another linear solver for Newton, e.g.
        ``KVAERNO5.with_linear_solver(BatchedDense(batch_size=256))`` for a (256, n) state
        whose rows evolve independently, or ``Krylov()`` (matrix-free GMRES) for a large
        state (see :mod:`torchadjoint.implicit.linear_solvers`). Pass it as ``method=``."""
        from ..implicit.linear_solvers import check_linear_solver

        return dataclasses.replace(self, linear_solver=check_linear_solver(linear_solver))

    def make_stepper(self, controller, f=None):
        """A step function for :func:`~torchadjoint.integrate.integrate` (rk_step's
        signature), holding the Newton machinery of one solve of ``f``."""
        from ..implicit.esdirk_step import ESDIRKStepper

        return ESDIRKStepper(self, controller, f)
