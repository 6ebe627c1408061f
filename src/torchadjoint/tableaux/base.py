"""The Butcher tableau: coefficients of one explicit Runge–Kutta method.

A tableau checks itself when it is built (consistency conditions of the method), so a
typo in a coefficient fails at import time rather than as a silently lower order.
Coefficients are stored in float64 and cast once per solve (:meth:`ButcherTableau.as_tensors`).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Optional, Sequence

import numpy as np
import torch

from .order_conditions import order_residuals

_TOL = 1e-12


class TableauTensors(NamedTuple):
    """The tableau cast to one dtype/device. Shapes: ``a`` (s, s) lower triangular,
    ``b`` (s,), ``b_error`` (s,) or None, ``dense`` (s, P) for FSAL methods,
    (s + 1, P) otherwise (the last row multiplies ``f1``), or None; ``a_rows[i]`` (i,)."""

    a: torch.Tensor
    b: torch.Tensor
    b_error: Optional[torch.Tensor]
    dense: Optional[torch.Tensor]
    a_rows: tuple  # a[i, :i] for each stage i, sliced once (the step loop's hot path)


# How many (dtype, device) pairs one tableau keeps its cast coefficients for: a solve uses
# one, a program rarely more than a few (float32 and float64, on the CPU and one GPU).
CAST_CACHE_SIZE = 8


def cached_cast(tableau, dtype: torch.dtype, device: torch.device,
                cast: Callable[[torch.dtype, torch.device], TableauTensors]) -> TableauTensors:
    """``cast(dtype, device)``, computed once per pair and kept on ``tableau`` itself.

    Not ``functools.lru_cache`` on the ``as_tensors`` method: that cache belongs to the
    class, holds ``self`` in its keys and never forgets, so every tableau ever cast (a
    user's, built per solve) stayed alive with its tensors on every device. This cache
    lives in the instance and dies with it; it holds at most ``CAST_CACHE_SIZE`` pairs, the
    oldest dropped first (casting again is a few tiny tensor copies). The tensors hold no
    reference back to the tableau.
    """
    # The tableaux are frozen dataclasses: the cache goes into the instance's __dict__,
    # not through setattr, and is no field (no part of equality, hash or repr).
    cache = tableau.__dict__.setdefault("_cast_cache", {})
    key = (dtype, device)
    found = cache.get(key)
    if found is None:
        # Made as plain tensors even inside a torch.func transform (grad, vmap, jvp), where every
        # tensor made is wrapped for that transform's level: cached, the wrappers outlived it and
        # every later solve computed with them.
        with torch._C._DisableFuncTorch():
            found = cast(dtype, device)
        if len(cache) >= CAST_CACHE_SIZE:
            cache.pop(next(iter(cache)), None)
        cache[key] = found
    return found


@dataclass(frozen=True)
class ButcherTableau:
    """An explicit Runge–Kutta method ``y1 = y0 + h Σ b_i k_i``.

    Attributes:
        name: the method's name, as accepted by ``solve(method=...)``.
        order: order of the propagated solution.
        c: nodes, length ``s`` (``c[0] == 0``).
        a: rows of the strictly lower-triangular stage matrix; row ``i`` has ``i`` entries.
        b: solution weights, length ``s``.
        b_error: ``b - b_hat`` for an embedded error estimate (sums to 0), or ``None``
            for a fixed-step method.
        dense: optional continuous extension as a matrix ``D`` of shape ``(s + 1, P)``:
            ``y(t0 + θh) = y0 + h Σ_j (Σ_p D[j, p] θ^(p+1)) K_j`` over the stages
            ``K = [k_1 … k_s, f(t0 + h, y1)]``. ``None``: cubic Hermite interpolation.
        fsal: derived, not declared — the last stage is ``f(t0 + h, y1)``.
    """

    name: str
    order: int
    c: tuple
    a: tuple
    b: tuple
    b_error: Optional[tuple] = None
    dense: Optional[tuple] = None
    fsal: bool = field(init=False)

    def __post_init__(self):
        s = len(self.c)
        if len(self.a) != s or len(self.b) != s:
            raise ValueError(f"tableau {self.name}: c, a and b must all have {s} rows")
        if self.c[0] != 0:
            raise ValueError(f"tableau {self.name}: c[0] must be 0 for an explicit method")
        for i, row in enumerate(self.a):
            if len(row) != i:
                raise ValueError(f"tableau {self.name}: row {i} of a must have {i} entries, has {len(row)}")
            if abs(sum(row) - self.c[i]) > _TOL * max(1, len(row)) * 100:
                raise ValueError(f"tableau {self.name}: row {i} of a sums to {sum(row)!r}, expected c[{i}] = {self.c[i]!r}")
        if abs(sum(self.b) - 1) > 1e-10:
            raise ValueError(f"tableau {self.name}: b sums to {sum(self.b)!r}, expected 1")
        if self.b_error is not None:
            if len(self.b_error) != s:
                raise ValueError(f"tableau {self.name}: b_error must have {s} entries")
            if abs(sum(self.b_error)) > 1e-10:
                raise ValueError(f"tableau {self.name}: b_error sums to {sum(self.b_error)!r}, expected 0")
        if self.dense is not None:
            d = np.asarray(self.dense, dtype=np.float64)
            if d.shape[0] != s + 1:
                raise ValueError(f"tableau {self.name}: dense must have s + 1 = {s + 1} rows")
            # The continuous extension must reproduce the step's own solution at θ = 1.
            at_one = d.sum(axis=1)
            expected = np.array(list(self.b) + [0.0])
            if self._is_fsal():
                at_one = np.concatenate([at_one[:-2], [at_one[-2] + at_one[-1]], [0.0]])
            if np.max(np.abs(at_one - expected)) > 1e-9:
                raise ValueError(f"tableau {self.name}: dense output at θ=1 does not equal b")
        # The declared order is a claim about b: check it against Butcher's order conditions,
        # so a wrong coefficient or an overstated order fails here, not as a slow solve.
        a_matrix = np.zeros((s, s))
        for i, row in enumerate(self.a):
            a_matrix[i, :i] = row
        residuals = order_residuals(a_matrix, np.asarray(self.b, dtype=np.float64), self.order)
        for q, residual in enumerate(residuals, start=1):
            if residual > 1e-10:
                raise ValueError(
                    f"tableau {self.name}: declared order {self.order}, but b violates the order-{q} "
                    f"conditions (residual {residual:.2e})"
                )
        object.__setattr__(self, "fsal", self._is_fsal())

    def _is_fsal(self) -> bool:
        # First-same-as-last: the last stage is evaluated at (t0 + h, y1), so it is the
        # next step's first stage and need not be computed again.
        return (
            len(self.c) > 1
            and self.c[-1] == 1
            and self.b[-1] == 0
            and all(abs(x - y) <= _TOL for x, y in zip(self.a[-1], self.b[:-1]))
        )

    @property
    def stages(self) -> int:
        return len(self.c)

    @property
    def adaptive(self) -> bool:
        return self.b_error is not None

    def as_tensors(self, dtype: torch.dtype, device: torch.device) -> TableauTensors:
        """The coefficients as tensors of ``dtype`` on ``device`` (cached per pair: :func:`cached_cast`)."""
        return cached_cast(self, dtype, device, self._cast)

    def _cast(self, dtype: torch.dtype, device: torch.device) -> TableauTensors:
        s = self.stages
        a = torch.zeros(s, s, dtype=torch.float64)
        for i, row in enumerate(self.a):
            if row:
                a[i, :i] = torch.tensor(row, dtype=torch.float64)
        b = torch.tensor(self.b, dtype=torch.float64)
        be = None if self.b_error is None else torch.tensor(self.b_error, dtype=torch.float64)
        dense = None
        if self.dense is not None:
            dense = torch.tensor(self.dense, dtype=torch.float64)
            if self.fsal:
                # f1 is the last stage itself: fold its row in, so no f1 is needed.
                dense = torch.cat([dense[:-2], dense[-2:-1] + dense[-1:]])
        cast = lambda x: None if x is None else x.to(dtype=dtype, device=device)  # noqa: E731
        a = cast(a)
        return TableauTensors(a, cast(b), cast(be), cast(dense), tuple(a[i, :i] for i in range(s)))


def quartic_through_midpoint(b: Sequence[float], c_mid: Sequence[float]) -> tuple:
    """Dense-output matrix ``D`` (s+1, 4) of the quartic through ``y0``, ``y1``, both end
    derivatives and a midpoint value ``y(t0 + h/2) = y0 + h Σ c_mid_j K_j``.

    ``c_mid`` has ``s + 1`` entries over ``K = [k_1 … k_s, f1]``. Every condition is linear
    in the stages, so the polynomial's coefficients are fixed linear combinations of them.
    """
    n = len(c_mid)
    y1 = np.array(list(b) + [0.0] * (n - len(b)))
    k1 = np.zeros(n)
    k1[0] = 1.0
    f1 = np.zeros(n)
    f1[-1] = 1.0
    mid = np.asarray(c_mid, dtype=np.float64)
    # p(θ) = k1 θ + c2 θ² + c3 θ³ + c4 θ⁴;  p(1) = y1,  p'(1) = f1,  p(1/2) = mid.
    m = np.array([[1, 1, 1], [2, 3, 4], [1 / 4, 1 / 8, 1 / 16]])
    rhs = np.stack([y1 - k1, f1 - k1, mid - k1 / 2])
    c234 = np.linalg.solve(m, rhs)
    d = np.stack([k1, c234[0], c234[1], c234[2]], axis=1)
    return tuple(tuple(float(x) for x in row) for row in d)


def polynomial_basis_to_dense(polys: Sequence[np.poly1d], stages: int) -> tuple:
    """Dense-output matrix from per-stage weight polynomials ``b_j(θ)`` (no f1 column)."""
    degree = max(p.order for p in polys)
    rows = []
    for p in polys:
        coeffs = p.coeffs[::-1]  # ascending powers
        if abs(coeffs[0]) > 1e-12:
            raise ValueError("dense weight polynomials must vanish at θ = 0")
        row = list(coeffs[1:]) + [0.0] * (degree - (len(coeffs) - 1))
        rows.append(tuple(float(x) for x in row))
    rows += [tuple([0.0] * degree)] * (stages + 1 - len(rows))
    return tuple(rows)


@functools.lru_cache(maxsize=None)
def real_stability_limit(tableau: ButcherTableau) -> float:
    """Where the method's stability region ends on the negative real axis: the largest
    ``x`` with ``|R(-x')| <= 1`` for all ``0 <= x' <= x``, ``R(z) = 1 + z bᵀ(I - zA)⁻¹1``
    the stability function (e.g. about 3.3 for dopri5). An explicit step with ``h·|λ|``
    beyond it grows where the solution decays: stiffness pins ``h`` there. ``inf`` when no
    end is found up to 50 (an A-stable implicit method, whose rows include the diagonal)."""
    s = tableau.stages
    a = np.zeros((s, s))
    for i, row in enumerate(tableau.a):
        a[i, :len(row)] = row
    b, ones = np.asarray(tableau.b, dtype=np.float64), np.ones(s)
    previous = 0.0
    for x in np.arange(0.01, 50.0, 0.01):
        z = -x
        r = 1 + z * b @ np.linalg.solve(np.eye(s) - z * a, ones)
        if abs(r) > 1 + 1e-12:
            return float(previous)
        previous = float(x)
    return math.inf


@functools.lru_cache(maxsize=None)
def stiffness_pair(tableau: ButcherTableau):
    """Two stages evaluated at the same time ``t0 + c h`` (the last such pair), as
    ``(i, j, a_j - a_i)`` with the difference of their stage rows (length s): their
    inputs differ by ``h Σ (a_j - a_i)_k K_k`` and their slopes by ``K_j - K_i``, whose
    ratio estimates the dominant eigenvalue's size |λ| (Hairer & Wanner, *Solving ODEs
    II*, §IV.2, as in DOPRI5's stiffness test). None when no two stages share a time."""
    s = tableau.stages
    rows = [list(row) + [0.0] * (s - len(row)) for row in tableau.a]
    for j in range(s - 1, 0, -1):
        for i in range(j - 1, 0, -1):
            if tableau.c[i] == tableau.c[j]:
                return i, j, tuple(x - y for x, y in zip(rows[j], rows[i]))
    return None
